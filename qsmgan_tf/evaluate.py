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

import dataclasses
import math
import pathlib
import re
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

from qsmgan_tf import cli
from qsmgan_tf.nifti_io import InputError

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
                                 "weights).")
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

# (header, metrics key, better): the table's columns, in order.
COLUMNS = (
    ("NRMSE %", "nrmse", "min"),
    ("dNRMSE %", "nrmse_detrend", "min"),
    ("HFEN %", "hfen", "min"),
    ("XSIM", "xsim", "max"),
    ("correlation", "correlation", "max"),
    ("DGM linearity", "dgm_linearity", "min"),
    ("PSNR dB", "psnr", "max"),
    ("time s", "seconds", "min"),
)
_FORMATS = {"nrmse": "{:.2f}", "nrmse_detrend": "{:.2f}", "hfen": "{:.2f}", "xsim": "{:.4f}",
            "correlation": "{:.4f}", "dgm_linearity": "{:.3f}", "psnr": "{:.2f}",
            "seconds": "{:.2f}"}
QSMGAN = "qsmgan"


@dataclasses.dataclass
class MethodSpec:
  """One row of the comparison: a method, its options and its label."""
  name: str
  options: dict[str, Any]
  label: str
  spec: str


@dataclasses.dataclass
class MethodResult:
  """A method's map (ppm), scores, wall time (s) and run information."""
  spec: MethodSpec
  chi_ppm: Any
  metrics: dict[str, float]
  seconds: float
  info: dict[str, Any]


def known_methods() -> tuple[str, ...]:
  """Method names `reconstruct.run_method` accepts."""
  from qsmgan_tf import reconstruct  # pylint: disable=import-outside-toplevel
  return tuple(reconstruct.METHOD_NAMES)


def _parse_value(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_method_specs(text: str, labels: Sequence[str] | None = None,
                       names: Sequence[str] | None = None) -> list[MethodSpec]:
  """Parses ``--methods``: comma-separated ``name[:key=value...]`` specs.

  A comma starts a new spec only when a bare word follows it and then ``:``, ``,`` or the end,
  and a colon starts a new option only before ``key=``: so ``qsmgan:server=localhost:8500`` and
  ``label=U-Net, no refinement`` parse.

  Args:
    text: the flag value.
    labels: optional row labels, one per spec (override ``label=``).
    names: accepted method names (default: `known_methods`).

  Returns:
    The specs, in order.

  Raises:
    InputError: empty list, unknown method, malformed option, wrong number of labels or a
      duplicated label.
  """
  names = tuple(names or known_methods())
  pieces = [p.strip() for p in re.split(r",\s*(?=[A-Za-z_][\w-]*\s*(?::|,|$))", text or "")]
  pieces = [p for p in pieces if p]
  if not pieces:
    raise InputError("--methods is empty")
  if labels is not None and len(labels) != len(pieces):
    raise InputError(f"--labels has {len(labels)} entries for {len(pieces)} method specs")
  specs = []
  for i, piece in enumerate(pieces):
    name, _, rest = piece.partition(":")
    name = name.strip().lower()
    if name not in names:
      raise InputError(f"unknown method {name!r} in --methods; expected one of "
                       f"{', '.join(names)}")
    options: dict[str, Any] = {}
    label = None
    for item in re.split(r":(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)", rest) if rest else []:
      key, eq, value = item.partition("=")
      key = key.strip()
      if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise InputError(f"method spec {piece!r}: expected key=value, got {item!r}")
      if key == "label":
        label = value.strip()
      else:
        options[key] = _parse_value(value.strip())
    if labels is not None:
      label = labels[i].strip()
    if not label:
      label = name if not options else (
          f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())})")
    specs.append(MethodSpec(name, options, label, piece))
  seen = [s.label for s in specs]
  duplicates = sorted({x for x in seen if seen.count(x) > 1})
  if duplicates:
    raise InputError(f"duplicate method label(s) {', '.join(duplicates)}: add label=... to tell "
                     f"them apart")
  return specs


def run_methods(specs: Sequence[MethodSpec], field_ppm, mask, voxel_size_mm, b0_dir,
                magnitude=None, qsmgan_defaults: dict[str, Any] | None = None,
                acquisition: dict[str, float] | None = None,
                progress: bool = True) -> list[MethodResult]:
  """Runs every spec through `reconstruct.run_method` on the same input (unscored).

  A spec's options are `run_method`'s: ``reference`` for any method, the parameters of
  `classical.DEFAULTS` for a classical one, `inference.reconstruct_qsmgan`'s keywords for qsmgan.

  Args:
    specs: from `parse_method_specs`.
    field_ppm: local field, ppm of B0.
    mask: boolean brain mask.
    voxel_size_mm: voxel size, mm.
    b0_dir: unit B0 direction in the voxel frame.
    magnitude: optional magnitude image.
    qsmgan_defaults: options for every qsmgan spec (the spec's own options win).
    acquisition: ``b0_tesla``/``te_seconds`` for the classical methods that take them.
    progress: log each method as it starts and ends.

  Returns:
    One MethodResult per spec (metrics empty), with wall-clock seconds.
  """
  from qsmgan_tf import reconstruct  # pylint: disable=import-outside-toplevel

  acquisition = acquisition or {}
  results = []
  for spec in specs:
    options = dict(spec.options)
    kwargs = {"reference": options.pop("reference")} if "reference" in options else {}
    if spec.name == QSMGAN:
      kwargs.update({**(qsmgan_defaults or {}), **options})
      kwargs.setdefault("progress", progress)
    else:
      kwargs["params"] = {**reconstruct.acquisition_params(spec.name, acquisition.get("b0_tesla"),
                                                           acquisition.get("te_seconds")),
                          **options}
    if progress:
      logging.info("running %s", spec.label)
    start = time.perf_counter()
    chi, info = reconstruct.run_method(spec.name, field_ppm, mask, voxel_size_mm, b0_dir,
                                       magnitude=magnitude, **kwargs)
    seconds = time.perf_counter() - start
    if progress:
      logging.info("%s: %.1f s", spec.label, seconds)
    results.append(MethodResult(spec, chi, {}, seconds, dict(info or {})))
  return results


