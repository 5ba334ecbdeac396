"""Tests for data_prep.simulate: field physics, noise model, background, magnitude, COSMOS,
the subject without model errors (with them: test_model_errors.py)."""

import json
import math

import numpy as np
import pytest
import scipy.ndimage

from data_prep import model_errors
from data_prep import simulate
from qsmgan_tf import physics

SMALL = (32, 32, 32)
BRAIN_SHAPE = (48, 56, 48)


def nrmse(x, truth, mask):
  a = x[mask] - x[mask].mean()
  b = truth[mask] - truth[mask].mean()
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def brain():
  return simulate.simulate_subject("brain", 4, shape=BRAIN_SHAPE, snr=100.0, lesions=True)


def test_subject_contract(brain):
  assert brain.subject_id == "brain-00004"
  for name in ("chi_ppm", "target_ppm", "field_ppm", "magnitude"):
    arr = getattr(brain, name)
    assert arr.shape == BRAIN_SHAPE and arr.dtype == np.float32, name
  assert brain.mask.dtype == bool and brain.seg.dtype == np.int16
  np.testing.assert_array_equal(brain.target_ppm, brain.chi_ppm)  # target='chi'
  for arr in (brain.chi_ppm, brain.field_ppm):
    assert np.all(arr[~brain.mask] == 0)
  assert brain.voxel_size_mm == (1.0, 1.0, 1.0) and brain.snr == 100.0
  np.testing.assert_allclose(brain.b0_dir, [0, 0, 1])
  assert brain.meta["field_units"] == "ppm" and brain.meta["phantom"]["kind"] == "brain"


def test_field_minus_noise_is_the_forward_field(brain):
  expected = np.where(brain.mask, physics.forward_field(brain.chi_ppm), 0.0)
  clean = brain.field_ppm - brain.components["noise_ppm"]
  np.testing.assert_allclose(clean, expected, atol=2e-6)
  assert np.all(brain.components["background_ppm"] == 0)


def test_noise_std_matches_snr(brain):
  # Complex noise sigma = mean magnitude / SNR; phase noise where the magnitude is M is sigma / M
  # rad, i.e. 1 / (SNR * 2 pi gamma B0 TE) ppm at the mean magnitude.
  m = brain.mask
  signal = brain.components["clean_magnitude"]
  mean_signal = signal[m].mean()
  expected = 1.0 / (100.0 * 2 * math.pi * physics.GAMMA_BAR_HZ_PER_T * 3.0 * 0.020) * 1e6
  assert brain.meta["field_noise_sigma_ppm_at_mean_magnitude"] == pytest.approx(expected)
  bright = m & (signal > 0.5 * mean_signal)
  scaled = brain.components["noise_ppm"][bright] * signal[bright] / mean_signal
  assert scaled.std() == pytest.approx(expected, rel=0.05)
  assert abs(scaled.mean()) < 0.05 * expected
  magnitude_noise = (brain.magnitude - signal)[bright]
  assert magnitude_noise.std() == pytest.approx(mean_signal / 100.0, rel=0.05)


def test_noise_free_and_same_seed():
  a = simulate.simulate_subject("shapes", 3, shape=SMALL, snr=None)
  assert a.snr is None
  np.testing.assert_array_equal(a.field_ppm, a.components["clean_field_ppm"])
  np.testing.assert_array_equal(a.magnitude, a.components["clean_magnitude"])
  b = simulate.simulate_subject("shapes", 3, shape=SMALL, snr=50.0)
  np.testing.assert_array_equal(a.chi_ppm, b.chi_ppm)  # the anatomy ignores the noise level
  c = simulate.simulate_subject("shapes", 3, shape=SMALL, snr=50.0)
  np.testing.assert_array_equal(b.field_ppm, c.field_ppm)


def test_background_polynomial():
  s = simulate.simulate_subject("shapes", 5, shape=SMALL, snr=None, background_order=2)
  bg = s.components["background_ppm"]
  assert np.all(bg[~s.mask] == 0)
  assert 0.005 <= bg[s.mask].std() <= 0.02 + 1e-6
  np.testing.assert_allclose(s.field_ppm - bg, s.components["clean_field_ppm"], atol=1e-7)
  # A quadratic: its third finite differences vanish inside the volume.
  full = model_errors.polynomial_background(np.ones(SMALL, bool), 2, np.random.default_rng(0))[0]
  assert np.abs(np.diff(full.astype(np.float64), n=3, axis=0)).max() < 1e-5


def test_oblique_b0_and_anisotropic_voxels():
  b0 = np.array([0.3, -0.2, 1.0])
  vox = (1.0, 1.0, 2.0)
  s = simulate.simulate_subject("shapes", 2, shape=(32, 32, 16), voxel_size_mm=vox, b0_dir=b0,
                                snr=None)
  np.testing.assert_allclose(s.b0_dir, b0 / np.linalg.norm(b0))
  expected = np.where(s.mask, physics.forward_field(s.chi_ppm, vox, b0), 0.0)
  np.testing.assert_allclose(s.field_ppm, expected, atol=2e-6)
  along_z = np.where(s.mask, physics.forward_field(s.chi_ppm, vox, (0, 0, 1)), 0.0)
  assert np.abs(s.field_ppm - along_z).max() > 0.05 * np.abs(along_z).max()
  assert s.meta["phantom"]["voxel_size_mm"] == list(vox)


