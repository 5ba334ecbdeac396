"""Tests for qsmgan_tf.refine: data-consistency refinement (NumPy reference and TF graph)."""

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from qsmgan_tf import physics
from qsmgan_tf import physics_tf
from qsmgan_tf import refine
from qsmgan_tf.refine import graph as refine_graph
from qsmgan_tf.refine import lcurve as refine_lcurve
from qsmgan_tf.refine import statistics as refine_statistics
from qsmgan_tf.refine import terms as refine_terms
from qsmgan_tf.classical import operators

_OBLIQUE = (0.25, -0.15, 0.95)
_VOXEL = (1.0, 1.1, 1.6)


def _phantom(shape=(36, 40, 30), seed=0, voxel=(1, 1, 1), b0=(0, 0, 1), noise=0.0):
  """Ellipsoidal 'brain' with smooth texture and a few blobs; field by the 2x forward model."""
  rng = np.random.default_rng(seed)
  g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  mask = (g[0] ** 2 / 0.8 + g[1] ** 2 / 0.75 + g[2] ** 2 / 0.7) < 1
  chi = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), 2) * 0.3
  for _ in range(5):
    c = rng.uniform(-0.5, 0.5, 3)
    chi += rng.uniform(-0.2, 0.3) * (((g - c[:, None, None, None]) ** 2).sum(0) < 0.15 ** 2)
  chi = (chi * mask).astype(np.float32)
  field = physics.forward_field(chi, voxel, b0) * mask
  field = field + noise * np.std(field[mask]) * rng.standard_normal(shape) * mask
  return chi, field.astype(np.float32), mask


def _rel(a, b, mask):
  return float(np.linalg.norm((a - b)[mask]) / np.linalg.norm(b[mask]))


@pytest.fixture(scope="module")
def oblique():
  return _phantom(voxel=_VOXEL, b0=_OBLIQUE, noise=0.02)


def _blurred(chi, mask):
  return (scipy.ndimage.gaussian_filter(chi, 1.5) * mask).astype(np.float32)


@pytest.mark.parametrize("prior", ["zero", "blurred"])
def test_cg_lowers_the_field_residual(oblique, prior):
  chi, field, mask = oblique
  chi_net = np.zeros_like(chi) if prior == "zero" else _blurred(chi, mask)
  out, info = refine.refine(chi_net, field, mask, _VOXEL, _OBLIQUE)
  assert info["residual_after"] < 0.25 * info["residual_before"]
  assert _rel(out, chi, mask) < _rel(chi_net, chi, mask)  # closer to the truth too
  assert not out[~mask].any()


def test_closed_form_lowers_the_residual(oblique):
  chi, field, mask = oblique
  out, info = refine.refine(_blurred(chi, mask), field, mask, _VOXEL, _OBLIQUE, method="closed")
  assert info["method"] == "closed"
  assert info["residual_after"] < 0.5 * info["residual_before"]
  assert not out[~mask].any()


@pytest.mark.parametrize("method,params", [
    ("cg", {"mu": 1e9}),                      # an infinite prior weight
    ("cg", {"iterations": 0}),                # no iteration
    ("closed", {"lam": 1e9}),
])
def test_dominant_prior_returns_chi_net(oblique, method, params):
  chi, field, mask = oblique
  chi_net = _blurred(chi, mask)
  out, _ = refine.refine(chi_net, field, mask, _VOXEL, _OBLIQUE, method=method, **params)
  np.testing.assert_allclose(out, chi_net, atol=1e-6 * np.abs(chi_net).max())


def test_perfect_prior_stays_put():
  """The truth on a noise-free field is (almost) a fixed point: only the margin's wrap-around
  differs from the 2x-padded simulation."""
  chi, field, mask = _phantom(voxel=_VOXEL, b0=_OBLIQUE)
  out = refine.refine_cg(chi, field, mask, _VOXEL, _OBLIQUE)
  assert _rel(out, chi, mask) < 0.02
  blurred = _blurred(chi, mask)
  # ... while a wrong prior moves by much more (the test can tell the two apart).
  assert _rel(refine.refine_cg(blurred, field, mask, _VOXEL, _OBLIQUE), blurred, mask) > 0.1


