"""Shared pieces of the classical dipole inversions: the working grid and difference operators.

Every inversion works on a `Grid`: the mask's bounding box cut out of the volume, zero-padded
by a margin to a fast (real) FFT size. The FFT is periodic, so the margin keeps a source's
field from wrapping onto the far side of the brain; cropping first keeps the grid small. The
margin (`DEFAULT_MARGIN`) is a measured trade-off (benchmarks/classical.py;
docs/history/BUILD_log.md, "Classical dipole inversions"): on a
160x192x160 simulated brain, a 12-voxel margin was as accurate as the classic 2x grid (TV-ADMM
24.5 vs 24.1 % NRMSE in 20 vs 175 s and 0.65 vs 3.0 GB; iLSQR 32.7 % both, 31 vs 131 s; TKD
within 0.1 point),
while margins of 0-8 voxels cost TV-ADMM 4-6 points. The closed-form L2 filter is the
exception and keeps 2x (see `cfl2`).

Gradients are forward differences with periodic boundaries on the padded grid, so that their
Fourier symbol is exactly ``E_i(k) = (exp(2 pi i k_i d_i) - 1) / d_i`` and
``sum_i |E_i|^2 = sum_i (2 sin(pi k_i d_i) / d_i)^2``, the |G(k)|^2 of the
closed-form methods. `divergence` is the negative adjoint of `gradient` (backward differences).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.fft

from qsmgan_tf import physics
from qsmgan_tf.errors import InputError

DEFAULT_MARGIN = 12
"""Zero margin (voxels a side) around the mask's bounding box; see the module docstring."""


def check_inputs(field_ppm, mask, voxel_size_mm, b0_dir):
  """Validates and normalises the common inversion arguments.

  Args:
    field_ppm: local field, ppm of B0, 3D.
    mask: region of interest, 3D, same shape (anything castable to bool).
    voxel_size_mm: 3 positive voxel sizes, mm.
    b0_dir: B0 direction in the voxel frame (any length; normalised).

  Returns:
    (field float32 zeroed outside the mask, mask bool, voxel size tuple, unit b0 ndarray).

  Raises:
    InputError: wrong dimensions or shapes, empty mask, non-finite field inside
      the mask, bad voxel size or B0 direction.
  """
  field = np.asarray(field_ppm, dtype=np.float32)
  mask = np.asarray(mask).astype(bool)
  if field.ndim != 3:
    raise InputError(f"field must be 3D, got shape {field.shape}")
  if mask.shape != field.shape:
    raise InputError(f"mask shape {mask.shape} differs from field shape {field.shape}")
  if not mask.any():
    raise InputError("mask is empty")
  if not np.isfinite(field[mask]).all():
    raise InputError("field has NaN or infinite values inside the mask")
  vs = tuple(float(v) for v in np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1))
  if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
    raise InputError(f"voxel size must be 3 positive numbers (mm), got {voxel_size_mm}")
  try:
    b0 = physics.unit_vector(b0_dir)
  except ValueError as exc:
    raise InputError(str(exc)) from None
  field = np.where(mask, field, np.float32(0.0))
  return field, mask, vs, b0


def fft(x: np.ndarray) -> np.ndarray:
  """Real-to-half-spectrum FFT (complex64 for float32 input), all cores."""
  return scipy.fft.rfftn(x, workers=-1)


