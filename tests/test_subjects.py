"""Tests for data_prep.subjects (folder layout, validation) and simulate.write_subject."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_prep import simulate
from data_prep import subjects
from qsmgan_tf import physics
from qsmgan_tf.errors import InputError

B0 = (0.25, -0.15, 1.0)


@pytest.fixture(scope="module")
def subject():
  return simulate.simulate_subject("shapes", 9, shape=(24, 28, 20), voxel_size_mm=(1.0, 0.9, 1.5),
                                   b0_dir=B0, snr=80.0, lesions=True, target="cosmos")


@pytest.fixture
def folder(tmp_path, subject):
  return simulate.write_subject(subject, tmp_path / subject.subject_id)


def test_round_trip(folder, subject):
  loaded = subjects.load_subject(folder)
  assert loaded.subject_id == subject.subject_id
  for name in ("chi_ppm", "target_ppm", "field_ppm", "magnitude"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(subject, name), err_msg=name)
  np.testing.assert_array_equal(loaded.mask, subject.mask)
  np.testing.assert_array_equal(loaded.seg, subject.seg)
  assert loaded.voxel_size_mm == pytest.approx(subject.voxel_size_mm)
  np.testing.assert_allclose(loaded.b0_dir, physics.unit_vector(B0), atol=1e-7)
  assert loaded.snr == 80.0 and loaded.meta["target"] == "cosmos"
  assert loaded.meta["b0_tesla"] == 3.0 and loaded.meta["field_units"] == "ppm"


def test_target_choice(folder, subject):
  # The folder holds a COSMOS chi.nii.gz and the truth beside it.
  np.testing.assert_array_equal(subjects.load_subject(folder, target="cosmos").target_ppm,
                                subject.target_ppm)
  as_chi = subjects.load_subject(folder, target="chi")
  np.testing.assert_array_equal(as_chi.target_ppm, subject.chi_ppm)
  assert as_chi.meta["target"] == "chi"
  _edit_json(folder, target="chi")
  with pytest.raises(InputError, match="COSMOS target was asked for"):
    subjects.load_subject(folder, target="cosmos")
  with pytest.raises(InputError, match="unknown target"):
    subjects.load_subject(folder, target="tkd")


def test_affine_tells_b0(folder):
  img = nib.load(str(folder / "field.nii.gz"))
  assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
  np.testing.assert_allclose(physics.b0_dir_from_affine(img.affine), physics.unit_vector(B0),
                             atol=1e-6)
  np.testing.assert_allclose(img.header.get_zooms()[:3], (1.0, 0.9, 1.5), rtol=1e-6)
  # Without b0_dir in subject.json, the loader falls back on the affine.
  meta = json.loads((folder / "subject.json").read_text())
  del meta["b0_dir"]
  (folder / "subject.json").write_text(json.dumps(meta))
  loaded = subjects.load_subject(folder)
  assert loaded.meta["b0_dir_source"] == "affine" and loaded.meta["b0_dir_warning"] is None
  np.testing.assert_allclose(loaded.b0_dir, physics.unit_vector(B0), atol=1e-6)


def test_write_is_whole_or_nothing(tmp_path, subject):
  target = tmp_path / "s1"
  simulate.write_subject(subject, target)
  with pytest.raises(InputError, match="already exists"):
    simulate.write_subject(subject, target)
  simulate.write_subject(subject, target, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["s1"]  # no temporary folders left behind
  with pytest.raises(InputError, match="output folder does not exist"):
    simulate.write_subject(subject, tmp_path / "missing" / "s2")


def test_phase_units_convert_to_ppm(folder, subject):
  meta = json.loads((folder / "subject.json").read_text())
  meta.update(field_units="rad", b0_tesla=7.0, te_seconds=0.01)
  (folder / "subject.json").write_text(json.dumps(meta))
  img = nib.load(str(folder / "field.nii.gz"))
  phase = physics.from_ppm(subject.field_ppm, "rad", 7.0, 0.01).astype(np.float32)
  nib.save(nib.Nifti1Image(phase, img.affine, img.header), str(folder / "field.nii.gz"))
  loaded = subjects.load_subject(folder)
  np.testing.assert_allclose(loaded.field_ppm, subject.field_ppm, rtol=1e-5, atol=1e-9)


def _edit_json(folder, **changes):
  path = folder / "subject.json"
  meta = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      meta.pop(key, None)
    else:
      meta[key] = value
  path.write_text(json.dumps(meta))


def _replace(folder, name, fn):
  img = nib.load(str(folder / name))
  data = fn(np.asarray(img.dataobj).astype(np.float32))
  nib.save(nib.Nifti1Image(data, img.affine), str(folder / name))


# Each row breaks one thing in a good subject folder; the loader must name it in one line.
BROKEN = [
    ("no sidecar", lambda f: os.remove(f / "subject.json"), "subject.json not found"),
    ("bad json", lambda f: (f / "subject.json").write_text("{"), "is not valid JSON"),
    ("no units", lambda f: _edit_json(f, field_units=None), "must state field_units"),
    ("unknown units", lambda f: _edit_json(f, field_units="gauss"), "unknown field unit"),
    ("rad without TE", lambda f: _edit_json(f, field_units="rad", te_seconds=None),
     "positive echo time"),
    ("text B0", lambda f: _edit_json(f, b0_tesla="3T"), "b0_tesla must be a number"),
    ("zero b0_dir", lambda f: _edit_json(f, b0_dir=[0, 0, 0]), "b0_dir must be three numbers"),
    ("no field", lambda f: os.remove(f / "field.nii.gz"), "field file not found"),
    ("no target", lambda f: os.remove(f / "chi.nii.gz"), "chi file not found"),
    ("mask shape", lambda f: _replace(f, "mask.nii.gz", lambda d: d[:-1]),
     "does not match the field shape"),
    ("empty mask", lambda f: _replace(f, "mask.nii.gz", np.zeros_like), "mask is empty"),
    ("NaN target", lambda f: _replace(f, "chi.nii.gz", lambda d: np.where(d == d.max(), np.nan, d)),
     "NaN/Inf"),
    ("fractional labels", lambda f: _replace(f, "seg.nii.gz", lambda d: d + 0.5),
     "integer labels"),
    ("4D field", lambda f: _replace(f, "field.nii.gz", lambda d: np.stack([d, d], -1)),
     "must be a 3D volume"),
]


@pytest.mark.parametrize("name, breaker, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_load_subject_errors(folder, name, breaker, message):
  del name
  breaker(folder)
  with pytest.raises(InputError, match=message) as info:
    subjects.load_subject(folder)
  assert "\n" not in str(info.value)


def test_missing_folder():
  with pytest.raises(InputError, match="subject folder not found"):
    subjects.load_subject("/nonexistent/subject")


def test_list_subjects(tmp_path, subject):
  with pytest.raises(InputError, match="subjects folder not found"):
    subjects.list_subjects(tmp_path / "nope")
  with pytest.raises(InputError, match="no subject folders"):
    subjects.list_subjects(tmp_path)
  simulate.write_subject(subject, tmp_path / "b")
  simulate.write_subject(subject, tmp_path / "a")
  (tmp_path / "notes").mkdir()
  (tmp_path / ".a.partial.tmp").mkdir()
  (tmp_path / ".a.partial.tmp" / "subject.json").write_text("{}")
  assert [p.name for p in subjects.list_subjects(tmp_path)] == ["a", "b"]


def test_make_phantom_function_and_cli(tmp_path):
  folder = simulate.write_phantom("shapes", 2, str(tmp_path), shape="20,20,16",
                                     voxel_size_mm="1,1,2", b0_dir="0,0.1,1", snr=0.0)
  loaded = subjects.load_subject(folder)
  assert folder.name == "shapes-00002" and loaded.snr is None
  assert loaded.voxel_size_mm == (1.0, 1.0, 2.0)
  np.testing.assert_allclose(loaded.b0_dir, physics.unit_vector((0, 0.1, 1)), atol=1e-7)
  # Bad input from the command line: one line on stderr, exit status 2, nothing written.
  result = subprocess.run(
      [sys.executable, "-m", "data_prep.make_phantom", "--seed=1", f"--out_dir={tmp_path}",
       "--voxel_size_mm=1,0,1"], capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: --voxel_size_mm")
  assert sorted(os.listdir(tmp_path)) == ["shapes-00002"]
