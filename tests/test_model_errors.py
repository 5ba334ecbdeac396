"""Tests for data_prep.model_errors: each error's level, shape and stream, the mask error, the
random levels, and that the rest of a simulated subject stays that of the error-free one."""

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.ndimage

from data_prep import model_errors
from data_prep import simulate
from qsmgan_tf import physics

SMALL = (32, 32, 32)
ALL_ERRORS = model_errors.ModelErrors(correlated_noise_ppm=0.003, noise_correlation_mm=1.0,
                                      edge_background_ppm=0.004, smooth_background_ppm=0.002,
                                      anisotropy_ppm=0.006, mask_error_vox=1)


def rms(x):
  return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_model_errors_leave_the_rest_of_the_subject():
  # Errors come from their own streams: the white noise, magnitude and COSMOS target are those of
  # the error-free subject, and each error's realisation does not depend on the others.
  args = dict(kind="shapes", seed=1, shape=SMALL, snr=80.0, target="cosmos")
  plain = simulate.simulate_subject(**args)
  one = simulate.simulate_subject(**args, model_errors=model_errors.ModelErrors(
      edge_background_ppm=0.004))
  both = simulate.simulate_subject(**args, model_errors=model_errors.ModelErrors(
      edge_background_ppm=0.004, correlated_noise_ppm=0.002, noise_correlation_mm=1.0))
  for s in (one, both):
    np.testing.assert_array_equal(s.magnitude, plain.magnitude)
    np.testing.assert_array_equal(s.components["noise_ppm"], plain.components["noise_ppm"])
    np.testing.assert_array_equal(s.target_ppm, plain.target_ppm)
    np.testing.assert_allclose(s.field_ppm - s.components["model_error_ppm"], plain.field_ppm,
                               atol=1e-7)
  np.testing.assert_array_equal(one.components["edge_background_ppm"],
                                both.components["edge_background_ppm"])


@pytest.mark.parametrize("errors, component, level", [
    # correlated noise: std over the mask
    (model_errors.ModelErrors(correlated_noise_ppm=0.003, noise_correlation_mm=1.5),
     "correlated_noise_ppm", 0.003),
    # white when the correlation length is 0
    (model_errors.ModelErrors(correlated_noise_ppm=0.002), "correlated_noise_ppm", 0.002),
    # residual background from outside sources
    (model_errors.ModelErrors(edge_background_ppm=0.005), "edge_background_ppm", 0.005),
    # smooth polynomial background
    (model_errors.ModelErrors(smooth_background_ppm=0.001, smooth_background_order=3),
     "smooth_background_ppm", 0.001),
])
def test_each_error_adds_its_level_inside_the_mask(errors, component, level):
  s = simulate.simulate_subject("shapes", 5, shape=SMALL, snr=None, model_errors=errors)
  part = s.components[component]
  assert np.all(part[~s.mask] == 0)
  assert part[s.mask].mean() == pytest.approx(0.0, abs=1e-6 * level)
  assert rms(part[s.mask]) == pytest.approx(level, rel=1e-4)
  np.testing.assert_array_equal(s.components["model_error_ppm"], part)
  np.testing.assert_allclose(s.field_ppm - part, s.components["clean_field_ppm"], atol=1e-7)
  assert s.meta["model_errors"]["rms_ppm"] == pytest.approx(level, rel=1e-4)
  assert s.meta["model_errors"]["levels"] == errors.to_json()


def test_correlated_noise_correlation_is_in_mm():
  # Gaussian-smoothed white noise: lag-1 correlation sum g[n] g[n+1] / sum g^2 of the sampled
  # kernel, sigma = correlation_mm / voxel size along each axis.
  vox, corr_mm = (1.0, 1.0, 2.0), 1.5
  s = simulate.simulate_subject("shapes", 3, shape=(40, 40, 20), voxel_size_mm=vox, snr=None,
                                model_errors=model_errors.ModelErrors(
                                    correlated_noise_ppm=0.003, noise_correlation_mm=corr_mm))
  n, m = s.components["correlated_noise_ppm"], s.mask
  for axis, v in enumerate(vox):
    sigma = corr_mm / v
    x = np.arange(-int(4 * sigma + 0.5), int(4 * sigma + 0.5) + 1)
    g = np.exp(-0.5 * (x / sigma)**2)
    expected = np.sum(g[:-1] * g[1:]) / np.sum(g * g)
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    both = m[tuple(lo)] & m[tuple(hi)]
    measured = np.corrcoef(n[tuple(lo)][both], n[tuple(hi)][both])[0, 1]
    assert measured == pytest.approx(expected, abs=0.03), axis


