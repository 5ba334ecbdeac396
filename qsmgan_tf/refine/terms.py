"""The solve's terms on the CG grid (NumPy): the L1 term's edge weights, the data term's
weighted operator, its offset (polynomial and level) projection, the SMV filter and the
erosions."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmgan_tf import physics
from qsmgan_tf.classical import operators
from qsmgan_tf.refine.params import MAX_FIT_OFFSET

# A voxel is in the SMV-eroded mask when its sphere's mean of the mask is above this (1 up to
# float32 FFT rounding, ~1e-6): the whole sphere lies inside the mask.
_ERODED_MIN = 0.999


def edge_weights(chi_grid: np.ndarray, mask_grid: np.ndarray, voxel_size_mm: Sequence[float],
                 edge_fraction: float, pairs: np.ndarray | None = None) -> np.ndarray:
  """M_G float32 [3, ...]: 0 on the ``edge_fraction`` largest |gradient| components of
  ``chi_grid`` inside the mask, 1 elsewhere: MEDI's edge mask (`medi.edge_mask`) with the
  network's map in place of the magnitude. With ``pairs`` (`interior_pairs`), only the
  components between two mask voxels are ranked and the rest (the step at the mask's edge) get
  0: the L1 term then does not see the map's level (`reference.refine_cg`'s ``fit_level = 2``)."""
  from qsmgan_tf.classical import medi  # pylint: disable=import-outside-toplevel
  kept = np.float32(1.0) if pairs is None else pairs.astype(np.float32)
  if edge_fraction <= 0:
    return np.broadcast_to(kept, (3,) + np.shape(chi_grid)).astype(np.float32)
  ranked = None if pairs is None else pairs > 0.5
  return medi.edge_mask(chi_grid, np.asarray(mask_grid, bool), voxel_size_mm, edge_fraction,
                        ranked) * kept


def interior_pairs(mask_grid: np.ndarray) -> np.ndarray:
  """float32 [3, ...]: 1 where a forward-difference component joins two mask voxels (voxel
  and its next neighbour along the axis, periodic as `operators.gradient`), else 0."""
  m = np.asarray(mask_grid, np.float32)
  return np.stack([m * np.roll(m, -1, axis) for axis in range(3)])


_POLY_SCALE_MM = 100.0
"""Length unit of the background polynomials' coordinates (conditioning only: the span, so the
projection, does not depend on it)."""


def _monomial_exponents(fit_offset) -> list[tuple[int, int, int]]:
  """``(i, j, k)`` of the monomials ``x^i y^j z^k`` of degree < ``fit_offset``, degree order."""
  return [(i, j, d - i - j) for d in range(int(fit_offset)) for i in range(d, -1, -1)
          for j in range(d - i, -1, -1)]


def _offset_projection(weight: np.ndarray, fit_offset,
                       voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                       level_field: np.ndarray | None = None) -> callable:
  """``P y = y - Q Q^T y``, ``Q`` an orthonormal basis of ``W p`` over the polynomials ``p`` of
  degree < ``fit_offset`` (``W = weight``; ``fit_offset = 1``: the constant, ``P y = y - u <u, y> /
  <u, u>`` with ``u = W``) and, if given, ``level_field`` (``B 1``, the weighted field of a
  uniform susceptibility over the mask: `reference.refine_cg`'s ``fit_level``): the weighted data
  residual with its best-fitting polynomial field (and uniform body's field) removed (the
  identity unless either). Coordinates in mm about the grid's centre."""
  if int(fit_offset) > MAX_FIT_OFFSET:
    raise ValueError(f"fit_offset must be 0..{MAX_FIT_OFFSET}, got {fit_offset}")
  if not int(fit_offset) > 0 and level_field is None:
    return lambda y: y
  flat = np.flatnonzero(weight)
  coords = [(c - 0.5 * (n - 1)) * (float(v) / _POLY_SCALE_MM)
            for c, n, v in zip(np.unravel_index(flat, weight.shape), weight.shape, voxel_size_mm)]
  w = weight.ravel()[flat].astype(np.float64)
  columns = [w * coords[0] ** i * coords[1] ** j * coords[2] ** k
             for i, j, k in _monomial_exponents(fit_offset)]
  if level_field is not None:
    columns.append(level_field.ravel()[flat].astype(np.float64))
  q = np.linalg.qr(np.stack(columns, axis=1))[0]

  def project(y):
    out = np.array(y, np.float32, copy=True)
    values = out.ravel()[flat].astype(np.float64)
    out.ravel()[flat] = (values - q @ (q.T @ values)).astype(np.float32)
    return out
  return project


def _level_field(grid: operators.Grid, weight: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """``B 1``: the weighted field of a uniform susceptibility over the grid's mask."""
  m = grid.mask.astype(np.float32)
  return physics.apply_kernel(m, kernel) * weight


def _weighted_operator(grid: operators.Grid, weight: np.ndarray, fit_offset: int = 0,
                       kernel: np.ndarray | None = None, level_field: np.ndarray | None = None):
  """``(B, A^T)`` on the grid for ``A = P B``, ``B x = W D (M x)`` (the weighted in-mask field
  of an in-mask source; ``W = M`` gives the symmetric ``M D M``) and ``P`` the offset
  projection (`_offset_projection`, the identity unless ``fit_offset``). ``P`` is an
  orthogonal projection, so ``A^T A = A^T B`` and ``A^T (W field - A x) = A^T (W field - B x)``:
  the data term needs ``P`` once per product, in ``A^T``. ``kernel``: the data term's
  half-spectrum kernel (default the grid's dipole; `_smv_data` gives the filtered one).
  ``level_field`` (`_level_field`, `reference.refine_cg`'s ``fit_level``): ``P`` also removes
  it, so a uniform susceptibility over the mask is (nearly) in ``A``'s null space. Also returns
  ``P``: ``(B, A^T, P)``."""
  m = grid.mask.astype(np.float32)
  kernel = grid.dipole() if kernel is None else kernel
  project = _offset_projection(weight, fit_offset, grid.voxel_size_mm, level_field)
  return (lambda x: physics.apply_kernel(m * x, kernel) * weight,
          lambda y: physics.apply_kernel(weight * project(y), kernel) * m, project)


def _eroded(grid: operators.Grid, radius_mm: float) -> np.ndarray:
  """float32 0/1: the grid's mask voxels whose sphere of ``radius_mm`` lies inside the mask."""
  smv = physics.smv_kernel(grid.shape, grid.voxel_size_mm, radius_mm)
  inside = physics.apply_kernel(grid.mask.astype(np.float32), smv)
  return ((inside > _ERODED_MIN) & grid.mask).astype(np.float32)


def _data_erosion(grid: operators.Grid, radius_mm: float) -> np.ndarray | np.float32:
  """The data term's erosion weight (`reference.refine_cg`'s ``data_erosion_mm``): `_eroded`, or
  1 when ``radius_mm`` is 0 or the erosion would leave no voxel."""
  if not radius_mm > 0:
    return np.float32(1.0)
  eroded = _eroded(grid, radius_mm)
  return eroded if eroded.any() else np.float32(1.0)


def _smv_data(grid: operators.Grid, radius_mm: float):
  """``(kernel, eroded, high_pass)`` of the SMV-filtered data term on ``grid``: the dipole
  times ``H = 1 - S`` (`physics.smv_kernel`), the mask eroded by the sphere (voxels whose
  sphere lies inside it, where ``H`` removes harmonic fields exactly) and ``H`` itself;
  ``(dipole, 1, None)`` when ``radius_mm`` is 0."""
  if not radius_mm > 0:
    return grid.dipole(), np.float32(1.0), None
  smv = physics.smv_kernel(grid.shape, grid.voxel_size_mm, radius_mm)
  high_pass = (np.float32(1.0) - smv).astype(np.float32)
  return grid.dipole() * high_pass, _eroded(grid, radius_mm), high_pass