def test_units_do_not_change_mu(oblique):
  """Both terms are quadratic: x10 on field and prior gives x10 on the result (ppm vs x10)."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  a = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE)
  b = refine.refine_cg(10 * prior, 10 * field, mask, _VOXEL, _OBLIQUE)
  np.testing.assert_allclose(b, 10 * a, atol=1e-4 * np.abs(b).max())


def test_numpy_and_tf_agree_with_dynamic_shapes(oblique):
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  specs = [tf.TensorSpec([None, None, None], tf.float32)] * 3 + [tf.TensorSpec([3], tf.float32)] * 2
  fn = tf.function(lambda c, f, m, v, b: refine.refine_tf(c, f, m, v, b), input_signature=specs)
  for crop in [(slice(None),) * 3, (slice(2, -2), slice(1, None), slice(None, -3))]:
    want = refine.refine_cg(prior[crop], field[crop], mask[crop], _VOXEL, _OBLIQUE)
    got = fn(prior[crop], field[crop], mask[crop].astype(np.float32), np.float32(_VOXEL),
             np.float32(_OBLIQUE)).numpy()
    assert _rel(got, want, mask[crop]) < 1e-4
  assert len(fn._list_all_concrete_functions()) == 1  # pylint: disable=protected-access


_TV = {"tv_weight": 3e-4, "reweights": 2}


_REFRESH = {**_TV, "reweights": 3, "edge_refresh": 1}


_CORRECTED = {**_TV, "reweights": 3, "margin": 2, "residual_margin": 12}


@pytest.mark.parametrize("params,other,apart", [
    (_TV, {}, 0.01),                                      # the L1 term vs the quadratic solve
    (_REFRESH, {**_REFRESH, "edge_refresh": 0}, 1e-3),    # M_G refreshed vs from chi_net
    (_CORRECTED, {**_CORRECTED, "residual_margin": 0}, 1e-3),  # defect correction vs one grid
    ({"margin": 2, "residual_margin": 12, "reweights": 2},  # ... also without the L1 term
     {"margin": 2, "reweights": 2}, 1e-3),
])
def test_edge_prior_numpy_and_tf_agree(oblique, params, other, apart):
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  want = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **params)
  got = refine.refine_tf(prior, field, mask.astype(np.float32), np.float32(_VOXEL),
                         np.float32(_OBLIQUE), **params).numpy()
  assert _rel(got, want, mask) < 1e-4
  # ... and the option changes the answer (the test can tell the two solves apart).
  assert _rel(refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **other), want, mask) > apart


@pytest.mark.parametrize("fitted", [{}, {"fit_offset": 1, "fit_level": 1}])
def test_defect_correction_converges_to_the_large_grid_solution(oblique, fitted):
  """Residuals on a margin-16 grid, CG steps on a margin-1 grid: the fixed point is the
  margin-16 solve's, although the margin-1 solve itself is far from it; also with the offset
  and the level's field fitted (both grids use the large grid's level field)."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  quadratic = {"mu": 0.05, "tv_weight": 0.0, **fitted}
  large = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, margin=16, iterations=300,
                           **quadratic)
  small = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, margin=1, iterations=300,
                           **quadratic)
  corrected = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, margin=1, iterations=60,
                               residual_margin=16, reweights=6, **quadratic)
  assert _rel(small, large, mask) > 0.01
  assert _rel(corrected, large, mask) < 0.05 * _rel(small, large, mask)


def test_residual_margin_no_larger_than_margin_changes_nothing(oblique):
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  want = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_TV)
  got = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, residual_margin=8, **_TV)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fit_offset", [1, 3])
def test_fitted_background_is_ignored(oblique, fit_offset):
  """What the fitted polynomial spans, added to the field inside the mask, changes nothing, with
  or without the magnitude weighting, in NumPy and TF alike, on two grids: a constant (a
  background-removal offset) for fit_offset = 1, a ramp plus a saddle (smooth background
  remnants) for 3. A fit of lower degree is fooled by it."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  spoiled = (field + (0.3 * np.std(field[mask]) * mask if fit_offset == 1
                      else _harmonic_background(mask, _VOXEL))).astype(np.float32)
  mag = _edge_magnitude(chi, mask)

  def numpy_solve(f, **params):
    return refine.refine_cg(prior, f, mask, _VOXEL, _OBLIQUE, **_CORRECTED, **params)

  def tf_solve(f, **params):
    return refine.refine_tf(prior, f, mask.astype(np.float32), np.float32(_VOXEL),
                            np.float32(_OBLIQUE), **_CORRECTED, **params).numpy()

  for weighting in ({}, {"magnitude_weighting": 1, "magnitude": mag}):
    want = numpy_solve(field, fit_offset=fit_offset, **weighting)
    assert _rel(numpy_solve(spoiled, fit_offset=fit_offset, **weighting), want, mask) < 1e-4
    assert _rel(tf_solve(spoiled, fit_offset=fit_offset, **weighting), want, mask) < 1e-4
  lower = fit_offset - 1
  assert _rel(numpy_solve(spoiled, fit_offset=lower), numpy_solve(field, fit_offset=lower),
              mask) > 0.01
  assert _rel(tf_solve(spoiled, fit_offset=lower), numpy_solve(field, fit_offset=lower),
              mask) > 0.01
  # The basis grows with fit_offset: one degree more changes the answer, TF as NumPy.
  higher = numpy_solve(field, fit_offset=fit_offset + 1)
  assert _rel(higher, numpy_solve(field, fit_offset=fit_offset), mask) > 1e-4
  assert _rel(tf_solve(field, fit_offset=fit_offset + 1), higher, mask) < 1e-4


@pytest.mark.parametrize("params", [{}, {**_CORRECTED, "tv_weight": 0.0, "fit_offset": 1},
                                    {**_CORRECTED, "fit_offset": 1, "edge_fraction": 0.3,
                                     "lcurve_stages": 1, "fine_shrinkage": 1}])
def test_fitted_level_makes_the_solve_blind_to_the_prior_level(oblique, params):
  """With fit_level 1 the data term ignores the field of a uniform chi over the mask, with 2
  the L1 term also the step at the mask's edge, so a prior shifted by c over the mask gives the
  same map shifted by c (the quadratic solve on one grid and two with 1, the L1 term with its
  edges, the L-curve and the shrinkage with 2; NumPy and TF alike); without it the solve turns
  the level's field into streaks."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  shift = (0.1 * mask).astype(np.float32)

  def solve(p, fn, **more):
    if fn == "tf":
      return refine.refine_tf(p, field, mask.astype(np.float32), np.float32(_VOXEL),
                              np.float32(_OBLIQUE), **params, **more).numpy()
    return refine.refine_cg(p, field, mask, _VOXEL, _OBLIQUE, **params, **more)

  # The L1 term's lagged weights amplify float32 round-off (tv_eps is small): a looser bound.
  use_tv = params.get("tv_weight", refine.DEFAULTS["tv_weight"]) > 0
  tol, level = (2e-3, 2) if use_tv else (1e-4, 1)
  want = solve(prior, "numpy", fit_level=level)
  for fn in ("numpy", "tf"):
    assert _rel(solve(prior + shift, fn, fit_level=level) - shift, want, mask) < tol
    assert _rel(solve(prior, fn, fit_level=level), want, mask) < tol
  if use_tv:  # with 1 the L1 term still sees the level, at the mask's edge
    assert _rel(solve(prior + shift, "numpy", fit_level=1) - shift, want, mask) > 10 * tol
  assert _rel(solve(prior + shift, "numpy") - shift, solve(prior, "numpy"), mask) > 1e-2
  # A wrong level hurts without the fit: the demeaned error of the shifted prior's map grows.
  def error(x):
    return _rel(x - x[mask].mean(), chi - chi[mask].mean(), mask)
  assert error(solve(prior + shift, "numpy", fit_level=level)) < 0.8 * error(
      solve(prior + shift, "numpy"))


