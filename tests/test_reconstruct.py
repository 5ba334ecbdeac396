"""Tests for qsmgan_tf.reconstruct: the method dispatcher, references and the input checks."""

import sys
import types

import nibabel as nib
import numpy as np
import pytest

import qsmgan_tf
from qsmgan_tf import classical
from qsmgan_tf import physics
from qsmgan_tf import reconstruct
from qsmgan_tf.errors import InputError

_N = 16


@pytest.fixture(name="case")
def _case():
  c = (_N - 1) / 2
  i, j, k = np.meshgrid(*[np.arange(_N) - c] * 3, indexing="ij")
  mask = i**2 + j**2 + k**2 < 6.5**2
  chi = np.where((i - 1) ** 2 + j**2 + k**2 < 9, 0.1, 0.0)
  field = np.where(mask, physics.forward_field(chi), 0).astype(np.float32)
  return field, mask


def test_method_names_cover_classical_and_network():
  assert reconstruct.METHOD_NAMES == ("tkd", "cfl2", "ilsqr", "medi", "tv", "qsmgan")
  assert set(reconstruct.CLASSICAL_METHODS) == set(classical.METHODS)


def test_classical_dispatch_matches_classical_reconstruct(case):
  field, mask = case
  chi, info = reconstruct.run_method("tkd", field, mask, (1, 1, 1), (0, 0, 1),
                                     params={"threshold": 0.15}, model="ignored.keras")
  direct = classical.reconstruct("tkd", field, mask, (1, 1, 1), (0, 0, 1),
                                 params={"threshold": 0.15})
  np.testing.assert_allclose(chi, np.where(mask, direct - direct[mask].mean(), 0), atol=1e-7)
  assert chi.dtype == np.float32 and np.all(chi[~mask] == 0)
  assert info["method"] == "tkd" and info["reference"] == "mask_mean"
  assert info["parameters"]["threshold"] == 0.15
  assert set(classical.DEFAULTS["tkd"]) <= set(info["parameters"])
  assert info["ignored_options"] == ["model"]
  assert info["seconds"] >= 0


def _stub_inference(monkeypatch, level=0.5):
  """A fake `qsmgan_tf.inference` returning chi = field + level, recording its arguments."""
  calls = {}

  def reconstruct_qsmgan(field_ppm, mask, voxel_size_mm, b0_dir, **kwargs):
    calls.update(kwargs, voxel_size_mm=voxel_size_mm, b0_dir=np.asarray(b0_dir))
    return np.asarray(field_ppm) + level, {"model": "stub", "refine": kwargs.get("refine")}

  stub = types.ModuleType("qsmgan_tf.inference")
  stub.reconstruct_qsmgan = reconstruct_qsmgan
  monkeypatch.setitem(sys.modules, "qsmgan_tf.inference", stub)
  monkeypatch.setattr(qsmgan_tf, "inference", stub, raising=False)
  return calls


@pytest.mark.parametrize("reference, expected_mean", [
    ("mask_mean", 0.0),   # chi is relative: its mean over the mask is removed
    ("none", None),       # the network's own level is kept (field mean + 0.5)
])
def test_qsmgan_dispatch_and_reference(monkeypatch, case, reference, expected_mean):
  field, mask = case
  calls = _stub_inference(monkeypatch)
  chi, info = reconstruct.run_method("qsmgan", field, mask, (1, 1, 2), (0, 0, 2),
                                     reference=reference, refine="none", overlap=0.5)
  assert calls["refine"] == "none" and calls["overlap"] == 0.5
  assert calls["voxel_size_mm"] == (1, 1, 2)
  np.testing.assert_allclose(calls["b0_dir"], (0, 0, 1))  # normalised before the call
  assert info["method_info"] == {"model": "stub", "refine": "none"}
  assert info["parameters"] == {"refine": "none", "overlap": 0.5}
  assert np.all(chi[~mask] == 0)
  if expected_mean is None:
    np.testing.assert_allclose(chi[mask], field[mask] + 0.5, atol=1e-6)
    assert info["reference_offset_ppm"] == 0.0
  else:
    assert abs(chi[mask].mean()) < 1e-6
    assert info["reference_offset_ppm"] == pytest.approx(field[mask].mean() + 0.5, abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="qsm"), "unknown method 'qsm'"),                          # typo in the name
    (dict(reference="median"), "unknown reference 'median'"),            # unknown reference
    (dict(params={"thresh": 0.2}), "unknown parameter"),                 # classical parameter typo
    (dict(mask=np.zeros((_N,) * 3, bool)), "mask is empty"),             # nothing to reconstruct
])
def test_run_method_rejects_bad_arguments(case, kwargs, match):
  field, mask = case
  args = dict(name="tkd", field_ppm=field, mask=mask)
  args.update(kwargs)
  with pytest.raises(InputError, match=match):
    reconstruct.run_method(**args)