def score_results(results: Sequence[MethodResult], truth_ppm, mask, seg=None) -> None:
  """Fills each result's metrics with `metrics.evaluate` (QSM-CI + PSNR) and its time."""
  from qsmgan_tf import metrics  # pylint: disable=import-outside-toplevel

  for result in results:
    scores = metrics.evaluate(result.chi_ppm, truth_ppm, mask, seg=seg)
    result.metrics = {k: _finite_or_none(v) for k, v in scores.items()}
    result.metrics["seconds"] = float(result.seconds)


def _finite_or_none(value):
  try:
    value = float(value)
  except (TypeError, ValueError):
    return value
  return value if math.isfinite(value) else None


def best_per_column(results: Sequence[MethodResult]) -> dict[str, list[str]]:
  """Metrics key -> labels of the best method(s), for keys with any value.

  Values are compared as the table shows them (rounded), so rows that print the same number
  are all marked.
  """
  best = {}
  for _, key, better in COLUMNS:
    values = [(float(_FORMATS[key].format(r.metrics[key])), r.spec.label) for r in results
              if isinstance(r.metrics.get(key), (int, float))]
    if not values:
      continue
    target = (min if better == "min" else max)(v for v, _ in values)
    best[key] = [label for v, label in values if v == target]
  return best


def results_table(results: Sequence[MethodResult]) -> str:
  """The markdown table, best value per column in bold, missing values as n/a."""
  best = best_per_column(results)
  arrows = {"min": "↓", "max": "↑"}
  header = ["method"] + [f"{h} {arrows[b]}" for h, _, b in COLUMNS]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS))
           + "|"]
  for r in results:
    cells = [r.spec.label.replace("|", "\\|")]
    for _, key, _ in COLUMNS:
      value = r.metrics.get(key)
      if not isinstance(value, (int, float)):
        cells.append("n/a")
        continue
      text = _FORMATS[key].format(value)
      cells.append(f"**{text}**" if r.spec.label in best.get(key, ()) else text)
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Best per column in bold. Time: wall clock of the whole method call, model "
            "loading included (the first qsmgan row also pays TensorFlow's start-up)."]
  return "\n".join(lines) + "\n"


def chimap_name(label: str, taken: set[str]) -> str:
  """BIDS-style ``desc-<label>_Chimap.nii.gz`` (alphanumeric label, unique in ``taken``)."""
  words = re.findall(r"[A-Za-z0-9]+", label) or ["method"]
  desc = words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])
  name, n = f"desc-{desc}_Chimap.nii.gz", 2
  while name in taken:
    name, n = f"desc-{desc}{n}_Chimap.nii.gz", n + 1
  taken.add(name)
  return name


def write_report(out_dir, results: Sequence[MethodResult], truth_ppm, mask, reference_img,
                 voxel_size_mm, inputs: dict[str, Any] | None = None,
                 window_ppm=(-0.15, 0.15), error_window_ppm=None) -> str:
  """Writes the maps, figure.png, results.md and (last) results.json; returns the table.

  Args:
    out_dir: output folder (created if missing).
    results: scored results.
    truth_ppm: reference chi, ppm (for the figure).
    mask: brain mask.
    reference_img: the field's NIfTI image: grid, affine and header of the maps.
    voxel_size_mm: voxel size, mm (figure aspect).
    inputs: facts about the inputs for results.json.
    window_ppm: figure window for chi, ppm.
    error_window_ppm: figure window for the error maps, ppm.
  """
  import qsmgan_tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import figures  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import nifti_io  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  taken: set[str] = set()
  rows = []
  for r in results:
    name = chimap_name(r.spec.label, taken)
    nifti_io.write_volume(out / name, r.chi_ppm, reference_img)
    rows.append({"label": r.spec.label, "method": r.spec.name, "spec": r.spec.spec,
                 "options": r.spec.options, "metrics": r.metrics, "seconds": r.seconds,
                 "chi_map": name, "info": r.info})
  figures.write_comparison(out / "figure.png", truth_ppm,
                           [(r.spec.label, r.chi_ppm) for r in results], mask,
                           voxel_size_mm=voxel_size_mm, window_ppm=tuple(window_ppm),
                           error_window_ppm=error_window_ppm and tuple(error_window_ppm))
  table = results_table(results)
  nifti_io.write_text(out / "results.md", table)
  nifti_io.write_json(out / "results.json", {
      "code_version": qsmgan_tf.__version__,
      "inputs": inputs or {},
      "columns": [{"header": h, "key": k, "better": b} for h, k, b in COLUMNS],
      "best": best_per_column(results),
      "methods": rows,
      "figure": {"file": "figure.png", "window_ppm": list(window_ppm),
                 "error_window_ppm": list(error_window_ppm or window_ppm)},
  })
  return table