def test_fit_offset_above_the_largest_degree_is_refused(oblique):
  chi, field, mask = oblique
  with pytest.raises(ValueError, match="fit_offset"):
    refine.refine_cg(chi, field, mask, _VOXEL, _OBLIQUE, fit_offset=refine.MAX_FIT_OFFSET + 1)


def test_fitted_offset_removes_the_small_grid_offset():
  """On a small FFT grid the field of a flat object with a net source (a head in a box of a
  few voxels' margin) differs from the 2x grid's (the simulation's) mostly by a constant over
  the mask: the mean field of the periodic images. Fitting that constant brings the small
  grid's solve closer to the truth than the same solve without it."""
  shape, radii = (48, 48, 32), (0.9, 0.9, 0.5)
  g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  mask = sum((g[i] / radii[i]) ** 2 for i in range(3)) < 1
  rng = np.random.default_rng(4)
  chi = ((scipy.ndimage.gaussian_filter(rng.standard_normal(shape), 2) * 0.3 + 0.1)
         * mask).astype(np.float32)
  field = (physics.forward_field(chi, (1, 1, 1), (0, 0, 1)) * mask).astype(np.float32)
  box = physics.bounding_box(mask)
  small = physics.forward_field(chi[box], (1, 1, 1), (0, 0, 1), pad_factor=1.0, margin=12)
  error = (small - field[box])[mask[box]]
  assert abs(error.mean()) > 2 * np.std(error)  # the small grid's error is mostly an offset
  prior = _blurred(chi, mask)
  params = {"margin": 12, "mu": 1e-3, "iterations": 40}
  demeaned = lambda x: np.where(mask, x - x[mask].mean(), 0.0)
  errors = [_rel(demeaned(refine.refine_cg(prior, field, mask, fit_offset=fit, **params)),
                 demeaned(chi), mask) for fit in (0, 1)]
  assert errors[1] < 0.9 * errors[0]


def test_edge_prior_keeps_edges_and_helps_on_piecewise_smooth_chi(oblique):
  """Blobs on a smooth background: the network-edge L1 prior beats the quadratic solve."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  quadratic = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE)
  edge = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_TV)
  assert _rel(edge, chi, mask) < _rel(quadratic, chi, mask)


def test_edge_refresh_helps_when_the_prior_blurs_the_edges(oblique):
  """A blurred prior puts its 'edges' beside chi's; the map after one step has sharper ones."""
  chi, field, mask = oblique
  prior = (scipy.ndimage.gaussian_filter(chi, 3.0) * mask).astype(np.float32)
  fixed = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **{**_REFRESH, "edge_refresh": 0})
  fresh = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_REFRESH)
  assert _rel(fresh, chi, mask) < _rel(fixed, chi, mask)


def test_edge_weights_free_the_strongest_gradients():
  x = np.zeros((12, 12, 12), np.float32)
  x[:, :, 6:] = 1.0  # one step along z: its gradient components are the only non-zero ones
  mask = np.ones_like(x, bool)
  # Periodic differences: the step at z = 5 and its wrap-around at z = 11, 5.6 % of components.
  weights = refine.edge_weights(x, mask, (1, 1, 1), edge_fraction=0.1)
  assert weights[2, :, :, [5, 11]].sum() == 0 and weights[2].sum() == 12 * 12 * 10
  assert weights[:2].all()               # no edge along x or y
  assert refine.edge_weights(x, mask, (1, 1, 1), edge_fraction=0.0).all()


@pytest.mark.parametrize("values", [
    np.abs(np.random.default_rng(2).standard_normal(1001)),          # distinct
    np.round(np.abs(np.random.default_rng(3).standard_normal(500)), 1),  # many ties and zeros
    np.zeros(7), np.array([3.5]), np.array([0.0, 1e-30, 1e30])])
