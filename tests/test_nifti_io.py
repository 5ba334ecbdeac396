"""Tests for qsmgan_tf.nifti_io: input validation messages and atomic, geometry-keeping output."""

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from qsmgan_tf import nifti_io
from qsmgan_tf.errors import InputError


def _affine():
  a = np.array([[0.0, 0.0, -1.5, 80.0], [0.9, 0.1, 0.0, -100.0], [-0.1, 0.9, 0.0, 60.0],
                [0.0, 0.0, 0.0, 1.0]])
  return a


def _save(path, data, cls=nib.Nifti1Image, sform_code=1, qform_code=1):
  img = cls(np.asarray(data), _affine())
  img.set_sform(_affine(), code=sform_code)
  img.set_qform(_affine(), code=qform_code)
  nib.save(img, str(path))
  return path


def _listing(folder):
  return sorted(p.name for p in pathlib.Path(folder).iterdir())


@pytest.mark.parametrize("path, stem, sidecar", [
    ("/a/b/sub-01_Chimap.nii.gz", "sub-01_Chimap", "/a/b/sub-01_Chimap.json"),
    ("x.nii", "x", "x.json"),
    ("dir.v2/y.nii.gz", "y", "dir.v2/y.json"),   # dots in folders do not matter
])
def test_names(path, stem, sidecar):
  assert nifti_io.nifti_stem(path) == stem
  assert nifti_io.sidecar_path(path) == pathlib.Path(sidecar)


def test_load_volume_accepts_3d_and_singleton_4d(tmp_path):
  data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
  vol, img = nifti_io.load_volume(_save(tmp_path / "a.nii.gz", data))
  assert vol.dtype == np.float32 and vol.shape == (3, 4, 5)
  np.testing.assert_array_equal(vol, data)
  vol4, _ = nifti_io.load_volume(_save(tmp_path / "b.nii", data[..., None]))
  np.testing.assert_array_equal(vol4, data)
  assert isinstance(img, nib.Nifti1Image)
  # NIfTI-2 is NIfTI too.
  vol2, img2 = nifti_io.load_volume(_save(tmp_path / "c.nii", data, cls=nib.Nifti2Image))
  assert isinstance(img2, nib.Nifti2Image) and vol2.shape == (3, 4, 5)


def test_load_errors_name_the_problem_and_the_file(tmp_path):
  (tmp_path / "text.nii.gz").write_text("not an image")
  nib.save(nib.MGHImage(np.zeros((3, 3, 3), np.float32), np.eye(4)), str(tmp_path / "brain.mgz"))
  cases = [
      # missing file: the full path, so the user sees where it was looked for
      (tmp_path / "none.nii", "field file not found: " + str(tmp_path / "none.nii")),
      # a folder
      (tmp_path, "field path is a directory"),
      # text file with a NIfTI name
      (tmp_path / "text.nii.gz", "field file is not a readable NIfTI image: text.nii.gz"),
      # a real image, but not NIfTI
      (tmp_path / "brain.mgz", "field file is not a NIfTI image: brain.mgz"),
      # 2D
      (_save(tmp_path / "flat.nii", np.zeros((4, 5), np.float32)),
       "field must be a 3D volume, got shape (4, 5) in flat.nii"),
      # a 3D shape with a degenerate axis
      (_save(tmp_path / "slab.nii", np.zeros((4, 5, 1), np.float32)), "got shape (4, 5, 1)"),
      # a true 4D series
      (_save(tmp_path / "echoes.nii", np.zeros((4, 5, 6, 3), np.float32)),
       "got shape (4, 5, 6, 3) in echoes.nii"),
      # complex data
      (_save(tmp_path / "cplx.nii", np.zeros((4, 5, 6), np.complex64)), "must be real-valued"),
  ]
  for path, message in cases:
    with pytest.raises(InputError) as err:
      nifti_io.load_volume(path, "field")
    assert message in str(err.value), (path, str(err.value))
    assert "\n" not in str(err.value)


def test_load_field_rejects_non_finite(tmp_path):
  data = np.zeros((4, 4, 4), np.float32)
  data[0, 0, 0], data[1, 2, 3] = np.nan, -np.inf
  with pytest.raises(InputError, match=r"field contains 2 NaN/Inf voxel\(s\): bad.nii"):
    nifti_io.load_field(_save(tmp_path / "bad.nii", data))


def test_load_mask(tmp_path):
  data = np.zeros((4, 5, 6), np.float32)
  data[1, 1, 1], data[2, 2, 2], data[3, 3, 3] = 1.0, 0.5, np.nan
  mask = nifti_io.load_mask(_save(tmp_path / "m.nii", data), (4, 5, 6))
  assert mask.dtype == bool and mask.sum() == 2 and not mask[3, 3, 3]
  with pytest.raises(InputError, match=r"mask shape \(4, 5, 6\) does not match the field shape "
                                       r"\(4, 5, 7\): m.nii"):
    nifti_io.load_mask(tmp_path / "m.nii", (4, 5, 7))
  with pytest.raises(InputError, match="mask is empty"):
    nifti_io.load_mask(_save(tmp_path / "e.nii", np.zeros((4, 5, 6), np.uint8)), (4, 5, 6))


