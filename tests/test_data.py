"""The tf.data reader: shapes and dtypes, sharding by file, strategy input, named errors."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from data_prep import patches
from data_prep import pipeline
from data_prep import subject_specs
from qsmgan_tf import data
from qsmgan_tf import records
from qsmgan_tf.records import codec

import shard_helpers  # tests/shard_helpers.py
from qsmgan_tf.errors import InputError


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("data") / "ds"
  specs = subject_specs.synthetic_specs(0, 3, 4, val_fraction=0.34, shape=(32, 32, 32))
  pipeline.make_dataset(specs, patches.PatchConfig(16, 8, 6), out,
                        pipeline.WriteOptions(train_shards=2, val_shards=1))
  return out


def _field_hashes_from_files(paths):
  """Independent decode (`codec.decode`, not the tf.data graph) of each record's field, as
  float32 bytes."""
  out = []
  for path in paths:
    for _, blob in records.iter_records(path):
      arrays, _ = codec.decode(blob)
      out.append(hashlib.sha256(arrays["field"].astype(np.float32).tobytes()).hexdigest())
  return out


def _field_hashes(ds):
  return [hashlib.sha256(f.numpy()[..., 0].tobytes()).hexdigest()
          for batch in ds for f in batch[0]]


def test_one_pass_yields_every_example_with_the_right_shapes(dataset_dir):
  manifest = records.load_manifest(dataset_dir)
  ds = data.make_dataset(dataset_dir, "train", 4, shuffle=False, repeat=False, with_mask=True)
  assert ds.element_spec[0].shape.as_list() == [None, 16, 16, 16, 1]
  assert ds.element_spec[1].shape.as_list() == [None, 8, 8, 8, 1]
  assert all(s.dtype == tf.float32 for s in ds.element_spec)
  fields = _field_hashes(ds)
  assert len(fields) == manifest["splits"]["train"]["num_examples"]
  paths = [dataset_dir / s["name"] for s in manifest["splits"]["train"]["shards"]]
  assert sorted(fields) == sorted(_field_hashes_from_files(paths))
  masks = np.concatenate([b[2].numpy() for b in ds])
  assert set(np.unique(masks)) <= {0.0, 1.0} and masks.any()


def test_training_dataset_repeats_and_batches(dataset_dir):
  ds = data.make_dataset(dataset_dir, "train", 3, seed=1)
  field, chi = next(iter(ds))
  assert field.shape == (3, 16, 16, 16, 1) and chi.shape == (3, 8, 8, 8, 1)
  assert ds.element_spec[0].shape.as_list() == [3, 16, 16, 16, 1]  # static: drop_remainder
  n = data.count_examples(dataset_dir, "train")
  assert sum(1 for _ in ds.take(n)) == n  # more batches than one pass holds


def test_deterministic_order_is_reproducible(dataset_dir):
  def first(seed):
    ds = data.make_dataset(dataset_dir, "train", 2, deterministic=True, seed=seed)
    return _field_hashes(ds.take(5))
  assert first(3) == first(3)
  assert first(3) != first(4)


def test_files_are_sharded_across_input_pipelines(dataset_dir):
  manifest = records.load_manifest(dataset_dir)
  seen = []
  for i in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                     num_replicas_in_sync=2)
    ds = data.make_dataset(dataset_dir, "train", 4, shuffle=False, repeat=False,
                           input_context=ctx)
    assert ds.element_spec[0].shape[0] in (None, 2)  # per-replica batch: 4 / 2
    mine = [dataset_dir / s["name"] for s in manifest["splits"]["train"]["shards"][i::2]]
    got = _field_hashes(ds)
    assert sorted(got) == sorted(_field_hashes_from_files(mine))
    seen.append(set(got))
  assert not seen[0] & seen[1]
  ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0)
  with pytest.raises(InputError, match="1 shard"):
    data.make_dataset(dataset_dir, "val", 2, input_context=ctx)


def test_dataset_for_mirrored_strategy_splits_the_global_batch(dataset_dir):
  devices = tf.config.list_logical_devices("CPU")
  assert len(devices) >= 2, "conftest.py should split the CPU into two logical devices"
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  dist = data.dataset_for_strategy(strategy, dataset_dir, "train", 4, seed=0)
  field, chi = next(iter(dist))
  local = strategy.experimental_local_results(field)
  assert len(local) == 2 and all(t.shape == (2, 16, 16, 16, 1) for t in local)
  assert all(t.shape == (2, 8, 8, 8, 1) for t in strategy.experimental_local_results(chi))


def test_wrong_dtype_in_manifest_fails_instead_of_misreading(dataset_dir, tmp_path):
  copy = tmp_path / "ds"
  shutil.copytree(dataset_dir, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["features"]["field"]["dtype"] = "float32"  # bytes are float16
  (copy / "manifest.json").write_text(json.dumps(manifest))
  ds = data.make_dataset(copy, "train", 2, shuffle=False, repeat=False)
  with pytest.raises(tf.errors.InvalidArgumentError, match="dtype"):
    next(iter(ds))


def test_corrupted_record_error_names_the_shard(dataset_dir, tmp_path):
  copy = tmp_path / "ds"
  shutil.copytree(dataset_dir, copy)
  name = records.load_manifest(copy)["splits"]["train"]["shards"][1]["name"]
  index, offset = shard_helpers.record_past_fingerprint(copy / name)
  blob = bytearray((copy / name).read_bytes())
  blob[offset + 12 + 500] ^= 0x10  # a record's data: passes the fast start-up check
  (copy / name).write_bytes(bytes(blob))
  ds = data.make_dataset(copy, "train", 2, shuffle=False, repeat=False)
  with pytest.raises(tf.errors.DataLossError, match=rf"{name}: record {index}: corrupted record data"):
    with data.shard_errors_named(copy, "train"):
      for _ in ds:
        pass
  # Hashing at start-up catches it before any step.
  with pytest.raises(records.ShardError, match=f"{name}: SHA-256 differs"):
    data.make_dataset(copy, "train", 2, verify="sha256")


def test_missing_split_or_dataset_is_bad_input(dataset_dir, tmp_path):
  with pytest.raises(InputError, match="no split 'test'"):
    data.make_dataset(dataset_dir, "test", 2)
  with pytest.raises(InputError, match="no manifest.json"):
    data.make_dataset(tmp_path, "train", 2)