def test_order_statistics_without_sorting_match_a_sort(values):
  values = values.astype(np.float32)
  ordered = np.sort(values)
  for k in sorted({0, len(values) // 3, len(values) - 2, len(values) - 1} - {-1}):
    got = [float(v) for v in refine_statistics._order_statistics_tf(values, k)]  # pylint: disable=protected-access
    assert got == [ordered[k], ordered[min(k + 1, len(values) - 1)]]


def test_tf_edge_weights_match_numpy(oblique):
  chi, _, mask = oblique
  for fraction in (0.3, 0.05):
    want = refine.edge_weights(chi, mask, _VOXEL, fraction)
    got = refine_graph._edge_weights_tf(chi, mask.astype(np.float32), np.float32(_VOXEL),  # pylint: disable=protected-access
                                  fraction).numpy()
    np.testing.assert_array_equal(got, want)


def test_tf_residual_matches_numpy(oblique):
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  want = refine.field_residual(prior, field, mask, _VOXEL, _OBLIQUE)
  got = float(refine.field_residual_tf(prior, field, mask.astype(np.float32), _VOXEL, _OBLIQUE))
  assert got == pytest.approx(want, rel=1e-4)
  # Semantics of physics.field_residual: the truth explains the field up to the noise, and
  # a constant offset of the field is ignored (de-meaned over the mask).
  assert refine.field_residual(chi, field + 0.5 * mask, mask, _VOXEL, _OBLIQUE) < 0.05


def test_empty_mask_is_rejected():
  z = np.zeros((8, 8, 8), np.float32)
  with pytest.raises(ValueError, match="mask is empty"):
    refine.refine(z, z, z > 0)


# --------------------------------------------------------------------------------------
# Magnitude: edges and noise weighting
# --------------------------------------------------------------------------------------
_MAG = {"tv_weight": 3e-4, "reweights": 2, "edge_fraction": 0.0, "magnitude_edge_fraction": 0.3,
        "magnitude_weighting": 1}


def _edge_magnitude(chi, mask, seed=1):
  """A magnitude whose edges are chi's (plus texture): the case magnitude edges are made for."""
  rng = np.random.default_rng(seed)
  mag = 1.0 + np.abs(chi) + 0.02 * rng.standard_normal(chi.shape)
  return (mag * mask).astype(np.float32)


def test_magnitude_numpy_and_tf_agree(oblique):
  chi, field, mask = oblique
  prior, mag = _blurred(chi, mask), _edge_magnitude(chi, mask)
  want = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_MAG, magnitude=mag)
  got = refine.refine_tf(prior, field, mask.astype(np.float32), np.float32(_VOXEL),
                         np.float32(_OBLIQUE), **_MAG, magnitude=mag).numpy()
  assert _rel(got, want, mask) < 1e-4
  without = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_MAG)
  assert _rel(without, want, mask) > 0.01  # the magnitude changes the answer


def test_magnitude_edges_help_when_they_are_chi_edges():
  """Piecewise-constant blobs: a blurred prior's own edges are poor; a magnitude with chi's
  edges gives better ones."""
  shape = (36, 40, 30)
  g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  mask = (g ** 2).sum(0) < 0.8
  rng = np.random.default_rng(5)
  chi = np.zeros(shape, np.float32)
  for _ in range(8):
    c = rng.uniform(-0.5, 0.5, 3)
    chi += rng.uniform(-0.2, 0.3) * (((g - c[:, None, None, None]) ** 2).sum(0) < 0.2 ** 2)
  chi = (chi * mask).astype(np.float32)
  field = (physics.forward_field(chi, _VOXEL, _OBLIQUE) * mask).astype(np.float32)
  prior, mag = _blurred(chi, mask), _edge_magnitude(chi, mask)
  network_edges = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_TV)
  magnitude_edges = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **{
      **_MAG, "magnitude_weighting": 0}, magnitude=mag)
  assert _rel(magnitude_edges, chi, mask) < 0.9 * _rel(network_edges, chi, mask)


def test_uniform_magnitude_weighting_changes_nothing_and_scale_does_not_matter(oblique):
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  plain = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE)
  flat = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, magnitude_weighting=1,
                          magnitude=np.full(chi.shape, 3.0, np.float32))
  np.testing.assert_allclose(flat, plain, atol=1e-5 * np.abs(plain).max())
  mag = _edge_magnitude(chi, mask)
  a = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_MAG, magnitude=mag)
  b = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_MAG, magnitude=7 * mag)
  np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max())


def test_magnitude_weighting_discounts_noisy_dark_voxels():
  """Phase noise is ~1/magnitude: where the magnitude is nearly zero (5 % of the voxels at 1 %
  of the rest) the field is garbage, and weighting the data term by the magnitude (maximum
  likelihood) lands closer to the truth. (With milder contrast, e.g. 15 % of the voxels at 10 %,
  it does not help this early-stopped solve: the weights also slow its convergence.)"""
  chi, field, mask = _phantom(voxel=_VOXEL, b0=_OBLIQUE)
  rng = np.random.default_rng(3)
  mag = np.where(rng.uniform(size=chi.shape) < 0.05, 0.01, 1.0).astype(np.float32) * mask
  sigma = 0.01 * np.std(field[mask]) / np.maximum(mag, 0.01)
  noisy = (field + sigma * rng.standard_normal(chi.shape) * mask).astype(np.float32)
  prior = _blurred(chi, mask)
  plain = refine.refine_cg(prior, noisy, mask, _VOXEL, _OBLIQUE, magnitude=mag)
  weighted = refine.refine_cg(prior, noisy, mask, _VOXEL, _OBLIQUE, magnitude_weighting=1,
                              magnitude=mag)
  assert _rel(weighted, chi, mask) < 0.9 * _rel(plain, chi, mask)


