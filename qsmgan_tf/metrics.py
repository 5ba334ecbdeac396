"""Accuracy of a susceptibility map against a ground truth: the QSM-CI metrics plus PSNR.

Every number except PSNR comes from `qsm_ci.qsm_eval.score_arrays` (the scorer of the public
QSM-CI leaderboard, pinned in setup.py), so results are comparable with it; nothing it computes is
re-implemented here. Keys keep QSM-CI's names:

  nrmse           100 ||(x - mean x) - (y - mean y)|| / ||y - mean y|| in the mask, %
  nrmse_detrend   the same after a linear fit of x on y ("dNRMSE"), %
  hfen            high-frequency error norm (LoG, sigma 1.5 voxels), %
  xsim            SSIM for QSM (5^3 window, L = 1 ppm, K = (0.01, 0.001))
  correlation     Pearson correlation in the mask
  coverage        fraction of the mask with a finite, non-zero reconstruction
  psnr            see `psnr`, dB (ours)

With a segmentation (QSM-CI labels: 1-6 deep grey nuclei, 7 thalamus, 8 WM, 9 GM, 10 CSF,
11 blood, 16 calcification) QSM-CI adds nrmse_tissue, nrmse_blood, nrmse_dgm, dgm_linearity
(|1 - slope| of the nuclei means), calc_moment_dev and calc_streak, and per-region statistics,
which `evaluate` returns separately under the key ``'regions'``.

`contrast_slope` (ours, not part of `evaluate`) is the whole-mask counterpart of that slope, for
data without a segmentation. `spectral_bands` and `fine_energy_fraction` (ours) say at which
spatial frequencies, inside or outside the dipole kernel's cone, a map's error lies, and how
much of a map's energy is fine structure.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qsmgan_tf import physics
from qsmgan_tf.errors import InputError

# Radial band edges of `spectral_bands`, cycles/mm (0.5 is Nyquist at 1 mm), and the cone.
BAND_EDGES_CYCLES_PER_MM = (0.05, 0.1, 0.2, 0.3)
CONE_DIPOLE = 0.1

HEADLINE_METRICS = ("nrmse", "nrmse_detrend", "hfen", "xsim", "correlation", "psnr")
"""The scalar metrics reported for every map (with or without a segmentation)."""

SEGMENTATION_METRICS = ("dgm_linearity", "nrmse_tissue", "nrmse_dgm", "nrmse_blood",
                        "calc_moment_dev", "calc_streak")
"""The scalar metrics QSM-CI adds when a segmentation is given."""


def _prepare(chi_ppm, truth_ppm, mask, demean: bool):
  """Float64 copies, zero outside the mask, non-finite recon voxels 0 (as QSM-CI scores them)."""
  chi = np.asarray(chi_ppm, dtype=np.float64)
  truth = np.asarray(truth_ppm, dtype=np.float64)
  mask = np.asarray(mask).astype(bool)
  if chi.ndim != 3 or chi.shape != truth.shape or chi.shape != mask.shape:
    raise InputError(f"shape mismatch: map {chi.shape}, truth {truth.shape}, "
                              f"mask {mask.shape}; all must be the same 3D shape")
  if not mask.any():
    raise InputError("mask is empty")
  if not np.isfinite(truth[mask]).all():
    raise InputError("truth has NaN or infinite values inside the mask")
  chi = np.where(mask & np.isfinite(chi), chi, 0.0)
  truth = np.where(mask, truth, 0.0)
  if demean:
    # chi is relative (D(0) = 0): compare shapes, not offsets.
    chi[mask] -= chi[mask].mean()
    truth[mask] -= truth[mask].mean()
  return chi, truth, mask


def psnr(chi_ppm: np.ndarray, truth_ppm: np.ndarray, mask: np.ndarray) -> float:
  """Peak signal-to-noise ratio of a map against the truth, dB.

  Definition: both maps have their mean over the mask removed; then
  ``PSNR = 20 log10(peak / RMSE)`` with ``RMSE`` the root mean square difference over the mask
  voxels and ``peak = max - min`` of the (de-meaned) truth over the mask, so a map that is off by
  a constant scores like the truth itself and the value does not depend on the truth's offset.
  Non-finite map voxels count as 0, as in QSM-CI.

  Args:
    chi_ppm: reconstruction, ppm.
    truth_ppm: ground truth, ppm.
    mask: voxels to score (bool).

  Returns:
    PSNR in dB; ``inf`` for a map identical to the truth up to a constant.

  Raises:
    InputError: shapes differ, empty mask, non-finite truth in the mask.
  """
  chi, truth, mask = _prepare(chi_ppm, truth_ppm, mask, demean=True)
  return _psnr_prepared(chi, truth, mask)


def contrast_slope(chi_ppm: np.ndarray, truth_ppm: np.ndarray, mask: np.ndarray) -> float:
  """How much contrast a map keeps: its least-squares slope on the truth over the mask (ours).

  Both maps have their mean over the mask removed; the slope is ``sum(x y) / sum(y y)`` over the
  mask voxels (1: all the contrast; a map that under-estimates gives less). Unlike QSM-CI's
  dgm_linearity it needs no segmentation: it weighs every mask voxel. Non-finite map voxels
  count as 0, as in QSM-CI.

  Args:
    chi_ppm: reconstruction, ppm.
    truth_ppm: ground truth, ppm.
    mask: voxels to use (bool).

  Returns:
    The slope (dimensionless); NaN when the truth is constant in the mask.

  Raises:
    InputError: shapes differ, empty mask, non-finite truth in the mask.
  """
  chi, truth, mask = _prepare(chi_ppm, truth_ppm, mask, demean=True)
  x, y = chi[mask], truth[mask]
  denominator = float(np.dot(y, y))
  return float(np.dot(x, y)) / denominator if denominator > 0.0 else math.nan


def pooled_patch_nrmse(err2, ref2) -> tuple[float, float]:
  """Training's patch NRMSE (`gan.NRMSE`) and its standard error (`gan.NRMSEStandardError`), %,
  from per-patch sums ``err2_i = sum (pred - true)^2`` and ``ref2_i = sum true^2``:
  ``100 sqrt(R)``, ``R = sum err2 / sum ref2``, and the delta method's
  ``100 SE(R) / (2 sqrt R)``, ``SE(R)^2 = n var_i(err2_i - R ref2_i) / (sum ref2)^2``.
  The standard error is 0 for fewer than two patches."""
  e = np.asarray(err2, dtype=np.float64).ravel()
  r = np.asarray(ref2, dtype=np.float64).ravel()
  if e.shape != r.shape or not len(e) or not r.sum() > 0:
    raise InputError("pooled_patch_nrmse needs as many err2 as ref2 sums and a positive ref2")
  ratio = e.sum() / r.sum()
  if len(e) < 2 or ratio <= 0:
    return float(100 * math.sqrt(ratio)), 0.0
  var_ratio = len(e) * np.var(e - ratio * r, ddof=1) / r.sum() ** 2
  return float(100 * math.sqrt(ratio)), float(50 * math.sqrt(var_ratio / ratio))


def _spectrum(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """FFT of the map demeaned over the mask and zeroed outside it (float64)."""
  x = np.where(mask, volume.astype(np.float64) - float(np.mean(volume[mask], dtype=np.float64)),
               0.0)
  return np.fft.fftn(x)


def _radial_frequency(shape, voxel_size_mm) -> np.ndarray:
  ki, kj, kk = physics.kspace_grid(shape, voxel_size_mm)
  return np.sqrt(ki**2 + kj**2 + kk**2)


def fine_energy_fraction(chi_ppm: np.ndarray, mask: np.ndarray,
                         voxel_size_mm=(1.0, 1.0, 1.0), cutoff_cycles_per_mm: float = 0.2) -> float:
  """Share of a map's energy above a spatial frequency (ours): fine structure.

  The map is demeaned over the mask and zeroed outside it; the share is
  ``sum |X(k)|^2 over |k| >= cutoff / sum |X(k)|^2`` (Parseval: the energy of the map's
  high-pass part over the map's energy). Veins, cortex and texture put energy above
  0.2 cycles/mm (wavelengths under 5 mm); smooth maps keep almost all of it below.

  Raises:
    InputError: shapes differ, empty mask, non-finite values in the mask.
  """
  chi, _, mask = _prepare(chi_ppm, chi_ppm, mask, demean=False)
  power = np.abs(_spectrum(chi, mask))**2
  total = float(power.sum())
  if total <= 0.0:
    return math.nan
  high = _radial_frequency(mask.shape, voxel_size_mm) >= cutoff_cycles_per_mm
  return float(power[high].sum()) / total


def spectral_bands(chi_ppm: np.ndarray, truth_ppm: np.ndarray, mask: np.ndarray,
                   voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                   edges_cycles_per_mm=BAND_EDGES_CYCLES_PER_MM,
                   cone_dipole: float = CONE_DIPOLE) -> list[dict[str, Any]]:
  """Where a map's error lies in k-space (ours): radial bands, each split at the dipole's cone.

  Both maps are demeaned over the mask and zeroed outside it. For each radial band of |k|
  (``edges_cycles_per_mm``; the last band, above the last edge, has upper bound None) and each side of the cone
  (``|D(k)| < cone_dipole``, the frequencies a single orientation barely measures, or the rest):
  ``truth_pct`` (the band's share of the truth's energy), ``error_pct`` (the error's energy there
  as a share of the truth's energy: the rows sum to NRMSE^2 / 100), ``correlation`` (the complex
  correlation of map and truth over the band, real part) and ``gain`` (``<X, Y> / <Y, Y>``: the
  contrast the map keeps there). A map equal to the truth has error 0, correlation 1 and gain 1
  in every band.

  Raises:
    InputError: shapes differ, empty mask, non-finite truth in the mask.
  """
  chi, truth, mask = _prepare(chi_ppm, truth_ppm, mask, demean=False)
  x, y = _spectrum(chi, mask), _spectrum(truth, mask)
  total = float(np.sum(np.abs(y)**2))
  radial = _radial_frequency(mask.shape, voxel_size_mm)
  cone = np.abs(physics.dipole_kernel(mask.shape, voxel_size_mm, b0_dir)) < cone_dipole
  bounds = (0.0,) + tuple(float(e) for e in edges_cycles_per_mm) + (math.inf,)
  rows = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    ring = (radial >= lo) & (radial < hi)
    for in_cone in (True, False):
      sel = ring & (cone == in_cone)
      xs, ys = x[sel], y[sel]
      yy, xx = float(np.sum(np.abs(ys)**2)), float(np.sum(np.abs(xs)**2))
      xy = float(np.real(np.vdot(ys, xs)))
      rows.append({"band_cycles_per_mm": [lo, hi if math.isfinite(hi) else None], "cone": in_cone,
                   "truth_pct": 100.0 * yy / total if total > 0 else math.nan,
                   "error_pct": 100.0 * float(np.sum(np.abs(xs - ys)**2)) / total
                                if total > 0 else math.nan,
                   "correlation": xy / math.sqrt(xx * yy) if xx * yy > 0 else math.nan,
                   "gain": xy / yy if yy > 0 else math.nan})
  return rows


def _psnr_prepared(chi, truth, mask) -> float:
  peak = float(truth[mask].max() - truth[mask].min())
  rmse = math.sqrt(float(np.mean((chi[mask] - truth[mask]) ** 2)))
  if rmse == 0.0:
    return math.inf
  if peak == 0.0:
    return -math.inf
  return 20.0 * math.log10(peak / rmse)


def evaluate(chi_ppm: np.ndarray, truth_ppm: np.ndarray, mask: np.ndarray,
             seg: np.ndarray | None = None, demean: bool = True) -> dict[str, Any]:
  """QSM-CI metrics (`qsm_ci.qsm_eval.score_arrays`, kind 'chi') plus PSNR.

  Args:
    chi_ppm: reconstruction, ppm, 3D.
    truth_ppm: ground truth, ppm, same shape.
    mask: voxels to score (bool), same shape.
    seg: optional integer label map in QSM-CI's labels (see the module docstring): adds the
      deep-grey-matter linearity, tissue/blood/calcification metrics and per-region statistics.
    demean: remove each map's mean over the mask first (the project's convention: chi is
      relative). NRMSE, dNRMSE, correlation and DGM linearity do not depend on it; XSIM and
      HFEN do, through the map's offset and its step at the mask edge.

  Returns:
    A dict of floats keyed by QSM-CI's metric names (see the module docstring) plus ``'psnr'``;
    with ``seg``, also ``'regions'``: QSM-CI's per-region summary
    ``{'labels': {id: name}, 'recon': {id: stats}, 'truth': {id: stats}}``.

  Raises:
    InputError: shapes differ, empty mask, non-finite truth in the mask.
  """
  from qsm_ci import qsm_eval  # pylint: disable=import-outside-toplevel

  chi, truth, mask = _prepare(chi_ppm, truth_ppm, mask, demean)
  if seg is not None:
    seg = np.asarray(seg)
    if seg.shape != mask.shape:
      raise InputError(f"segmentation shape {seg.shape} does not match {mask.shape}")
    seg = seg.astype(np.int32)
  # Coverage is QSM-CI's count of finite, non-zero voxels: take it from the map as given, since
  # de-meaning makes zeros (dropped voxels) non-zero.
  raw = np.asarray(chi_ppm)
  coverage = float((np.isfinite(raw) & (raw != 0) & mask).sum() / mask.sum())
  metrics, regions = qsm_eval.score_arrays(chi, truth, mask.astype(np.uint8), kind="chi", seg=seg)
  out: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
  out["coverage"] = coverage
  out["psnr"] = _psnr_prepared(chi, truth, mask)
  if regions is not None:
    out["regions"] = regions
  return out
