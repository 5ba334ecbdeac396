"""Tests for qsmgan_tf.metrics: known values of the QSM-CI metrics and of PSNR."""

import math

import numpy as np
import pytest
import scipy.ndimage

from qsmgan_tf import metrics
from qsmgan_tf.errors import InputError

_SHAPE = (24, 24, 24)


@pytest.fixture(name="truth")
def _truth():
  rng = np.random.default_rng(0)
  return (scipy.ndimage.gaussian_filter(rng.normal(size=_SHAPE), 1.5) * 0.5).astype(np.float32)


@pytest.fixture(name="mask")
def _mask():
  m = np.zeros(_SHAPE, bool)
  m[4:20, 5:19, 6:18] = True
  return m


def _seg(mask):
  """Six deep-grey 'nuclei' slabs inside the mask, the rest white matter (QSM-CI labels)."""
  seg = np.where(mask, 8, 0).astype(np.int16)
  for label in range(1, 7):
    seg[4 + 2 * label:6 + 2 * label, 8:14, 8:14] = label
  return seg


def test_identical_maps_score_perfectly(truth, mask):
  m = metrics.evaluate(truth, truth, mask)
  assert m["nrmse"] == pytest.approx(0.0, abs=1e-9)
  assert m["nrmse_detrend"] == pytest.approx(0.0, abs=1e-9)
  assert m["hfen"] == pytest.approx(0.0, abs=1e-9)
  assert m["correlation"] == pytest.approx(1.0)
  assert m["xsim"] == pytest.approx(1.0)
  assert m["psnr"] == math.inf
  assert m["coverage"] == 1.0
  assert set(metrics.HEADLINE_METRICS) <= set(m)
  assert "regions" not in m and "dgm_linearity" not in m


def test_offset_is_ignored(truth, mask):
  # chi is relative: a constant offset inside the mask changes nothing after de-meaning.
  m = metrics.evaluate(truth + 0.3, truth, mask)
  assert m["nrmse"] == pytest.approx(0.0, abs=1e-3)  # % (float32 rounding of the offset map)
  assert m["xsim"] == pytest.approx(1.0, abs=1e-6)
  assert m["psnr"] > 80
  # Without de-meaning, XSIM sees the offset (NRMSE de-means by definition).
  raw = metrics.evaluate(truth + 0.3, truth, mask, demean=False)
  assert raw["xsim"] < 0.9
  assert raw["nrmse"] == pytest.approx(0.0, abs=1e-3)


def test_scaled_map_has_known_nrmse(truth, mask):
  # ||2y - y|| / ||y|| = 1 (de-meaned): NRMSE 100 %; 0.5y: 50 %. A linear fit undoes any scale.
  m2 = metrics.evaluate(2.0 * truth, truth, mask)
  assert m2["nrmse"] == pytest.approx(100.0, rel=1e-5)
  assert m2["nrmse_detrend"] == pytest.approx(0.0, abs=1e-4)
  assert m2["correlation"] == pytest.approx(1.0)
  assert metrics.evaluate(0.5 * truth, truth, mask)["nrmse"] == pytest.approx(50.0, rel=1e-5)
  # Negated map: NRMSE 200 %, correlation -1.
  neg = metrics.evaluate(-truth, truth, mask)
  assert neg["nrmse"] == pytest.approx(200.0, rel=1e-5)
  assert neg["correlation"] == pytest.approx(-1.0)


def test_psnr_matches_its_definition(truth, mask):
  # Zero-mean +-sigma error (equal counts in the mask): RMSE = sigma exactly after de-meaning.
  sigma = 0.01
  err = np.zeros(_SHAPE, np.float64)
  signs = np.where(np.arange(mask.sum()) % 2 == 0, sigma, -sigma)
  err[mask] = signs
  assert mask.sum() % 2 == 0
  t = truth.astype(np.float64)
  peak = (t[mask] - t[mask].mean()).max() - (t[mask] - t[mask].mean()).min()
  expected = 20.0 * math.log10(peak / sigma)
  assert metrics.psnr(t + err, t, mask) == pytest.approx(expected, rel=1e-9)
  assert metrics.evaluate(t + err, t, mask)["psnr"] == pytest.approx(expected, rel=1e-9)
  # Twice the error: 6.02 dB less.
  assert metrics.psnr(t + 2 * err, t, mask) == pytest.approx(expected - 20 * math.log10(2))


def test_values_outside_the_mask_are_ignored(truth, mask):
  noisy = truth.copy()
  noisy[~mask] = 5.0
  assert metrics.evaluate(noisy, truth, mask)["nrmse"] == pytest.approx(0.0, abs=1e-6)


def test_dropped_and_nonfinite_voxels_lower_coverage(truth, mask):
  chi = truth.copy()
  chi[4:6] = 0.0         # an eroded rim, 2 of 16 slices
  chi[19, 5, 6] = np.nan
  m = metrics.evaluate(chi, truth, mask)
  expected = 1.0 - (2 * 14 * 12 + 1) / mask.sum()
  assert m["coverage"] == pytest.approx(expected)
  assert m["nrmse"] > 1.0 and math.isfinite(m["psnr"])


