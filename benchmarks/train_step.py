r"""Training-step speed of QSMGAN, and the output-transform study.

Speed (default; < 10 min on 2 cores): for the `paper` and `cpu_small` presets, each stage
(pretrain, wgan_gp) and precision (float32, mixed_bfloat16), seconds per step and patch pairs/s
with in-memory tensors, then with the TFRecord input pipeline (64^3/48^3 float16 shards, as
data_prep writes them) for one configuration, and the pipeline's read rate alone. Each
configuration runs in its own process so peak memory (ru_maxrss) is its own. One JSON line each.

  python benchmarks/train_step.py
  python benchmarks/train_step.py --presets=cpu_small --stages=pretrain

Output-transform study (a training run per transform on anatomy-free shape phantoms with chi up
to ~1.4 ppm, validation on other seeds; minutes per transform):

  python benchmarks/train_step.py --study=output_transform --steps=300
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _emit(record):
  print(json.dumps(record), flush=True)


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------
# One configuration (child process)
# --------------------------------------------------------------------------------------
def _random_pairs(n, size_in, size_out, seed=0):
  import numpy as np  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  m = (size_in - size_out) // 2
  vol = (rng.normal(size=(n, size_in, size_in, size_in, 1)) * 0.05).astype(np.float32)
  return vol * 0.3, vol[:, m:m + size_out, m:m + size_out, m:m + size_out].copy()


def write_records(out_dir, n, size_in=64, size_out=48, n_val=2):
  """Random 64^3/48^3 float16 pairs in data_prep's shard format, with a manifest."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from data_prep import manifest as manifest_lib  # pylint: disable=import-outside-toplevel
  from data_prep import patches  # pylint: disable=import-outside-toplevel
  from qsmgan_tf.records import codec  # pylint: disable=import-outside-toplevel

  os.makedirs(out_dir, exist_ok=True)
  cfg = patches.PatchConfig(input_patch=size_in, output_patch=size_out)
  scans, subjects = {}, {}
  for split, count, shards in (("train", n, 4), ("val", n_val, 1)):
    field, chi = _random_pairs(count, size_in, size_out, seed=len(split))
    paths = [os.path.join(out_dir, f"{split}-{i:05d}-of-{shards:05d}.tfrecord")
             for i in range(shards)]
    blobs = []
    for k in range(count):
      arrays = {"field": field[k, ..., 0], "chi": chi[k, ..., 0],
                "mask": np.ones((size_out,) * 3, np.uint8)}
      meta = {"subject_id": split, "kind": "shapes", "voxel_size_mm": [1, 1, 1],
              "b0_dir": [0, 0, 1], "centre": [0, 0, 0], "background": 0,
              "transform": np.eye(3, dtype=int).ravel(), "chi_scale": 1.0, "snr": 0.0}
      blobs.append(codec.encode(arrays, meta, cfg.storage_dtypes()))
    for i, path in enumerate(paths):
      codec.write_records(path, blobs[i::shards])
    scans[split] = [manifest_lib.scan_for_manifest(p) for p in paths]
    subjects[split] = [{"subject_id": split, "kind": "shapes", "seed": 0,
                        "shape": [size_in] * 3, "voxel_size_mm": [1.0, 1.0, 1.0],
                        "b0_dir": [0.0, 0.0, 1.0], "snr": 0.0}]
  manifest_lib.write_manifest(out_dir, manifest_lib.build_manifest(
      shard_scans=scans, subjects=subjects, patch_config=cfg, target="chi"))


def run_one(preset, precision, stage, source, data_dir, steps, warmup, batch):
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import data  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import distribute  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import gan  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel

  strategy = distribute.make_strategy("one_device")
  distribute.set_precision(precision)
  config = networks.PRESETS[preset]
  with strategy.scope():
    generator = networks.build_generator(config)
    critic = (networks.build_critic(networks.CRITIC_PRESETS[preset], config)
              if stage == "wgan_gp" else None)
    model = gan.QSMGAN(generator, critic, stage=stage, chi_scale=config.chi_scale)
    model.compile(keras.optimizers.Adam(1e-4),
                  keras.optimizers.Adam(1e-4) if critic is not None else None)
  if source == "memory":
    pairs = _random_pairs(batch, config.input_patch, config.output_patch)
    ds = tf.data.Dataset.from_tensors(tuple(tf.constant(a) for a in pairs)).repeat()
  else:
    ds = data.dataset_for_strategy(strategy, data_dir, "train", batch, seed=0)

  times = []

  class Timer(keras.callbacks.Callback):

    def on_train_batch_begin(self, batch_index, logs=None):
      self.t0 = time.perf_counter()

    def on_train_batch_end(self, batch_index, logs=None):
      float(logs["loss"])  # wait for the step
      times.append(time.perf_counter() - self.t0)

  model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[Timer()])
  step_s = float(np.median(times[warmup:]))
  record = {"what": "train_step", "preset": preset, "precision": precision, "stage": stage,
            "input": source, "global_batch": batch, "s_per_step": round(step_s, 3),
            "pairs_per_s": round(batch / step_s, 2), "first_step_s": round(times[0], 2),
            "timed_steps": steps, "peak_rss_mb": round(_peak_mb())}
  if stage == "wgan_gp":
    record["n_critic"] = model.n_critic
  _emit(record)
  return record


def read_rate(data_dir, batch, batches):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  # noqa: F401

  from qsmgan_tf import data  # pylint: disable=import-outside-toplevel

  ds = data.make_dataset(data_dir, "train", batch, seed=0)
  it = iter(ds)
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - t0
  _emit({"what": "input_pipeline_read", "global_batch": batch, "batches": batches,
         "pairs_per_s": round(batch * batches / elapsed, 1)})


