"""Truncated k-space division (TKD; Shmueli et al. 2009, Wharton et al. 2010).

``chi = F^-1[F[field] / D_t]`` with ``D_t = D`` where ``|D| > t``, else ``sign(D) t`` (sign(0)
taken as +1), and ``chi(k=0) = 0``. The field is set to zero outside the mask before the
transform; chi is returned inside the mask only. No correction factor for the truncation's
underestimation is applied (evaluation in this project fits no scale either, except dNRMSE).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmgan_tf.classical import operators
from qsmgan_tf.errors import InputError

METHOD = "tkd"
"""The name `predict`, `evaluate` and the benchmarks know this method by (`classical.METHODS`)."""
TABLE_RANK = 10
"""Where it sits among the methods (tables, defaults): cheapest first."""

DEFAULTS = {"threshold": 0.19, "margin": operators.DEFAULT_MARGIN, "pad_factor": 1.0}
"""threshold: |D| truncation level t (literature 0.1-0.2; 0.19 as in QSM-CI's TKD baseline)."""


def tkd(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float] = (1, 1, 1),
        b0_dir: Sequence[float] = (0, 0, 1), magnitude: np.ndarray | None = None,
        threshold: float = DEFAULTS["threshold"], margin: int = DEFAULTS["margin"],
        pad_factor: float = DEFAULTS["pad_factor"]) -> np.ndarray:
  """TKD dipole inversion.

  Args:
    field_ppm: local field, ppm of B0, 3D.
    mask: region of interest (bool), same shape.
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame.
    magnitude: unused (accepted for a uniform interface).
    threshold: truncation level t of |D|, in (0, 1/3].
    margin: zero margin around the mask's bounding box, voxels.
    pad_factor: minimum FFT grid size as a multiple of the bounding box.

  Returns:
    chi, ppm, float32, the field's shape, zero outside the mask (not de-meaned).

  Raises:
    InputError: bad inputs (see `operators.check_inputs`) or threshold out of range.
  """
  del magnitude
  field, mask, vs, b0 = operators.check_inputs(field_ppm, mask, voxel_size_mm, b0_dir)
  if not 0.0 < threshold <= 2.0 / 3.0:
    raise InputError(f"TKD threshold must be in (0, 2/3], got {threshold}")
  grid = operators.Grid(mask, vs, b0, margin, pad_factor)
  d = grid.dipole()
  t = np.float32(threshold)
  d_t = np.where(np.abs(d) > t, d, np.where(d < 0, -t, t))
  inv = (1.0 / d_t).astype(np.float32)
  inv[0, 0, 0] = 0.0
  chi = grid.ifft(grid.fft(grid.to_grid(field)) * inv)
  return grid.from_grid(chi, mask)