def test_magnitude_params_need_a_magnitude(oblique):
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  params = refine.resolve_params(None, **_MAG)
  assert refine.uses_magnitude(params)
  assert not refine.uses_magnitude(refine.without_magnitude(params))
  np.testing.assert_array_equal(
      refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **params),
      refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE,
                       **refine.without_magnitude(params)))
  _, info = refine.refine(prior, field, mask, _VOXEL, _OBLIQUE, contract={"refine": _MAG})
  assert info["magnitude_edge_fraction"] == 0.0 and info["magnitude_weighting"] == 0
  with pytest.raises(ValueError, match="magnitude"):
    refine.refine_cg(prior, field, mask, magnitude=np.zeros_like(prior), magnitude_weighting=1)
  with pytest.raises(ValueError, match="magnitude"):
    refine.refine_cg(prior, field, mask, magnitude=np.ones((3, 3, 3)), magnitude_weighting=1)


# --------------------------------------------------------------------------------------
# Regularisation scaled by the field's own noise (noise_reference_ppm)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.001, 0.004])
def test_field_noise_recovers_white_noise_on_a_smooth_field(sigma):
  # A smooth field (its Laplacian ~0) plus white noise of known std: the MAD estimate finds it.
  rng = np.random.default_rng(3)
  shape = (40, 44, 36)
  g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  mask = (g ** 2).sum(0) < 0.8
  smooth = 0.02 * np.sin(1.5 * g[0]) * np.cos(g[2])
  noisy = (smooth + sigma * rng.standard_normal(shape)).astype(np.float32)
  assert refine.field_noise_ppm(noisy, mask) == pytest.approx(sigma, rel=0.05)
  # Outside the mask the field does not count (a background-removed field is anything there).
  wild = np.where(mask, noisy, 100.0 * rng.standard_normal(shape)).astype(np.float32)
  assert refine.field_noise_ppm(wild, mask) == pytest.approx(refine.field_noise_ppm(noisy, mask))


def test_field_noise_tf_matches_numpy(oblique):
  _, field, mask = oblique
  for m in (mask, mask & (np.arange(mask.shape[0]) % 7 != 3)[:, None, None]):  # odd, even counts
    want = refine.field_noise_ppm(field, m)
    assert float(refine.field_noise_tf(field, m.astype(np.float32))) == pytest.approx(want,
                                                                                      rel=1e-5)
  assert float(refine.regularisation_scale_tf(field, mask, 0.0)) == 1.0
  assert refine.regularisation_scale(field, mask, 0.0) == (1.0, 0.0)


def test_noise_reference_scales_both_weights(oblique):
  # The scaled solve is the plain solve with mu and tv_weight times (noise / reference)^2.
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  noise = refine.field_noise_ppm(field, mask)
  reference = noise / 3.0
  scaled = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, noise_reference_ppm=reference,
                            **_TV)
  plain = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE,
                           **{**_TV, "mu": 9.0 * refine.DEFAULTS["mu"],
                              "tv_weight": 9.0 * _TV["tv_weight"]})
  assert _rel(scaled, plain, mask) < 1e-5
  unscaled = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_TV)
  assert _rel(scaled, unscaled, mask) > 1e-2
  got = refine.refine_tf(prior, field, mask.astype(np.float32), np.float32(_VOXEL),
                         np.float32(_OBLIQUE), noise_reference_ppm=reference, **_TV)
  assert _rel(got.numpy(), scaled, mask) < 1e-4
  _, info = refine.refine(prior, field, mask, _VOXEL, _OBLIQUE,
                          contract={"refine": {"noise_reference_ppm": reference}})
  assert info["field_noise_ppm"] == pytest.approx(noise)
  assert info["regularisation_scale"] == pytest.approx(9.0)
  assert info["mu_scaled"] == pytest.approx(9.0 * refine.DEFAULTS["mu"])



# --------------------------------------------------------------------------------------
# SMV-filtered data term (smv_radius_mm): harmonic background remnants drop out
# --------------------------------------------------------------------------------------
def _harmonic_background(mask, voxel):
  """A field harmonic everywhere in the volume: a linear ramp plus the quadratic x^2 - y^2 (both
  Laplacian-free), ppm; what imperfect background removal leaves, up to sources outside."""
  g = [np.arange(n, dtype=np.float64)[tuple(slice(None) if a == i else None for a in range(3))]
       * d for i, (n, d) in enumerate(zip(mask.shape, voxel))]
  c = [x - x.mean() for x in g]
  ramp = 4e-3 * c[0] - 3e-3 * c[2]
  saddle = 2e-4 * (c[0] ** 2 - c[1] ** 2)
  return ((ramp + saddle) * mask).astype(np.float32)


