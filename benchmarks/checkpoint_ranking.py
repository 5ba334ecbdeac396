r"""How many validation patches it takes to rank two generators (issue 16: choosing a checkpoint).

  python benchmarks/checkpoint_ranking.py --data_dir=runs/fine_data \
      --models=saved_models/qsmgan/8,runs/c12_gan/generator_best.keras [--patches=1520]

Training keeps the checkpoint with the lowest validation NRMSE (`training_callbacks.
BestGenerator`), pooled over a fixed set of patches (`gan.NRMSE`). Whether that choice means
anything depends on how many patches there are. Each model (a .keras generator, a training
folder or an exported SavedModel) runs on the same first ``--patches`` patches of the dataset's
'val' split, read in order; per patch the sums ``err2 = sum (pred - true)^2`` and
``ref2 = sum true^2`` are kept. Printed (one JSON line each):

* per model: the pooled NRMSE % and its delta-method standard error
  (`metrics.pooled_patch_nrmse`, what training logs as ``val_nrmse_se``) at the full count and
  at the counts training has used (64 and 200 patches);
* per pair of models: the difference of their pooled NRMSEs on the same patches, its standard
  error from 2,000 bootstrap resamplings of the patches (paired: one draw of patches serves
  both models, so what they share cancels), ``z = difference / SE``, and the patches a
  validation set would need for ``|z| = 2`` (the SE falls as 1/sqrt(patches)).

The raw generators are compared on patches, as training's validation does (no field scaling, no
refinement). Simulated data only; CPU time is about 0.3 s per patch and model for the paper
network on 2 cores.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qsmgan_tf import cli  # pylint: disable=wrong-import-position
from qsmgan_tf import metrics  # pylint: disable=wrong-import-position
from qsmgan_tf.errors import InputError  # pylint: disable=wrong-import-position

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFRecord dataset folder with a 'val' split.")
_MODELS = flags.DEFINE_list("models", None, "Two or more generators: .keras files, training "
                            "folders or exported SavedModels.")
_PATCHES = flags.DEFINE_integer("patches", 1000, "Validation patches (the first ones, in order; "
                                "fewer if the split is smaller).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Patches per generator call.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamplings of the patches.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
TRAINING_COUNTS = (64, 200)
"""Validation patches training has used (version 1-5: 32 batches of 2; version 6 on: 100)."""


def _patch_sums(generator, batches) -> tuple[np.ndarray, np.ndarray]:
  """Per-patch ``(err2, ref2)`` of ``generator`` over ``batches`` of (field, chi)."""
  err2, ref2 = [], []
  for field, chi in batches:
    pred = np.asarray(generator(field, training=False), dtype=np.float64)
    true = np.asarray(chi, dtype=np.float64)
    err2.append(((pred - true) ** 2).reshape(len(true), -1).sum(axis=1))
    ref2.append((true ** 2).reshape(len(true), -1).sum(axis=1))
  return np.concatenate(err2), np.concatenate(ref2)


def paired_difference(sums_a, sums_b, draws: np.ndarray) -> tuple[float, float]:
  """``(NRMSE_a - NRMSE_b, its bootstrap SE)`` over the same patches; ``draws`` [B, n] are
  patch indices (one draw serves both models)."""
  (ea, ra), (eb, rb) = sums_a, sums_b
  diff = 100 * (np.sqrt(ea.sum() / ra.sum()) - np.sqrt(eb.sum() / rb.sum()))
  boot = 100 * (np.sqrt(ea[draws].sum(axis=1) / ra[draws].sum(axis=1))
                - np.sqrt(eb[draws].sum(axis=1) / rb[draws].sum(axis=1)))
  return float(diff), float(boot.std(ddof=1))


@cli.one_line_errors
def main(argv):
  del argv
  if not _DATA_DIR.value or not _MODELS.value or len(_MODELS.value) < 2:
    raise InputError("--data_dir and two or more --models are required")
  if _PATCHES.value < 2 or _BATCH.value < 1 or _BOOTSTRAP.value < 10:
    raise InputError("--patches must be >= 2, --batch_size >= 1, --bootstrap >= 10")
  from qsmgan_tf import data  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import exporting  # pylint: disable=import-outside-toplevel

  with data.shard_errors_named(_DATA_DIR.value, "val"):
    batches = [(np.asarray(f), np.asarray(c)) for f, c in data.make_dataset(
        _DATA_DIR.value, "val", _BATCH.value, shuffle=False, repeat=False,
        deterministic=True).unbatch().take(_PATCHES.value).batch(_BATCH.value)]
  if not batches:
    raise InputError(f"no validation patches in {_DATA_DIR.value}")
  sums = {}
  for spec in _MODELS.value:
    start = time.perf_counter()
    sums[spec] = _patch_sums(exporting.generator_from(spec)[0], batches)
    n = len(sums[spec][0])
    row = {"model": spec, "patches": n, "seconds": round(time.perf_counter() - start, 1)}
    for count in sorted({c for c in TRAINING_COUNTS if c < n} | {n}):
      score, error = metrics.pooled_patch_nrmse(sums[spec][0][:count], sums[spec][1][:count])
      row[f"nrmse_{count}"], row[f"se_{count}"] = round(score, 3), round(error, 3)
    print(json.dumps(row), flush=True)
  n = min(len(e) for e, _ in sums.values())
  draws = np.random.default_rng(_SEED.value).integers(0, n, (_BOOTSTRAP.value, n))
  for a, b in itertools.combinations(_MODELS.value, 2):
    diff, error = paired_difference(*(tuple(v[:n] for v in sums[m]) for m in (a, b)), draws)
    z = diff / error if error > 0 else float("inf")
    needed = int(np.ceil(n * (2.0 / abs(z)) ** 2)) if diff and error > 0 else None
    print(json.dumps({"a": a, "b": b, "patches": n, "nrmse_a_minus_b": round(diff, 3),
                      "se": round(error, 3), "z": round(z, 2),
                      "patches_for_z2": needed}), flush=True)


if __name__ == "__main__":
  app.run(main)
