"""The sharding stages of the Beam pipeline: bundle files in, exactly N planned shards out.

In the 'fileio' and 'reshard' modes of `data_prep.pipeline.WriteOptions`, Beam's TFRecord sink
first writes one file per bundle; these stages index the bundles' records, deal them into N shard
plans in a seeded order over their SHA-256, write each shard (Beam's file sink,
`fileio.WriteToFiles`, or our own copy) and scan it for the manifest. Module-level functions:
Beam pickles them by reference.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterator

import numpy as np

from qsmgan_tf import records
from qsmgan_tf.records import codec


def index_bundle(path) -> list[tuple[str, str, int, int, str, int]]:
  """``(sha256, path, offset, framed length, subject id, background flag)`` of every record
  of one bundle file: all the manifest needs per record, read once.
  """
  out = []
  for offset, length, data in records.iter_spans(path):
    out.append((hashlib.sha256(data).hexdigest(), str(path), offset, length, *codec.origin(data)))
  return out


def plan_shards(index, prefix: str, num_shards: int, seed: int):
  """Deals the records into ``num_shards`` shards: a seeded permutation of the records sorted
  by SHA-256, so the plan depends on the example set only, not on Beam's bundle order.

  Yields:
    ``(shard path, [index entry, ...])`` per shard.
  """
  ordered = sorted(index)
  order = np.random.default_rng(seed).permutation(len(ordered))
  for i in range(num_shards):
    name = f"{prefix}-{i:05d}-of-{num_shards:05d}{records.SHARD_SUFFIX}"
    yield name, [ordered[j] for j in order[i::num_shards]]


def _planned_records(spans) -> Iterator[bytes]:
  """The framed records of a shard plan, read from the bundle files in plan order."""
  sources = {}
  try:
    for _, source, offset, length, _, _ in spans:
      if source not in sources:
        sources[source] = open(source, "rb")  # pylint: disable=consider-using-with
      f = sources[source]
      f.seek(offset)
      yield f.read(length)
  finally:
    for f in sources.values():
      f.close()


def _shard_scan(path, spans, file_sha256: str) -> dict:
  """The manifest scan of a written shard: its file hash, and the rest from its plan."""
  per_subject: dict[str, list[int]] = {}
  for *_, sid, background in spans:
    per_subject.setdefault(sid, [0, 0])[background] += 1
  return {
      "name": os.path.basename(path),
      "num_records": len(spans),
      "size_bytes": os.path.getsize(path),
      "sha256": file_sha256,
      "fingerprint": records.fingerprint(path),
      "record_sha256": [span[0] for span in spans],
      "per_subject": per_subject,
  }


def write_shard(plan) -> dict:
  """Copies framed records into one shard (temp file, then rename); returns its manifest scan."""
  path, spans = plan
  tmp = f"{path}.tmp"
  file_hash = hashlib.sha256()
  with open(tmp, "wb") as out:
    for framed in _planned_records(spans):
      out.write(framed)
      file_hash.update(framed)
  os.replace(tmp, path)
  return _shard_scan(path, spans, file_hash.hexdigest())


def plan_payloads(plan) -> Iterator[tuple[str, bytes | None]]:
  """``(shard name, record data)`` for every record of a shard plan, in plan order.

  All records of a shard come out of this one element, so they reach Beam's file sink within
  one bundle and `fileio.WriteToFiles` writes exactly one file per shard name. A shard with no
  records (more shards than examples) yields ``(name, None)``: the sink creates its file only
  for a destination it sees, and every listed shard must exist.
  """
  path, spans = plan
  name = os.path.basename(path)
  if not spans:
    yield name, None
  for framed in _planned_records(spans):
    yield name, framed[12:-4]


@functools.cache
def _tfrecord_sink_class():
  """A `fileio.FileSink` that frames records as `WriteToTFRecord` does (Beam's own code)."""
  from apache_beam.io import fileio  # pylint: disable=import-outside-toplevel
  from apache_beam.io import tfrecordio  # pylint: disable=import-outside-toplevel

  class TFRecordFileSink(fileio.FileSink):
    """Writes the data of ``(shard name, data)`` elements as TFRecords."""

    def open(self, fh):
      self._fh = fh  # pylint: disable=attribute-defined-outside-init

    def write(self, record):
      if record[1] is None:  # an empty shard: its file, opened for it, stays empty
        return
      # Beam ships no TFRecord `FileSink`; this is the framing `WriteToTFRecord` uses
      # (length, CRC-32C, data, CRC-32C). The data CRC is checked by the 'full' verify level.
      tfrecordio._TFRecordUtil.write_record(self._fh, record[1])  # pylint: disable=protected-access

    def flush(self):
      self._fh.flush()

  return TFRecordFileSink


def tfrecord_sink(destination):
  """The `WriteToFiles` sink for any destination (built on the worker, never pickled)."""
  del destination
  return _tfrecord_sink_class()()


def shard_destination(name_data) -> str:
  return name_data[0]


def shard_file_name(window, pane, shard_index, total_shards, compression,  # pylint: disable=unused-argument
                     destination) -> str:
  """`WriteToFiles` naming: a destination is a shard's final name, and must be one file.

  Raises:
    RuntimeError: Beam wrote a shard's records into more than one file (they reached the sink
      in several bundles, or spilled past ``max_writers_per_bundle``).
  """
  if total_shards != 1:
    raise RuntimeError(f"Beam wrote {total_shards} files for {destination}, not one")
  return destination


def plan_by_name(plan) -> tuple[str, list]:
  path, spans = plan
  return os.path.basename(path), spans


def scan_written(file_result, out_dir, plans: dict) -> dict:
  """The manifest scan of a shard `WriteToFiles` has moved into ``out_dir``.

  Reads the shard once (every length CRC checked, the file hashed) and checks its record count
  against its plan; record digests and subjects come from the plan, as with `write_shard`.

  Raises:
    RuntimeError: the shard does not hold the planned number of records.
  """
  path = os.path.join(out_dir, file_result.file_name)
  spans = plans[file_result.file_name]
  file_hash = hashlib.sha256()
  count = sum(1 for _ in records.iter_records(path, check_crc=False, file_hash=file_hash))
  if count != len(spans):
    raise RuntimeError(f"{file_result.file_name} holds {count} records, {len(spans)} planned")
  return _shard_scan(path, spans, file_hash.hexdigest())
