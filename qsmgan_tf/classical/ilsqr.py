"""iLSQR: LSQR with streaking-artifact estimation and removal (Li et al. 2015, NeuroImage 108:111).

Four steps, all on the padded working grid:

1. chi_lsqr: LSQR on ``min ||W_L (F^-1 D F chi - field)||`` stopped early (tolerance
   ``lsqr_tol``, semi-convergence is the regularisation). W_L down-weights voxels whose field
   Laplacian is large (unreliable phase, mostly at the mask edge): 1 below the ``lap_pct[0]``
   percentile of |Laplacian| in the mask, 0 above ``lap_pct[1]``, linear between (paper eq. 7).
2. chi_fs ("FastQSM"): ``F^-1[sign(D) F[field]]`` filtered twice by a k-space blend of
   itself (weight w(k) from |D|^n between two percentiles) and its spherical-mean smoothed
   version (SMV, radius ``smv_radius_mm``) in the ill-conditioned part of k-space, masked in
   between; then linearly regressed onto a TKD map (threshold 1/8) to fix its scale (eqs.
   8-14). It is nearly free of streaks but blurred: it only supplies edge information.
3. chi_sa: the streaking component, restricted to the ill-conditioned cone
   ``P = F^-1 [|D| < cone_threshold] F``, found by LSQR on
   ``min ||W_G G P chi_sa - W_G G chi_lsqr||``, where W_G is 1 where chi_fs is smooth and 0 at
   its edges (percentile ramp ``grad_pct`` of |G chi_fs| per component, times W_L): streaks
   are the part of chi_lsqr's gradient at places where chi_fs has no edge (eq. 15).
4. chi = chi_lsqr - chi_sa, masked.

Percentiles and tolerances follow the paper and its authors' public SAR code; units: field and
chi in ppm (the method is linear, so any field unit gives chi in the same unit).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from qsmgan_tf import physics
from qsmgan_tf.classical import operators
from qsmgan_tf.errors import InputError

_log = logging.getLogger(__name__)

METHOD = "ilsqr"
"""The name `predict`, `evaluate` and the benchmarks know this method by (`classical.METHODS`)."""
TABLE_RANK = 30
"""Where it sits among the methods (tables, defaults): cheapest first."""

DEFAULTS = {"lsqr_tol": 1e-2, "lsqr_max_iter": 50, "sa_tol": 1e-2, "sa_max_iter": 50,
            "cone_threshold": 0.1, "lap_pct": (60.0, 99.9), "grad_pct": (50.0, 70.0),
            "kspace_pct": (1.0, 30.0), "kspace_power": 0.001, "smv_radius_mm": 3.0,
            "tkd_threshold": 0.125, "margin": operators.DEFAULT_MARGIN, "pad_factor": 1.0}
"""Li et al. 2015 / public implementations: LSQR tolerance 0.01 (step 1, <= 50 iterations) and
0.01 (step 3, <= 50), ill-conditioned cone |D| < 0.1, Laplacian weight percentiles 60-99.9,
gradient weight percentiles 50-70, FastQSM k-space weights from |D|^0.001 between its 1st and
30th percentile with an SMV of radius 3 mm, TKD threshold 1/8 for the scale fit."""


def _laplacian(x: np.ndarray, voxel_size_mm: Sequence[float]) -> np.ndarray:
  return operators.divergence(operators.gradient(x, voxel_size_mm), voxel_size_mm)


def _fast_qsm(grid, field_g, gmask, d, params) -> np.ndarray:
  """Step 2: streak-poor, blurred chi estimate with TKD-matched scale (on the grid)."""
  f_k = grid.fft(field_g)
  dn = np.abs(d) ** np.float32(params["kspace_power"])
  lo, hi = np.percentile(dn[dn > 1e-20], params["kspace_pct"])
  wk = np.clip((dn - lo) / max(float(hi - lo), 1e-30), 0.0, 1.0).astype(np.float32)
  filt = wk + (1.0 - wk) * physics.smv_kernel(grid.shape, grid.voxel_size_mm, params["smv_radius_mm"])
  x = grid.ifft(np.sign(d) * f_k * filt) * gmask
  x = grid.ifft(grid.fft(x) * filt) * gmask
  t = np.float32(params["tkd_threshold"])
  d_t = np.where(np.abs(d) > t, d, np.where(d < 0, -t, t))
  inv = 1.0 / d_t
  inv[0, 0, 0] = 0.0
  x_tkd = grid.ifft(f_k * inv)
  a, b = np.polyfit(x[gmask].astype(np.float64), x_tkd[gmask].astype(np.float64), 1)
  return ((a * x + b) * gmask).astype(np.float32)


def ilsqr(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float] = (1, 1, 1),
          b0_dir: Sequence[float] = (0, 0, 1), magnitude: np.ndarray | None = None,
          margin: int = DEFAULTS["margin"], pad_factor: float = DEFAULTS["pad_factor"],
          **params) -> np.ndarray:
  """iLSQR dipole inversion (see the module docstring for the four steps).

  Args:
    field_ppm: local field, ppm of B0, 3D.
    mask: region of interest (bool), same shape.
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame.
    magnitude: unused (the paper's weights come from the field's Laplacian).
    margin: zero margin around the mask's bounding box, voxels.
    pad_factor: minimum FFT grid size as a multiple of the bounding box.
    **params: overrides of `DEFAULTS` (lsqr_tol, lsqr_max_iter, sa_tol, sa_max_iter,
      cone_threshold, lap_pct, grad_pct, kspace_pct, kspace_power, smv_radius_mm,
      tkd_threshold).

  Returns:
    chi, ppm, float32, the field's shape, zero outside the mask (not de-meaned).

  Raises:
    InputError: bad inputs or an unknown parameter.
  """
  del magnitude
  unknown = set(params) - set(DEFAULTS)
  if unknown:
    raise InputError(f"unknown iLSQR parameter(s): {', '.join(sorted(unknown))}")
  p = {**DEFAULTS, **params}
  field, mask, vs, b0 = operators.check_inputs(field_ppm, mask, voxel_size_mm, b0_dir)
  grid = operators.Grid(mask, vs, b0, margin, pad_factor)
  gmask = grid.mask
  field_g = grid.to_grid(field).astype(np.float32)
  d = grid.dipole()

  # Step 1: Laplacian-weighted LSQR.
  lap = np.abs(_laplacian(field_g, vs))
  w_lap = operators.percentile_ramp(lap, gmask, *p["lap_pct"]) * gmask

  def a1(x):
    return w_lap * grid.ifft(grid.fft(x) * d)

  def a1t(y):
    return grid.ifft(grid.fft(w_lap * y) * d)

  chi_lsqr, n1 = operators.lsqr(a1, a1t, w_lap * field_g, grid.shape, p["lsqr_tol"],
                                p["lsqr_max_iter"])
  chi_lsqr *= gmask

  # Step 2: FastQSM edge reference.
  chi_fs = _fast_qsm(grid, field_g, gmask, d, p)

  # Step 3: streaking component in the ill-conditioned cone.
  g_fs = np.abs(operators.gradient(chi_fs, vs))
  w_g = np.empty_like(g_fs)
  for axis in range(3):
    w_g[axis] = operators.percentile_ramp(g_fs[axis], gmask, *p["grad_pct"]) * w_lap
  cone = (np.abs(d) < np.float32(p["cone_threshold"])).astype(np.float32)

  def cone_proj(x):
    return grid.ifft(grid.fft(x) * cone)

  def a3(x):
    return w_g * operators.gradient(cone_proj(x), vs)

  def a3t(y):
    return cone_proj(-operators.divergence(w_g * y, vs))

  rhs = w_g * operators.gradient(chi_lsqr, vs)
  chi_sa, n3 = operators.lsqr(a3, a3t, rhs, grid.shape, p["sa_tol"], p["sa_max_iter"])
  _log.debug("iLSQR: %d LSQR iterations (step 1), %d (step 3)", n1, n3)

  # Step 4.
  return grid.from_grid(chi_lsqr - chi_sa, mask)