@pytest.mark.parametrize("seed", [0, 2])
def test_edge_background_comes_from_outside_the_mask(seed):
  s = simulate.simulate_subject("shapes", seed, shape=SMALL, snr=None,
                                model_errors=model_errors.ModelErrors(edge_background_ppm=0.004))
  b, m = s.components["edge_background_ppm"].astype(np.float64), s.mask
  record = s.meta["model_errors"]["edge_background"]
  # Sources sit 1-8 mm outside the mask.
  dist = scipy.ndimage.distance_transform_edt(~m)
  assert record["blobs"]
  for blob in record["blobs"]:
    assert 1.0 <= dist[tuple(blob["centre_vox"])] <= 8.0
  # Largest at the edge: the outer 3 voxels see more than the core.
  edge = m & ~scipy.ndimage.binary_erosion(m, iterations=3)
  core = m & ~edge
  assert np.abs(b[edge]).mean() > 1.3 * np.abs(b[core]).mean()
  assert record["edge3_rms_ppm"] > record["core_rms_ppm"]
  # Harmonic inside the mask: its Laplacian away from the edge is small next to the field (sources
  # inside the mask give a ratio of 0.5-0.9 here, the phantom's own field 1.4-1.9).
  deep = scipy.ndimage.binary_erosion(m, iterations=2)
  lap = scipy.ndimage.laplace(b)
  assert rms(lap[deep]) < 0.25 * rms(b[deep])


def test_anisotropy_field_analytic():
  # sin^2(theta) - 2/3: -2/3 along B0, 0 at the magic angle, +1/3 across B0; 0 without WM.
  b0 = physics.unit_vector((0.2, -0.1, 1.0))
  across = np.cross(b0, [1.0, 0.0, 0.0])
  across /= np.linalg.norm(across)
  magic = math.acos(1.0 / math.sqrt(3.0))
  tilted = math.cos(magic) * b0 + math.sin(magic) * across
  dirs = np.stack([b0, tilted, across, across], axis=1).reshape(3, 4, 1, 1).astype(np.float32)
  wm = np.array([1.0, 1.0, 1.0, 0.0], np.float32).reshape(4, 1, 1)
  out = model_errors.anisotropy_field(wm, dirs, b0, 0.006).ravel()
  np.testing.assert_allclose(out, [-0.004, 0.0, 0.002, 0.0], atol=1e-8)


def test_anisotropy_only_in_white_matter():
  errors = model_errors.ModelErrors(anisotropy_ppm=0.006)
  s = simulate.simulate_subject("brain", 4, shape=(32, 40, 32), snr=None, model_errors=errors)
  a, wm = s.components["anisotropy_ppm"], s.seg == 8
  assert wm.sum() > 500
  assert np.all(a[~wm] == 0)
  # Both signs: the fibre direction field turns through the magic angle.
  assert a[wm].min() < -0.002 and a[wm].max() > 0.001
  assert np.all((a[wm] >= -0.004 - 1e-7) & (a[wm] <= 0.002 + 1e-7))
  record = s.meta["model_errors"]["anisotropy"]
  assert record["applied"] and record["wm_voxels"] == int(wm.sum())
  # Shapes phantoms have no white matter: no effect, and the record says so.
  shapes = simulate.simulate_subject("shapes", 4, shape=(16, 16, 16), snr=None,
                                     model_errors=errors)
  assert "anisotropy_ppm" not in shapes.components
  assert not shapes.components["model_error_ppm"].any()
  assert shapes.meta["model_errors"]["anisotropy"]["applied"] is False


