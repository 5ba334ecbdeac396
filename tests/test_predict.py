"""Tests for the predict binary, run as a user would: ``python -m qsmgan_tf.predict``."""

import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from qsmgan_tf import physics

_REPO = pathlib.Path(__file__).resolve().parents[1]
_N = 20
_B0_T = 3.0
_TE_S = 0.02


def _affine():
  """A 1 x 1 x 1.5 mm grid tilted 20 degrees about x: B0 is not along a voxel axis."""
  t = np.radians(20)
  rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
  a = np.eye(4)
  a[:3, :3] = rot @ np.diag([1.0, 1.0, 1.5])
  a[:3, 3] = (-10.0, -12.0, 8.0)
  return a


def _save(path, data, sform_code=1, qform_code=1, affine=None):
  affine = _affine() if affine is None else affine
  img = nib.Nifti1Image(np.asarray(data), affine)
  img.set_sform(affine, code=sform_code)
  img.set_qform(affine, code=qform_code)
  nib.save(img, str(path))
  return str(path)


@pytest.fixture(name="data", scope="module")
def _data(tmp_path_factory):
  """A sphere phantom's field (ppm, hz, rad) and mask in one folder; returns the folder."""
  d = tmp_path_factory.mktemp("predict")
  c = (_N - 1) / 2
  i, j, k = np.meshgrid(*[np.arange(_N) - c] * 3, indexing="ij")
  mask = i**2 + j**2 + (k * 1.5) ** 2 < 8**2
  chi = np.where((i - 2) ** 2 + j**2 + (1.5 * k) ** 2 < 9, 0.1, 0.0)
  b0 = physics.b0_dir_from_affine(_affine())
  field = np.where(mask, physics.forward_field(chi, (1, 1, 1.5), b0), 0).astype(np.float32)
  _save(d / "field.nii.gz", field)
  _save(d / "mask.nii.gz", mask.astype(np.uint8))
  hz = physics.ppm_to_hz(field, _B0_T).astype(np.float32)
  _save(d / "field_hz_4d.nii.gz", hz[..., None], sform_code=4, qform_code=0)  # MNI, singleton 4D
  _save(d / "phase.nii", physics.hz_to_rad(hz, _TE_S).astype(np.float32))
  return d


