"""A dataset's shards against its ``manifest.json``: identities, digests and check levels.

Shared by the reader's start-up check (`qsmgan_tf.data.check_dataset`), ``python -m
data_prep.verify`` and the manifest writer (`data_prep.manifest`): a shard is known by its size,
a fingerprint (SHA-256 of its size and first and last 64 KiB), its record count, its file
SHA-256 and the SHA-256 of each record; a split by the order-independent digest of its examples.

Only the 'full' check level parses examples (`codec.decode`, which loads TensorFlow): it imports
the codec when it runs, so that importing this module, and with it ``python -m data_prep.verify
--help`` and the training binary's early ``--data_dir`` check, loads no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Mapping, Sequence

from qsmgan_tf.errors import InputError
from qsmgan_tf.records import schema
from qsmgan_tf.records.framing import ShardError, count_records, iter_records

# Bytes hashed at each end of a shard for its cheap fingerprint.
_FINGERPRINT_BYTES = 1 << 16


@dataclasses.dataclass
class ShardScan:
  """What `scan_shard` found in one shard."""
  path: str
  num_records: int
  size_bytes: int
  sha256: str | None = None
  record_sha256: list[str] | None = None


def fingerprint(path) -> str:
  """SHA-256 of a shard's size and its first and last 64 KiB: cheap, tells shards apart."""
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(_FINGERPRINT_BYTES))
    if size > _FINGERPRINT_BYTES:
      f.seek(max(size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
      h.update(f.read())
  return h.hexdigest()


def file_sha256(path, chunk: int = 1 << 22) -> str:
  """SHA-256 of a whole file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def scan_shard(path, check_crc: bool = False) -> ShardScan:
  """Reads one shard once: record count, size, file SHA-256 and each record's SHA-256.

  Raises:
    ShardError: broken framing (see `iter_records`).
  """
  file_hash = hashlib.sha256()
  hashes = [hashlib.sha256(data).hexdigest()
            for _, data in iter_records(path, check_crc=check_crc, file_hash=file_hash)]
  return ShardScan(path=str(path), num_records=len(hashes), size_bytes=os.path.getsize(path),
                   sha256=file_hash.hexdigest(), record_sha256=hashes)


def example_set_digest(record_sha256: Sequence[str]) -> str:
  """Order-independent digest of a set of examples: SHA-256 over their sorted SHA-256s."""
  h = hashlib.sha256()
  for digest in sorted(record_sha256):
    h.update(digest.encode("ascii") + b"\n")
  return h.hexdigest()


def load_manifest(data_dir) -> dict:
  """Reads and sanity-checks ``DIR/manifest.json``.

  Raises:
    InputError: no dataset there, an unreadable manifest, or another format/schema version.
  """
  path = os.path.join(str(data_dir), schema.MANIFEST_NAME)
  if not os.path.isdir(str(data_dir)):
    raise InputError(f"dataset folder not found: {data_dir}")
  if not os.path.exists(path):
    raise InputError(f"{data_dir} has no {schema.MANIFEST_NAME}: not a finished dataset")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as exc:
    raise InputError(f"{schema.MANIFEST_NAME} in {data_dir} is unreadable: {exc}") from None
  if manifest.get("format") != schema.FORMAT:
    raise InputError(f"{schema.MANIFEST_NAME} in {data_dir} is not a {schema.FORMAT} dataset")
  if manifest.get("schema_version") != schema.SCHEMA_VERSION:
    raise InputError(f"{data_dir}: schema version {manifest.get('schema_version')}, this code "
                     f"reads version {schema.SCHEMA_VERSION}")
  return manifest


def split_entry(manifest: Mapping, split: str, data_dir="") -> Mapping:
  """The manifest's entry for ``split``; InputError naming the available splits otherwise."""
  splits = manifest.get("splits", {})
  if split not in splits:
    raise InputError(f"dataset {data_dir} has no split {split!r} (has: "
                     f"{', '.join(sorted(splits)) or 'none'})")
  return splits[split]


def unlisted_shards(data_dir, manifest: Mapping) -> list[str]:
  """Record files in the folder that the manifest does not list (e.g. from another dataset)."""
  listed = {s["name"] for entry in manifest.get("splits", {}).values() for s in entry["shards"]}
  extra = []
  for name in sorted(os.listdir(str(data_dir))):
    if name in listed:
      continue
    if schema.SHARD_PATTERN.match(name) or ".tfrecord" in name:
      extra.append(name)
  return extra


CHECK_LEVELS = ("exists", "records", "sha256", "full")


def check_shard(data_dir, shard: Mapping, level: str = "records",
                spec: Mapping | None = None) -> list[str] | None:
  """Compares one shard with its manifest entry; raises ShardError on the first difference.

  Levels (each includes the previous ones):
    'exists': the file is there, with the listed size and fingerprint (first/last 64 KiB);
    'records': its record count matches, walking the length headers;
    'sha256': its SHA-256 matches (reads the whole file);
    'full': every record's CRC, feature dtypes and shapes (against ``spec``) are checked.

  Returns:
    With 'full', the SHA-256 of each record (for the example-set digest); else None.
  """
  if level not in CHECK_LEVELS:
    raise ValueError(f"unknown check level {level!r}; expected one of {CHECK_LEVELS}")
  path = os.path.join(str(data_dir), shard["name"])
  if not os.path.isfile(path):
    raise ShardError(path, "missing shard listed in the manifest")
  size = os.path.getsize(path)
  if size != shard["size_bytes"]:
    raise ShardError(path, f"size {size} bytes, manifest says {shard['size_bytes']} "
                     "(truncated or replaced)")
  if fingerprint(path) != shard["fingerprint"]:
    raise ShardError(path, "content differs from the manifest's fingerprint (a shard from "
                     "another dataset, or corrupted)")
  rank = CHECK_LEVELS.index(level)
  if rank >= 1:
    count = count_records(path)
    if count != shard["num_records"]:
      raise ShardError(path, f"{count} records, manifest says {shard['num_records']}")
  hashes = None
  if rank >= 3:
    # Records first: a CRC mismatch names the record, the file hash only the file.
    from qsmgan_tf.records import codec  # pylint: disable=import-outside-toplevel  (loads TF)
    hashes = []
    for index, data in iter_records(path, check_crc=True):
      try:
        arrays, _ = codec.decode(data)
        if spec is not None:
          schema.check_example(arrays, spec)
      except ValueError as exc:
        raise ShardError(path, f"bad example: {exc}", index) from None
      hashes.append(hashlib.sha256(data).hexdigest())
  if rank >= 2 and file_sha256(path) != shard["sha256"]:
    raise ShardError(path, "SHA-256 differs from the manifest (corrupted or replaced)")
  return hashes


def check_split(data_dir, manifest: Mapping, split: str, level: str = "records") -> list[str]:
  """Checks every shard of a split (and that no unlisted shard lies beside them).

  Returns:
    The shard paths, in manifest order.

  Raises:
    ShardError: the first shard that differs from the manifest (one line naming it).
    InputError: no such split.
  """
  entry = split_entry(manifest, split, data_dir)
  extra = unlisted_shards(data_dir, manifest)
  if extra:
    raise ShardError(os.path.join(str(data_dir), extra[0]),
                     "record file not listed in the manifest (foreign or stale shard)")
  paths = []
  for shard in entry["shards"]:
    check_shard(data_dir, shard, level, manifest.get("features"))
    paths.append(os.path.join(str(data_dir), shard["name"]))
  return paths


def locate_data_loss(data_dir, split: str | None = None) -> ShardError | None:
  """Finds the first shard/record whose framing or CRC is broken (after a DataLossError)."""
  try:
    manifest = load_manifest(data_dir)
  except InputError:
    return None
  splits = [split] if split else sorted(manifest.get("splits", {}))
  for name in splits:
    for shard in manifest["splits"].get(name, {}).get("shards", []):
      path = os.path.join(str(data_dir), shard["name"])
      if not os.path.isfile(path):
        return ShardError(path, "missing shard listed in the manifest")
      try:
        for _ in iter_records(path, check_crc=True):
          pass
      except ShardError as exc:
        return exc
  return None
