"""Total-variation dipole inversion by ADMM with closed-form k-space updates (Bilgic et al. 2014).

Minimises ``1/2 ||F^-1 D F chi - field||^2 + lam ||G chi||_1`` (anisotropic TV, G the periodic
forward-difference gradient per mm) on the padded grid, with the splitting ``z = G chi`` and
scaled dual ``u``:

  chi <- F^-1[(D F[field] + rho F[G^T (z - u)]) / (D^2 + rho |G(k)|^2)]
  z   <- soft(G chi + u, lam / rho)
  u   <- u + G chi - z

``G^T`` is applied in image space (one FFT per iteration instead of three). Units: the field
in ppm; lam carries ppm x mm (the L1 term is linear and the data term quadratic in the field),
so lam must be rescaled if the field is given in other units (x scale for Hz or rad).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmgan_tf.classical import operators
from qsmgan_tf.errors import InputError

METHOD = "tv"
"""The name `predict`, `evaluate` and the benchmarks know this method by (`classical.METHODS`)."""
TABLE_RANK = 50
"""Where it sits among the methods (tables, defaults): cheapest first."""

DEFAULTS = {"lam": 1e-4, "rho_factor": 100.0, "max_iter": 200, "tol": 3e-3,
            "margin": operators.DEFAULT_MARGIN, "pad_factor": 1.0}
"""lam: TV weight for a field in ppm (Bilgic 2014's range 3e-5..2e-4; on our 1 mm simulated
brain NRMSE was 24.5/25.7/29.0 % for lam 1e-4/2e-4/4e-4); rho = rho_factor * lam (Bilgic:
100); stop when the relative chi update falls below tol (1e-2 stopped ~2-3 points short of
the converged NRMSE) or after max_iter iterations."""


def _soft(x: np.ndarray, t: float) -> np.ndarray:
  return np.sign(x) * np.maximum(np.abs(x) - np.float32(t), 0.0)


def tv(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float] = (1, 1, 1),
       b0_dir: Sequence[float] = (0, 0, 1), magnitude: np.ndarray | None = None,
       lam: float = DEFAULTS["lam"], rho_factor: float = DEFAULTS["rho_factor"],
       max_iter: int = DEFAULTS["max_iter"], tol: float = DEFAULTS["tol"],
       margin: int = DEFAULTS["margin"], pad_factor: float = DEFAULTS["pad_factor"]) -> np.ndarray:
  """TV-ADMM dipole inversion.

  Args:
    field_ppm: local field, ppm of B0, 3D.
    mask: region of interest (bool), same shape.
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame.
    magnitude: unused (accepted for a uniform interface).
    lam: TV weight (ppm x mm, for a field in ppm), > 0.
    rho_factor: ADMM penalty rho = rho_factor * lam.
    max_iter: maximum ADMM iterations.
    tol: stop when ||chi_new - chi|| / ||chi_new|| < tol.
    margin: zero margin around the mask's bounding box, voxels.
    pad_factor: minimum FFT grid size as a multiple of the bounding box.

  Returns:
    chi, ppm, float32, the field's shape, zero outside the mask (not de-meaned).

  Raises:
    InputError: bad inputs or non-positive parameters.
  """
  del magnitude
  field, mask, vs, b0 = operators.check_inputs(field_ppm, mask, voxel_size_mm, b0_dir)
  if not (lam > 0 and rho_factor > 0 and max_iter >= 1):
    raise InputError("TV lam, rho_factor and max_iter must be positive")
  grid = operators.Grid(mask, vs, b0, margin, pad_factor)
  rho = np.float32(rho_factor * lam)
  d = grid.dipole()
  den = d * d + rho * grid.gradient_symbol_sq()
  den[0, 0, 0] = 1.0
  inv_den = (1.0 / den).astype(np.float32)
  inv_den[0, 0, 0] = 0.0  # chi(k=0) = 0: both terms vanish there.
  dtf = grid.fft(grid.to_grid(field)) * d
  z = np.zeros((3,) + grid.shape, dtype=np.float32)
  u = np.zeros_like(z)
  chi = np.zeros(grid.shape, dtype=np.float32)
  for _ in range(int(max_iter)):
    # G^T y = -div y.
    rhs = dtf - rho * grid.fft(operators.divergence(z - u, vs))
    chi_new = grid.ifft(rhs * inv_den)
    delta = float(np.linalg.norm(chi_new - chi)) / max(float(np.linalg.norm(chi_new)), 1e-30)
    chi = chi_new
    gchi = operators.gradient(chi, vs)
    z = _soft(gchi + u, lam / rho)
    u += gchi - z
    if delta < tol:
      break
  return grid.from_grid(chi, mask)
