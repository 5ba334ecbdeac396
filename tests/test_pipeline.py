"""The Beam pipeline and its binary: split by subject, a faithful manifest, determinism."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_prep import manifest as manifest_lib
from data_prep import patches
from data_prep import pipeline
from data_prep import subject_specs
from qsmgan_tf import records
from qsmgan_tf.records import codec
from qsmgan_tf.errors import InputError

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_SPEC_ARGS = dict(val_fraction=0.25, snrs=[50.0, 100.0], b0_tilts_deg=[0.0, 15.0],
                  shape=(32, 32, 32))
_CONFIG = patches.PatchConfig(input_patch=16, output_patch=8, stride=8, augment=True)
_BINARY_ARGS = ["--synthetic_shapes=4", "--subject_shape=32,32,32", "--input_patch=16",
                "--output_patch=8", "--stride=8", "--shards=3", "--val_shards=1",
                "--val_fraction=0.25", "--snr=50,100", "--b0_tilt_deg=0,15", "--augment"]


def _run_binary(*args, cwd=None):
  env = dict(os.environ, PYTHONPATH=str(_ROOT))
  return subprocess.run([sys.executable, "-m", "data_prep.make_tfrecords", *args],
                        capture_output=True, text=True, env=env, cwd=cwd or _ROOT, timeout=300)


def _in_process(out_dir, seed, sharding=pipeline.WriteOptions.sharding, val_shards=1):
  specs = subject_specs.synthetic_specs(0, 4, seed, **_SPEC_ARGS)
  return pipeline.make_dataset(specs, _CONFIG, out_dir, pipeline.WriteOptions(
      train_shards=3, val_shards=val_shards, sharding=sharding, seed=seed))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  # The binary as a user runs it: two worker processes, started from another folder.
  proc = _run_binary(f"--out_dir={root / 'a'}", "--seed=1", "--direct_num_workers=2",
                     "--direct_running_mode=multi_processing", *_BINARY_ARGS, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Quiet by default: the workers' start-up and bundle lines went to a log file, then removed.
  assert "sdk_worker" not in proc.stderr and "apache_beam" not in proc.stderr, proc.stderr[-3000:]
  same_seed = _in_process(root / "b", seed=1)
  # More validation shards than validation pairs: some shards are empty.
  other_seed = _in_process(root / "c", seed=2, val_shards=64)
  beam_sharded = _in_process(root / "d", seed=1, sharding="beam")
  resharded = _in_process(root / "e", seed=1, sharding="reshard")
  return (root, records.load_manifest(root / "a"), same_seed, other_seed, beam_sharded,
          resharded)


def test_binary_writes_a_whole_dataset(datasets):
  root, manifest, *_ = datasets
  names = sorted(os.listdir(root / "a"))
  assert names == ["manifest.json", "train-00000-of-00003.tfrecord",
                   "train-00001-of-00003.tfrecord", "train-00002-of-00003.tfrecord",
                   "val-00000-of-00001.tfrecord"]
  # Nothing half-written left beside it: no staging folder, no Beam temp files.
  assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
  assert manifest["features"]["field"] == {"shape": [16] * 3, "dtype": "float16",
                                           "units": "ppm of B0", "content": "local field"}
  assert manifest["flags"]["seed"] == 1 and manifest["flags"]["augment"] is True
  assert manifest["normalisation"].startswith("none")
  # Every level of checking passes, including each record's CRC and features.
  for split in ("train", "val"):
    records.check_split(root / "a", manifest, split, "full")


def test_manifest_matches_the_shards(datasets):
  root, manifest, *_ = datasets
  for split, entry in manifest["splits"].items():
    hashes = []
    for shard in entry["shards"]:
      scan = records.scan_shard(root / "a" / shard["name"])
      assert (scan.num_records, scan.size_bytes, scan.sha256) == (
          shard["num_records"], shard["size_bytes"], shard["sha256"])
      hashes += scan.record_sha256
    assert len(hashes) == entry["num_examples"] == sum(
        d["num_examples"] for d in entry["subject_details"])
    assert records.example_set_digest(hashes) == entry["example_digest"]


def test_split_is_by_subject(datasets):
  root, manifest, *_ = datasets
  train = set(manifest["splits"]["train"]["subjects"])
  val = set(manifest["splits"]["val"]["subjects"])
  assert len(train) == 3 and len(val) == 1 and not train & val
  for split, subjects in (("train", train), ("val", val)):
    for shard in manifest["splits"][split]["shards"]:
      for _, data in records.iter_records(root / "a" / shard["name"]):
        _, meta = codec.decode(data)
        assert meta["meta/subject_id"] in subjects


def test_same_seed_same_examples_other_seed_other_examples(datasets):
  root, manifest, same_seed, other_seed, beam_sharded, resharded = datasets
  # Same flags and seed, another runner mode (2 processes vs in-process): same example set...
  assert same_seed["example_digest"] == manifest["example_digest"]
  for split in ("train", "val"):
    assert same_seed["splits"][split]["example_digest"] == manifest["splits"][split]["example_digest"]
    # ...and, with the default sharding (planned shards written by Beam's file sink),
    # byte-identical shards; our own copy stage ('reshard') writes the very same bytes.
    for other in (same_seed, resharded):
      assert [s["sha256"] for s in other["splits"][split]["shards"]] == [
          s["sha256"] for s in manifest["splits"][split]["shards"]]
  assert other_seed["example_digest"] != manifest["example_digest"]
  # Beam's own sharding (a GroupByKey) deals examples differently, but the set is the same.
  assert beam_sharded["example_digest"] == manifest["example_digest"]
  assert sorted(os.listdir(root / "d")) == sorted(os.listdir(root / "a"))
  for split in ("train", "val"):
    records.check_split(root / "d", beam_sharded, split, "full")


def test_more_shards_than_examples_still_writes_every_shard(datasets):
  root, _, _, other_seed, *_ = datasets
  shards = other_seed["splits"]["val"]["shards"]
  assert [s["name"] for s in shards] == [f"val-{i:05d}-of-00064.tfrecord" for i in range(64)]
  assert 0 < sum(s["num_records"] == 0 for s in shards) < 64
  assert sorted(os.listdir(root / "c")) == sorted(
      ["manifest.json"] + [s["name"] for e in other_seed["splits"].values() for s in e["shards"]])
  records.check_split(root / "c", other_seed, "val", "full")


def test_manifest_round_trip(tmp_path, datasets):
  _, manifest, *_ = datasets
  (tmp_path / "d").mkdir()
  manifest_lib.write_manifest(tmp_path / "d", manifest)
  assert records.load_manifest(tmp_path / "d") == json.loads(json.dumps(manifest))
  assert len(manifest_lib.manifest_sha256(tmp_path / "d")) == 64


def test_existing_output_is_refused_with_one_line(datasets):
  root, *_ = datasets
  proc = _run_binary(f"--out_dir={root / 'a'}", *_BINARY_ARGS)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: output folder already exists")


def test_failed_run_leaves_nothing(tmp_path):
  specs = [subject_specs.SubjectSpec("bad-00000", "train", "no-such-kind", seed=1,
                                     shape=(32, 32, 32))]
  with pytest.raises(Exception, match="no-such-kind"):
    pipeline.make_dataset(specs, _CONFIG, tmp_path / "out", pipeline.WriteOptions())
  assert os.listdir(tmp_path) == []


def test_realistic_model_errors_change_the_field_not_the_truth():
  args = dict(_SPEC_ARGS, snrs=[100.0])
  clean = subject_specs.synthetic_specs(2, 0, 5, **args)
  realistic = subject_specs.synthetic_specs(2, 0, 5, **args, model_errors="realistic")
  assert [s.seed for s in clean] == [s.seed for s in realistic]
  for plain_spec, error_spec in zip(clean, realistic):
    _, plain = pipeline.make_subject(plain_spec)
    _, subject = pipeline.make_subject(error_spec)
    levels = pipeline.subject_summary((error_spec, subject))["model_errors"]
    assert levels is not None and levels == pipeline.subject_summary(
        (error_spec, pipeline.make_subject(error_spec)[1]))["model_errors"]  # from the seed
    assert pipeline.subject_summary((plain_spec, plain))["model_errors"] is None
    given = subject.mask & plain.mask
    # The target is the true chi wherever both masks hold; the field carries the errors.
    np.testing.assert_array_equal(subject.chi_ppm[given], plain.chi_ppm[given])
    error = subject.components["model_error_ppm"]
    assert np.any(error[subject.mask])  # seed 5 draws active errors for both brains
    np.testing.assert_allclose(
        subject.field_ppm[given] - error[given] - subject.components["noise_ppm"][given],
        plain.field_ppm[given] - plain.components["noise_ppm"][given], atol=1e-5)
  with pytest.raises(InputError, match="--model_errors"):
    subject_specs.synthetic_specs(1, 0, 5, **args, model_errors="huge")
  with pytest.raises(InputError, match="--model_error_fraction"):
    subject_specs.synthetic_specs(1, 0, 5, **args, model_errors="realistic",
                                  model_error_fraction=2)


def test_detail_fraction_draws_per_brain_and_keeps_the_rest():
  args = dict(_SPEC_ARGS, snrs=[100.0])
  clean = subject_specs.synthetic_specs(40, 4, 3, **args)
  half = subject_specs.synthetic_specs(40, 4, 3, **args, detail="fine", detail_fraction=0.5)
  fine = [s for s in half if s.detail == "fine"]
  assert 10 <= len(fine) <= 30 and all(s.kind == "brain" for s in fine)  # shapes have no anatomy
  assert [dataclasses.replace(s, detail="none") for s in half] == clean
  spec = dataclasses.replace(clean[0], detail="fine")
  _, subject = pipeline.make_subject(spec)
  assert subject.meta["phantom"]["detail"]["n_thin_vessels"] >= 80
  assert pipeline.subject_summary((spec, subject))["detail"] == "fine"
  with pytest.raises(InputError, match="--detail"):
    subject_specs.synthetic_specs(1, 0, 5, **args, detail="coarse")
  with pytest.raises(InputError, match="--detail_fraction"):
    subject_specs.synthetic_specs(1, 0, 5, **args, detail="fine", detail_fraction=-1)
