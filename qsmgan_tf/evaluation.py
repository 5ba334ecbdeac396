"""Evaluation library: runs methods on one input, scores them, writes the report.

`qsmgan_tf.evaluate` is the absl binary over it (its module docstring shows the command line and
the method-spec syntax); tests and the model card's scripts call these functions directly.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

import qsmgan_tf
from qsmgan_tf import figures
from qsmgan_tf import metrics
from qsmgan_tf import nifti_io
from qsmgan_tf import reconstruct
from qsmgan_tf.errors import InputError


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
# Columns shown only when some method has the metric, placed before the time column; "one":
# the best is the value closest to 1 (`benchmarks/real_data.py` adds the contrast slope).
OPTIONAL_COLUMNS = (
    ("slope", "slope", "one"),
)
_FORMATS = {"nrmse": "{:.2f}", "nrmse_detrend": "{:.2f}", "hfen": "{:.2f}", "xsim": "{:.4f}",
            "correlation": "{:.4f}", "dgm_linearity": "{:.3f}", "psnr": "{:.2f}",
            "seconds": "{:.2f}", "slope": "{:.3f}"}
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


def _has_number(result: MethodResult, key: str) -> bool:
  value = result.metrics.get(key)
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def table_columns(results: Sequence[MethodResult]) -> tuple[tuple[str, str, str], ...]:
  """`COLUMNS` plus the `OPTIONAL_COLUMNS` some result has a number for (before the time)."""
  extra = tuple(c for c in OPTIONAL_COLUMNS if any(_has_number(r, c[1]) for r in results))
  return COLUMNS[:-1] + extra + COLUMNS[-1:]


def best_per_column(results: Sequence[MethodResult]) -> dict[str, list[str]]:
  """Metrics key -> labels of the best method(s), for keys with any value.

  Values are compared as the table shows them (rounded), so rows that print the same number
  are all marked.
  """
  best = {}
  for _, key, better in table_columns(results):
    values = [(float(_FORMATS[key].format(r.metrics[key])), r.spec.label) for r in results
              if _has_number(r, key)]
    if not values:
      continue
    if better == "one":
      values = [(abs(v - 1.0), label) for v, label in values]
    target = (max if better == "max" else min)(v for v, _ in values)
    best[key] = [label for v, label in values if v == target]
  return best


def results_table(results: Sequence[MethodResult]) -> str:
  """The markdown table, best value per column in bold, missing values as n/a."""
  best = best_per_column(results)
  columns = table_columns(results)
  arrows = {"min": "↓", "max": "↑", "one": "→1"}
  header = ["method"] + [f"{h} {arrows[b]}" for h, _, b in columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns))
           + "|"]
  for r in results:
    cells = [r.spec.label.replace("|", "\\|")]
    for _, key, _ in columns:
      value = r.metrics.get(key)
      if not _has_number(r, key):
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
      "columns": [{"header": h, "key": k, "better": b} for h, k, b in table_columns(results)],
      "best": best_per_column(results),
      "methods": rows,
      "figure": {"file": "figure.png", "window_ppm": list(window_ppm),
                 "error_window_ppm": list(error_window_ppm or window_ppm)},
  })
  return table


def window_from_flag(values, name: str) -> tuple[float, float]:
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
