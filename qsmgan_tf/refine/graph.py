"""The refinement in TensorFlow (`refine_tf`: dynamic shapes, float32; for the SavedModel's
signatures and local inference), its field residual, and both traced once for NumPy inputs
(`run_refine_tf`, `traced_field_residual_tf`: the local runs' engine).

TensorFlow is imported inside the functions: importing this package does not load it."""

from __future__ import annotations

import functools

import numpy as np

from qsmgan_tf import fine_shrinkage as shrinkage_lib
from qsmgan_tf.refine.params import DEFAULTS, MAX_FIT_OFFSET, without_magnitude
from qsmgan_tf.refine.statistics import (_order_statistics_tf, field_noise_tf,
                                         regularisation_scale_tf, robust_weights_tf)
from qsmgan_tf.refine.terms import _ERODED_MIN, _POLY_SCALE_MM, _monomial_exponents


def _tf_crop_box(mask):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel
  m = tf.cast(tf.cast(tf.convert_to_tensor(mask), tf.float32) > 0.5, tf.float32)
  begin, size = physics_tf.bounding_box(m)
  return m, begin, size


def _gradient_tf(x, voxel_size_mm):
  """`operators.gradient` in TensorFlow: periodic forward differences per mm, [3, *x.shape]."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  inv = 1.0 / tf.cast(voxel_size_mm, tf.float32)
  return tf.stack([(tf.roll(x, -1, axis) - x) * inv[axis] for axis in range(3)])


def _edge_weights_tf(x, m, voxel_size_mm, edge_fraction, support=None):
  """`terms.edge_weights` in TensorFlow (the same linear quantile, computed in float64); ``support``
  [3, ...] (> 0.5: ranked) replaces the mask's voxels as the components ranked (the caller
  multiplies by `terms.interior_pairs` for ``fit_level = 2``)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  g = tf.abs(_gradient_tf(x * m, voxel_size_mm))
  inside = tf.broadcast_to(m > 0.5, tf.shape(g)) if support is None else support > 0.5
  values = tf.boolean_mask(g, inside)
  n = tf.size(values)
  h = tf.cast(n - 1, tf.float64) * (1.0 - tf.cast(edge_fraction, tf.float64))
  lo = tf.cast(tf.floor(h), tf.int32)
  v_lo, v_hi = (tf.cast(v, tf.float64) for v in _order_statistics_tf(values, lo))
  thr = tf.cast(v_lo + (h - tf.floor(h)) * (v_hi - v_lo), tf.float32)
  edges = tf.cast(g <= thr, tf.float32)
  return tf.where(edge_fraction > 0, edges, tf.ones_like(edges))


