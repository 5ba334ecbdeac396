"""tf.data input pipeline over a TFRecord patch-pair dataset (see `qsmgan_tf.records`).

  ds = data.make_dataset("/data/qsm_train", "train", global_batch_size=4)
  with data.shard_errors_named("/data/qsm_train", "train"):
    model.fit(ds, steps_per_epoch=1000)

Elements are ``(field_ppm [B, P, P, P, 1], chi_ppm [B, Q, Q, Q, 1])`` float32 (plus the target-
patch mask with ``with_mask=True``), in ppm: the model normalises. At start-up the shards are
checked against ``manifest.json`` (existence, no unlisted shard, size, fingerprint, record count;
optionally SHA-256), and every record's stored dtype and shape are checked while parsing.

TensorFlow's record reader raises ``DataLossError`` on a corrupted record without naming the file;
`shard_errors_named` re-raises it with the shard and record index. Errors are never skipped.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import tensorflow as tf

from qsmgan_tf import records
from qsmgan_tf.records import codec
from qsmgan_tf.errors import InputError


# Start-up check levels of `make_dataset(verify=...)`.
VERIFY_LEVELS = {False: None, None: None, True: "records", "records": "records",
                 "exists": "exists", "sha256": "sha256", "full": "full"}


def check_dataset(data_dir, split: str = "train", verify="records") -> tuple[dict, list[str]]:
  """Loads the manifest and checks the split's shards; returns ``(manifest, shard paths)``.

  Args:
    data_dir: dataset folder.
    split: 'train' or 'val'.
    verify: True/'records' (size, fingerprint, record count: fast), 'exists', 'sha256' (hash
      every shard: slow on big datasets), 'full' (also every record's CRC and features), or
      False (only list the shards).

  Raises:
    InputError: no dataset, no such split, or (a `records.ShardError`) a missing, truncated,
      corrupted, foreign or unlisted shard, with one line naming it.
  """
  if verify not in VERIFY_LEVELS:
    raise ValueError(f"verify must be one of {list(VERIFY_LEVELS)}, got {verify!r}")
  manifest = records.load_manifest(data_dir)
  level = VERIFY_LEVELS[verify]
  if level is None:
    entry = records.split_entry(manifest, split, data_dir)
    paths = [os.path.join(str(data_dir), s["name"]) for s in entry["shards"]]
  else:
    paths = records.check_split(data_dir, manifest, split, level)
  return manifest, paths


def shard_files_for(paths: Sequence[str], input_context=None) -> list[str]:
  """The shard files one input pipeline reads: every n-th file, n = number of pipelines.

  Raises:
    InputError: fewer shards than input pipelines (a worker would get no data).
  """
  paths = list(paths)
  if input_context is None or input_context.num_input_pipelines <= 1:
    return paths
  n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
  if len(paths) < n:
    raise InputError(f"{len(paths)} shard(s) cannot feed {n} input pipelines: rebuild the "
                     f"dataset with --shards >= {n}")
  return paths[i::n]


def make_dataset(data_dir, split: str = "train", global_batch_size: int = 2, *,
                 shuffle: bool = True, deterministic: bool = False, repeat: bool = True,
                 input_context: tf.distribute.InputContext | None = None, verify=True,
                 with_mask: bool = False, shuffle_buffer: int = 256, seed: int | None = None,
                 cycle_length: int = 4, drop_remainder: bool | None = None) -> tf.data.Dataset:
  """A batched, prefetched dataset of (field, chi[, mask]) float32 patch pairs.

  Args:
    data_dir: dataset folder (with manifest.json).
    split: 'train' or 'val'.
    global_batch_size: batch size summed over replicas; with ``input_context`` each pipeline
      batches ``input_context.get_per_replica_batch_size(global_batch_size)``.
    shuffle: shuffle shard order and examples (buffer of ``shuffle_buffer`` records).
    deterministic: fixed element order (seed 0 unless ``seed``); slower interleave.
    repeat: repeat forever (training); False gives one pass (evaluation).
    input_context: from ``tf.distribute``: shards FILES across input pipelines (workers).
    verify: start-up check level, see `check_dataset`.
    with_mask: also yield the target-patch mask ``[B, Q, Q, Q, 1]`` (0/1 float32).
    shuffle_buffer: records held for shuffling (each ~0.86 MB at 64^3/48^3 float16).
    seed: shuffle seed.
    cycle_length: shards read concurrently.
    drop_remainder: drop a last partial batch; default: when repeating.

  Returns:
    The ``tf.data.Dataset``.

  Raises:
    InputError: see `check_dataset`, or more input pipelines than shards.
  """
  manifest, paths = check_dataset(data_dir, split, verify)
  files = shard_files_for(paths, input_context)
  batch = (input_context.get_per_replica_batch_size(global_batch_size)
           if input_context is not None else int(global_batch_size))
  if batch < 1:
    raise InputError(f"batch size must be >= 1, got {global_batch_size}")
  if deterministic and seed is None:
    seed = 0
  if drop_remainder is None:
    drop_remainder = repeat
  spec = manifest["features"]
  names = ("field", "chi", "mask") if with_mask else ("field", "chi")

  ds = tf.data.Dataset.from_tensor_slices(files)
  if shuffle:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.interleave(
      lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
      cycle_length=max(1, min(cycle_length, len(files))), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if shuffle:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.batch(batch, drop_remainder=drop_remainder)
  ds = ds.map(lambda s: codec.parse_batch(s, spec, names),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = deterministic
  # Files are already split per worker above; auto-sharding again would drop data.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return ds.with_options(options)


def dataset_for_strategy(strategy: tf.distribute.Strategy, data_dir, split: str = "train",
                         global_batch_size: int = 2, verify=True, **kwargs):
  """A distributed dataset: `make_dataset` per input pipeline via
  ``strategy.distribute_datasets_from_function`` (shards split by file across workers).

  The manifest check runs once here, not once per pipeline.
  """
  check_dataset(data_dir, split, verify)

  def dataset_fn(context: tf.distribute.InputContext):
    return make_dataset(data_dir, split, global_batch_size, input_context=context,
                        verify=False, **kwargs)

  return strategy.distribute_datasets_from_function(dataset_fn)


@contextlib.contextmanager
def shard_errors_named(data_dir, split: str | None = None):
  """Re-raises a ``DataLossError`` from reading the dataset with the shard and record named.

  Wrap the loop (or ``model.fit``) that consumes a dataset of ``data_dir``. The located error
  comes from re-reading the split's shards with CRC checks (only after a failure).

  Raises:
    tf.errors.DataLossError: ``"<shard>: record <i>: <reason> (<TensorFlow's message>)"``.
  """
  try:
    yield
  except tf.errors.DataLossError as exc:
    located = records.locate_data_loss(data_dir, split)
    where = str(located) if located is not None else f"a shard of {data_dir} (not located)"
    raise tf.errors.DataLossError(exc.node_def, exc.op, f"{where} ({exc.message})") from exc


def count_examples(data_dir, split: str = "train") -> int:
  """Examples in a split, from the manifest."""
  return int(records.split_entry(records.load_manifest(data_dir), split, data_dir)["num_examples"])
