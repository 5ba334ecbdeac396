"""The dataset manifest: what a TFRecord dataset folder holds, and how it is published whole.

``manifest.json`` (format `qsmgan_tf.records.FORMAT`) lists per split the shards (name, record
count, size, SHA-256, fingerprint), the number of examples and background examples, the source
subjects with their geometry, and an order-independent digest of the example set; plus the
feature spec (shape, dtype, unit of each array), the normalisation (none: ppm stored), the flags
and the code version. The same flags and seed give the same example digest, even though Beam
assigns examples to shards in a different order on each run.

A dataset is written into a hidden temporary folder beside its destination and renamed when
complete (`publish`), so a half-written dataset is never mistaken for a whole one.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import os
import pathlib
import shutil
import subprocess
import uuid
from typing import Any, Iterable, Mapping, Sequence

import qsmgan_tf
from qsmgan_tf import nifti_io
from qsmgan_tf import records
from qsmgan_tf.records import codec
from qsmgan_tf.errors import InputError

NORMALISATION = "none: field (ppm of B0) and target (ppm) are stored as they are; the model normalises"
DIPOLE_CONVENTION = "D(k) = 1/3 - (k.b0)^2/|k|^2, D(0) = 0: a paramagnetic source gives a positive field"


def scan_for_manifest(path) -> dict:
  """Everything the manifest says about one written shard (run in a Beam worker).

  Reads the shard once: SHA-256 of the file and of each record, and per-subject counts of
  brain/background examples taken from each record's meta/ features; plus the fingerprint.
  """
  file_hash = hashlib.sha256()
  hashes = []
  per_subject = collections.defaultdict(lambda: [0, 0])
  for _, data in records.iter_records(path, check_crc=False, file_hash=file_hash):
    hashes.append(hashlib.sha256(data).hexdigest())
    sid, background = codec.origin(data)
    per_subject[sid][background] += 1
  return {
      "name": os.path.basename(str(path)),
      "num_records": len(hashes),
      "size_bytes": os.path.getsize(path),
      "sha256": file_hash.hexdigest(),
      "fingerprint": records.fingerprint(path),
      "record_sha256": hashes,
      "per_subject": dict(per_subject),
  }


def code_version() -> str:
  """Package version, plus the git commit of the checkout when there is one."""
  version = qsmgan_tf.__version__
  root = pathlib.Path(qsmgan_tf.__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  return f"{version}+g{commit}" if commit else version


def build_manifest(*, shard_scans: Mapping[str, Sequence[Mapping]],
                   subjects: Mapping[str, Sequence[Mapping]], patch_config,
                   target: str, flags: Mapping[str, Any] | None = None) -> dict:
  """Assembles ``manifest.json`` from the shard scans and the subject summaries.

  Args:
    shard_scans: per split, the `scan_for_manifest` dicts of its shards.
    subjects: per split, one summary dict per subject (``subject_id``, ``kind``, ``seed``,
      ``shape``, ``voxel_size_mm``, ``b0_dir``, ``snr``, ...).
    patch_config: the `data_prep.patches.PatchConfig` used.
    target: 'chi' or 'cosmos' (what the chi/ feature holds).
    flags: resolved command-line flags, recorded as they are.

  Returns:
    The manifest dict.

  Raises:
    ValueError: a subject in two splits, or shard counts that disagree with the subjects.
  """
  cfg = patch_config
  splits = {}
  digests = {}
  seen = {}
  for split in sorted(shard_scans):
    shards = sorted(shard_scans[split], key=lambda s: s["name"])
    hashes = [h for s in shards for h in s["record_sha256"]]
    per_subject = collections.defaultdict(lambda: [0, 0])
    for s in shards:
      for sid, (n_brain, n_bg) in s["per_subject"].items():
        per_subject[sid][0] += n_brain
        per_subject[sid][1] += n_bg
    details = []
    for subject in sorted(subjects.get(split, []), key=lambda s: s["subject_id"]):
      sid = subject["subject_id"]
      if sid in seen:
        raise ValueError(f"subject {sid} is in both {seen[sid]} and {split}")
      seen[sid] = split
      n_brain, n_bg = per_subject.pop(sid, [0, 0])
      details.append({**subject, "num_examples": n_brain + n_bg, "num_background": n_bg})
    if per_subject:
      raise ValueError(f"{split} shards hold examples of unlisted subjects: {sorted(per_subject)}")
    digests[split] = records.example_set_digest(hashes)
    voxel_sizes = sorted({tuple(d["voxel_size_mm"]) for d in details})
    splits[split] = {
        "num_examples": len(hashes),
        "num_background": sum(d["num_background"] for d in details),
        "subjects": [d["subject_id"] for d in details],
        "subject_details": details,
        "voxel_sizes_mm": [list(v) for v in voxel_sizes],
        "example_digest": digests[split],
        "shards": [{k: s[k] for k in ("name", "num_records", "size_bytes", "sha256",
                                      "fingerprint")} for s in shards],
    }
  overall = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(digests.items())).encode())
  dtypes = cfg.storage_dtypes()
  return {
      "format": records.FORMAT,
      "schema_version": records.SCHEMA_VERSION,
      "code_version": code_version(),
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "generator": "data_prep.make_tfrecords",
      "target": target,
      "features": {
          "field": {"shape": [cfg.input_patch] * 3, "dtype": dtypes["field"],
                    "units": records.ARRAY_UNITS["field"], "content": "local field"},
          "chi": {"shape": [cfg.output_patch] * 3, "dtype": dtypes["chi"],
                  "units": records.ARRAY_UNITS["chi"],
                  "content": "COSMOS" if target == "cosmos" else "susceptibility (truth)"},
          "mask": {"shape": [cfg.output_patch] * 3, "dtype": dtypes["mask"],
                   "units": records.ARRAY_UNITS["mask"], "content": "brain mask"},
      },
      "meta_features": {k: list(v) for k, v in records.META.items()},
      "patches": {
          "input_patch": cfg.input_patch, "output_patch": cfg.output_patch,
          "stride": cfg.stride, "background_fraction": cfg.background_fraction,
          "augment": cfg.augment, "b0_change": cfg.b0_change,
          "chi_scale_range": list(cfg.chi_scale_range), "max_patches": cfg.max_patches,
          "mask_inputs": cfg.mask_inputs,
      },
      "normalisation": NORMALISATION,
      "dipole_convention": DIPOLE_CONVENTION,
      "compression": "none",
      "example_digest": overall.hexdigest(),
      "flags": dict(flags or {}),
      "splits": splits,
  }


def manifest_sha256(data_dir) -> str:
  """SHA-256 of a dataset's manifest.json (what a trained model's contract records)."""
  return records.file_sha256(os.path.join(str(data_dir), records.MANIFEST_NAME))


def write_manifest(data_dir, manifest: Mapping) -> None:
  """Writes ``manifest.json`` atomically (world-readable, like the shards)."""
  path = os.path.join(str(data_dir), records.MANIFEST_NAME)
  nifti_io.write_json(path, dict(manifest))
  os.chmod(path, 0o644)


def staging_dir(out_dir, overwrite: bool = False) -> pathlib.Path:
  """Creates the hidden folder beside ``out_dir`` where a dataset is built.

  Raises:
    InputError: ``out_dir`` exists (without ``overwrite``) or its parent folder does not.
  """
  out = pathlib.Path(out_dir).resolve()
  if out.exists() and not overwrite:
    raise InputError(f"output folder already exists: {out} (pass --overwrite to replace it)")
  if not out.parent.is_dir():
    raise InputError(f"parent folder of --out_dir does not exist: {out.parent}")
  tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  return tmp


def publish(tmp_dir, out_dir) -> None:
  """Renames a finished staging folder to ``out_dir`` (replacing an old dataset whole)."""
  tmp, out = pathlib.Path(tmp_dir), pathlib.Path(out_dir).resolve()
  if not (tmp / records.MANIFEST_NAME).exists():
    raise ValueError(f"{tmp} has no manifest: refusing to publish an unfinished dataset")
  old = None
  if out.exists():
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
  os.replace(tmp, out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def discard(tmp_dir) -> None:
  """Removes a staging folder after a failure."""
  shutil.rmtree(str(tmp_dir), ignore_errors=True)


def summarise_subjects(entries: Iterable[Mapping]) -> dict[str, list[dict]]:
  """Groups subject summaries (each with a ``split`` key) by split."""
  out = collections.defaultdict(list)
  for entry in entries:
    entry = dict(entry)
    out[entry.pop("split")].append(entry)
  return dict(out)
