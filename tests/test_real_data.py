"""Tests for benchmarks/real_data.py: the skip path, the contrast slope and its table column.

The script defines absl flags, so it runs in a subprocess (flags live in one global registry:
see test_package.py); nothing here needs ../shared/real.
"""

import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from qsmgan_tf import evaluation
from qsmgan_tf import metrics
from qsmgan_tf import physics
from qsmgan_tf.errors import InputError

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = _REPO / "benchmarks" / "real_data.py"
_FILES = ("field_ppm.nii.gz", "mask.nii.gz", "chi_cosmos.nii.gz")


def _run(*args, cwd=_REPO):
  return subprocess.run([sys.executable, str(_SCRIPT), *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=300, check=False)


# --------------------------------------------------------------------------------------
# Skip path and bad flags
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("present, detail", [
    # the folder does not exist
    (None, "no such folder"),
    # an empty folder
    ((), "missing field_ppm.nii.gz, mask.nii.gz, chi_cosmos.nii.gz"),
    # the reference alone is missing
    (("field_ppm.nii.gz", "mask.nii.gz"), "missing chi_cosmos.nii.gz"),
])
def test_without_the_data_it_says_so_in_one_line_and_exits_0(tmp_path, present, detail):
  data = tmp_path / "qsm2016"
  if present is not None:
    data.mkdir()
    for name in present:
      (data / name).write_bytes(b"")
  out = tmp_path / "report"
  proc = _run(f"--data_dir={data}", f"--out_dir={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("real-data benchmark skipped: "), proc.stderr
  assert str(data) in lines[0] and detail in lines[0]
  assert proc.stdout == "" and not out.exists()


@pytest.mark.parametrize("args, message", [
    # an unknown flag: one line, not absl's usage text
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
    # a bad method spec fails even before the data check
    (["--extra=nope"], "unknown method 'nope'"),
    # a stray positional argument
    (["stray"], "unexpected arguments: stray"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
  proc = _run(f"--data_dir={tmp_path}", *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


# --------------------------------------------------------------------------------------
# Contrast slope
# --------------------------------------------------------------------------------------
def _arrays(seed=0, shape=(6, 7, 8)):
  rng = np.random.default_rng(seed)
  y = rng.normal(0.0, 0.05, shape)
  mask = np.zeros(shape, bool)
  mask[1:-1, 1:-1, 1:-1] = True
  return y, mask


@pytest.mark.parametrize("make_map, expected", [
    # a scaled, offset copy keeps 60 % of the contrast: the offset does not count
    (lambda y: 0.6 * y + 0.3, 0.6),
    # the reference itself
    (lambda y: y, 1.0),
    # the opposite sign
    (lambda y: -2.0 * y - 0.1, -2.0),
    # a constant map keeps no contrast
    (lambda y: np.full_like(y, 0.2), 0.0),
])
def test_contrast_slope_of_linear_maps(make_map, expected):
  y, mask = _arrays()
  x = make_map(y)
  x[~mask] = 50.0  # outside the mask: ignored
  assert metrics.contrast_slope(x, y, mask) == pytest.approx(expected, abs=1e-9)


def test_contrast_slope_matches_a_least_squares_fit_and_counts_nan_as_zero():
  y, mask = _arrays(seed=1)
  x = 0.7 * y + np.random.default_rng(2).normal(0.0, 0.03, y.shape)
  x[2, 3, 4] = np.nan
  fitted = np.polyfit(y[mask], np.nan_to_num(x)[mask], 1)[0]  # independent: polyfit, nan -> 0
  assert metrics.contrast_slope(x, y, mask) == pytest.approx(fitted, rel=1e-9)
  assert 0.4 < fitted < 1.0


def test_contrast_slope_rejects_bad_input_and_flags_a_constant_truth():
  y, mask = _arrays()
  assert np.isnan(metrics.contrast_slope(y, np.ones_like(y), mask))
  with pytest.raises(InputError, match="mask is empty"):
    metrics.contrast_slope(y, y, np.zeros_like(mask))
  with pytest.raises(InputError, match="shape mismatch"):
    metrics.contrast_slope(y[:-1], y, mask)


# --------------------------------------------------------------------------------------
# The optional slope column of the results table
# --------------------------------------------------------------------------------------
def _result(label, **metric_values):
  spec = evaluation.MethodSpec(label, {}, label, label)
  return evaluation.MethodResult(spec, None, dict(metric_values), 0.0, {})


def _rows(table):
  lines = [line for line in table.splitlines() if line.startswith("|")]
  header = [c.strip() for c in lines[0].split("|")[1:-1]]
  return header, {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                  for line in lines[2:]}


def test_slope_column_appears_before_time_with_the_value_nearest_1_in_bold():
  results = [_result("low", nrmse=50.0, slope=0.6, seconds=1.0),
             _result("high", nrmse=60.0, slope=1.3, seconds=2.0),
             _result("none", nrmse=70.0, seconds=3.0)]
  header, rows = _rows(evaluation.results_table(results))
  assert header[-2:] == ["slope →1", "time s ↓"]
  assert [rows[k][-2] for k in ("low", "high", "none")] == ["0.600", "**1.300**", "n/a"]
  assert evaluation.best_per_column(results)["slope"] == ["high"]


def test_no_slope_column_without_slopes():
  header, _ = _rows(evaluation.results_table([_result("a", nrmse=50.0, seconds=1.0)]))
  assert not any(h.startswith("slope") for h in header) and len(header) == 9


# --------------------------------------------------------------------------------------
# The script, end to end on a tiny stand-in for the subject
# --------------------------------------------------------------------------------------
def test_script_scores_methods_with_slopes_and_writes_its_report(tmp_path):
  shape, voxel = (32, 32, 32), (1.0, 1.0, 1.2)
  idx = np.indices(shape).astype(np.float32)
  mask = ((idx - 15.5) ** 2 / np.array([12, 13, 11.0]).reshape(3, 1, 1, 1) ** 2).sum(0) < 1
  chi = np.where(mask, -0.02, 0.0).astype(np.float32)
  chi[(((idx - np.reshape((14, 16, 15), (3, 1, 1, 1))) ** 2).sum(0) < 16) & mask] = 0.12
  field = physics.forward_field(chi, voxel, (0, 0, 1)) * mask
  data = tmp_path / "qsm2016"
  data.mkdir()
  affine = np.diag(list(voxel) + [1.0])
  for name, array, dtype in zip(_FILES, (field, mask, chi), (np.float32, np.uint8, np.float32)):
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, data / name)
  out = tmp_path / "report"
  proc = _run(f"--data_dir={data}", f"--out_dir={out}", "--methods=tkd,cfl2:label=L2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert [line["label"] for line in lines] == ["tkd", "L2"]
  assert set(lines[0]) == {"label", "spec", "nrmse", "hfen", "xsim", "correlation", "slope",
                           "fine_energy", "seconds"}
  assert all(0.0 <= line["fine_energy"] <= 1.0 for line in lines)
  report = json.loads((out / "results.json").read_text())
  for line, row in zip(lines, report["methods"]):
    assert row["metrics"]["slope"] == pytest.approx(line["slope"])
    assert 0.2 < line["slope"] < 1.5  # a noise-free field: close to the truth's contrast
  assert "slope" in [c["key"] for c in report["columns"]]
  assert report["figure"]["window_ppm"] == [-0.15, 0.15]
  assert report["figure"]["error_window_ppm"] == [-0.15, 0.15]
  assert "slope →1" in (out / "results.md").read_text()
  summary = (out / "real_data.md").read_text()
  assert "real_data.py" in summary and f"--out_dir={out}" in summary and "slope →1" in summary
  assert (out / "figure.png").stat().st_size > 0
  # The spectral table: COSMOS's energy row sums to 100 %, each method's error row to NRMSE^2/100.
  rows = {l.split("|")[1].strip(): [float(v) for v in l.split("|")[2:-2]]
          for l in summary.splitlines() if l.startswith(("| COSMOS energy", "| tkd error"))}
  assert sum(rows["COSMOS energy"]) == pytest.approx(100.0, abs=0.1)
  tkd = rows["tkd error"]
  assert sum(tkd) == pytest.approx(lines[0]["nrmse"] ** 2 / 100.0, rel=0.02, abs=0.2)