_SMV = {**_TV, "smv_radius_mm": 3.0}
_ERODE = {**_TV, "data_erosion_mm": 2.0}
_SMALL_GRID = {"margin": 4, "residual_margin": 12, "reweights": 3}


@pytest.mark.parametrize("option, params", [
    ("smv_radius_mm", _SMV), ("smv_radius_mm", {**_SMV, **_SMALL_GRID, "fit_offset": 1}),
    ("data_erosion_mm", _ERODE), ("data_erosion_mm", {**_ERODE, **_SMALL_GRID, "fit_offset": 2})])
def test_edge_data_terms_numpy_and_tf_agree(oblique, option, params):
  """The SMV-filtered data term and the one without the mask's rim: TF = NumPy, and on."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  want = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **params)
  got = refine.refine_tf(prior, field, mask.astype(np.float32), np.float32(_VOXEL),
                         np.float32(_OBLIQUE), **params).numpy()
  assert _rel(got, want, mask) < 1e-4
  plain = {**params, option: 0.0}
  assert _rel(refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **plain), want, mask) > 1e-3


def _assert_blind_to(spoiled, oblique, params, option, tolerance):
  """With ``params`` the refinement of ``spoiled`` is that of the clean field (to
  ``tolerance``); with ``option`` off the solve turns the difference into chi."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  clean = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **params)
  robust = refine.refine_cg(prior, spoiled, mask, _VOXEL, _OBLIQUE, **params)
  assert _rel(robust, clean, mask) < tolerance
  plain = {**params, option: 0.0}
  fooled = refine.refine_cg(prior, spoiled, mask, _VOXEL, _OBLIQUE, **plain)
  assert _rel(fooled, refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **plain), mask) > 0.1


def test_smv_kernel_tf_matches_numpy():
  shape, voxel = (20, 18, 15), (1.0, 1.1, 1.6)
  want = physics.smv_kernel(shape, voxel, 3.0)
  assert want.shape == (20, 18, 8) and want[0, 0, 0] == pytest.approx(1.0)
  got = physics_tf.smv_kernel(np.int32(shape), np.float32(voxel), 3.0).numpy()
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_smv_data_term_ignores_a_harmonic_background(oblique):
  """With the SMV filter a harmonic field added to the data changes nothing (mean value
  property inside the eroded mask; on anisotropic voxels the discrete sphere's mean of x^2 - y^2
  is off by a constant, which fit_offset takes); without it the solve turns it into chi."""
  _, field, mask = oblique
  _assert_blind_to(field + _harmonic_background(mask, _VOXEL), oblique,
                   {**_SMV, "fit_offset": 1}, "smv_radius_mm", 1e-3)


# --------------------------------------------------------------------------------------
# The data term without the mask's outer rim (data_erosion_mm)
# --------------------------------------------------------------------------------------
def test_data_erosion_ignores_the_rim_and_keeps_a_mask_it_would_empty(oblique):
  """Whatever the field holds within the radius of the mask's edge (an edge remnant, here
  large random values) changes nothing with the erosion; without it the solve follows it. An
  erosion that would leave no voxel keeps the whole mask."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  grid = operators.Grid(mask, _VOXEL, physics.unit_vector(_OBLIQUE), 0)
  rim = mask & ~(grid.from_grid(refine_terms._eroded(grid, 2.0), mask) > 0.5)
  assert 0 < rim.sum() < mask.sum()
  spoiled = field + np.where(rim, np.random.default_rng(3).normal(0, 0.05, field.shape),
                             0).astype(np.float32)
  _assert_blind_to(spoiled, oblique, _ERODE, "data_erosion_mm", 1e-4)
  everything = {**_ERODE, "data_erosion_mm": 500.0}
  whole = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **everything)
  np.testing.assert_array_equal(whole, refine.refine_cg(
      prior, field, mask, _VOXEL, _OBLIQUE, **{**_ERODE, "data_erosion_mm": 0.0}))
  got = refine.refine_tf(prior, field, mask.astype(np.float32), np.float32(_VOXEL),
                         np.float32(_OBLIQUE), **everything).numpy()
  assert _rel(got, whole, mask) < 1e-4


# --------------------------------------------------------------------------------------
# The L-curve continuation of the L1 weight (lcurve_stages)
# --------------------------------------------------------------------------------------
def _tf_matches_numpy(prior, field, mask, params):
  """NumPy's map and L1 weight, after asserting that TF gives the same (oblique, anisotropic)."""
  want, weight = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **params,
                                  return_weight=True)
  got, got_weight = refine.refine_tf(prior, field, mask.astype(np.float32),
                                     np.float32(_VOXEL), np.float32(_OBLIQUE), **params,
                                     return_weight=True)
  assert _rel(got.numpy(), want, mask) < 1e-4
  assert float(got_weight) == pytest.approx(weight, rel=1e-6)
  return want, weight


_LCURVE = {**_TV, "tv_weight": 1e-4, "lcurve_stages": 3, "lcurve_factor": 4.0,
           "lcurve_reweights": 2}