def test_apply_reference():
  chi = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
  mask = chi >= 4
  out, offset = reconstruct.apply_reference(chi, mask)
  assert offset == pytest.approx(5.5)
  np.testing.assert_array_equal(out[mask], [-1.5, -0.5, 0.5, 1.5])
  assert np.all(out[~mask] == 0)
  out, offset = reconstruct.apply_reference(chi, mask, "none")
  assert offset == 0.0 and np.all(out[mask] == chi[mask])


# --------------------------------------------------------------------------------------
# load_inputs: the rules data_prep reuses (the CLI's subprocess tests cover the messages)
# --------------------------------------------------------------------------------------
def _write(tmp_path, name, data, affine=np.diag([0.9, 0.9, 2.0, 1.0])):
  path = tmp_path / name
  nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
  return path


def test_load_inputs_converts_units_and_reads_geometry(tmp_path, case):
  field, mask = case
  hz = physics.ppm_to_hz(field, 7.0).astype(np.float32)
  fpath = _write(tmp_path, "f.nii.gz", hz)
  mpath = _write(tmp_path, "m.nii.gz", mask.astype(np.uint8))
  inp = reconstruct.load_inputs(fpath, mpath, "hz", b0_tesla=7.0, magnitude_path=fpath)
  np.testing.assert_allclose(inp.field_ppm, field, atol=1e-7)
  assert inp.field_ppm.dtype == np.float32 and inp.mask.dtype == bool
  assert inp.voxel_size_mm == pytest.approx((0.9, 0.9, 2.0))
  assert inp.files == {"field": "f.nii.gz", "mask": "m.nii.gz", "magnitude": "f.nii.gz"}
  assert inp.ppm_per_unit == pytest.approx(1 / (42.57747892 * 7.0))
  # nibabel writes sform code 2 ('aligned') for a given affine: trusted, no warning.
  assert inp.b0_dir_source == "affine" and inp.b0_dir_warning is None
  np.testing.assert_allclose(inp.b0_dir, (0, 0, 1))
  inp = reconstruct.load_inputs(fpath, mpath, "hz", b0_tesla=7.0, b0_dir=(0, 3, 4))
  np.testing.assert_allclose(inp.b0_dir, (0, 0.6, 0.8))
  assert inp.b0_dir_source == "flag" and inp.b0_dir_warning is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(field_units="tesla"), "unknown field unit 'tesla'"),           # the library path
    (dict(field_units="rad", b0_tesla=3.0), "echo time"),                # rad needs TE
    (dict(field_units="hz", b0_tesla=0.0), "--b0_tesla must be positive"),
    (dict(te_seconds=-0.01), "--te_seconds must be positive"),
    (dict(b0_dir="1,0,nan"), "zero length"),                             # not finite
    (dict(b0_dir=(0, 0, 0)), "zero length"),                             # as a vector
])
def test_load_inputs_rejects_bad_parameters_before_reading(kwargs, match):
  # The files do not exist: parameter errors are reported first, without touching them.
  with pytest.raises(InputError, match=match):
    reconstruct.load_inputs("/nonexistent/f.nii", "/nonexistent/m.nii", **kwargs)


def test_acquisition_params_reach_only_methods_that_take_them():
  assert reconstruct.acquisition_params("tkd", 3.0, 0.02) == {}
  assert reconstruct.acquisition_params("qsmgan", 3.0, 0.02) == {}
  medi = reconstruct.acquisition_params("medi", 3.0, None)
  assert medi == ({"b0_tesla": 3.0} if "b0_tesla" in classical.DEFAULTS["medi"] else {})
