r"""Data pipeline benchmark: simulation, patch encoding, Beam writing, tf.data reading.

  python benchmarks/data_pipeline.py                 # real shapes: 64^3/48^3 float16, ~5 min
  python benchmarks/data_pipeline.py --brains=1 --shapes=1 \
      --runs=multi_processing:fileio,multi_processing:reshard

One JSON line per measurement (``name`` says which):
  simulate_*       subjects/s of `data_prep.simulate.simulate_subject` at the phantom's
                   natural grid (the brain's first call also loads the ICBM152 template);
  encode_stage     pairs/s of patch cutting + `records.codec.encode` (tf.train.Example) in one
                   process, next to the CRC-32C (google-crc32c) and SHA-256 cost of one pair;
  beam_write_*     pairs/s of the whole Beam pipeline (2 DirectRunner workers) from subjects on
                   disk (loading, patches, encoding, TFRecord sink, sharding, manifest scan),
                   per running mode and sharding ('fileio' default = planned shards written
                   by Beam's file sink, 'reshard' = the same shards copied by our own stage,
                   'beam' = GroupByKey), with the peak RSS so far and the machine's load
                   (other jobs share the cores; compare runs of one invocation);
                   ``beam_end_to_end`` has the simulation inside the pipeline;
  verify_*         start-up check levels of the reader and of ``python -m data_prep.verify``;
  read_*           pairs/s out of `qsmgan_tf.data.make_dataset` (one pass, and the training
                   configuration with shuffling);
  train_step       `paper` pretrain steps fed by this dataset (benchmarks/train_step.py), and
  read_vs_train    the reader's rate over what one training step consumes (goal >= 10x).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BRAINS = flags.DEFINE_integer("brains", 2, "Brains (natural grid) in the Beam runs.")
_SHAPES = flags.DEFINE_integer("shapes", 2, "Shape phantoms (natural grid) in the Beam runs.")
_RUNS = flags.DEFINE_list(
    "runs", ["multi_processing:fileio", "multi_processing:reshard", "multi_threading:reshard",
             "multi_processing:beam"],
    "Beam write runs to compare, as DirectRunner running mode:sharding (repeats allowed).")
_WORKERS = flags.DEFINE_integer("workers", 2, "DirectRunner workers.")
_ENCODE_PAIRS = flags.DEFINE_integer("encode_pairs", 300, "Pairs timed in the encode stage.")
_READ_PAIRS = flags.DEFINE_integer("read_pairs", 2000, "Pairs read in the training config.")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Scratch folder (default: a temp folder).")


def _emit(name, **values):
  print(json.dumps({"name": name, **values}, sort_keys=False), flush=True)


def _children_peak_mib():
  return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1)


def _self_peak_mib():
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def measure_simulation():
  from data_prep import simulate  # pylint: disable=import-outside-toplevel
  subjects = {}
  for kind, seeds in (("brain", (0, 1)), ("shapes", (0, 1))):
    times = []
    for seed in seeds:
      t0 = time.perf_counter()
      subjects.setdefault(kind, simulate.simulate_subject(kind, seed))
      times.append(time.perf_counter() - t0)
    shape = list(subjects[kind].mask.shape)
    _emit(f"simulate_{kind}", shape=shape, first_call_s=round(times[0], 2),
          seconds=round(times[1], 2), subjects_per_s=round(1.0 / times[1], 3),
          mask_voxels=int(subjects[kind].mask.sum()))
  return subjects


def measure_encode(subject):
  from data_prep import patches  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import records  # pylint: disable=import-outside-toplevel
  from qsmgan_tf.records import codec  # pylint: disable=import-outside-toplevel
  cfg = patches.PatchConfig(augment=True)
  dtypes = cfg.storage_dtypes()
  t0 = time.perf_counter()
  blobs = []
  for arrays, meta in patches.patch_pairs(subject, cfg, seed=0):
    blobs.append(codec.encode(arrays, meta, dtypes))
    if len(blobs) >= _ENCODE_PAIRS.value:
      break
  seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  for b in blobs:
    records.masked_crc32c(b)
  crc_s = (time.perf_counter() - t0) / len(blobs)
  t0 = time.perf_counter()
  for b in blobs:
    hashlib.sha256(b).digest()
  sha_s = (time.perf_counter() - t0) / len(blobs)
  per_pair = seconds / len(blobs)
  _emit("encode_stage", pairs=len(blobs), seconds=round(seconds, 2),
        pairs_per_s=round(len(blobs) / seconds, 1), bytes_per_pair=len(blobs[0]),
        crc_impl=records.crc_implementation(), crc_ms_per_pair=round(crc_s * 1e3, 3),
        sha256_ms_per_pair=round(sha_s * 1e3, 3),
        crc_share_of_encode=round(crc_s / per_pair, 3),
        note="includes the per-subject float16 conversion and padding")


def _write_subjects(subjects_by_kind, root):
  from data_prep import simulate  # pylint: disable=import-outside-toplevel
  os.makedirs(root, exist_ok=True)
  for kind, count in (("brain", _BRAINS.value), ("shapes", _SHAPES.value)):
    for seed in range(count):
      subject = simulate.simulate_subject(kind, 100 + seed)
      simulate.write_subject(subject, os.path.join(root, f"{kind}-{seed:02d}"))


def measure_beam(subjects_dir, work):
  from data_prep import patches  # pylint: disable=import-outside-toplevel
  from data_prep import pipeline  # pylint: disable=import-outside-toplevel
  from data_prep import subject_specs  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import records  # pylint: disable=import-outside-toplevel
  cfg = patches.PatchConfig(augment=True)
  last = None
  for index, run in enumerate(_RUNS.value):  # a run may repeat: alternate runs to compare
    mode, sharding = run.split(":")
    out = os.path.join(work, f"ds{index}_{mode}_{sharding}")
    specs = subject_specs.real_specs(subjects_dir, 0, 0.2, "chi")
    peak_before = max(_children_peak_mib(), _self_peak_mib())
    t0 = time.perf_counter()
    try:
      manifest = pipeline.make_dataset(
          specs, cfg, out, pipeline.WriteOptions(
              train_shards=8, val_shards=2, sharding=sharding, beam_args=tuple(
                  pipeline.beam_args("DirectRunner", _WORKERS.value, mode))))
    except RuntimeError as exc:  # the lost-records guard
      _emit(f"beam_write_{mode}_{sharding}", error=str(exc))
      continue
    seconds = time.perf_counter() - t0
    n = sum(e["num_examples"] for e in manifest["splits"].values())
    size = sum(s["size_bytes"] for e in manifest["splits"].values() for s in e["shards"])
    _emit(f"beam_write_{mode}_{sharding}", workers=_WORKERS.value, subjects=len(specs),
          pairs=n, seconds=round(seconds, 1), pairs_per_s=round(n / seconds, 1),
          bytes_per_pair=round(size / n), mb_per_s=round(size / seconds / 1e6, 1),
          crc_impl=records.crc_implementation(),
          # High-water marks (any process so far): a rise is this run's doing.
          peak_rss_mib_before=peak_before,
          peak_rss_mib_after=max(_children_peak_mib(), _self_peak_mib()),
          load_avg_1min=round(os.getloadavg()[0], 1))
    if last is not None:
      shutil.rmtree(last)
    last = out
  specs = subject_specs.synthetic_specs(_BRAINS.value, _SHAPES.value, 0, val_fraction=0.2)
  out = os.path.join(work, "ds_synthetic")
  t0 = time.perf_counter()
  manifest = pipeline.make_dataset(
      specs, cfg, out, pipeline.WriteOptions(train_shards=8, val_shards=2, beam_args=tuple(
          pipeline.beam_args("DirectRunner", _WORKERS.value, "multi_processing"))))
  seconds = time.perf_counter() - t0
  n = sum(e["num_examples"] for e in manifest["splits"].values())
  _emit("beam_end_to_end", mode="multi_processing", sharding=pipeline.WriteOptions.sharding,
        workers=_WORKERS.value, subjects=len(specs),
        pairs=n, seconds=round(seconds, 1), pairs_per_s=round(n / seconds, 1),
        subjects_per_s=round(len(specs) / seconds, 3))
  shutil.rmtree(out)
  return last


def measure_verify(data_dir):
  from data_prep import verify  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import data  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import records  # pylint: disable=import-outside-toplevel
  manifest = records.load_manifest(data_dir)
  n = sum(e["num_examples"] for e in manifest["splits"].values())
  for level in ("records", "sha256"):
    t0 = time.perf_counter()
    for split in manifest["splits"]:
      data.check_dataset(data_dir, split, level)
    _emit(f"verify_reader_{level}", pairs=n, seconds=round(time.perf_counter() - t0, 3))
  t0 = time.perf_counter()
  verify.verify_dataset(data_dir, "full")
  seconds = time.perf_counter() - t0
  _emit("verify_full", pairs=n, seconds=round(seconds, 2), pairs_per_s=round(n / seconds, 1))


def measure_read(data_dir):
  from qsmgan_tf import data  # pylint: disable=import-outside-toplevel
  n_train = data.count_examples(data_dir, "train")
  for name, kwargs, limit in (
      ("read_one_pass", dict(shuffle=False, repeat=False), None),
      ("read_training", dict(shuffle=True, repeat=True, seed=0), _READ_PAIRS.value)):
    ds = data.make_dataset(data_dir, "train", 8, **kwargs)
    it = iter(ds)
    next(it)  # pipeline start-up (threads, first shuffle fill) not counted
    t0 = time.perf_counter()
    pairs = 0
    for field, _ in it:
      pairs += int(field.shape[0])
      if limit and pairs >= limit:
        break
    seconds = time.perf_counter() - t0
    _emit(name, batch=8, pairs=pairs, split_size=n_train, seconds=round(seconds, 2),
          pairs_per_s=round(pairs / seconds, 1))
  return round(pairs / seconds, 1)  # the training configuration's rate


def measure_training_step(data_dir, read_pairs_per_s):
  """Times `paper` pretrain steps (mixed_bfloat16, batch 2) fed by this dataset, in this run.

  Emits ``train_step`` (from benchmarks/train_step.py) and ``read_vs_train`` with the ratio of
  the reader's rate to what one training step consumes (the issue's goal: >= 10x).
  """
  import train_step  # pylint: disable=import-outside-toplevel  (sibling benchmark)

  record = train_step.run_one("paper", "mixed_bfloat16", "pretrain", "pipeline", data_dir,
                              steps=5, warmup=2, batch=2)
  _emit("read_vs_train", read_pairs_per_s=read_pairs_per_s,
        train_pairs_per_s=record["pairs_per_s"],
        ratio=round(read_pairs_per_s / record["pairs_per_s"], 1))


def main(argv):
  del argv
  import logging  # pylint: disable=import-outside-toplevel
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [sys.path[0]] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
  work = _WORK_DIR.value or tempfile.mkdtemp(prefix="qsm_bench_data_")
  try:
    subjects = measure_simulation()
    measure_encode(subjects["brain"])
    del subjects
    subjects_dir = os.path.join(work, "subjects")
    _write_subjects(None, subjects_dir)
    data_dir = measure_beam(subjects_dir, work)
    measure_verify(data_dir)
    read_rate = measure_read(data_dir)
    measure_training_step(data_dir, read_rate)
  finally:
    if not _WORK_DIR.value:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