@pytest.mark.parametrize("slope", [0.0, 0.5, 1e9])
def test_lcurve_numpy_and_tf_agree_and_choose_alike(oblique, slope):
  """Any slope threshold: TF = NumPy in the map and the L1 weight chosen; threshold 0 keeps
  every stage (the last weight, 64x), an unreachable one none (the weight as given)."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  params = {**_LCURVE, "lcurve_slope": slope}
  want, weight = _tf_matches_numpy(prior, field, mask, params)
  if slope == 0.0:
    assert weight == pytest.approx(1e-4 * 4.0 ** 3)
    _, info = refine.refine(prior, field, mask, _VOXEL, _OBLIQUE, contract={"refine": params})
    assert info["tv_weight_used"] == pytest.approx(weight)  # what the sidecar records
  if slope == 1e9:
    assert weight == pytest.approx(1e-4)
    plain = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE,
                             **{**params, "lcurve_stages": 0})
    np.testing.assert_array_equal(want, plain)


def test_lcurve_continuation_keeps_stages_while_steep():
  """`_lcurve_continuation` on a made-up L-curve: kept while -dlog(TV)/dlog(misfit) >= 0.5."""
  # (misfit, TV) per L1 weight 1, 2, 4, 8: slopes 1.0, 0.6, 0.2 -> stops after weight 4.
  curve = {1.0: (1.0, 1.0), 2.0: (2.0, 0.5), 4.0: (4.0, 0.5 * 2 ** -0.6),
           8.0: (8.0, 0.5 * 2 ** -0.8)}
  x, weight, slopes = refine_lcurve._lcurve_continuation(
      1.0, 1.0, lambda tv: tv, lambda x: curve[x], 3, 2.0, 0.5)
  assert (x, weight) == (4.0, 4.0)
  assert slopes == pytest.approx([1.0, 0.6, 0.2])


# --------------------------------------------------------------------------------------------
# fine_shrinkage: the correction weighed per band of k by the field's own signal-to-noise
# --------------------------------------------------------------------------------------------
def test_shrinkage_gains_follow_the_field_signal_to_noise():
  from qsmgan_tf import fine_shrinkage  # pylint: disable=import-outside-toplevel
  chi, clean, mask = _phantom(shape=(40, 44, 36))
  rng = np.random.default_rng(4)
  # Pure white noise: every band is noise, the gains fall to 0 (P_field ~ P_noise) but in the
  # coarsest band (a few samples, the mask's own spectrum).
  noise = (0.01 * rng.standard_normal(mask.shape) * mask).astype(np.float32)
  pure = fine_shrinkage.gains(noise, mask, (1, 1, 1), (0, 0, 1), refine.field_noise_ppm(noise, mask))
  assert pure[1:].max() < 0.05 and pure.mean() < 0.1
  # A strong smooth field with a little noise: the coarse bands are signal (gain ~1), and the
  # gains never rise with |k|.
  noisy = clean + 0.002 * np.std(clean[mask]) * rng.standard_normal(mask.shape) * mask
  g = fine_shrinkage.gains(noisy, mask, (1, 1, 1), (0, 0, 1), refine.field_noise_ppm(noisy, mask))
  assert g[:3].min() > 0.95 and np.all(np.diff(g) <= 0)
  # No noise estimate: nothing is shrunk.
  np.testing.assert_array_equal(fine_shrinkage.gains(noisy, mask, (1, 1, 1), (0, 0, 1), 0.0),
                                np.ones(fine_shrinkage.SHELLS))
  # Gains of 1 leave the refined map as it is; the network's map is kept where it is the answer.
  refined = _blurred(chi, mask)
  same, _ = fine_shrinkage.shrink(refined, chi, noisy, mask, (1, 1, 1), (0, 0, 1), 0.0)
  assert _rel(same, refined, mask) < 1e-5
  kept, _ = fine_shrinkage.shrink(chi, chi, noise, mask, (1, 1, 1), (0, 0, 1), 0.01)
  np.testing.assert_allclose(kept, np.where(mask, chi, 0), atol=1e-7)


def test_shrinkage_numpy_and_tf_agree(oblique):
  from qsmgan_tf import fine_shrinkage  # pylint: disable=import-outside-toplevel
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  noise = refine.field_noise_ppm(field, mask)
  want, want_g = fine_shrinkage.shrink(chi, prior, field, mask, _VOXEL, _OBLIQUE, noise)
  got, got_g = fine_shrinkage.shrink_tf(chi, prior, field, mask.astype(np.float32),
                                        np.float32(_VOXEL), np.float32(_OBLIQUE), noise)
  np.testing.assert_allclose(got_g.numpy(), want_g, atol=1e-4)
  assert 0.0 < want_g.min() < 0.99  # the test field's finest bands are shrunk
  assert _rel(got.numpy(), want, mask) < 1e-4
  # In the refinement: refine_tf with fine_shrinkage = 1 is refine_cg's, and differs from off.
  params = {**_TV, "fine_shrinkage": 1}
  want = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **params)
  got = refine.refine_tf(prior, field, mask.astype(np.float32), np.float32(_VOXEL),
                         np.float32(_OBLIQUE), **params).numpy()
  assert _rel(got, want, mask) < 1e-4
  assert _rel(refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **_TV), want, mask) > 1e-3
  info = refine.refine(prior, field, mask, _VOXEL, _OBLIQUE,
                       contract={"refine": params})[1]
  assert len(info["fine_shrinkage_gains"]) == fine_shrinkage.SHELLS
  assert info["fine_shrinkage_gains"] == pytest.approx(list(want_g), abs=1e-4)


def test_robust_weights_are_hubers():
  """Weights 1 within threshold * s of zero and threshold * s / |r| beyond (so w r^2 grows
  linearly), s the residual's robust deviation (a normal sample's sigma); 0 outside."""
  rng = np.random.default_rng(3)
  r = rng.standard_normal((40, 40, 40)) * 0.01
  inside = np.zeros(r.shape, bool)
  inside[2:-2, 2:-2, 2:-2] = True
  r[10, 10, 10], r[20, 20, 20] = 0.2, -0.5  # outliers: 20 and 50 deviations
  w = refine.robust_weights(r, inside, 2.0)
  s = 1.4826 * np.median(np.abs(r[inside]))
  assert s == pytest.approx(0.01, rel=0.02)
  assert w[10, 10, 10] == pytest.approx(2 * s / 0.2, rel=1e-4)
  assert w[20, 20, 20] == pytest.approx(2 * s / 0.5, rel=1e-4)
  small = inside & (np.abs(r) <= 2 * s)
  assert np.all(w[small] == 1) and np.all(w[~inside] == 0)
  np.testing.assert_allclose((w * r * r)[inside & ~small], 2 * s * np.abs(r[inside & ~small]),
                             rtol=1e-4)
  assert np.array_equal(refine.robust_weights(np.zeros_like(r), inside, 2.0), inside)
  got = refine.robust_weights_tf(tf.constant(r, tf.float32), tf.constant(inside, tf.float32),
                                 2.0).numpy()
  np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-7)


_ROBUST = {**_CORRECTED, "fit_offset": 1, "robust_data": 2.0}


@pytest.mark.parametrize("params", [_ROBUST, {**_LCURVE, "robust_data": 3.0}],
                         ids=["corrected", "lcurve"])
def test_robust_numpy_and_tf_agree(oblique, params):
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  want, weight = _tf_matches_numpy(prior, field, mask, params)
  plain = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE,
                           **{**params, "robust_data": 0.0})
  assert _rel(want, plain, mask) > 1e-3  # the second pass does change the map


def test_robust_data_term_ignores_a_field_the_dipole_cannot_explain(oblique):
  """Model error: a few voxels' field replaced by a large value no susceptibility explains (a
  vein's flow artefact, an unwrapping error). The plain solve spreads it into chi as streaks;
  the Huber-weighted second pass lets those voxels pull far less."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  broken = field.copy()
  rng = np.random.default_rng(7)
  inside = np.argwhere(mask)
  for i, j, k in inside[rng.choice(len(inside), 40, replace=False)]:
    broken[i, j, k] += rng.choice([-1.0, 1.0]) * 20 * np.std(field[mask])
  params = {**_TV, "fit_offset": 1, "robust_data": 0.0}
  plain = refine.refine_cg(prior, broken, mask, _VOXEL, _OBLIQUE, **params)
  robust = refine.refine_cg(prior, broken, mask, _VOXEL, _OBLIQUE,
                            **{**params, "robust_data": 3.0})
  assert _rel(robust, chi, mask) < 0.3 * _rel(plain, chi, mask)  # measured 0.16 vs 0.78
  # On the unbroken field the weights also fall on residual the prior left (0.162 vs 0.154):
  # robustness has a price, which the tuning phantoms weigh.
  clean = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **params)
  clean_robust = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE,
                                  **{**params, "robust_data": 3.0})
  assert _rel(clean_robust, chi, mask) < 1.1 * _rel(clean, chi, mask)