def refine_tf(chi_net, field_ppm, mask, voxel_size_mm, b0_dir, mu=DEFAULTS["mu"],
              iterations=DEFAULTS["iterations"], margin=DEFAULTS["margin"],
              tv_weight=DEFAULTS["tv_weight"], edge_fraction=DEFAULTS["edge_fraction"],
              reweights=DEFAULTS["reweights"], tv_eps=DEFAULTS["tv_eps"],
              magnitude_edge_fraction=DEFAULTS["magnitude_edge_fraction"],
              magnitude_weighting=DEFAULTS["magnitude_weighting"],
              edge_refresh=DEFAULTS["edge_refresh"],
              residual_margin=DEFAULTS["residual_margin"], fit_offset=DEFAULTS["fit_offset"],
              noise_reference_ppm=DEFAULTS["noise_reference_ppm"],
              smv_radius_mm=DEFAULTS["smv_radius_mm"],
              data_erosion_mm=DEFAULTS["data_erosion_mm"],
              lcurve_stages=DEFAULTS["lcurve_stages"], lcurve_factor=DEFAULTS["lcurve_factor"],
              lcurve_slope=DEFAULTS["lcurve_slope"],
              lcurve_reweights=DEFAULTS["lcurve_reweights"],
              fine_shrinkage=DEFAULTS["fine_shrinkage"], fit_level=DEFAULTS["fit_level"],
              robust_data=DEFAULTS["robust_data"], bregman=DEFAULTS["bregman"], magnitude=None,
              return_weight=False):
  """CG data-consistency refinement in TensorFlow; same maths, defaults and argument order as
  `reference.refine_cg`.

  Works in a tf.function with dynamic shapes (float32 CG on complex64 FFTs).

  Args:
    chi_net: network susceptibility, ppm, float32 [X, Y, Z].
    field_ppm: local field, ppm of B0, float32 [X, Y, Z].
    mask: brain mask [X, Y, Z] (> 0.5 is inside; must not be empty).
    voxel_size_mm: voxel size, mm, float [3].
    b0_dir: TRUE B0 direction in this grid's voxel frame, float [3].
    mu: prior weight (scalar, Python or tensor).
    iterations: CG iterations per (re)weighting step (scalar, Python or tensor).
    margin: zero margin around the mask's bounding box, voxels (scalar).
    tv_weight, edge_fraction, reweights, tv_eps: the L1 edge prior (package docstring);
      scalars, Python or tensors; ``tv_weight`` 0 gives the quadratic solve.
    magnitude_edge_fraction, magnitude_weighting: the magnitude's uses
      (`reference.refine_cg`); scalars.
    edge_refresh: 1 = M_G from the current chi at every step after the first
      (`reference.refine_cg`).
    residual_margin: margin of the grid of each step's data residual (`reference.refine_cg`);
      scalar.
    fit_offset: n > 0 = fit a polynomial field of degree < n jointly with chi
      (`reference.refine_cg`); scalar, at most `MAX_FIT_OFFSET`.
    noise_reference_ppm: > 0 = scale ``mu`` and ``tv_weight`` by the field's own noise
      (`regularisation_scale_tf`); scalar.
    smv_radius_mm: > 0 = the SMV-filtered data term (`reference.refine_cg`); scalar.
    data_erosion_mm: > 0 = the data term without the mask's outer rim (`reference.refine_cg`);
      scalar.
    lcurve_stages, lcurve_factor, lcurve_slope, lcurve_reweights: the L-curve continuation of
      the L1 weight (`reference.refine_cg`); scalars.
    fine_shrinkage: 1 = weigh the correction per band of k (`fine_shrinkage.shrink_tf`); scalar.
    fit_level: 1 = the data term does not see chi's uniform level, 2 = nor the L1 term
      (`reference.refine_cg`); scalar.
    robust_data: > 0 = a second solve with Huber weights at this many robust deviations of the
      first solve's data residual (`reference.refine_cg`, `robust_weights_tf`); scalar.
    bregman: this many Bregman passes after the others, each with the last residual added back
      to the field (`reference.refine_cg`); scalar.
    magnitude: optional magnitude [X, Y, Z] (positive mean inside the mask); None ignores the
      two above. Traced callers without a magnitude pass any volume with both set to 0.
    return_weight: also return the L1 weight used (after the noise scale and the L-curve).

  Returns:
    chi_ppm float32 [X, Y, Z], 0 outside the mask; with ``return_weight``,
    ``(chi_ppm, tv_weight)``.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel

  chi_net = tf.convert_to_tensor(chi_net, tf.float32)
  field_ppm = tf.convert_to_tensor(field_ppm, tf.float32)
  m_full, begin, size = _tf_crop_box(mask)
  scale = regularisation_scale_tf(field_ppm, m_full, noise_reference_ppm)
  mu = tf.cast(mu, tf.float32) * scale
  iterations = tf.cast(iterations, tf.int32)
  tv_weight = tf.cast(tv_weight, tf.float32) * scale
  tv_eps = tf.cast(tv_eps, tf.float32)
  use_tv = tv_weight > 0
  margin = tf.cast(margin, tf.int32)
  residual_margin = tf.cast(residual_margin, tf.int32)
  corrected = residual_margin > margin
  outer = tf.where(tf.logical_or(use_tv, corrected), tf.maximum(tf.cast(reweights, tf.int32), 1),
                   1)
  voxel_size_mm = tf.cast(voxel_size_mm, tf.float32)
  grid = physics_tf.fft_shape(size, 1.0, margin)
  m = physics_tf.pad_to(tf.slice(m_full, begin, size), grid)
  smv_radius_mm = tf.cast(smv_radius_mm, tf.float32)
  use_smv = smv_radius_mm > 0

  def high_pass(on_grid):  # `terms._smv_data`'s H = 1 - S on a grid; 1 without the SMV filter
    return tf.cond(use_smv, lambda: 1.0 - physics_tf.smv_kernel(on_grid, voxel_size_mm,
                                                                 smv_radius_mm),
                   lambda: tf.ones(tf.stack([on_grid[0], on_grid[1], on_grid[2] // 2 + 1])))

  def data_kernel(on_grid):  # `terms._smv_data`'s kernel: D H
    return tf.cast(physics_tf.dipole_kernel(on_grid, voxel_size_mm, b0_dir, rfft=True)
                   * high_pass(on_grid), tf.complex64)

  kernel = data_kernel(grid)
  # The residual's grid (the CG grid unless residual_margin is larger).
  grid_r = physics_tf.fft_shape(size, 1.0, tf.maximum(margin, residual_margin))
  # One kernel when the grids coincide (the default): no second kernel on the same grid.
  kernel_r = tf.cond(corrected, lambda: data_kernel(grid_r), lambda: kernel)

  def to_grid(v):
    return physics_tf.pad_to(tf.slice(v, begin, size), grid) * m

  def dot(a, b):
    return tf.reduce_sum(a * b)

  if magnitude is None:
    mag = m
    magnitude_edge_fraction, magnitude_weighting = 0.0, 0
  else:
    mag = tf.abs(to_grid(tf.convert_to_tensor(magnitude, tf.float32)))
  magnitude_edge_fraction = tf.cast(magnitude_edge_fraction, tf.float32)
  weight = tf.where(tf.cast(magnitude_weighting, tf.int32) > 0,
                    mag / (tf.reduce_sum(mag) / tf.reduce_sum(m)), m)

  def eroded(radius_mm):  # `terms._eroded`
    inside = physics_tf.apply_kernel(m, physics_tf.smv_kernel(grid, voxel_size_mm, radius_mm))
    return tf.cast(tf.logical_and(inside > _ERODED_MIN, m > 0.5), tf.float32)

  def data_erosion():  # `terms._data_erosion`: the whole mask if the erosion leaves no voxel
    rim = eroded(data_erosion_mm)
    return tf.where(tf.reduce_any(rim > 0), rim, tf.ones_like(rim))

  data_erosion_mm = tf.cast(data_erosion_mm, tf.float32)
  weight = tf.cond(use_smv, lambda: weight * eroded(smv_radius_mm), lambda: weight)
  weight = tf.cond(data_erosion_mm > 0, lambda: weight * data_erosion(), lambda: weight)

  fit_offset = tf.clip_by_value(tf.cast(fit_offset, tf.int32), 0, MAX_FIT_OFFSET)
  fit_level = tf.cast(fit_level, tf.int32)
  level_edges = fit_level > 1  # the L1 term leaves the mask's edge alone (fit_level 2)
  fit_level = fit_level > 0
  fitted_any = tf.logical_or(fit_offset > 0, fit_level)
  exponents = tf.constant(_monomial_exponents(MAX_FIT_OFFSET), tf.float32)  # [terms, 3]
  # The columns kept: the monomials of degree < fit_offset, then B 1 if fit_level.
  columns = tf.concat([tf.reduce_sum(exponents, axis=1) < tf.cast(fit_offset, tf.float32),
                       tf.reshape(fit_level, [1])], axis=0)

  def projection(u, level_field):  # `terms._offset_projection`: the identity unless either
    def basis():  # Q on u's support, and the support's indices
      where = tf.where(u != 0)
      centre = 0.5 * (tf.cast(tf.shape(u), tf.float32) - 1.0)
      coords = ((tf.cast(where, tf.float32) - centre) * voxel_size_mm) / _POLY_SCALE_MM
      powers = tf.reduce_prod(tf.pow(coords[:, None, :], exponents[None]), axis=2)
      # float64 as in `reference.refine_cg`: in float32 Q is orthogonal to ~1e-4 only and Q^T y sums
      # ~1e6 voxels, while P must remove a background many times the tissue field's size.
      weighted = tf.cast(powers * tf.gather_nd(u, where)[:, None], tf.float64)
      level = tf.cast(tf.gather_nd(level_field(), where), tf.float64)[:, None]
      terms = tf.boolean_mask(tf.concat([weighted, level], axis=1), columns, axis=1)
      return tf.linalg.qr(terms)[0], where

    # tf.cond: no basis, and no reductions per CG step, when nothing is fitted.
    q, where = tf.cond(fitted_any, basis,
                       lambda: (tf.zeros([0, 0], tf.float64), tf.zeros([0, 3], tf.int64)))

    def fitted(y):
      values = tf.cast(tf.gather_nd(y, where), tf.float64)
      coefficients = tf.linalg.matvec(q, values, transpose_a=True)
      return tf.tensor_scatter_nd_sub(y, where,
                                      tf.cast(tf.linalg.matvec(q, coefficients), tf.float32))
    return lambda y: tf.cond(fitted_any, lambda: fitted(y), lambda: y)

  def to_residual_grid(v):
    return physics_tf.pad_to(physics_tf.crop_from(v, size), grid_r)

  def from_residual_grid(v):
    return physics_tf.pad_to(physics_tf.crop_from(v, size), grid)

  m_r = to_residual_grid(m)
  field_r = to_residual_grid(to_grid(field_ppm))
  # The SMV-filtered field on the residual's grid (as `reference.refine_cg`).
  field_r = tf.cond(use_smv, lambda: tf.signal.irfft3d(
      tf.signal.rfft3d(field_r) * tf.cast(high_pass(grid_r), tf.complex64), fft_length=grid_r),
                    lambda: field_r)
  x0 = to_grid(chi_net)

  edge_refresh = tf.cast(edge_refresh, tf.int32) > 0
  # The magnitude's edges do not change between steps: sorted once.
  no_edges = tf.ones(tf.concat([[3], tf.shape(x0)], 0), tf.float32)
  mag_edges = tf.cond(tf.logical_and(use_tv, magnitude_edge_fraction > 0),
                      lambda: _edge_weights_tf(mag, m, voxel_size_mm, magnitude_edge_fraction),
                      lambda: no_edges)

  # fit_level 2: the L1 term leaves the step at the mask's edge alone too
  # (`reference.refine_cg`): the components ranked and kept are the interior pairs instead of the
  # mask's voxels (one ranking in the graph either way: a tf.cond over two would trace the sort
  # twice).
  pairs = tf.stack([m * tf.roll(m, -1, axis) for axis in range(3)])
  ranked = tf.where(level_edges, pairs, tf.broadcast_to(m, tf.shape(pairs)))
  kept = tf.where(level_edges, pairs, tf.ones_like(pairs))

  def edge_mask(chi):
    return _edge_weights_tf(chi, m, voxel_size_mm, edge_fraction, ranked) * kept * mag_edges

  # M_G is only needed with the L1 term; tf.cond skips the sorts otherwise.
  edges0 = tf.cond(use_tv, lambda: edge_mask(x0), lambda: no_edges)
  stage_steps = tf.maximum(tf.cast(lcurve_reweights, tf.int32), 1)
  stages = tf.where(use_tv, tf.cast(lcurve_stages, tf.int32), 0)
  factor = tf.cast(lcurve_factor, tf.float32)
  slope_min = tf.cast(lcurve_slope, tf.float32)

  def solve_weighted(weight, added_r, tv_start, pass_stages, residual_needed):
    """`reference.refine_cg`'s: ``(x, tv_weight used, P (W field + added - B x) or zeros)``."""
    def forward(x):  # B x = W D (M x); A = P B, P applied once, in A^T (`terms._weighted_operator`)
      return tf.signal.irfft3d(tf.signal.rfft3d(m * x) * kernel, fft_length=grid) * weight

    def adjoint(y):  # A^T y = M D (W P y)
      return tf.signal.irfft3d(tf.signal.rfft3d(weight * project(y)) * kernel,
                               fft_length=grid) * m

    weight_r = to_residual_grid(weight)
    weighted_field_r = weight_r * field_r + added_r

    def forward_r(x_r):  # B on the residual's grid
      return tf.signal.irfft3d(tf.signal.rfft3d(m_r * x_r) * kernel_r,
                               fft_length=grid_r) * weight_r

    # The level's field of the residual's grid on both grids, as `reference.refine_cg`: one
    # product, and none without fit_level (its column is dropped then).
    level_r = tf.cond(fit_level, lambda: forward_r(m_r), lambda: tf.zeros_like(m_r))
    project_r = projection(weight_r, lambda: level_r)
    project = projection(weight, lambda: from_residual_grid(level_r))

    def projected_residual(x):  # P (W field - B x) on the residual's grid
      return project_r(weighted_field_r - forward_r(to_residual_grid(x)))

    def data_residual(x):  # A^T (P W field - A x) on the residual's grid, as `reference.refine_cg`
      return from_residual_grid(tf.signal.irfft3d(
          tf.signal.rfft3d(weight_r * projected_residual(x)) * kernel_r,
          fft_length=grid_r) * m_r)

    def outer_body(k, x, tv_weight):
      edges = tf.cond(tf.logical_and(use_tv, tf.logical_and(edge_refresh, k > 0)),
                      lambda: edge_mask(x), lambda: edges0)

      def lagged_weights():
        gx = edges * _gradient_tf(x, voxel_size_mm)
        return edges * tf.math.rsqrt(gx * gx + tv_eps)

      # tv_weight * V / d^2 per axis, folded once per step: the CG steps' L1 term is then
      # sum_a roll(g_a, 1, a) - g_a, g_a = w_a (roll(y, -1, a) - y): -div(V grad y) in 6 ops an
      # axis (it costs a third of a CG step, as much as an FFT pair).
      inv_sq = tv_weight / tf.square(voxel_size_mm)
      w = tf.cond(use_tv, lagged_weights, lambda: edges) * inv_sq[:, None, None, None]

      def tv_term(y):
        def value():
          ym = m * y
          out = tf.zeros_like(y)
          for axis in range(3):
            g = w[axis] * (tf.roll(ym, -1, axis) - ym)
            out += tf.roll(g, 1, axis) - g
          return m * out
        return tf.cond(use_tv, value, lambda: tf.zeros_like(y))

      def normal(y):
        return adjoint(forward(y)) + mu * y + tv_term(y)

      # CG for the step delta (started at 0): normal(delta) = rhs - normal(x), whose data part
      # comes from the residual's grid (defect correction when that is the larger one).
      r = data_residual(x) + mu * (x0 - x) - tv_term(x)

      def body(i, delta, r, p, rs):
        ap = normal(p)
        alpha = tf.math.divide_no_nan(rs, dot(p, ap))
        delta = delta + alpha * p
        r = r - alpha * ap
        rs_new = dot(r, r)
        p = r + tf.math.divide_no_nan(rs_new, rs) * p
        return i + 1, delta, r, p, rs_new

      _, delta, _, _, _ = tf.while_loop(
          lambda i, *_: i < iterations, body,
          (tf.constant(0), tf.zeros_like(x), r, r, dot(r, r)))
      return k + 1, x + delta

    def solve(x, tv_weight, steps):  # `reference.refine_cg`'s solve: steps from x
      _, x = tf.while_loop(lambda k, _: k < steps, lambda k, x: outer_body(k, x, tv_weight),
                           (tf.constant(0), x))
      return x

    def misfit(x):  # the L-curve's residual, as `reference.refine_cg`
      r = projected_residual(x)
      return tf.sqrt(dot(r, r))

    def point(x):  # `lcurve._lcurve_point`
      g = _gradient_tf(m * x, voxel_size_mm)
      g = tf.where(level_edges, g * pairs, g)
      tv = tf.boolean_mask(tf.sqrt(tf.reduce_sum(g * g, axis=0)), m > 0.5)
      return misfit(x), tf.reduce_mean(tv)

    x = solve(x0, tv_start, outer)

    def stage_body(stage, x, tv_weight, misfit_x, tv_x, done):  # `lcurve._lcurve_continuation`
      x_next = solve(x0, tv_weight * factor, stage_steps)
      misfit_next, tv_next = point(x_next)
      rise = tf.math.log(misfit_next / misfit_x)
      ok = tf.logical_and(rise > 0, tf.logical_and(tv_x > 0, tv_next > 0))
      slope = tf.where(ok, -tf.math.log(tv_next / tv_x) / tf.where(ok, rise, 1.0), 0.0)
      keep = slope >= slope_min
      return (stage + 1, tf.where(keep, x_next, x),
              tf.where(keep, tv_weight * factor, tv_weight),
              tf.where(keep, misfit_next, misfit_x), tf.where(keep, tv_next, tv_x),
              tf.logical_not(keep))

    start = tf.cond(pass_stages > 0, lambda: point(x),
                    lambda: (tf.constant(0.0), tf.constant(0.0)))
    _, x, used, _, _, _ = tf.while_loop(
        lambda stage, *rest: tf.logical_and(stage <= pass_stages, tf.logical_not(rest[-1])),
        stage_body, (tf.constant(1), x, tv_start, start[0], start[1], tf.constant(False)))
    # Only when a next pass uses it: the residual costs a large-grid FFT pair.
    residual = tf.cond(residual_needed, lambda: projected_residual(x),
                       lambda: tf.zeros_like(field_r))
    return x, used, residual

  # robust_data: a second pass with Huber weights on the first's residual; bregman: passes with
  # the last residual added back to the field (`reference.refine_cg`). One loop over the passes
  # traces the solve once (a tf.cond over several solves would trace it that many times).
  robust_data = tf.cast(robust_data, tf.float32)
  weighted_passes = tf.where(robust_data > 0, 2, 1)
  passes = weighted_passes + tf.where(use_tv, tf.maximum(tf.cast(bregman, tf.int32), 0), 0)

  def pass_body(i, weight, added_r, x, used):
    del x
    # A Bregman pass keeps the weight the last pass chose; the others start from the given one.
    bregman_pass = i >= weighted_passes
    x, used, residual = solve_weighted(
        weight, added_r, tf.where(bregman_pass, used, tv_weight),
        tf.where(bregman_pass, 0, stages), i + 1 < passes)
    next_weighted = i + 1 < weighted_passes
    weight = tf.cond(next_weighted, lambda: weight * robust_weights_tf(
        from_residual_grid(residual), m, robust_data), lambda: weight)
    # Bregman: b_k+1 = b_k + P (W field - B x) = P (b_k - B x), the residual just computed.
    added_r = tf.where(next_weighted, added_r, residual)
    return i + 1, weight, added_r, x, used

  _, _, _, x, tv_weight = tf.while_loop(
      lambda i, *_: i < passes, pass_body,
      (tf.constant(0), weight, tf.zeros_like(field_r), x0, tv_weight))
  inner = physics_tf.crop_from(x, size)
  full = tf.shape(m_full)
  chi = tf.pad(inner, tf.stack([begin, full - begin - size], axis=1)) * m_full
  chi = tf.cond(tf.cast(fine_shrinkage, tf.int32) > 0,
                lambda: shrinkage_lib.shrink_tf(chi, chi_net * m_full, field_ppm, m_full,
                                                voxel_size_mm, b0_dir,
                                                field_noise_tf(field_ppm, m_full))[0],
                lambda: chi)
  return (chi, tv_weight) if return_weight else chi


