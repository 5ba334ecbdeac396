r"""Builds a sharded TFRecord dataset of (field, chi) patch pairs with Apache Beam.

Simulated subjects are generated inside the pipeline; real subjects (``--subjects_dir``) are
read from the folder layout of `data_prep.subjects`. The dataset is written into a hidden folder
beside ``--out_dir`` and renamed when complete, with a ``manifest.json`` (see
`data_prep.manifest`). Unknown ``--flags`` are passed on to Beam as pipeline options.

Example (28 synthetic subjects, the paper's patch geometry, 2 local worker processes):

  python -m data_prep.make_tfrecords --out_dir=/data/qsm_train \
    --synthetic_brains=20 --synthetic_shapes=8 --seed=1 --val_fraction=0.15 \
    --lesion_fraction=0.5 --snr=50,100,200 --voxel_sizes=1x1x1,0.8x0.8x1.6 --b0_tilt_deg=0,15 \
    --input_patch=64 --output_patch=48 --stride=16 --background_fraction=0.5 --augment \
    --dtype=float16 --shards=16 --target=chi --runner=DirectRunner

then ``python -m data_prep.verify /data/qsm_train``.

While the pipeline runs, this process's stderr, which Beam's worker processes inherit, goes to
a temporary log file: the workers log their start-up and every bundle at INFO whatever the
pipeline options say. It is removed after a successful run and named after a failed one;
``--verbosity=1`` (or ``-v 1``) shows everything live instead.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import pathlib
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

from qsmgan_tf import cli
from qsmgan_tf.errors import InputError

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Dataset folder to create (must not exist "
                               "unless --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset folder whole.")
_SYN_BRAINS = flags.DEFINE_integer("synthetic_brains", 0, "Simulated ICBM152-based brains.")
_SYN_SHAPES = flags.DEFINE_integer("synthetic_shapes", 0, "Simulated anatomy-free shape phantoms.")
_SUBJECTS_DIR = flags.DEFINE_string("subjects_dir", None, "Folder of real subjects "
                                    "(data_prep.subjects layout).")
_SEED = flags.DEFINE_integer("seed", 0, "Dataset seed: subject seeds and the split derive from it.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.1, "Share of subjects (per kind) held out "
                                   "for validation.")
_LESION_FRACTION = flags.DEFINE_float("lesion_fraction", 0.5, "Share of brains with microbleeds "
                                      "and calcification.")
_SNR = flags.DEFINE_list("snr", ["100"], "SNR values; each subject draws one ('inf' = no noise).")
_VOXEL_SIZES = flags.DEFINE_list("voxel_sizes", ["1x1x1"], "Voxel sizes in mm as AxBxC; each "
                                 "subject draws one.")
_B0_TILT = flags.DEFINE_list("b0_tilt_deg", ["0"], "B0 tilts from z in degrees (random "
                             "azimuth); each subject draws one.")
_SUBJECT_SHAPE = flags.DEFINE_list("subject_shape", None, "Simulation grid i,j,k (default: the "
                                   "phantom's natural grid).")
_BACKGROUND_ORDER = flags.DEFINE_integer("background_order", 0, "Residual background field "
                                         "polynomial degree added to simulated fields.")
_MODEL_ERRORS = flags.DEFINE_enum(
    "model_errors", "none", ["none", "realistic"],
    "Departures from the dipole model in simulated fields: none, or realistic levels drawn per "
    "subject from its seed (data_prep.model_errors: correlated noise, background residuals at "
    "the edge and smooth, white-matter anisotropy, a mask a few voxels off); the target stays "
    "the true chi.")
_MODEL_ERROR_FRACTION = flags.DEFINE_float("model_error_fraction", 1.0, "Share of simulated "
                                           "subjects with --model_errors (drawn per subject).")
_DETAIL = flags.DEFINE_enum(
    "detail", "none", ["none", "fine"],
    "Simulated brains' fine anatomy: none, or fine (thin veins, a 1.2 mm texture, folded tissue "
    "borders; data_prep.phantoms.brain_phantom).")
_DETAIL_FRACTION = flags.DEFINE_float("detail_fraction", 1.0, "Share of simulated brains with "
                                      "--detail (drawn per subject).")
_TARGET = flags.DEFINE_enum("target", "chi", ["chi", "cosmos"], "Training target.")
_INPUT_PATCH = flags.DEFINE_integer("input_patch", 64, "Field patch edge, voxels.")
_OUTPUT_PATCH = flags.DEFINE_integer("output_patch", 48, "Target patch edge, voxels (centred).")
_STRIDE = flags.DEFINE_integer("stride", 16, "Spacing of the patch-centre grid, voxels.")
_BACKGROUND_FRACTION = flags.DEFINE_float("background_fraction", 0.5, "Background patches per "
                                          "brain patch.")
_MAX_PATCHES = flags.DEFINE_integer("max_patches_per_subject", 0, "Cap on pairs per subject "
                                    "(0 = all).")
_AUGMENT = flags.DEFINE_bool("augment", False, "Random flips/permutations that keep the dipole "
                             "kernel, and chi scaling.")
_B0_CHANGE = flags.DEFINE_bool("augment_b0_change", False, "Also permute axes in ways that move "
                               "B0 (recorded in meta/b0_dir).")
_CHI_SCALE = flags.DEFINE_list("chi_scale_range", ["0.8", "1.25"], "Per-subject chi (and field) "
                               "scale range with --augment.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Storage dtype.")
_SHARDS = flags.DEFINE_integer("shards", 16, "Training shards (>= the number of training "
                               "workers).")
_VAL_SHARDS = flags.DEFINE_integer("val_shards", 2, "Validation shards.")
_SHARDING = flags.DEFINE_enum(
    "sharding", "fileio", ["fileio", "reshard", "beam"],
    "How examples reach the --shards shards. 'fileio': Beam's TFRecord sink writes per-bundle "
    "files, records are dealt into shards in a seeded order, and Beam's file sink "
    "(fileio.WriteToFiles, one destination per shard) writes the shards (little memory, "
    "byte-identical reruns). 'reshard': the same, but the shards are copied by our own stage "
    "(identical bytes). 'beam': WriteToTFRecord(num_shards) directly (a GroupByKey of every "
    "example: memory grows with the dataset; for cluster runners).")
_RUNNER = flags.DEFINE_string("runner", "DirectRunner", "Beam runner.")
_NUM_WORKERS = flags.DEFINE_integer("direct_num_workers", 2, "DirectRunner workers (0 = cores).")
_RUNNING_MODE = flags.DEFINE_enum("direct_running_mode", "multi_processing",
                                  ["in_memory", "multi_threading", "multi_processing"],
                                  "DirectRunner mode.")


def _floats(values, name):
  try:
    return [float(v) for v in values]
  except ValueError:
    raise InputError(f"--{name} must be numbers, got {','.join(values)}") from None


def _voxel_sizes(values):
  out = []
  for text in values:
    parts = text.lower().split("x")
    try:
      size = tuple(float(p) for p in parts)
    except ValueError:
      size = ()
    if len(size) != 3 or not all(s > 0 for s in size):
      raise InputError(f"--voxel_sizes entries must look like 1x1x1.5 (mm), got {text!r}")
    out.append(size)
  return out


def _parse_flags(argv):
  """absl parses its flags; the rest (Beam pipeline options) is handed to main untouched."""
  return flags.FLAGS(argv, known_only=True)


@contextlib.contextmanager
def _stderr_to_log(enabled: bool):
  """fd 2 (inherited by Beam's worker processes) into a temporary log file while enabled."""
  if not enabled:
    yield
    return
  sys.stderr.flush()
  fd, path = tempfile.mkstemp(prefix="qsmgan-beam-", suffix=".log")
  saved = os.dup(2)
  os.dup2(fd, 2)
  os.close(fd)
  failure = None
  try:
    yield
  except BaseException as err:
    failure = err
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    if failure is None or isinstance(failure, InputError):  # bad input: its one line says all
      os.unlink(path)
    else:
      logging.error("the Beam run's log (workers included): %s", path)


@cli.one_line_errors
def main(argv):
  # Imports here: --help must not pay for numpy/scipy/Beam.
  from data_prep import patches  # pylint: disable=import-outside-toplevel
  from data_prep import pipeline  # pylint: disable=import-outside-toplevel
  from data_prep import subject_specs  # pylint: disable=import-outside-toplevel

  extra = argv[1:]
  if logging.get_verbosity() < logging.DEBUG:
    # Beam logs every bundle and worker start at INFO.
    std_logging.getLogger("apache_beam").setLevel(std_logging.WARNING)
  if not _OUT_DIR.value:
    raise InputError("--out_dir is required")
  snrs = [None if v == float("inf") else v for v in _floats(_SNR.value, "snr")]
  if any(v is not None and v <= 0 for v in snrs):
    raise InputError("--snr values must be positive")
  scale = _floats(_CHI_SCALE.value, "chi_scale_range")
  shape = None
  if _SUBJECT_SHAPE.value:
    shape = tuple(int(v) for v in _SUBJECT_SHAPE.value)
    if len(shape) != 3 or min(shape) < 8:
      raise InputError(f"--subject_shape must be 3 sizes >= 8, got {_SUBJECT_SHAPE.value}")
  try:
    config = patches.PatchConfig(
        input_patch=_INPUT_PATCH.value, output_patch=_OUTPUT_PATCH.value, stride=_STRIDE.value,
        background_fraction=_BACKGROUND_FRACTION.value, augment=_AUGMENT.value,
        b0_change=_B0_CHANGE.value, chi_scale_range=tuple(scale),
        max_patches=_MAX_PATCHES.value, dtype=_DTYPE.value)
  except (ValueError, TypeError) as exc:
    raise InputError(str(exc)) from None
  specs = subject_specs.synthetic_specs(
      _SYN_BRAINS.value, _SYN_SHAPES.value, _SEED.value, val_fraction=_VAL_FRACTION.value,
      lesion_fraction=_LESION_FRACTION.value, snrs=snrs,
      voxel_sizes=_voxel_sizes(_VOXEL_SIZES.value),
      b0_tilts_deg=_floats(_B0_TILT.value, "b0_tilt_deg"), shape=shape, target=_TARGET.value,
      background_order=_BACKGROUND_ORDER.value, model_errors=_MODEL_ERRORS.value,
      model_error_fraction=_MODEL_ERROR_FRACTION.value, detail=_DETAIL.value,
      detail_fraction=_DETAIL_FRACTION.value)
  if _SUBJECTS_DIR.value:
    specs += subject_specs.real_specs(_SUBJECTS_DIR.value, _SEED.value, _VAL_FRACTION.value,
                                      _TARGET.value)
  # Worker processes must import this checkout's packages even when it is not pip-installed.
  root = str(pathlib.Path(__file__).resolve().parent.parent)
  paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
  if root not in paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p])
  # Flags that change the content, recorded as given (runner settings do not change it).
  resolved = {f.name: f.value for f in flags.FLAGS.get_flags_for_module(sys.modules[__name__])
              if f.name not in ("runner", "direct_num_workers", "direct_running_mode")}
  resolved["beam_args"] = extra
  print(f"simulating {len(specs)} subjects and writing their patch pairs with Beam "
        f"({_RUNNER.value})...", flush=True)
  with _stderr_to_log(logging.get_verbosity() < logging.DEBUG):
    manifest = pipeline.make_dataset(
        specs, config, _OUT_DIR.value,
        pipeline.WriteOptions(train_shards=_SHARDS.value, val_shards=_VAL_SHARDS.value,
                              sharding=_SHARDING.value, seed=_SEED.value,
                              beam_args=tuple(pipeline.beam_args(
                                  _RUNNER.value, _NUM_WORKERS.value, _RUNNING_MODE.value,
                                  extra))),
        target=_TARGET.value, flags=resolved, overwrite=_OVERWRITE.value)
  counts = {s: e["num_examples"] for s, e in manifest["splits"].items()}
  logging.info("dataset %s: %s examples, digest %s", _OUT_DIR.value, counts,
               manifest["example_digest"][:16])
  print(f"wrote {_OUT_DIR.value}: " + ", ".join(f"{s} {n} pairs" for s, n in counts.items()))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