def test_load_matching(tmp_path):
  path = _save(tmp_path / "mag.nii", np.ones((4, 5, 6), np.float32))
  assert nifti_io.load_matching(path, (4, 5, 6), "magnitude").shape == (4, 5, 6)
  with pytest.raises(InputError, match="magnitude shape"):
    nifti_io.load_matching(path, (4, 5, 5), "magnitude")


def test_voxel_size(tmp_path):
  img = nib.load(str(_save(tmp_path / "v.nii", np.zeros((3, 3, 3), np.float32))))
  assert nifti_io.voxel_size_mm(img) == pytest.approx((0.905539, 0.905539, 1.5), rel=1e-5)
  img.header.set_zooms((1.0, 0.0, 1.0))
  with pytest.raises(InputError, match="voxel size"):
    nifti_io.voxel_size_mm(img)


@pytest.mark.parametrize("text, expected", [
    ("0,0,1", (0, 0, 1)),
    (" 0, 3 ,4", (0, 0.6, 0.8)),      # spaces and normalisation
    ("-1,0,0", (-1, 0, 0)),
])
def test_parse_b0_dir(text, expected):
  np.testing.assert_allclose(nifti_io.parse_b0_dir(text), expected)


@pytest.mark.parametrize("text, match", [
    ("0,0,0", "zero length"),
    ("0,1", "three numbers"),
    ("x,y,z", "three numbers"),
    ("", "three numbers"),
])
def test_parse_b0_dir_errors(text, match):
  with pytest.raises(InputError, match=match):
    nifti_io.parse_b0_dir(text)


@pytest.mark.parametrize("cls, shape, sform_code, qform_code", [
    (nib.Nifti1Image, (5, 6, 7), 1, 1),      # scanner space, both transforms
    (nib.Nifti1Image, (5, 6, 7, 1), 4, 0),   # singleton 4D, MNI sform only
    (nib.Nifti2Image, (5, 6, 7), 2, 1),      # NIfTI-2
])
def test_write_volume_keeps_geometry(tmp_path, cls, shape, sform_code, qform_code):
  ref_path = _save(tmp_path / "ref.nii.gz", np.zeros(shape, np.int16), cls, sform_code, qform_code)
  ref = nib.load(str(ref_path))
  ref.header.set_slope_inter(2.0, 1.0)  # a scaled integer input must not rescale the output
  data = np.random.default_rng(0).normal(size=shape[:3]).astype(np.float64)
  nifti_io.write_volume(tmp_path / "out.nii.gz", data, ref)
  out = nib.load(str(tmp_path / "out.nii.gz"))
  assert type(out) is cls
  assert out.shape == shape[:3] and out.get_data_dtype() == np.float32
  np.testing.assert_allclose(out.get_fdata(), data.astype(np.float32), rtol=0, atol=0)
  np.testing.assert_allclose(out.affine, ref.affine, atol=1e-6)
  assert int(out.header["sform_code"]) == sform_code
  assert int(out.header["qform_code"]) == qform_code
  np.testing.assert_allclose(out.header.get_zooms()[:3], ref.header.get_zooms()[:3])
  assert _listing(tmp_path) == ["out.nii.gz", "ref.nii.gz"]


def test_write_volume_is_atomic(tmp_path, monkeypatch):
  ref = nib.load(str(_save(tmp_path / "ref.nii", np.zeros((3, 3, 3), np.float32))))
  with pytest.raises(InputError, match="output folder does not exist"):
    nifti_io.write_volume(tmp_path / "missing" / "o.nii.gz", np.zeros((3, 3, 3)), ref)

  def broken_save(img, path):
    pathlib.Path(path).write_bytes(b"half a file")
    raise OSError("disk full")

  monkeypatch.setattr(nib, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    nifti_io.write_volume(tmp_path / "o.nii.gz", np.zeros((3, 3, 3)), ref)
  assert _listing(tmp_path) == ["ref.nii"]  # neither the target nor a temporary file


def test_write_json_and_text(tmp_path):
  payload = {"b": np.float32(0.5), "a": np.arange(3), "p": pathlib.Path("x/y.nii"), "n": None}
  nifti_io.write_json(tmp_path / "s.json", payload)
  text = (tmp_path / "s.json").read_text()
  assert json.loads(text) == {"a": [0, 1, 2], "b": 0.5, "n": None, "p": "x/y.nii"}
  assert text.index('"a"') < text.index('"b"')  # keys sorted: stable diffs
  with pytest.raises(TypeError):
    nifti_io.write_json(tmp_path / "t.json", {"x": object()})
  assert _listing(tmp_path) == ["s.json"]