def test_segmentation_adds_region_metrics(truth, mask):
  seg = _seg(mask)
  m = metrics.evaluate(truth, truth, mask, seg=seg)
  assert m["dgm_linearity"] == pytest.approx(0.0, abs=1e-9)
  assert set(m["regions"]["recon"]) >= {"1", "6", "8"}
  assert m["regions"]["labels"]["8"] == "White matter"
  # Nuclei means scaled by 0.6 -> slope 0.6 -> linearity 0.4.
  half = np.where(np.isin(seg, range(1, 7)), 0.6 * truth, truth)
  scaled = metrics.evaluate(half, truth, mask, seg=seg)
  assert scaled["dgm_linearity"] == pytest.approx(0.4, abs=1e-6)
  assert set(metrics.SEGMENTATION_METRICS) <= set(m)


@pytest.mark.parametrize("kwargs, match", [
    (dict(chi_ppm=np.zeros((4, 4, 5))), "shape mismatch"),      # map of another shape
    (dict(mask=np.zeros(_SHAPE, bool)), "mask is empty"),        # nothing to score
    (dict(truth_ppm=np.full(_SHAPE, np.nan)), "truth has NaN"),  # broken truth
    (dict(seg=np.zeros((3, 3, 3))), "segmentation shape"),       # wrong segmentation
])
def test_bad_input(kwargs, match, truth, mask):
  args = dict(chi_ppm=truth, truth_ppm=truth, mask=mask)
  args.update(kwargs)
  with pytest.raises(InputError, match=match):
    metrics.evaluate(**args)


def test_spectral_bands_sum_to_the_nrmse_and_find_a_low_pass_error(truth, mask):
  bands = metrics.spectral_bands(truth, truth, mask)
  assert all(r["error_pct"] == 0.0 and r["correlation"] == pytest.approx(1.0)
             and r["gain"] == pytest.approx(1.0) for r in bands if r["truth_pct"] > 0)
  assert sum(r["truth_pct"] for r in bands) == pytest.approx(100.0)
  # A map with its fine part removed (an ideal low-pass at 0.2 cycles/mm): all of the error sits
  # above the cut and equals the truth's energy there; below, the map is exact.
  x = np.where(mask, truth - truth[mask].mean(), 0.0)
  k = np.sqrt(sum(q**2 for q in np.meshgrid(*[np.fft.fftfreq(n) for n in _SHAPE],
                                              indexing="ij")))
  low = np.real(np.fft.ifftn(np.where(k < 0.2, np.fft.fftn(x), 0.0)))
  # The low-pass leaks outside the mask, where maps are zeroed; score it on the whole grid.
  full = np.ones(_SHAPE, bool)
  truth_full = np.where(mask, x, 0.0)
  rows = metrics.spectral_bands(low, truth_full, full)
  for r in rows:
    if r["band_cycles_per_mm"][0] >= 0.2:
      assert r["error_pct"] == pytest.approx(r["truth_pct"], rel=1e-6)
    else:
      assert r["error_pct"] == pytest.approx(0.0, abs=1e-6)
  nrmse = metrics.evaluate(low, truth_full, full)["nrmse"]
  assert sum(r["error_pct"] for r in rows) == pytest.approx(nrmse**2 / 100.0, rel=1e-6)
  assert metrics.fine_energy_fraction(low, full) == pytest.approx(0.0, abs=1e-9)
  high = sum(r["truth_pct"] for r in rows if r["band_cycles_per_mm"][0] >= 0.2) / 100.0
  assert metrics.fine_energy_fraction(truth_full, full) == pytest.approx(high)


def test_spectral_bands_cone_follows_b0():
  # One plane wave with k along (1, 1, 0): perpendicular to B0 = z (D = 1/3, off the cone), and
  # in the cone (D = 0) for a B0 at the magic angle to k.
  i, j, _ = np.meshgrid(*[np.arange(s) for s in _SHAPE], indexing="ij")
  wave = np.cos(2 * np.pi * 3 * (i + j) / _SHAPE[0])
  full = np.ones(_SHAPE, bool)
  rows = metrics.spectral_bands(np.zeros(_SHAPE), wave, full, b0_dir=(0, 0, 1))
  assert sum(r["truth_pct"] for r in rows if r["cone"]) == pytest.approx(0.0)
  theta = np.arccos(1 / np.sqrt(3))
  b0 = np.cos(theta) * np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0) + np.sin(theta) * np.array([0, 0, 1])
  rows = metrics.spectral_bands(np.zeros(_SHAPE), wave, full, b0_dir=tuple(b0))
  assert sum(r["truth_pct"] for r in rows if r["cone"]) == pytest.approx(100.0)
  assert all(r["error_pct"] == pytest.approx(r["truth_pct"]) for r in rows)  # a zero map