def ifft(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Inverse of `fft` onto a real grid of ``shape``."""
  return scipy.fft.irfftn(x, s=shape, workers=-1)


class Grid:
  """Bounding-box crop plus margin padding to a fast FFT size, with its k-space operators.

  Attributes:
    full_shape: shape of the input volume.
    box: slices of the mask's bounding box in the input volume.
    inner_shape: shape of the box.
    shape: padded FFT grid shape.
    voxel_size_mm, b0_dir: geometry.
  """

  def __init__(self, mask: np.ndarray, voxel_size_mm: Sequence[float], b0_dir: Sequence[float],
               margin: int = DEFAULT_MARGIN, pad_factor: float = 1.0):
    """Builds the grid.

    Args:
      mask: boolean region of interest.
      voxel_size_mm: voxel size, mm.
      b0_dir: unit B0 direction, voxel frame.
      margin: minimum zero margin a side around the bounding box, voxels.
      pad_factor: minimum padded size as a multiple of the box (2.0 = the classic 2x).
    """
    self.full_shape = tuple(mask.shape)
    self.box = physics.bounding_box(mask)
    self.inner_shape = tuple(s.stop - s.start for s in self.box)
    self.shape = physics.fft_shape(self.inner_shape, pad_factor, margin)
    self.voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
    self.b0_dir = np.asarray(b0_dir, dtype=np.float64)
    self.mask = self.to_grid(mask).astype(bool)

  def to_grid(self, volume: np.ndarray) -> np.ndarray:
    """Crops a full volume to the box and pads it onto the FFT grid (same dtype)."""
    return physics.pad_to(np.asarray(volume)[self.box], self.shape)

  def from_grid(self, volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grid volume -> full-size float32 volume, zero outside ``mask`` (full size)."""
    out = np.zeros(self.full_shape, dtype=np.float32)
    out[self.box] = physics.crop_from(volume, self.inner_shape)
    out[~mask] = 0.0
    return out

  def dipole(self) -> np.ndarray:
    """Half-spectrum dipole kernel on the grid (float32)."""
    return physics.dipole_kernel(self.shape, self.voxel_size_mm, self.b0_dir, rfft=True)

  def gradient_symbol_sq(self) -> np.ndarray:
    """|G(k)|^2 = sum_i (2 sin(pi k_i d_i) / d_i)^2 on the half spectrum, mm^-2 (float32)."""
    ks = physics.kspace_grid(self.shape, self.voxel_size_mm, rfft=True)
    out = np.zeros(ks[0].shape[:1] + ks[1].shape[1:2] + ks[2].shape[2:], dtype=np.float32)
    for k, d in zip(ks, self.voxel_size_mm):
      out = out + ((2.0 * np.sin(np.pi * k * d)) / d).astype(np.float32) ** 2
    return out

  def fft(self, x: np.ndarray) -> np.ndarray:
    return fft(x)

  def ifft(self, x: np.ndarray) -> np.ndarray:
    return ifft(x, self.shape)


def gradient(x: np.ndarray, voxel_size_mm: Sequence[float]) -> np.ndarray:
  """Periodic forward differences, per mm: array [3, *x.shape] (x's float dtype)."""
  x = np.asarray(x)
  out = np.empty((3,) + x.shape, dtype=np.result_type(x.dtype, np.float32))
  for axis in range(3):
    g = out[axis]
    src = np.moveaxis(x, axis, 0)
    dst = np.moveaxis(g, axis, 0)
    np.subtract(src[1:], src[:-1], out=dst[:-1])
    np.subtract(src[:1], src[-1:], out=dst[-1:])
    g *= np.float32(1.0 / voxel_size_mm[axis])
  return out


def divergence(g: np.ndarray, voxel_size_mm: Sequence[float]) -> np.ndarray:
  """Periodic backward-difference divergence: ``divergence = -gradient^T``."""
  out = np.zeros(g.shape[1:], dtype=g.dtype)
  for axis in range(3):
    src = np.moveaxis(g[axis], axis, 0)
    dst = np.moveaxis(out, axis, 0)
    scale = np.float32(1.0 / voxel_size_mm[axis])
    # (div g)[i] = (g[i] - g[i-1]) / d, with g[-1] the last sample (periodic).
    dst[1:] += (src[1:] - src[:-1]) * scale
    dst[:1] += (src[:1] - src[-1:]) * scale
  return out


def percentile_ramp(values: np.ndarray, where: np.ndarray, low_pct: float,
                    high_pct: float) -> np.ndarray:
  """Weights 1 below the low percentile of ``values[where]``, 0 above the high, linear between.

  Used by iLSQR for its Laplacian and gradient weights (Li et al. 2015, eqs. 7 and 15).
  """
  lo, hi = np.percentile(values[where], [low_pct, high_pct])
  span = max(float(hi - lo), 1e-30)
  w = np.clip((hi - values) / span, 0.0, 1.0).astype(np.float32)
  return w


def lsqr(apply_a, apply_at, b: np.ndarray, x_shape, tol: float = 1e-2, max_iter: int = 50):
  """LSQR (Paige & Saunders 1982) for min ||A x - b||_2 with matrix-free float32 operators.

  Stops when the residual norm falls below ``tol * ||b||`` or the normal-equation residual
  ``||A^T r||`` below ``tol * ||A|| ||r||`` (estimated); early stopping is the regularisation
  in iLSQR (semi-convergence).

  Args:
    apply_a: x (array of x_shape) -> A x (array like b).
    apply_at: y (array like b) -> A^T y (array of x_shape).
    b: right-hand side.
    x_shape: shape of the unknown.
    tol: relative tolerance.
    max_iter: iteration cap.

  Returns:
    (x, iterations done).
  """
  u = np.array(b, dtype=np.float32)
  beta = float(np.linalg.norm(u))
  x = np.zeros(x_shape, dtype=np.float32)
  if beta == 0.0:
    return x, 0
  u /= beta
  v = apply_at(u).astype(np.float32)
  alpha = float(np.linalg.norm(v))
  if alpha == 0.0:
    return x, 0
  v /= alpha
  w = v.copy()
  phi_bar, rho_bar = beta, alpha
  bnorm = beta
  anorm_sq = 0.0
  it = 0
  for it in range(1, max_iter + 1):
    u = apply_a(v) - np.float32(alpha) * u
    beta = float(np.linalg.norm(u))
    if beta > 0:
      u /= beta
    anorm_sq += alpha**2 + beta**2
    v = apply_at(u) - np.float32(beta) * v
    alpha = float(np.linalg.norm(v))
    if alpha > 0:
      v /= alpha
    rho = np.hypot(rho_bar, beta)
    c, s = rho_bar / rho, beta / rho
    theta = s * alpha
    rho_bar = -c * alpha
    phi = c * phi_bar
    phi_bar = s * phi_bar
    x += np.float32(phi / rho) * w
    w = v - np.float32(theta / rho) * w
    # phi_bar = ||r||; phi_bar * alpha * |c| = ||A^T r||.
    if phi_bar <= tol * bnorm:
      break
    if phi_bar * alpha * abs(c) <= tol * np.sqrt(anorm_sq) * phi_bar:
      break
  return x, it


def cg(apply_a, b: np.ndarray, x0: np.ndarray | None = None, tol: float = 1e-2,
       max_iter: int = 100):
  """Conjugate gradients for a symmetric positive (semi-)definite matrix-free operator.

  Returns:
    (x, iterations done); stops at ``||r|| <= tol * ||b||``.
  """
  x = np.zeros_like(b) if x0 is None else x0.astype(b.dtype, copy=True)
  r = b - apply_a(x) if x0 is not None else b.copy()
  p = r.copy()
  rs = float(np.vdot(r, r))
  bnorm = float(np.linalg.norm(b))
  it = 0
  for it in range(1, max_iter + 1):
    if np.sqrt(rs) <= tol * bnorm:
      it -= 1
      break
    ap = apply_a(p)
    pap = float(np.vdot(p, ap))
    if pap <= 0:
      break
    a = rs / pap
    x += np.float32(a) * p
    r -= np.float32(a) * ap
    rs_new = float(np.vdot(r, r))
    p = r + np.float32(rs_new / rs) * p
    rs = rs_new
  return x, it