def test_cosmos_directions():
  b0 = physics.unit_vector((0.2, 0.1, 1.0))
  dirs = simulate.cosmos_directions(b0, 25.0)
  np.testing.assert_allclose(dirs[0], b0)
  for d in dirs[1:]:
    assert np.linalg.norm(d) == pytest.approx(1.0)
    assert math.degrees(math.acos(np.dot(d, b0))) == pytest.approx(25.0)
  # Tilted about two orthogonal axes: the tilts point in orthogonal directions.
  assert np.dot(dirs[1] - b0 * np.dot(dirs[1], b0), dirs[2] - b0 * np.dot(dirs[2], b0)) == \
      pytest.approx(0.0, abs=1e-12)


def test_cosmos_target_close_to_chi():
  s = simulate.simulate_subject("shapes", 1, shape=(40, 40, 40), snr=None, target="cosmos",
                                lesions=True)
  assert s.meta["target"] == "cosmos" and len(s.meta["cosmos_b0_dirs"]) == 3
  assert np.all(s.target_ppm[~s.mask] == 0)
  assert nrmse(s.target_ppm, s.chi_ppm, s.mask) < 0.06
  # The closed form alone errs at the mask edge; the data-consistency iterations fix it.
  closed = simulate.simulate_subject("shapes", 1, shape=(40, 40, 40), snr=None, target="cosmos",
                                     lesions=True, cosmos_iterations=0)
  assert nrmse(closed.target_ppm, s.chi_ppm, s.mask) > 2 * nrmse(s.target_ppm, s.chi_ppm, s.mask)
  # Referenced to the truth's mean over the mask.
  assert s.target_ppm[s.mask].mean() == pytest.approx(s.chi_ppm[s.mask].mean(), abs=1e-6)


def test_magnitude_dark_in_veins_and_microbleeds(brain):
  mag = brain.components["clean_magnitude"]
  wm = np.median(mag[brain.seg == 8])
  assert np.median(mag[brain.seg == 17]) < 0.5 * wm
  assert np.median(mag[brain.seg == 11]) < wm
  assert np.median(mag[brain.seg == 10]) > wm  # CSF is bright
  assert np.all(brain.magnitude[~brain.mask] >= 0)


def test_magnitude_rim_is_not_dark(brain):
  # The magnitude's own warp must not pull zero signal into the mask: a dark rim would mean
  # uniform phase noise (about 0.1 ppm) along the whole brain outline.
  mag = brain.components["clean_magnitude"]
  rim = brain.mask & ~scipy.ndimage.binary_erosion(brain.mask) & ~np.isin(brain.seg, [11, 16, 17])
  assert np.mean(mag[rim] < 0.2 * np.median(mag[brain.mask])) < 0.01


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "skull"}, "unknown phantom kind"),
    ({"target": "tkd"}, "unknown target"),
    ({"snr": -3.0}, "snr must be positive"),
    ({"voxel_size_mm": (1, 0, 1)}, "voxel size"),
    ({"b0_dir": (0, 0, 0)}, "zero length"),
    ({"background_order": -1}, "background_order"),
])
def test_bad_arguments(kwargs, message):
  args = {"kind": "shapes", "seed": 0, "shape": (16, 16, 16)}
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    simulate.simulate_subject(**args)


def assert_same_subject(a, b):
  for name in ("chi_ppm", "target_ppm", "field_ppm", "mask", "magnitude", "seg"):
    x, y = getattr(a, name), getattr(b, name)
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
  assert a.components.keys() == b.components.keys()
  for name in a.components:
    assert a.components[name].tobytes() == b.components[name].tobytes(), name
  assert a.meta == b.meta


def test_model_errors_off_is_the_plain_subject():
  args = dict(kind="shapes", seed=3, shape=SMALL, snr=50.0, background_order=2)
  plain = simulate.simulate_subject(**args)
  assert_same_subject(plain, simulate.simulate_subject(**args, model_errors=None))
  assert_same_subject(plain, simulate.simulate_subject(
      **args, model_errors=model_errors.ModelErrors()))
  assert "model_errors" not in plain.meta
  # Pinned from the simulator before model errors existed: the phantom, white-noise and
  # background streams are unchanged (update only for a deliberate change of these models).
  for voxel, field, noise in [((4, 11, 14), -0.0036010672, 0.0019904904),
                              ((13, 22, 13), -0.0276345517, 0.0003448251),
                              ((19, 19, 5), -0.0395892523, -0.0028110761)]:
    assert plain.field_ppm[voxel] == pytest.approx(field, rel=1e-4, abs=1e-9)
    assert plain.components["noise_ppm"][voxel] == pytest.approx(noise, rel=1e-4, abs=1e-9)
  assert np.sum(plain.field_ppm.astype(np.float64)**2) == pytest.approx(46.79036, rel=1e-5)


def test_write_phantom_realistic(tmp_path):
  folder = simulate.write_phantom("shapes", 11, str(tmp_path), shape="20,20,16",
                                  model_errors="realistic")
  payload = json.loads((folder / simulate.JSON_FILE).read_text())
  assert payload["meta"]["model_errors"]["levels"] == \
      model_errors.realistic_model_errors(11).to_json()
  (tmp_path / "plain").mkdir()
  plain = simulate.write_phantom("shapes", 11, str(tmp_path / "plain"), shape="20,20,16")
  assert "model_errors" not in json.loads((plain / simulate.JSON_FILE).read_text())["meta"]
  with pytest.raises(ValueError, match="--model_errors"):
    simulate.write_phantom("shapes", 11, str(tmp_path), shape="20,20,16", model_errors="bad")
