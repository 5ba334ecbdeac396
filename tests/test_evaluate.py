"""Tests for qsmgan_tf.evaluate (method specs, results table, the evaluate binary)."""

import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from qsmgan_tf import evaluation as evaluate  # the library behind the binary
from qsmgan_tf import metrics
from qsmgan_tf import physics
from qsmgan_tf.errors import InputError

_REPO = pathlib.Path(__file__).resolve().parents[1]
_NAMES = ("qsmgan", "tkd", "cfl2", "ilsqr", "medi", "tv")


# --------------------------------------------------------------------------------------
# Method specs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    # plain names, spaces after commas tolerated
    ("tkd, cfl2", [("tkd", {}, "tkd"), ("cfl2", {}, "cfl2")]),
    # an option: default label shows it
    ("qsmgan:refine=none", [("qsmgan", {"refine": "none"}, "qsmgan (refine=none)")]),
    # colons inside a value (host:port) stay in the value; label= names the row
    ("qsmgan:server=localhost:8500:label=served,qsmgan",
     [("qsmgan", {"server": "localhost:8500"}, "served"), ("qsmgan", {}, "qsmgan")]),
    # numbers and booleans are typed; a model path with a comma-free path stays text
    ("tkd:threshold=0.2:iterations=3:verbose=true,qsmgan:model=saved/gan/2",
     [("tkd", {"threshold": 0.2, "iterations": 3, "verbose": True}, "tkd (threshold=0.2, "
       "iterations=3, verbose=True)"),
      ("qsmgan", {"model": "saved/gan/2"}, "qsmgan (model=saved/gan/2)")]),
    # a comma inside a label (followed by words, not a spec) stays in the label
    ("qsmgan:refine=none:label=U-Net, no refinement,tkd",
     [("qsmgan", {"refine": "none"}, "U-Net, no refinement"), ("tkd", {}, "tkd")]),
])
def test_parse_method_specs(text, expected):
  specs = evaluate.parse_method_specs(text, names=_NAMES)
  assert [(s.name, s.options, s.label) for s in specs] == expected


@pytest.mark.parametrize("text, labels, message", [
    ("tkd,foo", None, "unknown method 'foo'"),
    ("tkd,tkd", None, "duplicate method label"),
    ("tkd:threshold", None, "expected key=value"),
    ("", None, "--methods is empty"),
    ("tkd,cfl2", ["one"], "--labels has 1 entries for 2"),
])
def test_parse_method_specs_rejects(text, labels, message):
  with pytest.raises(InputError, match=message):
    evaluate.parse_method_specs(text, labels, names=_NAMES)


def test_labels_flag_overrides_spec_labels():
  specs = evaluate.parse_method_specs("qsmgan:refine=none,qsmgan", ["U-Net", "refined"],
                                      names=_NAMES)
  assert [s.label for s in specs] == ["U-Net", "refined"]


# --------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------
def _result(label, **metric_values):
  spec = evaluate.MethodSpec(label, {}, label, label)
  return evaluate.MethodResult(spec, None, dict(metric_values), metric_values.get("seconds", 0),
                               {})


def test_results_table_bolds_best_per_column_by_direction():
  results = [
      _result("a", nrmse=30.0, nrmse_detrend=29.0, hfen=40.0, xsim=0.80, correlation=0.90,
              psnr=30.0, seconds=5.0),
      _result("b", nrmse=40.0, nrmse_detrend=28.0, hfen=40.0, xsim=0.85, correlation=0.80,
              psnr=31.0, seconds=1.0),
  ]
  table = evaluate.results_table(results)
  lines = [line for line in table.splitlines() if line.startswith("|")]
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in lines[2:]}
  assert len(lines) == 4
  # columns: NRMSE, dNRMSE, HFEN, XSIM, corr, DGM, PSNR, time
  assert rows["a"] == ["**30.00**", "29.00", "**40.00**", "0.8000", "**0.9000**", "n/a", "30.00",
                       "5.00"]
  assert rows["b"] == ["40.00", "**28.00**", "**40.00**", "**0.8500**", "0.8000", "n/a",
                       "**31.00**", "**1.00**"]
  best = evaluate.best_per_column(results)
  assert best["hfen"] == ["a", "b"] and "dgm_linearity" not in best


def test_best_is_judged_on_printed_values():
  # 0.4987 and 0.5012 both print as 0.50: both are best, as a reader of the table sees it.
  results = [_result("a", psnr=0.4987, seconds=0.0012), _result("b", psnr=0.5012, seconds=0.004)]
  best = evaluate.best_per_column(results)
  assert best["psnr"] == ["a", "b"] and best["seconds"] == ["a", "b"]


def test_chimap_names_are_bids_labels_and_unique():
  taken = set()
  first = evaluate.chimap_name("qsmgan (refine=none)", taken)
  second = evaluate.chimap_name("qsmgan refine none", taken)
  assert (first, second) == ("desc-qsmganRefineNone_Chimap.nii.gz",
                             "desc-qsmganRefineNone2_Chimap.nii.gz")