def field_residual_tf(chi_ppm, field_ppm, mask, voxel_size_mm, b0_dir):
  """`reference.field_residual` in TensorFlow (2x padding of the mask's box, mask-demeaned;
  the same argument order); scalar."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel

  m, begin, size = _tf_crop_box(mask)
  chi = tf.slice(tf.convert_to_tensor(chi_ppm, tf.float32) * m, begin, size)
  field = tf.slice(tf.convert_to_tensor(field_ppm, tf.float32), begin, size)
  return physics_tf.field_residual(chi, field, tf.slice(m, begin, size), voxel_size_mm, b0_dir,
                                   pad_factor=2.0)


def _local_specs():
  """Unnamed specs of the traced helpers' volume inputs: chi, field, mask, voxel, b0 (the
  positional order of `refine_tf` and `field_residual_tf`)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return [tf.TensorSpec([None, None, None], tf.float32)] * 3 + [
      tf.TensorSpec([3], tf.float32)] * 2


@functools.cache
def traced_refine_tf():
  """`refine_tf` traced once, its parameters and magnitude as tensors (no retrace per value);
  returns ``(chi_ppm, tv_weight_used)``."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  scalars = [tf.TensorSpec([], tf.float32 if isinstance(v, float) else tf.int32)
             for v in DEFAULTS.values()]
  return tf.function(functools.partial(refine_tf, return_weight=True),
                     input_signature=_local_specs() + scalars + [
                         tf.TensorSpec([None, None, None], tf.float32)])


def run_refine_tf(chi_net, field_ppm, mask, voxel_size_mm, b0_dir, params: dict,
                  magnitude=None, return_weight: bool = False):
  """`traced_refine_tf` on NumPy inputs with a `params.resolve_params` dict and an optional
  magnitude (without one, the parameters' magnitude uses are switched off); chi_ppm, or
  ``(chi_ppm, tv_weight_used)`` with ``return_weight``."""
  if magnitude is None:
    params = without_magnitude(params)
    magnitude = mask
  scalars = {k: np.asarray(v, np.float32 if isinstance(DEFAULTS[k], float) else np.int32)
             for k, v in params.items()}
  chi, weight = traced_refine_tf()(
      np.asarray(chi_net, np.float32), np.asarray(field_ppm, np.float32),
      np.asarray(mask, np.float32), np.asarray(voxel_size_mm, np.float32),
      np.asarray(b0_dir, np.float32), **scalars,
      magnitude=np.asarray(magnitude, np.float32))
  return (chi.numpy(), float(weight)) if return_weight else chi.numpy()


@functools.cache
def traced_field_residual_tf():
  """`field_residual_tf` traced once (faster than the SciPy version)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.function(field_residual_tf, input_signature=_local_specs())
