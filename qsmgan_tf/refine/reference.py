"""The NumPy/SciPy reference of the refinement (float64 CG, `refine_cg`: the test oracle of the
TensorFlow graph), the closed form and the field residual. `entry.refine` runs them by name."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmgan_tf import fine_shrinkage as shrinkage_lib
from qsmgan_tf import physics
from qsmgan_tf.classical import operators
from qsmgan_tf.refine.lcurve import _lcurve_continuation, _lcurve_point
from qsmgan_tf.refine.params import CLOSED_FORM_DEFAULTS, DEFAULTS, _check_inputs, check_magnitude
from qsmgan_tf.refine.statistics import field_noise_ppm, regularisation_scale, robust_weights
from qsmgan_tf.refine.terms import (_data_erosion, _level_field, _smv_data,
                                    _weighted_operator, edge_weights, interior_pairs)


def refine_cg(chi_net: np.ndarray, field_ppm: np.ndarray, mask: np.ndarray,
              voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
              b0_dir: Sequence[float] = (0.0, 0.0, 1.0), mu: float = DEFAULTS["mu"],
              iterations: int = DEFAULTS["iterations"],
              margin: int = DEFAULTS["margin"], tv_weight: float = DEFAULTS["tv_weight"],
              edge_fraction: float = DEFAULTS["edge_fraction"],
              reweights: int = DEFAULTS["reweights"],
              tv_eps: float = DEFAULTS["tv_eps"],
              magnitude_edge_fraction: float = DEFAULTS["magnitude_edge_fraction"],
              magnitude_weighting: int = DEFAULTS["magnitude_weighting"],
              edge_refresh: int = DEFAULTS["edge_refresh"],
              residual_margin: int = DEFAULTS["residual_margin"],
              fit_offset: int = DEFAULTS["fit_offset"],
              noise_reference_ppm: float = DEFAULTS["noise_reference_ppm"],
              smv_radius_mm: float = DEFAULTS["smv_radius_mm"],
              data_erosion_mm: float = DEFAULTS["data_erosion_mm"],
              lcurve_stages: int = DEFAULTS["lcurve_stages"],
              lcurve_factor: float = DEFAULTS["lcurve_factor"],
              lcurve_slope: float = DEFAULTS["lcurve_slope"],
              lcurve_reweights: int = DEFAULTS["lcurve_reweights"],
              fine_shrinkage: int = DEFAULTS["fine_shrinkage"],
              fit_level: int = DEFAULTS["fit_level"],
              robust_data: float = DEFAULTS["robust_data"],
              bregman: int = DEFAULTS["bregman"],
              magnitude: np.ndarray | None = None, return_weight: bool = False):
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
    tv_weight: weight of the L1 edge prior ``||M_G grad chi||_1`` (0 = quadratic solve).
    edge_fraction: share of chi_net's in-mask gradient components left free as edges.
    reweights: lagged-diffusivity steps (each runs ``iterations`` CG steps); 1 if tv_weight 0.
    tv_eps: smoothing of the L1 term, ppm^2/mm^2.
    magnitude_edge_fraction: share of the magnitude's in-mask gradient components also left
      free (0 = its edges unused); needs ``magnitude`` and ``tv_weight > 0``.
    magnitude_weighting: 1 = weight the data term by the normalised magnitude (module
      docstring); needs ``magnitude``.
    edge_refresh: 1 = take M_G from the current chi at every reweighting step after the
      first (the magnitude's edges, if used, stay); 0 = from chi_net throughout.
    residual_margin: if larger than ``margin``, the data residual ``A^T (W field - A chi)``
      that starts each of the ``reweights`` steps (also without the L1 term) is computed on
      the box padded by this margin, while the CG steps run on the ``margin`` grid: defect
      correction, converging to the larger grid's solution at the small grid's cost per CG
      step (package docstring). 0 (or <= margin) = one grid.
    fit_offset: n > 0 = fit a polynomial field of degree < n jointly with chi (module
      docstring): 1 a constant offset (the data term ignores the field's in-mask weighted
      mean), 2 also linear, 3 also quadratic background remnants (up to `params.MAX_FIT_OFFSET`);
      0 = the field is taken as absolute.
    fit_level: 1 = the data term ignores the field of a uniform chi over the mask; 2 = the
      L1 term also leaves out the step at the mask's edge, so that nothing in the solve sees
      chi's uniform level: the map's level is chi_net's and the rest does not depend on it
      (package docstring); 0 = both see it.
    noise_reference_ppm: > 0 = ``mu`` and ``tv_weight`` are the weights for a field with
      this much noise (ppm) and are scaled by `regularisation_scale` for this field's own
      noise (package docstring); 0 = used as given.
    smv_radius_mm: > 0 = the data term compares the SMV-high-passed fields on the mask eroded
      by this radius, mm (package docstring): harmonic background remnants drop out;
      0 = the fields themselves on the whole mask.
    data_erosion_mm: > 0 = the data term leaves out the voxels within this distance of the
      mask's edge, mm (package docstring; the whole mask if none would be left); 0 = none.
    lcurve_stages: > 0 = after the solve, up to this many stages that each multiply the L1
      weight by ``lcurve_factor`` and solve again from ``chi_net``, kept while the L-curve
      is steep (``-dlog(TV) / dlog(misfit) >= lcurve_slope`` over the stage; module
      docstring); 0 = the L1 weight as given. Needs ``tv_weight > 0``.
    lcurve_factor, lcurve_slope, lcurve_reweights: the stages' weight factor, the smallest
      slope kept and the reweighting steps of each stage (each from ``chi_net``).
    robust_data: > 0 = after the solve (and the L-curve), weight each voxel's data term by
      Huber's `robust_weights` of its residual at this many robust standard deviations and
      solve again, the L-curve included, from ``chi_net`` (package docstring); 0 = one solve.
    bregman: > 0 = this many Bregman passes after those: each solves again from ``chi_net`` at
      the L1 weight kept, its weighted field the last pass's plus that pass's projected
      residual, ``b_k+1 = P (b_k - B x)`` (package docstring); needs ``tv_weight > 0``.
    magnitude: optional magnitude image [X, Y, Z] (any scale); None ignores the two above.
    return_weight: also return the L1 weight used (after the noise scale and the L-curve).

  Returns:
    chi_ppm float32 [X, Y, Z], 0 outside the mask; with ``return_weight``,
    ``(chi_ppm, tv_weight)``.

  Raises:
    ValueError: shapes differ, the mask is empty, or the magnitude is unusable.
  """
  chi_net, field_ppm, mask = _check_inputs(chi_net, field_ppm, mask)
  magnitude = check_magnitude(magnitude, mask)
  scale, _ = regularisation_scale(field_ppm, mask, noise_reference_ppm)
  mu, tv_weight = mu * scale, tv_weight * scale
  grid = operators.Grid(mask, voxel_size_mm, physics.unit_vector(b0_dir), margin)
  m = grid.mask.astype(np.float32)
  mag = None if magnitude is None else grid.to_grid(magnitude) * m
  weight = m
  if mag is not None and magnitude_weighting:
    weight = (mag / mag[grid.mask].mean(dtype=np.float64)).astype(np.float32)
  kernel, eroded, high_pass = _smv_data(grid, smv_radius_mm)
  weight = (weight * eroded * _data_erosion(grid, data_erosion_mm)).astype(np.float32)
  vs = grid.voxel_size_mm
  x0 = (grid.to_grid(chi_net) * grid.mask).astype(np.float64)
  f = (grid.to_grid(field_ppm) * grid.mask).astype(np.float32)
  use_tv = tv_weight > 0
  corrected = int(residual_margin) > int(margin)
  # The residual's grid: the CG grid unless residual_margin is larger.
  grid_r = (operators.Grid(mask, voxel_size_mm, physics.unit_vector(b0_dir), residual_margin)
            if corrected else grid)

  def to_residual_grid(v):
    return physics.pad_to(physics.crop_from(v, grid.inner_shape), grid_r.shape)

  def from_residual_grid(v):
    return physics.pad_to(physics.crop_from(v, grid.inner_shape), grid.shape)

  kernel_r, _, high_pass_r = _smv_data(grid_r, smv_radius_mm) if corrected else (
      kernel, None, high_pass)
  f_r = to_residual_grid(f) if corrected else f
  if high_pass_r is not None:  # the SMV-filtered field, on the residual's grid
    f_r = physics.apply_kernel(f_r, high_pass_r).astype(np.float32)
  # The magnitude's edges do not change between steps: sorted once.
  mag_edges = (edge_weights(mag, grid.mask, vs, magnitude_edge_fraction)
               if use_tv and mag is not None and magnitude_edge_fraction > 0 else 1.0)
  # fit_level 2: the L1 term leaves the step at the mask's edge (the map's level) alone too.
  pairs = interior_pairs(grid.mask) if use_tv and int(fit_level) > 1 else None

  def edge_mask(chi):
    return edge_weights(chi.astype(np.float32), grid.mask, vs, edge_fraction, pairs) * mag_edges

  edges0 = edge_mask(x0) if use_tv else None

  def solve_weighted(weight, added_r=0.0, tv_start=tv_weight, stages=int(lcurve_stages)):
    """The whole solve (and ``stages`` of the L-curve) with data weight ``weight`` and
    ``added_r`` added to the weighted field on the residual's grid, from the L1 weight
    ``tv_start``: ``(x, tv_weight, r)``, ``r()`` the map's projected, weighted data residual
    ``P (W field + added - B x)`` on the residual's grid."""
    weight_r = to_residual_grid(weight) if corrected else weight
    # The level's field is the residual grid's on both grids: the small grid's own (its
    # periodic images are close) would leave the CG steps a near-null direction that the
    # residual's grid does not have, and defect correction diverges along it.
    level_r = (_level_field(grid_r, weight_r, kernel_r) if int(fit_level) > 0 else None)
    level = (from_residual_grid(level_r) if corrected and level_r is not None else level_r)
    forward, adjoint, project = _weighted_operator(grid, weight, fit_offset, kernel, level)
    forward_r, adjoint_r, project_r = (
        _weighted_operator(grid_r, weight_r, fit_offset, kernel_r, level_r) if corrected
        else (forward, adjoint, project))
    weighted_field_r = weight_r * f_r + added_r

    def residual(x):  # P (W field - B x) on the residual's grid
      return project_r(weighted_field_r - forward_r(to_residual_grid(x.astype(np.float32))))

    def misfit(x):  # ||P (W field - B x)||: the L-curve's residual
      return float(np.sqrt(np.sum(np.square(residual(x), dtype=np.float64))))

    def data_residual(x):  # A^T (W field - A x) on the residual's grid
      x_r = to_residual_grid(x.astype(np.float32))
      return from_residual_grid(adjoint_r(weighted_field_r - forward_r(x_r))).astype(np.float64)

    def solve(x, tv_weight, steps):
      """``steps`` reweighting steps from ``x`` (the edges refreshed after the first)."""
      for step in range(steps):
        x = step_from(x, tv_weight, step)
      return x

    def step_from(x, tv_weight, step):
      edges = edges0
      if use_tv:
        if step > 0 and edge_refresh:
          edges = edge_mask(x)
        gx = edges * operators.gradient(x.astype(np.float32), vs)
        v = edges / np.sqrt(gx * gx + np.float32(tv_eps))

      def tv_term(y, v=v if use_tv else None):
        if v is None:
          return 0.0
        yy = (m * y).astype(np.float32)
        return tv_weight * (m * -operators.divergence(v * operators.gradient(yy, vs), vs))

      def normal(y):
        return adjoint(forward(y)).astype(np.float64) + mu * y + tv_term(y)

      # CG for the step delta (started at 0): normal(delta) = rhs - normal(x), whose data part
      # comes from the residual's grid (defect correction when that is the larger one).
      r = data_residual(x) + mu * (x0 - x) - tv_term(x)
      delta = np.zeros_like(x)
      p = r.copy()
      rs = float(np.vdot(r, r))
      for _ in range(int(iterations)):
        if rs <= 0.0:
          break
        ap = normal(p)
        alpha = rs / float(np.vdot(p, ap))
        delta += alpha * p
        r -= alpha * ap
        rs_new = float(np.vdot(r, r))
        p = r + (rs_new / rs) * p
        rs = rs_new
      return x + delta

    steps = max(int(reweights), 1) if use_tv or corrected else 1
    x = solve(x0.copy(), tv_start, steps)
    tv_weight_used = tv_start
    if use_tv and stages > 0:
      stage_steps = max(int(lcurve_reweights), 1)
      x, tv_weight_used, _ = _lcurve_continuation(
          x, tv_start, lambda tv: solve(x0.copy(), tv, stage_steps),
          lambda x: _lcurve_point(misfit(x), x, m, vs, pairs), stages, lcurve_factor,
          lcurve_slope)
    return x, tv_weight_used, lambda: residual(x)

  x, tv_weight_used, final_residual = solve_weighted(weight)
  if robust_data > 0:  # the residual (a large-grid FFT pair) only when a second pass uses it
    weight = weight * robust_weights(from_residual_grid(final_residual()), grid.mask, robust_data)
    x, tv_weight_used, final_residual = solve_weighted(weight)
  # Bregman (Osher et al. 2005): each pass solves again, from chi_net at the weight kept, with
  # b_k+1 = b_k + P (W field - B x) = P (b_k - B x) as the weighted field: what the L1 term took
  # from the data (contrast) goes back in, pass by pass.
  for _ in range(max(int(bregman), 0) if use_tv else 0):
    x, tv_weight_used, final_residual = solve_weighted(
        weight, final_residual(), tv_weight_used, stages=0)
  chi = grid.from_grid(x.astype(np.float32), mask)
  if int(fine_shrinkage) > 0:
    chi, _ = shrinkage_lib.shrink(chi, np.where(mask, chi_net, 0.0), field_ppm, mask,
                                  voxel_size_mm, b0_dir, field_noise_ppm(field_ppm, mask))
  return (chi, float(tv_weight_used)) if return_weight else chi


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