# --------------------------------------------------------------------------------------
# Binary, end to end on a tiny phantom
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
  """A 32^3 phantom: three 'nuclei' (qsm-ci labels 1-3) in 'white matter' (8), noise-free field."""
  folder = tmp_path_factory.mktemp("phantom")
  shape = (32, 32, 32)
  idx = np.indices(shape).astype(np.float32)
  mask = ((idx - 15.5) ** 2 / np.array([12, 13, 11.0]).reshape(3, 1, 1, 1) ** 2).sum(0) < 1
  seg = np.where(mask, 8, 0).astype(np.int16)
  chi = np.where(mask, -0.02, 0.0).astype(np.float32)
  for label, centre, value in ((1, (11, 12, 14), 0.08), (2, (20, 18, 16), 0.16),
                               (3, (15, 22, 12), 0.10)):
    blob = ((idx - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) < 3.5 ** 2
    seg[blob & mask] = label
    chi[blob & mask] = value
  voxel = (1.0, 1.0, 1.2)
  field = physics.forward_field(chi, voxel, (0, 0, 1)) * mask
  affine = np.diag(list(voxel) + [1.0])
  paths = {}
  for name, data, dtype in (("field", field, np.float32), ("mask", mask, np.uint8),
                            ("truth", chi, np.float32), ("seg", seg, np.int16)):
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    paths[name] = folder / f"{name}.nii.gz"
    nib.save(img, paths[name])
  return paths


def _run(*args):
  return subprocess.run([sys.executable, "-m", "qsmgan_tf.evaluate", *args], cwd=_REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def test_evaluate_binary_writes_table_json_maps_and_figure(phantom, tmp_path):
  out = tmp_path / "eval"
  proc = _run(f"--field={phantom['field']}", "--field_units=ppm", f"--mask={phantom['mask']}",
              f"--truth={phantom['truth']}", f"--seg={phantom['seg']}",
              "--methods=tkd,cfl2:label=closed-form L2", f"--out_dir={out}", "--quiet")
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = (out / "results.md").read_text()
  assert proc.stdout.strip() == table.strip()
  rows = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
  assert rows == ["tkd", "closed-form L2"]

  report = json.loads((out / "results.json").read_text())
  assert [m["label"] for m in report["methods"]] == ["tkd", "closed-form L2"]
  assert report["inputs"]["voxel_size_mm"] == [1.0, 1.0, pytest.approx(1.2)]
  assert report["inputs"]["b0_dir"] == [0.0, 0.0, 1.0]
  field_img = nib.load(phantom["field"])
  truth = np.asarray(nib.load(phantom["truth"]).dataobj)
  mask = np.asarray(nib.load(phantom["mask"]).dataobj) > 0
  seg = np.asarray(nib.load(phantom["seg"]).dataobj)
  for entry in report["methods"]:
    img = nib.load(out / entry["chi_map"])
    assert img.shape == field_img.shape
    np.testing.assert_allclose(img.affine, field_img.affine)
    # The JSON's numbers are those of the written map, recomputed independently.
    again = metrics.evaluate(np.asarray(img.dataobj), truth, mask, seg=seg)
    for key in ("nrmse", "xsim", "dgm_linearity", "psnr"):
      assert entry["metrics"][key] == pytest.approx(again[key], rel=1e-5, abs=1e-6), key
    # A noise-free field inverts well: a wrong kernel or B0 direction would not.
    assert entry["metrics"]["nrmse"] < 60 and entry["metrics"]["correlation"] > 0.8
    assert entry["metrics"]["seconds"] > 0

  png = (out / "figure.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
  assert width > height > 200  # 3 rows (truth + 2 methods) x 6 panels
  assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("change, message", [
    # the truth file does not exist
    ({"truth": "missing.nii.gz"}, "truth file not found"),
    # mask on another grid
    ({"mask": "small"}, "mask shape"),
    # an unknown method
    ({"methods": "tkd,nope"}, "unknown method 'nope'"),
    # a field in Hz needs B0
    ({"field_units": "hz"}, "b0"),
])
def test_evaluate_binary_bad_input_exits_2_with_one_line(phantom, tmp_path, change, message):
  args = {"field": phantom["field"], "field_units": "ppm", "mask": phantom["mask"],
          "truth": phantom["truth"], "methods": "tkd", "out_dir": tmp_path / "eval"}
  args.update(change)
  if args["mask"] == "small":
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), small)
    args["mask"] = small
  if args["truth"] == "missing.nii.gz":
    args["truth"] = tmp_path / "missing.nii.gz"
  proc = _run(*[f"--{k}={v}" for k, v in args.items() if v is not None])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
  assert not (tmp_path / "eval" / "results.json").exists()


def test_evaluate_binary_compares_network_variants_in_one_run(phantom, tmp_path):
  """The model card's use: the network alone and refined, beside a baseline, one run."""
  import keras  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel

  keras.utils.set_random_seed(0)
  config = networks.PRESETS["test_tiny"]
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  networks.build_generator(config).save(model_dir / "generator_best.keras")
  (model_dir / "contract.json").write_text(json.dumps(
      {"generator": config.to_dict(), "input_patch": config.input_patch,
       "output_patch": config.output_patch, "voxel_sizes_mm": [[1.0, 1.0, 1.2]]}))
  out = tmp_path / "eval"
  proc = _run(f"--field={phantom['field']}", f"--mask={phantom['mask']}",
              f"--truth={phantom['truth']}", f"--model={model_dir}", "--quiet",
              "--methods=qsmgan:refine=none:label=network alone,qsmgan,tkd", f"--out_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "results.json").read_text())
  alone, refined, tkd = report["methods"]
  assert [alone["label"], refined["label"], tkd["label"]] == ["network alone", "qsmgan", "tkd"]
  assert alone["options"] == {"refine": "none"} and refined["options"] == {}
  # Untrained weights: refinement against the field is what makes the map consistent.
  before = alone["info"]["method_info"]["residual_after"]
  after = refined["info"]["method_info"]["residual_after"]
  assert after < 0.5 * before
  assert refined["metrics"]["nrmse"] < alone["metrics"]["nrmse"]
  maps = sorted(p.name for p in out.glob("*_Chimap.nii.gz"))
  assert maps == ["desc-networkAlone_Chimap.nii.gz", "desc-qsmgan_Chimap.nii.gz",
                  "desc-tkd_Chimap.nii.gz"]
