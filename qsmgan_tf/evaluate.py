r"""Scores QSMGAN against the classical methods on one input, in one run.

  python -m qsmgan_tf.evaluate --field=sub-01_localfield.nii.gz --field_units=ppm \
      --mask=sub-01_mask.nii.gz --truth=sub-01_chi.nii.gz [--seg=sub-01_dseg.nii.gz] \
      [--magnitude=sub-01_mag.nii.gz] --model=saved_models/qsmgan \
      --methods='qsmgan,qsmgan:refine=none:label=U-Net only,tkd,cfl2,ilsqr,medi,tv' \
      --out_dir=eval/sub-01

Every method goes through `reconstruct.run_method` (the dispatcher `predict` uses) on the same
field, mask, voxel size and B0 direction, and is scored with `metrics.evaluate` (the QSM-CI
definitions plus PSNR). Writes into ``--out_dir``:

  * ``results.md``: a markdown table (method, NRMSE, dNRMSE, HFEN, XSIM, correlation, DGM
    linearity, PSNR, time), the best value per column in bold; also printed on stdout;
  * ``results.json``: the same numbers, each method's spec, options and run information;
  * ``desc-<label>_Chimap.nii.gz`` per method, on the field's grid and affine;
  * ``figure.png``: truth and one row per method, three orthogonal slices at a fixed ppm window,
    plus the error (method - truth) at the same window (`figures`).

Each file is written to a temporary name and renamed, results.json last, so a crash never
leaves a half-written file and a complete results.json means a complete run.

Method specs: ``name[:key=value[:key=value...]]``. ``name`` is a classical method (tkd, cfl2,
ilsqr, medi, tv) or ``qsmgan``; options go to `reconstruct.run_method` (for example
``qsmgan:refine=none``, ``qsmgan:model=saved_models/gan/2``, ``tkd:threshold=0.2``), except
``label=...``, the row's name. Values are read as int, float or true/false when they parse as
such, else as text. The ``--model``/``--refine``/``--server``/``--rest_url``/``--inference``
flags are defaults for every qsmgan spec.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from qsmgan_tf import cli
from qsmgan_tf import evaluation
from qsmgan_tf.errors import InputError

_FIELD = flags.DEFINE_string("field", None, "Local field NIfTI (unit: --field_units).")
_FIELD_UNITS = flags.DEFINE_enum("field_units", "ppm", ["ppm", "hz", "rad"],
                                 "Unit of --field: ppm of B0, Hz (needs --b0_tesla) or phase in "
                                 "rad (needs --b0_tesla and --te_seconds).")
_B0_TESLA = flags.DEFINE_float("b0_tesla", None, "Main field, T (for --field_units=hz|rad).")
_TE_SECONDS = flags.DEFINE_float("te_seconds", None, "Echo time, s (for --field_units=rad).")
_B0_DIR = flags.DEFINE_string("b0_dir", None, "B0 direction x,y,z in the voxel frame; default: "
                              "from the field's affine.")
_MASK = flags.DEFINE_string("mask", None, "Brain mask NIfTI (non-zero = inside).")
_TRUTH = flags.DEFINE_string("truth", None, "Reference susceptibility NIfTI, ppm.")
_SEG = flags.DEFINE_string("seg", None, "QSM-CI segmentation labels NIfTI (adds DGM linearity).")
_MAGNITUDE = flags.DEFINE_string("magnitude", None, "Magnitude NIfTI (MEDI's edge mask and "
                                 "weights; qsmgan's refinement as its contract says; spec "
                                 "option use_magnitude=false keeps it from qsmgan).")
_METHODS = flags.DEFINE_string("methods", "qsmgan,tkd,cfl2,ilsqr,medi,tv",
                               "Comma-separated method specs name[:key=value...] (module doc).")
_LABELS = flags.DEFINE_list("labels", None, "Row labels, one per method spec (default: the "
                            "spec's label= option, else the spec itself).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder (created if missing).")
_MODEL = flags.DEFINE_string("model", None, "Default qsmgan model: SavedModel version folder or "
                             "model base path.")
_REFINE = flags.DEFINE_enum("refine", None, ["cg", "none"], "Default qsmgan refinement against "
                            "the measured field (default: predict's, cg).")
_SERVER = flags.DEFINE_string("server", None, "Default qsmgan TF Serving gRPC host:port.")
_REST_URL = flags.DEFINE_string("rest_url", None, "Default qsmgan TF Serving REST model URL.")
_INFERENCE = flags.DEFINE_enum("inference", None, ["single", "tiled"], "Default qsmgan "
                               "inference: one fully convolutional pass or overlapping tiles.")
_WINDOW = flags.DEFINE_list("window_ppm", ["-0.15", "0.15"], "Figure window for chi, ppm.")
_ERROR_WINDOW = flags.DEFINE_list("error_window_ppm", None, "Figure window for the error maps, "
                                  "ppm (default: --window_ppm).")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress output.")


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
  defaults = {k: f.value for k, f in (("model", _MODEL), ("refine", _REFINE),
                                       ("server", _SERVER), ("rest_url", _REST_URL),
                                       ("inference", _INFERENCE)) if f.value is not None}
  window = evaluation.window_from_flag(_WINDOW.value, "window_ppm")
  error_window = evaluation.window_from_flag(_ERROR_WINDOW.value, "error_window_ppm") if _ERROR_WINDOW.value else None
  table = evaluation.evaluate_files(
      _OUT_DIR.value, _METHODS.value, _LABELS.value, defaults, window, error_window,
      progress=not _QUIET.value, field=_FIELD.value, mask=_MASK.value, truth=_TRUTH.value,
      field_units=_FIELD_UNITS.value, b0_tesla=_B0_TESLA.value, te_seconds=_TE_SECONDS.value,
      b0_dir=_B0_DIR.value, seg=_SEG.value, magnitude=_MAGNITUDE.value)
  sys.stdout.write(table)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["field", "mask", "truth", "out_dir"])
  app.run(main)
