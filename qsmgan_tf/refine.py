"""Data-consistency refinement of a network's susceptibility map against the measured field.

Solves, started at the network output ``chi_net``::

    min_chi  ||M (D chi - field)||^2 + mu ||chi - chi_net||^2,    chi = 0 outside M,

by a few conjugate-gradient iterations on the normal equations
``(A^T A + mu I) chi = A^T field + mu chi_net`` with ``A = M F^-1 D F M`` (M the mask, D the
dipole kernel of `physics`). Both terms are quadratic in ppm, so ``mu`` does not depend on the
units as long as field and chi share them (a ×10 normalisation leaves it unchanged).
Early stopping (few iterations) is part of the regulariser: the network supplies the
ill-posed cone, the field the well-posed rest.

Speed: the solve runs on the mask's bounding box padded by ``margin`` voxels a side to a fast
FFT size, not on a 2x grid (chi is zero outside the mask, so the periodic images of the
sources are at least ``2 * margin`` voxels away from the mask). BUILD.md quotes the measured
effect of the margin on accuracy and time.

Two implementations with the same defaults (`DEFAULTS`): NumPy/SciPy (`refine_cg`, the
reference, float64 CG) and TensorFlow (`refine_tf`, dynamic shapes, float32; used inside the
SavedModel's ``predict_volume`` and ``refine`` signatures and by local inference, so a CLI run
and TF Serving give the same numbers). They agree to ~1e-6 (tests/test_refine.py).
Residuals for the sidecar (`field_residual`, `field_residual_tf`) follow
`physics.field_residual`: 2x padding (of the mask's box) and de-meaned over the mask.
`refine_closed_form` is the one-shot k-space variant
``chi = F^-1[(D F[field] + lam F[chi_net]) / (D^2 + lam)]`` (no mask in the data term).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmgan_tf import physics
from qsmgan_tf.classical import operators

DEFAULTS = {"mu": 0.003, "iterations": 15, "margin": operators.DEFAULT_MARGIN}
"""Refinement defaults (recorded in the model contract as ``contract['refine']``), chosen on
simulated validation phantoms by ``python benchmarks/inference.py --study=refine`` (BUILD.md)."""

CLOSED_FORM_DEFAULTS = {"lam": 0.01, "margin": operators.DEFAULT_MARGIN}
"""Closed-form k-space variant: Tikhonov weight towards chi_net, padding margin (voxels)."""

METHODS = ("cg", "closed", "none")


def resolve_params(contract: dict | None = None, **overrides) -> dict:
  """CG parameters: explicit overrides, else ``contract['refine']``, else `DEFAULTS`.

  Args:
    contract: model contract or None.
    **overrides: mu / iterations / margin; None values are ignored.

  Returns:
    dict with exactly the keys of `DEFAULTS`, typed like them.
  """
  out = dict(DEFAULTS)
  for source in (((contract or {}).get("refine") or {}), overrides):
    for key, value in source.items():
      if key in out and value is not None:
        out[key] = type(DEFAULTS[key])(value)
  return out


def resolve_method(method) -> str:
  """'cg' | 'closed' | 'none' (None and False mean 'none'); ValueError otherwise."""
  method = "none" if method in (None, False) else str(method).lower()
  if method not in METHODS:
    raise ValueError(f"unknown refinement {method!r}; expected one of {', '.join(METHODS)}")
  return method


# --------------------------------------------------------------------------------------
# NumPy reference
# --------------------------------------------------------------------------------------
def _check_inputs(chi_net, field_ppm, mask):
  chi_net = np.asarray(chi_net, dtype=np.float32)
  field_ppm = np.asarray(field_ppm, dtype=np.float32)
  mask = np.asarray(mask) > 0.5
  if not chi_net.shape == field_ppm.shape == mask.shape or chi_net.ndim != 3:
    raise ValueError(f"chi_net {chi_net.shape}, field {field_ppm.shape} and mask {mask.shape} "
                     "must be 3D volumes of one shape")
  if not mask.any():
    raise ValueError("mask is empty")
  return chi_net, field_ppm, mask


def _masked_operator(grid: operators.Grid):
  """``A x = M D (M x)`` on the grid: the in-mask field of an in-mask source (A = A^T)."""
  m = grid.mask.astype(np.float32)
  kernel = grid.dipole()
  return lambda x: physics.apply_kernel(m * x, kernel) * m


def refine_cg(chi_net: np.ndarray, field_ppm: np.ndarray, mask: np.ndarray,
              voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
              b0_dir: Sequence[float] = (0.0, 0.0, 1.0), mu: float = DEFAULTS["mu"],
              iterations: int = DEFAULTS["iterations"],
              margin: int = DEFAULTS["margin"]) -> np.ndarray:
  """CG data-consistency refinement (NumPy/SciPy reference).

  Args:
    chi_net: network susceptibility, ppm, [X, Y, Z].
    field_ppm: local field, ppm of B0, [X, Y, Z].
    mask: brain mask, [X, Y, Z] (bool, or > 0.5 inside).
    voxel_size_mm: voxel size, mm.
    b0_dir: TRUE B0 direction in this grid's voxel frame.
    mu: weight of ``||chi - chi_net||^2`` (same for ppm and normalised units).
    iterations: CG iterations (0 returns the masked chi_net).
    margin: zero margin around the mask's bounding box, voxels, before rounding up to a fast
      FFT size.

  Returns:
    chi_ppm float32 [X, Y, Z], 0 outside the mask.

  Raises:
    ValueError: shapes differ, or the mask is empty.
  """
  chi_net, field_ppm, mask = _check_inputs(chi_net, field_ppm, mask)
  grid = operators.Grid(mask, voxel_size_mm, physics.unit_vector(b0_dir), margin)
  apply = _masked_operator(grid)
  x0 = (grid.to_grid(chi_net) * grid.mask).astype(np.float64)
  f = (grid.to_grid(field_ppm) * grid.mask).astype(np.float32)
  # Normal equations for delta = chi - chi_net, started at 0 (the prior term vanishes there).
  r = apply(f - apply(x0)).astype(np.float64)
  delta = np.zeros_like(x0)
  p = r.copy()
  rs = float(np.vdot(r, r))
  for _ in range(int(iterations)):
    if rs <= 0.0:
      break
    ap = apply(apply(p)).astype(np.float64) + mu * p
    alpha = rs / float(np.vdot(p, ap))
    delta += alpha * p
    r -= alpha * ap
    rs_new = float(np.vdot(r, r))
    p = r + (rs_new / rs) * p
    rs = rs_new
  return grid.from_grid((x0 + delta).astype(np.float32), mask)


def refine_closed_form(chi_net: np.ndarray, field_ppm: np.ndarray, mask: np.ndarray,
                       voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                       b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
                       lam: float = CLOSED_FORM_DEFAULTS["lam"],
                       margin: int = CLOSED_FORM_DEFAULTS["margin"]) -> np.ndarray:
  """One-shot k-space refinement ``F^-1[(D F[field] + lam F[chi_net]) / (D^2 + lam)]``.

  No mask inside the data term (so no iterations); same cropping and padding as `refine_cg`.

  Returns:
    chi_ppm float32 [X, Y, Z], 0 outside the mask.
  """
  chi_net, field_ppm, mask = _check_inputs(chi_net, field_ppm, mask)
  grid = operators.Grid(mask, voxel_size_mm, physics.unit_vector(b0_dir), margin)
  d = grid.dipole()
  num = (d * grid.fft(grid.to_grid(field_ppm) * grid.mask)
         + lam * grid.fft(grid.to_grid(chi_net) * grid.mask))
  return grid.from_grid(grid.ifft(num / (d * d + lam)).astype(np.float32), mask)


def field_residual(chi_ppm, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0),
                   b0_dir=(0.0, 0.0, 1.0)) -> float:
  """`physics.field_residual` (2x padding, mask-demeaned) on the mask's bounding box.

  chi is zero outside the mask, so cropping to the box first changes nothing but the cost.
  """
  chi_ppm, field_ppm, mask = _check_inputs(chi_ppm, field_ppm, mask)
  box = physics.bounding_box(mask)
  return physics.field_residual(chi_ppm[box] * mask[box], field_ppm[box], mask[box],
                                voxel_size_mm, b0_dir)


def refine(chi_net, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
           method: str = "cg", mu: float | None = None, iterations: int | None = None,
           margin: int | None = None, lam: float | None = None, contract: dict | None = None):
  """Refinement by name, with residuals for the sidecar (NumPy).

  Args:
    chi_net, field_ppm, mask, voxel_size_mm, b0_dir: as `refine_cg`.
    method: 'cg', 'closed' or 'none'.
    mu, iterations, margin: CG parameters; None takes ``contract['refine']`` then `DEFAULTS`.
    lam: closed-form weight; None takes `CLOSED_FORM_DEFAULTS`.
    contract: model contract (its ``refine`` entry supplies defaults).

  Returns:
    ``(chi_ppm, info)``, info with the method, its parameters and the relative field residual
    (`field_residual`) before and after.

  Raises:
    ValueError: unknown method, bad shapes or an empty mask.
  """
  method = resolve_method(method)
  params = resolve_params(contract, mu=mu, iterations=iterations, margin=margin)
  chi_net, field_ppm, mask = _check_inputs(chi_net, field_ppm, mask)
  chi_net = chi_net * mask
  before = field_residual(chi_net, field_ppm, mask, voxel_size_mm, b0_dir)
  if method == "none":
    return chi_net, {"method": "none", "residual_before": before, "residual_after": before}
  if method == "closed":
    lam = CLOSED_FORM_DEFAULTS["lam"] if lam is None else float(lam)
    chi = refine_closed_form(chi_net, field_ppm, mask, voxel_size_mm, b0_dir, lam,
                             params["margin"])
    info = {"method": "closed", "lam": lam, "margin": params["margin"]}
  else:
    chi = refine_cg(chi_net, field_ppm, mask, voxel_size_mm, b0_dir, **params)
    info = {"method": "cg", **params}
  info["residual_before"] = before
  info["residual_after"] = field_residual(chi, field_ppm, mask, voxel_size_mm, b0_dir)
  return chi, info


# --------------------------------------------------------------------------------------
# TensorFlow (dynamic shapes; for SavedModel signatures)
# --------------------------------------------------------------------------------------
def _tf_crop_box(mask):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel
  m = tf.cast(tf.cast(tf.convert_to_tensor(mask), tf.float32) > 0.5, tf.float32)
  begin, size = physics_tf.bounding_box(m)
  return m, begin, size


def refine_tf(chi_net, field_ppm, mask, b0_dir, voxel_size_mm, mu=DEFAULTS["mu"],
              iterations=DEFAULTS["iterations"], margin=DEFAULTS["margin"]):
  """CG data-consistency refinement in TensorFlow; same maths and defaults as `refine_cg`.

  Works in a tf.function with dynamic shapes (float32 CG on complex64 FFTs).

  Args:
    chi_net: network susceptibility, ppm, float32 [X, Y, Z].
    field_ppm: local field, ppm of B0, float32 [X, Y, Z].
    mask: brain mask [X, Y, Z] (> 0.5 is inside; must not be empty).
    b0_dir: TRUE B0 direction in this grid's voxel frame, float [3].
    voxel_size_mm: voxel size, mm, float [3].
    mu: prior weight (scalar, Python or tensor).
    iterations: CG iterations (scalar, Python or tensor).
    margin: zero margin around the mask's bounding box, voxels (scalar).

  Returns:
    chi_ppm float32 [X, Y, Z], 0 outside the mask.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel

  chi_net = tf.convert_to_tensor(chi_net, tf.float32)
  field_ppm = tf.convert_to_tensor(field_ppm, tf.float32)
  m_full, begin, size = _tf_crop_box(mask)
  mu = tf.cast(mu, tf.float32)
  iterations = tf.cast(iterations, tf.int32)
  grid = physics_tf.fft_shape(size, 1.0, margin)
  kernel = tf.cast(physics_tf.dipole_kernel(grid, voxel_size_mm, b0_dir, rfft=True),
                   tf.complex64)
  m = physics_tf.pad_to(tf.slice(m_full, begin, size), grid)

  def to_grid(v):
    return physics_tf.pad_to(tf.slice(v, begin, size), grid) * m

  def apply(x):  # A x = M D (M x), as `_masked_operator`
    return tf.signal.irfft3d(tf.signal.rfft3d(m * x) * kernel, fft_length=grid) * m

  def dot(a, b):
    return tf.reduce_sum(a * b)

  x0 = to_grid(chi_net)
  r = apply(to_grid(field_ppm) - apply(x0))

  def body(i, delta, r, p, rs):
    ap = apply(apply(p)) + mu * p
    alpha = tf.math.divide_no_nan(rs, dot(p, ap))
    delta = delta + alpha * p
    r = r - alpha * ap
    rs_new = dot(r, r)
    p = r + tf.math.divide_no_nan(rs_new, rs) * p
    return i + 1, delta, r, p, rs_new

  _, delta, _, _, _ = tf.while_loop(
      lambda i, *_: i < iterations, body,
      (tf.constant(0), tf.zeros_like(x0), r, r, dot(r, r)))
  inner = physics_tf.crop_from(x0 + delta, size)
  full = tf.shape(m_full)
  return tf.pad(inner, tf.stack([begin, full - begin - size], axis=1)) * m_full


def field_residual_tf(chi_ppm, field_ppm, mask, b0_dir, voxel_size_mm):
  """`field_residual` in TensorFlow (2x padding of the mask's box, mask-demeaned); scalar."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel

  m, begin, size = _tf_crop_box(mask)
  chi = tf.slice(tf.convert_to_tensor(chi_ppm, tf.float32) * m, begin, size)
  field = tf.slice(tf.convert_to_tensor(field_ppm, tf.float32), begin, size)
  return physics_tf.field_residual(chi, field, tf.slice(m, begin, size), voxel_size_mm, b0_dir,
                                   pad_factor=2.0)