# --------------------------------------------------------------------------------------
# Output-transform study
# --------------------------------------------------------------------------------------
def _phantom_patches(seeds, per_subject, size_in, size_out, rng):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from data_prep import simulate  # pylint: disable=import-outside-toplevel

  fields, chis = [], []
  m = (size_in - size_out) // 2
  for seed in seeds:
    s = simulate.simulate_subject("shapes", int(seed), shape=(96, 96, 96))
    inside = np.argwhere(s.mask[m + size_out // 2:96 - size_in + m + size_out // 2 + 1,
                                m + size_out // 2:96 - size_in + m + size_out // 2 + 1,
                                m + size_out // 2:96 - size_in + m + size_out // 2 + 1])
    for idx in rng.choice(len(inside), size=per_subject, replace=False):
      i, j, k = inside[idx]
      f = s.field_ppm[i:i + size_in, j:j + size_in, k:k + size_in]
      c = s.target_ppm[i + m:i + m + size_out, j + m:j + m + size_out, k + m:k + m + size_out]
      fields.append(f[..., None])
      chis.append(c[..., None])
  return np.stack(fields).astype(np.float32), np.stack(chis).astype(np.float32)


def transform_study(steps, preset, transforms, batch=2):
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import training  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import training_config  # pylint: disable=import-outside-toplevel

  config = networks.PRESETS[preset]
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  train_f, train_c = _phantom_patches(range(100, 112), 12, config.input_patch,
                                      config.output_patch, rng)
  val_f, val_c = _phantom_patches(range(900, 903), 8, config.input_patch, config.output_patch,
                                  rng)
  _emit({"what": "transform_study_data", "train_pairs": len(train_f), "val_pairs": len(val_f),
         "max_abs_chi_ppm": float(np.abs(train_c).max()),
         "val_voxels_abs_chi_gt_0.7": int((np.abs(val_c) > 0.7).sum()),
         "seconds": round(time.perf_counter() - t0, 1)})
  for transform in transforms:
    keras.mixed_precision.set_global_policy("float32")
    train_ds = tf.data.Dataset.from_tensor_slices((train_f, train_c)).shuffle(
        len(train_f), seed=0).repeat().batch(batch)
    val_ds = tf.data.Dataset.from_tensor_slices((val_f, val_c)).batch(batch)
    with tempfile.TemporaryDirectory() as model_dir:
      cfg = training_config.resolve_config(preset, model_dir=model_dir, stage="pretrain",
                                           total_steps=steps, steps_per_epoch=steps,
                                           checkpoint_every_steps=steps,
                                           output_transform=transform, strategy="one_device",
                                           precision="auto", quiet=True,
                                           global_batch_size=batch)
      t0 = time.perf_counter()
      training.train(cfg, datasets=(train_ds, val_ds))
      seconds = time.perf_counter() - t0
      generator = keras.models.load_model(os.path.join(model_dir, "generator_final.keras"))
    pred = np.concatenate([np.asarray(generator(val_f[i:i + 4], training=False))
                           for i in range(0, len(val_f), 4)])
    err = pred - val_c
    big = np.abs(val_c) > 0.7
    _emit({"what": "transform_study", "transform": transform, "preset": preset,
           "steps": steps, "val_nrmse_pct": round(float(
               100 * np.sqrt((err**2).sum() / (val_c**2).sum())), 2),
           "val_l1_ppm": round(float(np.abs(err).mean()), 5),
           "l1_ppm_where_abs_chi_gt_0.7": round(float(np.abs(err[big]).mean()), 4),
           "max_pred_ppm": round(float(np.abs(pred).max()), 3),
           "train_seconds": round(seconds, 1)})


# --------------------------------------------------------------------------------------
def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="paper,cpu_small")
  parser.add_argument("--precisions", default="float32,mixed_bfloat16")
  parser.add_argument("--stages", default="pretrain,wgan_gp")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (study: train steps)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--study", choices=["speed", "output_transform"], default="speed")
  parser.add_argument("--transforms", default="linear,tanh,scaled_tanh")
  parser.add_argument("--study_preset", default="cpu_small")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # child: preset,precision,stage,input
  parser.add_argument("--data_dir", help=argparse.SUPPRESS)
  parser.add_argument("--read_rate", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.one:
    preset, precision, stage, source = args.one.split(",")
    run_one(preset, precision, stage, source, args.data_dir, args.steps, args.warmup,
            args.batch)
    return
  if args.read_rate:
    read_rate(args.data_dir, args.batch, 60)
    return
  if args.study == "output_transform":
    transform_study(args.steps, args.study_preset, args.transforms.split(","))
    return

  child = [sys.executable, os.path.abspath(__file__), f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--batch={args.batch}"]
  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel

  # The pipeline must not be the bottleneck: the same step fed from TFRecords, with the
  # fastest configuration asked for (records of its preset's patch sizes).
  presets, precisions = args.presets.split(","), args.precisions.split(",")
  fastest = "cpu_small" if "cpu_small" in presets else presets[0]
  record_precision = "mixed_bfloat16" if "mixed_bfloat16" in precisions else precisions[0]
  config = networks.PRESETS[fastest]
  with tempfile.TemporaryDirectory() as data_dir:
    write_records(data_dir, 64, config.input_patch, config.output_patch)
    subprocess.run(child + ["--read_rate", f"--data_dir={data_dir}"], check=True)
    runs = [(p, q, s, "memory") for p in presets for q in precisions
            for s in args.stages.split(",")]
    runs.append((fastest, record_precision, "pretrain", "tfrecord"))
    for run in runs:
      subprocess.run(child + [f"--one={','.join(run)}", f"--data_dir={data_dir}"], check=True)


if __name__ == "__main__":
  main()
