r"""Real-data benchmark: every method on the 2016 QSM challenge's in-vivo subject, against COSMOS.

  python benchmarks/real_data.py --out_dir=runs/real_data_v4 \
      [--model=saved_models/qsmgan/8] [--extra='qsmgan:model=RUN/generator_best.keras:label=new']

The subject (one healthy volunteer, 3 T, measured local field in ppm, brain mask, COSMOS
reference; B0 along the third axis, from the affine) is read from ``../shared/real/qsm2016``
beside the repository (``--data_dir``). Users do not have it: without it the script says so in
one line and exits 0. See the README in that folder for its provenance and limits.

One run scores every method on the same field (`evaluation.run_methods`, `score_results`,
`write_report`): qsmgan refined, the network alone (``refine=none``), TKD, closed-form L2, iLSQR,
MEDI and TV at their documented defaults, plus ``--extra`` specs. Each method also gets
``slope`` (`metrics.contrast_slope`): the least-squares slope of its demeaned map on COSMOS's
demeaned map over the WHOLE mask, i.e. how much contrast it keeps (1 = all; the network alone
keeps about 0.6). There is no segmentation, so QSM-CI's deep-grey-matter linearity is n/a here.

Each method also gets ``fine_energy`` (`metrics.fine_energy_fraction`: the share of its map's
energy above 0.2 cycles/mm; COSMOS's own is in the spectral table) and a row of the spectral
table (`metrics.spectral_bands`): its error's energy per radial band of k, inside and outside the
dipole's cone, as % of COSMOS's energy (a row sums to NRMSE^2 / 100), so a change shows where
it gained or lost: fine structure, the cone the network fills, or the well-measured rest.

Prints one JSON line per method (label, spec, nrmse, hfen, xsim, correlation, slope,
fine_energy, seconds) and writes into ``--out_dir`` the evaluate report (results.md,
results.json, one Chimap per method, figure.png at +-0.15 ppm, errors at the same window) and
``real_data.md`` (subject, command line, date, both tables).

This subject is for validation only: never choose a parameter, a checkpoint or a method variant
on it. Public QSM-CI in-vivo figures on it (NRMSE % against COSMOS, whole mask, demeaned), for
comparison: QSMnet+ 51.1, LPCNN 52.1, tuned MEDI 60.0, tuned TKD 62.7, the released QSMGAN
weights 73.2.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import shlex
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qsmgan_tf import cli  # pylint: disable=wrong-import-position
from qsmgan_tf import evaluation  # pylint: disable=wrong-import-position
from qsmgan_tf import metrics  # pylint: disable=wrong-import-position
from qsmgan_tf import nifti_io  # pylint: disable=wrong-import-position
from qsmgan_tf.errors import InputError  # pylint: disable=wrong-import-position

DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared/real/qsm2016"
FILES = {"field": "field_ppm.nii.gz", "mask": "mask.nii.gz", "truth": "chi_cosmos.nii.gz"}
DEFAULT_METHODS = ("qsmgan,qsmgan:refine=none:label=network alone,tkd,cfl2,ilsqr,medi,tv")
SUBJECT = ("2016 QSM reconstruction challenge, in-vivo subject (3 T, single orientation), "
           "COSMOS reference")
WINDOW_PPM = (-0.15, 0.15)
JSON_KEYS = ("nrmse", "hfen", "xsim", "correlation", "slope", "fine_energy")

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with field_ppm.nii.gz, mask.nii.gz and "
                                "chi_cosmos.nii.gz (default: ../shared/real/qsm2016 beside the "
                                "repository).")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/real_data", "Report folder (created if missing).")
_MODEL = flags.DEFINE_string("model", None, "Default model of the qsmgan specs (default: the "
                             "newest under saved_models/qsmgan).")
_METHODS = flags.DEFINE_string("methods", DEFAULT_METHODS, "Method specs name[:key=value...], "
                               "as `python -m qsmgan_tf.evaluate --methods`.")
_EXTRA = flags.DEFINE_list("extra", [], "More method specs appended to --methods, e.g. "
                           "'qsmgan:model=RUN/generator_best.keras:label=candidate'.")


def missing_files(data_dir) -> list[str]:
  """The input files absent from ``data_dir`` (all of them when the folder is absent)."""
  folder = pathlib.Path(data_dir)
  return [name for name in FILES.values() if not (folder / name).is_file()]


def method_text(methods: str, extra) -> str:
  """``--methods`` with the ``--extra`` specs appended."""
  return ",".join([methods] + [e for e in extra if e.strip()])


def run(data_dir, out_dir, methods: str, model=None, progress=True):
  """Scores every method on the subject, adds the slopes, writes the evaluate report.

  Args:
    data_dir: folder with the `FILES`.
    out_dir: report folder.
    methods: method specs (`evaluation.parse_method_specs`).
    model: default model of the qsmgan specs (None: the newest shipped one).
    progress: log each method.

  Returns:
    ``(results, table, spectral)``: the scored `evaluation.MethodResult`s, the markdown table
    and the spectral table (`spectral_markdown`).
  """
  specs = evaluation.parse_method_specs(methods)
  folder = pathlib.Path(data_dir)
  paths = {k: str(folder / name) for k, name in FILES.items()}
  inputs, truth_ppm, _ = evaluation.load_inputs(**paths)
  results = evaluation.run_methods(specs, inputs.field_ppm, inputs.mask, inputs.voxel_size_mm,
                                   inputs.b0_dir, qsmgan_defaults={"model": model} if model
                                   else None, progress=progress)
  evaluation.score_results(results, truth_ppm, inputs.mask)
  for r in results:
    slope = metrics.contrast_slope(r.chi_ppm, truth_ppm, inputs.mask)
    r.metrics["slope"] = slope if math.isfinite(slope) else None
    r.metrics["fine_energy"] = metrics.fine_energy_fraction(r.chi_ppm, inputs.mask,
                                                            inputs.voxel_size_mm)
    r.info["spectral_bands"] = metrics.spectral_bands(r.chi_ppm, truth_ppm, inputs.mask,
                                                      inputs.voxel_size_mm, inputs.b0_dir)
  facts = dict(paths, subject=SUBJECT, voxel_size_mm=list(inputs.voxel_size_mm),
               b0_dir=[float(v) for v in inputs.b0_dir], b0_dir_source=inputs.b0_dir_source,
               shape=list(inputs.field_ppm.shape), mask_voxels=int(inputs.mask.sum()),
               slope="least-squares slope of the demeaned map on the demeaned COSMOS, whole mask")
  table = evaluation.write_report(out_dir, results, truth_ppm, inputs.mask, inputs.image,
                                  inputs.voxel_size_mm, facts, WINDOW_PPM, WINDOW_PPM)
  spectral = spectral_markdown(results, metrics.fine_energy_fraction(
      truth_ppm, inputs.mask, inputs.voxel_size_mm))
  return results, table, spectral


def _band_header(row) -> str:
  lo, hi = row["band_cycles_per_mm"]
  band = f"{lo:g}-{hi:g}" if hi is not None else f">{lo:g}"
  return f"{'cone' if row['cone'] else 'off'} {band}"


def spectral_markdown(results, reference_fine: float) -> str:
  """Each method's error energy per band and cone side (% of COSMOS's energy), and COSMOS's
  energy per band, as a markdown table (bands in cycles/mm; 'cone': ``|D| < 0.1``)."""
  bands = results[0].info["spectral_bands"]
  lines = ["| map | " + " | ".join(_band_header(r) for r in bands) + " | fine energy |",
           "|---|" + "---:|" * (len(bands) + 1),
           "| COSMOS energy | " + " | ".join(f"{r['truth_pct']:.1f}" for r in bands)
           + f" | {reference_fine:.3f} |"]
  for r in results:
    lines.append(f"| {r.spec.label} error | "
                 + " | ".join(f"{b['error_pct']:.1f}" for b in r.info["spectral_bands"])
                 + f" | {r.metrics['fine_energy']:.3f} |")
  return "\n".join(lines + ["", "Error energy per radial band of k (cycles/mm) inside ('cone', "
                             "|D| < 0.1) and outside the dipole's cone, % of COSMOS's energy; a "
                             "row sums to NRMSE^2 / 100. Fine energy: share of a map's energy "
                             "above 0.2 cycles/mm.", ""])


def summary_markdown(table: str, command: str, when: str, data: str, models,
                     spectral: str = "") -> str:
  """``real_data.md``: subject, command line, date, qsmgan models and the tables."""
  return "\n".join([
      "# Real-data benchmark", "",
      f"- Subject: {SUBJECT} (`{data}`); validation only, never tuned on.",
      f"- Command: `{command}`", f"- Date: {when}",
      f"- qsmgan models: {', '.join(f'`{m}`' for m in models) or 'none'}",
      "- Slope: least-squares slope of each demeaned map on COSMOS over the whole mask (no "
      "segmentation, so DGM linearity is n/a).",
      "- Public QSM-CI NRMSE % on this subject: QSMnet+ 51.1, LPCNN 52.1, tuned MEDI 60.0, tuned "
      "TKD 62.7, released QSMGAN weights 73.2.", "", table, "", spectral])


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUT_DIR.value:
    raise InputError("--out_dir is empty")
  methods = method_text(_METHODS.value, _EXTRA.value)
  evaluation.parse_method_specs(methods)  # bad specs fail before the data check
  data_dir = pathlib.Path(_DATA_DIR.value) if _DATA_DIR.value else DEFAULT_DATA_DIR
  shown = _DATA_DIR.value or "../shared/real/qsm2016"
  missing = missing_files(data_dir)
  if missing:
    detail = "no such folder" if not data_dir.is_dir() else f"missing {', '.join(missing)}"
    print(f"real-data benchmark skipped: {shown} is not there ({detail}); it holds the 2016 "
          f"QSM challenge subject, which is not distributed with the project.", file=sys.stderr)
    return 0
  results, table, spectral = run(data_dir, _OUT_DIR.value, methods, _MODEL.value)
  for r in results:
    print(json.dumps({"label": r.spec.label, "spec": r.spec.spec,
                      **{k: r.metrics.get(k) for k in JSON_KEYS}, "seconds": r.seconds}),
          flush=True)
  models = dict.fromkeys(str(r.info.get("method_info", {}).get("model")) for r in results
                         if r.spec.name == evaluation.QSMGAN)
  when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  command = shlex.join(["python"] + sys.argv)
  sys.stderr.write(table + "\n" + spectral)
  nifti_io.write_text(pathlib.Path(_OUT_DIR.value) / "real_data.md",
                      summary_markdown(table, command, when, shown, models, spectral))
  return 0


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as exc:  # one line, not absl's two
    sys.exit(cli.fail(str(exc)))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
