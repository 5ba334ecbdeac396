"""Integrity: every way a dataset can be broken gives one line naming the file, exit 2."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from data_prep import patches
from data_prep import pipeline
from data_prep import subject_specs
from data_prep import verify
from qsmgan_tf import data
from qsmgan_tf import records
from qsmgan_tf.errors import InputError
from qsmgan_tf.records import codec

import shard_helpers  # tests/shard_helpers.py

_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("verify")
  out = {}
  for seed in (1, 2):  # the second dataset supplies "foreign" shards
    specs = subject_specs.synthetic_specs(0, 3, seed, val_fraction=0.34, shape=(32, 32, 32))
    pipeline.make_dataset(specs, patches.PatchConfig(16, 8, 8), root / f"ds{seed}",
                          pipeline.WriteOptions(train_shards=2, val_shards=1))
    out[seed] = root / f"ds{seed}"
  return out


def _verify_cli(path):
  env = dict(os.environ, PYTHONPATH=str(_ROOT))
  proc = subprocess.run([sys.executable, "-m", "data_prep.verify", str(path)],
                        capture_output=True, text=True, env=env, timeout=120)
  return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()


def _shard(path, index=1):
  return records.load_manifest(path)["splits"]["train"]["shards"][index]["name"]


def _truncate(ds, other):
  name = _shard(ds)
  with open(ds / name, "r+b") as f:
    f.truncate(os.path.getsize(ds / name) - 100)
  return name, "size"


def _flip(ds, other):
  name = _shard(ds)
  index, offset = shard_helpers.record_past_fingerprint(ds / name)
  blob = bytearray((ds / name).read_bytes())
  blob[offset + 12 + 1000] ^= 0xFF  # inside a record's data: size and count unchanged
  (ds / name).write_bytes(bytes(blob))
  return name, rf"record {index}: corrupted record data \(CRC mismatch\)"


def _delete(ds, other):
  name = _shard(ds)
  (ds / name).unlink()
  return name, "missing shard"


def _add_foreign(ds, other):
  # An extra shard from another dataset, under a name the manifest does not list.
  name = "train-00002-of-00003.tfrecord"
  shutil.copy(other / _shard(other, 0), ds / name)
  return name, "not listed in the manifest"


def _replace_foreign(ds, other):
  # Same name, another dataset's content.
  name = _shard(ds, 0)
  shutil.copy(other / name, ds / name)
  return name, "size|fingerprint"


_BREAKAGES = [_truncate, _flip, _delete, _add_foreign, _replace_foreign]


def test_intact_dataset_verifies(built):
  code, stdout, _ = _verify_cli(built[1])
  assert code == 0 and stdout.startswith("ok:")
  assert verify.verify_dataset(built[1]).keys() == {"train", "val"}


@pytest.mark.parametrize("breakage", _BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_broken_dataset_is_reported_by_name(built, tmp_path, breakage):
  ds = tmp_path / "ds"
  shutil.copytree(built[1], ds)
  name, reason = breakage(ds, built[2])
  code, _, stderr = _verify_cli(ds)
  assert code == 2
  assert len(stderr) == 1 and stderr[0].startswith(f"error: {name}: "), stderr
  assert re.search(reason, stderr[0]), stderr
  if breakage is not _flip:
    # The reader's default start-up check (sizes, fingerprints, counts) stops it too.
    with pytest.raises(records.ShardError, match=name):
      data.make_dataset(ds, "train", 2)


def test_digest_detects_a_swapped_record(built, tmp_path):
  # A record swapped for another dataset's, with the shard's manifest entry (size, hash,
  # fingerprint) updated to match: only the example-set digest can notice.
  ds = tmp_path / "ds"
  shutil.copytree(built[1], ds)
  name = _shard(ds, 0)
  blobs = [d for _, d in records.iter_records(ds / name)]
  blobs[0] = next(d for _, d in records.iter_records(built[2] / _shard(built[2], 0)))
  codec.write_records(ds / name, blobs)
  manifest = json.loads((ds / "manifest.json").read_text())
  entry = manifest["splits"]["train"]["shards"][0]
  entry.update(size_bytes=os.path.getsize(ds / name), sha256=records.file_sha256(ds / name),
               fingerprint=records.fingerprint(ds / name))
  (ds / "manifest.json").write_text(json.dumps(manifest))
  verify.verify_dataset(ds, "sha256")  # every shard-level check passes
  with pytest.raises(InputError, match="train: example digest differs"):
    verify.verify_dataset(ds, "full")


def test_unfinished_dataset_has_no_manifest(tmp_path):
  codec.write_records(tmp_path / "train-00000-of-00001.tfrecord", [b"x"])
  code, _, stderr = _verify_cli(tmp_path)
  assert code == 2 and "no manifest.json" in stderr[0]