def _run(args, cwd, wrapper=False):
  """Runs the binary; with ``wrapper``, also reports whether TensorFlow was imported."""
  env = dict(os.environ, PYTHONPATH=str(_REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if wrapper:
    code = ("import atexit, runpy, sys; "
            "atexit.register(lambda: print('TF_LOADED=%s' % ('tensorflow' in sys.modules))); "
            "sys.argv = ['predict'] + sys.argv[1:]; "
            "runpy.run_module('qsmgan_tf.predict', run_name='__main__')")
    cmd = [sys.executable, "-c", code] + list(args)
  else:
    cmd = [sys.executable, "-m", "qsmgan_tf.predict"] + list(args)
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                        check=False)


def _outputs(folder):
  return sorted(p.name for p in pathlib.Path(folder).iterdir()
                if "Chimap" in p.name or p.name.startswith("."))


# --------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------
@pytest.fixture(name="ppm_run", scope="module")
def _ppm_run(data):
  out = data / "out"
  out.mkdir()
  res = _run(["--method=tkd", f"--field={data / 'field.nii.gz'}", f"--mask={data / 'mask.nii.gz'}",
              f"--output={out / 'sub-01_Chimap.nii.gz'}"], cwd=data, wrapper=True)
  assert res.returncode == 0, res.stderr
  return out, res


def test_classical_path_does_not_import_tensorflow(ppm_run):
  _, res = ppm_run
  assert "TF_LOADED=False" in res.stdout


def test_output_keeps_grid_affine_and_header(data, ppm_run):
  out, _ = ppm_run
  ref = nib.load(str(data / "field.nii.gz"))
  img = nib.load(str(out / "sub-01_Chimap.nii.gz"))
  assert img.shape == ref.shape
  assert img.get_data_dtype() == np.float32
  np.testing.assert_allclose(img.affine, ref.affine, atol=1e-6)
  np.testing.assert_allclose(img.get_sform(), ref.get_sform(), atol=1e-6)
  np.testing.assert_allclose(img.get_qform(), ref.get_qform(), atol=1e-5)
  assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
  assert img.header.get_zooms() == pytest.approx((1.0, 1.0, 1.5))
  chi = img.get_fdata()
  mask = nib.load(str(data / "mask.nii.gz")).get_fdata() > 0
  assert np.all(chi[~mask] == 0)
  assert abs(chi[mask].mean()) < 1e-6  # mask_mean reference
  # The paramagnetic sphere comes back positive: field units and B0 direction were right.
  assert chi[_N // 2 + 2, _N // 2, _N // 2] > 0.03
  assert _outputs(out) == ["sub-01_Chimap.json", "sub-01_Chimap.nii.gz"]  # no temp files


def test_sidecar_contents(ppm_run):
  out, _ = ppm_run
  side = json.loads((out / "sub-01_Chimap.json").read_text())
  assert side["method"] == "tkd" and side["units"] == "ppm" and side["reference"] == "mask_mean"
  assert side["parameters"]["threshold"] > 0
  np.testing.assert_allclose(side["b0_dir"], physics.b0_dir_from_affine(_affine()), atol=1e-9)
  assert side["b0_dir_source"] == "affine" and side["b0_dir_warning"] is None
  assert side["voxel_size_mm"] == pytest.approx([1.0, 1.0, 1.5])
  assert side["field_units"] == "ppm"
  assert side["field_conversion"]["ppm_per_field_unit"] == 1.0
  assert side["inputs"] == {"field": "field.nii.gz", "mask": "mask.nii.gz"}
  assert side["code_version"]
  assert set(side["seconds"]) == {"load", "reconstruct"}
  # No directory leaks into the sidecar (file names only).
  text = json.dumps(side)
  assert os.sep not in text.replace("\\/", "")


def test_hz_4d_template_image_and_rad_give_the_same_chi(data, ppm_run):
  out, _ = ppm_run
  chi_ppm = nib.load(str(out / "sub-01_Chimap.nii.gz")).get_fdata()
  # Hz, with a trailing singleton 4th dimension and an MNI sform: same chi, plus the warning.
  res = _run(["--method=tkd", "--field=field_hz_4d.nii.gz", "--mask=mask.nii.gz",
              "--field_units=hz", f"--b0_tesla={_B0_T}", "--output=out/hz_Chimap.nii.gz"],
             cwd=data)
  assert res.returncode == 0, res.stderr
  assert "pass --b0_dir" in res.stderr
  img = nib.load(str(out / "hz_Chimap.nii.gz"))
  assert img.shape == (_N,) * 3
  assert int(img.header["sform_code"]) == 4
  np.testing.assert_allclose(img.get_fdata(), chi_ppm, atol=1e-5 * np.abs(chi_ppm).max())
  side = json.loads((out / "hz_Chimap.json").read_text())
  assert side["b0_dir_warning"] and side["field_units"] == "hz"
  assert side["field_conversion"]["ppm_per_field_unit"] == pytest.approx(1 / 127.7324, rel=1e-6)
  # Phase in rad at TE, B0 given explicitly (the affine's own direction), --quiet: silent.
  b0 = ",".join(f"{v:.12f}" for v in physics.b0_dir_from_affine(_affine()))
  res = _run(["--method=tkd", "--field=phase.nii", "--mask=mask.nii.gz", "--field_units=rad",
              f"--b0_tesla={_B0_T}", f"--te_seconds={_TE_S}", f"--b0_dir={b0}", "--quiet",
              "--output=out/rad_Chimap.nii"], cwd=data)
  assert res.returncode == 0, res.stderr
  assert res.stderr.strip() == ""
  np.testing.assert_allclose(nib.load(str(out / "rad_Chimap.nii")).get_fdata(), chi_ppm,
                             atol=1e-5 * np.abs(chi_ppm).max())
  side = json.loads((out / "rad_Chimap.json").read_text())
  assert side["b0_dir_source"] == "flag"
  assert side["field_conversion"]["te_seconds"] == _TE_S


_STUB = '''
import json, sys, types
import numpy as np
def reconstruct_qsmgan(field_ppm, mask, voxel_size_mm, b0_dir, **kwargs):
  print("KWARGS=" + json.dumps(kwargs))
  return np.asarray(field_ppm) + 1.0, {"model_version": 7, "refinement": kwargs["refine"]}
stub = types.ModuleType("qsmgan_tf.inference")
stub.reconstruct_qsmgan = reconstruct_qsmgan
sys.modules["qsmgan_tf.inference"] = stub
sys.argv = ["predict"] + sys.argv[1:]
import runpy
runpy.run_module("qsmgan_tf.predict", run_name="__main__")
'''


def test_qsmgan_flags_reach_the_network(data):
  # A stand-in for qsmgan_tf.inference records what the binary passes to reconstruct_qsmgan.
  env = dict(os.environ, PYTHONPATH=str(_REPO))
  (data / "out").mkdir(exist_ok=True)  # not left to another test
  args = ["--method=qsmgan", "--field=field.nii.gz", "--mask=mask.nii.gz",
          "--output=out/net_Chimap.nii.gz", "--model=/home/someone/runs/qsmgan/3",
          "--refine=none", "--inference=tiled", "--overlap=0.5", "--mode=constant",
          "--sw_batch_size=2", "--threads=1", "--reference=none", "--quiet"]
  res = subprocess.run([sys.executable, "-c", _STUB] + args, cwd=data, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
  assert res.returncode == 0, res.stderr
  kwargs = json.loads(res.stdout.split("KWARGS=")[1].splitlines()[0])
  assert kwargs == {"model": "/home/someone/runs/qsmgan/3", "server": None, "rest_url": None,
                    "refine": "none", "inference": "tiled", "overlap": 0.5, "mode": "constant",
                    "sw_batch_size": 2, "threads": 1, "progress": False, "magnitude": None}
  side = json.loads((data / "out" / "net_Chimap.json").read_text())
  assert side["method"] == "qsmgan" and side["reference"] == "none"
  assert side["parameters"]["model"] == "qsmgan/3"  # no directories
  assert side["method_info"] == {"model_version": 7, "refinement": "none"}
  chi = nib.load(str(data / "out" / "net_Chimap.nii.gz")).get_fdata()
  field = nib.load(str(data / "field.nii.gz")).get_fdata()
  mask = nib.load(str(data / "mask.nii.gz")).get_fdata() > 0
  np.testing.assert_allclose(chi[mask], field[mask] + 1.0, atol=1e-6)  # reference none: as is


# --------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, nothing written
# --------------------------------------------------------------------------------------
def _bad_files(d):
  """Broken inputs for the table below, written once."""
  field = nib.load(str(d / "field.nii.gz")).get_fdata().astype(np.float32)
  (d / "notnifti.nii.gz").write_text("this is not an image\n")
  _save(d / "flat.nii.gz", field[:, :, 0])
  _save(d / "fourd.nii.gz", np.stack([field, field], axis=-1))
  _save(d / "small_mask.nii.gz", np.ones((_N, _N, _N - 1), np.uint8))
  _save(d / "empty_mask.nii.gz", np.zeros((_N,) * 3, np.uint8))
  nan = field.copy()
  nan[3, 4, 5] = np.nan
  _save(d / "nan.nii.gz", nan)
  inf = field.copy()
  inf[0, 0, 0] = np.inf
  _save(d / "inf.nii.gz", inf)
  _save(d / "small_mag.nii.gz", np.ones((_N - 2, _N, _N), np.float32))


_OK = ("--field=field.nii.gz", "--mask=mask.nii.gz", "--output=out2/x_Chimap.nii.gz")

_BAD_CASES = [
    # missing field file
    ("missing_file", ("--field=missing.nii.gz",), "field file not found: missing.nii.gz"),
    # a text file named like NIfTI
    ("not_nifti", ("--field=notnifti.nii.gz",),
     "field file is not a readable NIfTI image: notnifti.nii.gz"),
    # a 2D image
    ("2d", ("--field=flat.nii.gz",), "field must be a 3D volume, got shape (20, 20)"),
    # a true 4D series (e.g. multi-echo) is not a field
    ("true_4d", ("--field=fourd.nii.gz",), "field must be a 3D volume, got shape (20, 20, 20, 2)"),
    # mask on another grid
    ("mask_shape", ("--mask=small_mask.nii.gz",),
     "mask shape (20, 20, 19) does not match the field shape"),
    # mask with no voxel inside
    ("empty_mask", ("--mask=empty_mask.nii.gz",), "mask is empty"),
    # NaN in the field
    ("nan", ("--field=nan.nii.gz",), "field contains 1 NaN/Inf voxel(s): nan.nii.gz"),
    # Inf in the field
    ("inf", ("--field=inf.nii.gz",), "field contains 1 NaN/Inf voxel(s): inf.nii.gz"),
    # phase in rad without TE
    ("rad_without_te", ("--field_units=rad", "--b0_tesla=3"),
     "need a positive echo time (--te_seconds)"),
    # Hz without B0
    ("hz_without_b0", ("--field_units=hz",), "need a positive B0 field strength (--b0_tesla)"),
    # zero-length B0 direction
    ("zero_b0_dir", ("--b0_dir=0,0,0",), "--b0_dir: B0 direction has zero length"),
    # B0 direction with two components
    ("b0_dir_two_numbers", ("--b0_dir=0,1",), "--b0_dir must be three numbers x,y,z"),
    # output folder does not exist
    ("output_folder_missing", ("--output=nowhere/x_Chimap.nii.gz",),
     "output folder does not exist: nowhere"),
    # output not a NIfTI name
    ("output_not_nifti", ("--output=out2/x_Chimap.mat",), "--output must end in .nii or .nii.gz"),
    # magnitude on another grid
    ("magnitude_shape", ("--magnitude=small_mag.nii.gz", "--method=medi"),
     "magnitude shape (18, 20, 20)"),
]


@pytest.fixture(name="bad_dir", scope="module")
def _bad_dir(data):
  _bad_files(data)
  (data / "out2").mkdir()
  return data


@pytest.mark.parametrize("case, override, message", _BAD_CASES,
                         ids=[case for case, _, _ in _BAD_CASES])
def test_bad_input_exits_2_with_one_line(bad_dir, case, override, message):
  del case  # the test id
  names = {a.split("=")[0] for a in override}
  args = ["--method=tkd"] + [a for a in _OK if a.split("=")[0] not in names] + list(override)
  if "--method=medi" in override:
    args.remove("--method=tkd")
  res = _run(args, cwd=bad_dir)
  assert res.returncode == 2, res.stderr
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1, res.stderr
  assert lines[0].startswith("error: ") and message in lines[0], lines[0]
  assert "Traceback" not in res.stderr
  assert _outputs(bad_dir / "out2") == []


def test_unknown_unit_is_a_usage_error(bad_dir):
  # The enum flag rejects it before main runs (absl's usage error, status 1).
  res = _run(["--method=tkd", *_OK, "--field_units=tesla"], cwd=bad_dir)
  assert res.returncode == 1
  assert "--field_units" in res.stderr and "Traceback" not in res.stderr
  assert _outputs(bad_dir / "out2") == []
