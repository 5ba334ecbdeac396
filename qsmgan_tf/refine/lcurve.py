"""The L-curve continuation of the L1 weight (the package docstring): a stage's point and
the stages kept while the curve is steep."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmgan_tf.classical import operators


def _lcurve_point(misfit: float, x: np.ndarray, m: np.ndarray,
                  voxel_size_mm: Sequence[float],
                  pairs: np.ndarray | None = None) -> tuple[float, float]:
  """``(data misfit, total variation)`` of ``x``: the TV is ``sum |grad x|`` over the mask (the
  isotropic norm, no edge mask), per voxel; with ``pairs`` (`terms.interior_pairs`) without the
  step at the mask's edge."""
  g = operators.gradient((m * x).astype(np.float32), voxel_size_mm).astype(np.float64)
  if pairs is not None:
    g *= pairs
  tv = np.sqrt(np.sum(g * g, axis=0))[m > 0.5]
  return misfit, float(tv.mean())


def _lcurve_continuation(x, tv_weight, solve, point, stages, factor, slope_min):
  """Raises the L1 weight by ``factor`` per stage while the L-curve is steep (package docstring).

  ``solve(tv_weight)`` is a stage's map at that weight; ``point(x)`` is its
  ``(misfit, total variation)``. A stage is kept when ``-dlog(TV) / dlog(misfit) >= slope_min``
  over it; the first one that is not ends the continuation, and is discarded.

  Returns:
    ``(x, tv_weight, slopes)``: the kept map, its L1 weight and the slope of every stage tried.
  """
  misfit, tv = point(x)
  slopes = []
  for _ in range(int(stages)):
    x_next = solve(tv_weight * factor)
    misfit_next, tv_next = point(x_next)
    rise = np.log(misfit_next / misfit) if misfit > 0 and misfit_next > 0 else 0.0
    slope = float(-np.log(tv_next / tv) / rise) if rise > 0 and tv > 0 and tv_next > 0 else 0.0
    slopes.append(slope)
    if not slope >= slope_min:
      break
    x, misfit, tv, tv_weight = x_next, misfit_next, tv_next, tv_weight * factor
  return x, tv_weight, slopes