def _window(values, name: str) -> tuple[float, float]:
  try:
    low, high = (float(v) for v in values)
  except (TypeError, ValueError):
    raise InputError(f"--{name} must be two numbers low,high, got {values!r}") from None
  if not low < high:
    raise InputError(f"--{name} must have low < high, got {low},{high}")
  return low, high


def load_inputs(field, mask, truth, field_units="ppm", b0_tesla=None, te_seconds=None, b0_dir=None,
                seg=None, magnitude=None):
  """Loads and checks the evaluation inputs (one-line InputErrors for bad files/flags).

  Field, mask, magnitude, units and B0 go through `reconstruct.load_inputs` (the predict CLI's
  rules); the truth and segmentation must match the field's grid.

  Returns:
    ``(inputs, truth_ppm, seg)``: a `reconstruct.Inputs`, the truth (ppm) and the labels or None.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import nifti_io  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import reconstruct  # pylint: disable=import-outside-toplevel

  for flag, value in (("field", field), ("mask", mask), ("truth", truth)):
    if value is None:
      raise InputError(f"--{flag} is required")
  inputs = reconstruct.load_inputs(field, mask, field_units, b0_tesla, te_seconds, b0_dir,
                                   magnitude)
  shape = inputs.field_ppm.shape
  truth_ppm = nifti_io.load_matching(truth, shape, "truth")
  seg_arr = None
  if seg:
    seg_arr = np.rint(nifti_io.load_matching(seg, shape, "seg")).astype(np.int16)
  return inputs, truth_ppm, seg_arr


def evaluate_files(out_dir, methods: str, labels=None, qsmgan_defaults=None,
                   window_ppm=(-0.15, 0.15), error_window_ppm=None, progress=True,
                   **input_args) -> str:
  """The whole evaluation from files (what the binary runs); returns the markdown table.

  Args:
    out_dir: output folder.
    methods: the ``--methods`` specs.
    labels: optional row labels.
    qsmgan_defaults: defaults for qsmgan specs (model, refine, server, ...).
    window_ppm: figure window for chi, ppm.
    error_window_ppm: figure window for the errors, ppm.
    progress: log progress.
    **input_args: `load_inputs` arguments (file paths, units, B0).
  """
  specs = parse_method_specs(methods, labels)
  if out_dir is None:
    raise InputError("--out_dir is required")
  inputs, truth_ppm, seg = load_inputs(**input_args)
  results = run_methods(specs, inputs.field_ppm, inputs.mask, inputs.voxel_size_mm,
                        inputs.b0_dir, inputs.magnitude, qsmgan_defaults,
                        {"b0_tesla": inputs.b0_tesla, "te_seconds": inputs.te_seconds}, progress)
  score_results(results, truth_ppm, inputs.mask, seg)
  facts = {k: str(v) for k, v in input_args.items() if v is not None}
  facts.update(voxel_size_mm=list(inputs.voxel_size_mm),
               b0_dir=[float(v) for v in inputs.b0_dir], b0_dir_source=inputs.b0_dir_source,
               b0_dir_warning=inputs.b0_dir_warning, shape=list(inputs.field_ppm.shape),
               mask_voxels=int(inputs.mask.sum()))
  return write_report(out_dir, results, truth_ppm, inputs.mask, inputs.image,
                      inputs.voxel_size_mm, facts, window_ppm, error_window_ppm)


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
  defaults = {k: f.value for k, f in (("model", _MODEL), ("refine", _REFINE),
                                       ("server", _SERVER), ("rest_url", _REST_URL),
                                       ("inference", _INFERENCE)) if f.value is not None}
  window = _window(_WINDOW.value, "window_ppm")
  error_window = _window(_ERROR_WINDOW.value, "error_window_ppm") if _ERROR_WINDOW.value else None
  table = evaluate_files(
      _OUT_DIR.value, _METHODS.value, _LABELS.value, defaults, window, error_window,
      progress=not _QUIET.value, field=_FIELD.value, mask=_MASK.value, truth=_TRUTH.value,
      field_units=_FIELD_UNITS.value, b0_tesla=_B0_TESLA.value, te_seconds=_TE_SECONDS.value,
      b0_dir=_B0_DIR.value, seg=_SEG.value, magnitude=_MAGNITUDE.value)
  sys.stdout.write(table)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["field", "mask", "truth", "out_dir"])
  app.run(main)