# --------------------------------------------------------------------------------------------
# bregman: passes with the last residual added back to the field
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{**_ROBUST, "tv_weight": 3e-3, "bregman": 1},
                                    {**_LCURVE, "robust_data": 3.0, "bregman": 2}],
                         ids=["robust", "lcurve"])
def test_bregman_numpy_and_tf_agree(oblique, params):
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  want, _ = _tf_matches_numpy(prior, field, mask, params)
  plain = refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **{**params, "bregman": 0})
  assert _rel(want, plain, mask) > 1e-3  # the Bregman pass does change the map


def test_bregman_gives_back_the_contrast_the_l1_term_took(oblique):
  """A strong L1 term on an exact field flattens chi (its slope on the truth falls below 1);
  each Bregman pass puts the part of the field the map does not explain back into the data
  term, and the slope and the error recover. Without the L1 term there is nothing to give
  back: the parameter is ignored."""
  chi, field, mask = oblique
  prior = _blurred(chi, mask)
  params = {**_TV, "tv_weight": 3e-2, "reweights": 3}

  def slope(x):
    return float(np.polyfit(chi[mask], x[mask], 1)[0])

  maps = [refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **{**params, "bregman": n})
          for n in (0, 1, 2)]
  slopes = [slope(x) for x in maps]
  errors = [_rel(x, chi, mask) for x in maps]
  assert slopes[0] < 0.9 and slopes[0] < slopes[1] < slopes[2] <= 1.05, slopes
  assert errors[2] < errors[1] < errors[0], errors
  quadratic = {**params, "tv_weight": 0.0}
  np.testing.assert_array_equal(
      refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **quadratic),
      refine.refine_cg(prior, field, mask, _VOXEL, _OBLIQUE, **{**quadratic, "bregman": 2}))