@pytest.mark.parametrize("change", [-2, -1, 1, 2])
def test_mask_error(change):
  plain = simulate.simulate_subject("shapes", 6, shape=SMALL, snr=60.0)
  s = simulate.simulate_subject("shapes", 6, shape=SMALL, snr=60.0,
                                model_errors=model_errors.ModelErrors(mask_error_vox=change))
  true = plain.mask
  np.testing.assert_array_equal(s.components["true_mask"], true)
  # Eroded/dilated by |change| voxels: taxicab distance to the other side.
  if change < 0:
    expected = scipy.ndimage.distance_transform_cdt(true, metric="taxicab") > -change
  else:
    expected = scipy.ndimage.distance_transform_cdt(~true, metric="taxicab") <= change
  np.testing.assert_array_equal(s.mask, expected)
  assert (s.mask.sum() < true.sum()) == (change < 0)
  record = s.meta["model_errors"]["mask"]
  assert record["true_voxels"] == true.sum() and record["given_voxels"] == s.mask.sum()
  # Truth masked by the given mask; the field inside it is the true forward field plus noise.
  np.testing.assert_array_equal(s.chi_ppm, np.where(s.mask, plain.chi_ppm, 0))
  np.testing.assert_array_equal(s.target_ppm, s.chi_ppm)
  assert np.all(s.seg[~s.mask] == 0) and np.all(s.field_ppm[~s.mask] == 0)
  full = physics.forward_field(plain.chi_ppm)
  np.testing.assert_allclose(s.field_ppm - s.components["noise_ppm"], np.where(s.mask, full, 0),
                             atol=2e-6)
  inner = s.mask & true
  np.testing.assert_array_equal(s.components["noise_ppm"][inner],
                                plain.components["noise_ppm"][inner])
  if change > 0:  # white noise at the mean magnitude's level in the rim
    rim = s.mask & ~true
    assert s.components["noise_ppm"][rim].std() == pytest.approx(
        plain.meta["field_noise_sigma_ppm_at_mean_magnitude"], rel=0.1)


def test_mask_error_that_empties_the_mask():
  with pytest.raises(ValueError, match="empty mask"):
    simulate.simulate_subject("shapes", 0, shape=(16, 16, 16), snr=None,
                              model_errors=model_errors.ModelErrors(mask_error_vox=-20))


def test_draw_is_seeded_and_in_range():
  draws = [model_errors.ModelErrors.draw(np.random.default_rng(seed)) for seed in range(300)]
  assert draws[:10] == [model_errors.ModelErrors.draw(np.random.default_rng(s)) for s in range(10)]
  assert model_errors.realistic_model_errors(7) == model_errors.realistic_model_errors(7)
  assert len(set(draws)) == len(draws)
  ranges = model_errors.MODEL_ERROR_RANGES
  for name in ("correlated_noise_ppm", "noise_correlation_mm", "edge_background_ppm",
               "smooth_background_ppm", "anisotropy_ppm", "mask_error_vox"):
    values = np.array([getattr(d, name) for d in draws], np.float64)
    on = values != 0
    assert 0.5 < on.mean() < 0.9, name  # each error on with probability 0.7
    lo, hi = ranges[name]
    if name == "anisotropy_ppm":
      assert 0.3 < np.mean(values[on] > 0) < 0.7
      values = np.abs(values)
    assert np.all((values[on] >= lo) & (values[on] <= hi)), name
  assert {d.mask_error_vox for d in draws} == {-2, -1, 0, 1, 2}
  assert {d.smooth_background_order for d in draws} == {1, 2, 3}
  # The correlation length comes with the correlated noise.
  assert all((d.correlated_noise_ppm > 0) == (d.noise_correlation_mm > 0) for d in draws)


def test_model_errors_meta_is_json():
  s = simulate.simulate_subject("brain", 5, shape=(32, 40, 32), snr=40.0, background_order=1,
                                model_errors=ALL_ERRORS)
  text = json.dumps(s.meta)
  record = json.loads(text)["model_errors"]
  assert record["levels"] == dataclasses.asdict(ALL_ERRORS)
  assert set(record) == {"levels", "mask", "correlated_noise", "edge_background",
                         "smooth_background", "anisotropy", "rms_ppm"}
  parts = ("correlated_noise_ppm", "edge_background_ppm", "smooth_background_ppm",
           "anisotropy_ppm")
  np.testing.assert_allclose(sum(s.components[p] for p in parts),
                             s.components["model_error_ppm"], atol=1e-8)
  assert record["rms_ppm"] == pytest.approx(rms(s.components["model_error_ppm"][s.mask]))


@pytest.mark.parametrize("kwargs, message", [
    ({"correlated_noise_ppm": -1e-3}, "correlated_noise_ppm"),
    ({"edge_background_ppm": float("nan")}, "edge_background_ppm"),
    ({"anisotropy_ppm": float("inf")}, "anisotropy_ppm"),
    ({"smooth_background_order": 0}, "smooth_background_order"),
    ({"mask_error_vox": 1.5}, "mask_error_vox"),
])
def test_bad_model_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    model_errors.ModelErrors(**kwargs)
