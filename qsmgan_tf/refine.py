"""Data-consistency refinement of a network's susceptibility map against the measured field.

Solves, started at the network output ``chi_net``::

    min_chi  ||M (D chi - field)||^2 + mu ||chi - chi_net||^2
             + tv_weight ||M_G grad chi||_1,                      chi = 0 outside M,

by a few conjugate-gradient iterations on the normal equations
``(A^T A + mu I + tv_weight G^T V G) chi = A^T field + mu chi_net`` with
``A = M F^-1 D F M`` (M the mask, D the dipole kernel of `physics`, G the periodic forward
gradient). With ``tv_weight = 0`` (the library default) the problem is quadratic and one CG run
of ``iterations`` steps solves it; both terms are in ppm, so ``mu`` does not depend on the
units as long as field and chi share them (a ×10 normalisation leaves it unchanged).
Early stopping (few iterations) is part of the regulariser: the network supplies the
ill-posed cone, the field the well-posed rest.

The L1 term is MEDI's morphology prior (Liu et al. 2011) with the NETWORK's map as the
anatomy: ``M_G`` is 0 on the ``edge_fraction`` strongest gradient components of ``chi_net``
inside the mask (its edges are left free) and 1 elsewhere, where piecewise smoothness is
asked for. It is solved like the MEDI toolbox does, by lagged diffusivity: ``reweights``
outer steps, each freezing ``V = M_G / sqrt(|M_G grad chi|^2 + tv_eps)`` (tv_eps in
ppm^2/mm^2) and running ``iterations`` CG steps from the current chi. With ``edge_refresh = 1``
M_G is taken again, at every step after the first, from the current chi instead of chi_net:
after one step the refined map is far closer to the truth than the network's (its edges
included), so later steps smooth away from better edges. It needs no magnitude
image, so the SavedModel's ``predict_volume`` signature (field, mask, B0, voxel size) can run
it. Its parameters are chosen on validation phantoms and recorded in the model's contract.

When a magnitude image is given (``predict --magnitude``, the ``predict_volume_magnitude``
signature), two optional uses of it, both off unless the contract sets them:
``magnitude_edge_fraction > 0`` also frees the magnitude's strongest gradient components
(``M_G = M_G(chi_net) * M_G(magnitude)``: smoothness is asked for only where neither image
has an edge; ``edge_fraction = 0`` leaves the magnitude's edges alone, as MEDI does), and
``magnitude_weighting = 1`` weights the data term by the magnitude normalised to mean 1 over
the mask, ``||W (D chi - field)||^2`` with ``W = M |m| / mean(|m|)``: the phase noise's
standard deviation is inversely proportional to the magnitude, so this is the
maximum-likelihood weighting MEDI uses (dark voxels such as microbleeds count less).
Without a magnitude both are ignored.

Speed: the solve runs on the mask's bounding box padded by ``margin`` voxels a side to a fast
FFT size, not on a 2x grid (chi is zero outside the mask, so the periodic images of the
sources are at least ``2 * margin`` voxels away from the mask). BUILD.md quotes the measured
effect of the margin on accuracy and time. A larger margin is more physical (a head's field
does not wrap around) but makes every CG step dearer; ``residual_margin`` buys most of it for
a few large-grid FFTs: each of the ``reweights`` steps starts from the data residual
``A^T (W field - A chi)`` computed on the box padded by ``residual_margin``, and only the CG
steps (the approximate inverse) run on the ``margin`` grid. This is defect correction
(iterative refinement): its fixed point is the large grid's solution, whatever the small
grid's error, so enough steps converge to it (tests/test_refine.py).

A local field is only defined up to a constant: background-field removal leaves an arbitrary
offset, and a periodic FFT grid adds one of its own (the mean field of the sources' periodic
images, which depends on the cell's shape in mm: on a 1x1x2 mm grid it is most of the data
term's model error, at 1 mm a small part, BUILD.md "The field offset"). ``fit_offset = 1``
fits that constant jointly with chi, ``min_{chi, c} ||W (D chi + c - field)||^2 + ...``, by
projecting the weighted data residual orthogonally to ``W M`` (``P y = y - u <u, y> / <u, u>``,
``u = W M``; the minimum over c in closed form), on both grids. ``fit_offset = n > 1`` fits a
polynomial of degree ``n - 1`` the same way (``P y = y - Q Q^T y``, ``Q`` an orthonormal basis
of ``W`` times the monomials, mm coordinates): background-removal remnants that are smooth over
the head (a linear or quadratic field) are then not explained by chi either, at the cost of the
tissue field's own projection on those few terms, which the prior supplies.

The susceptibility's own level is just as undefined: a uniform chi over the mask gives a field
that is harmonic inside it (a uniformly magnetised body has surface sources only), which
background removal takes out of a real field, and its size depends on the mask's shape alone.
The solve cannot learn the level from the data, but it does see the level's field whenever the
network's level differs from the one the field implies, and explains that field with chi: a
prior shifted by 0.05 ppm took a simulated brain from 8.7 to 24-29 % NRMSE (BUILD.md "The
prior's level"). ``fit_level = 1`` adds ``B 1`` (the weighted field of a uniform chi over the
mask, taken on the residual's grid for both grids: the CG grid's own, with its near periodic
images, would give its steps a near-null direction the residual's grid lacks, and defect
correction diverged along it on a simulated shape phantom) to the fitted basis of ``P``: the
data term no longer sees the level. The L1 term still does, as the step from the map to the
zero outside the mask, which pulls the edge voxels towards zero. ``fit_level = 2`` also leaves
the gradient components that cross the mask's edge out of the L1 term, its edge ranking and the
L-curve's TV (`interior_pairs`): the uniform chi is then in the null space of the whole
problem, the map's level is the network's, and the rest of the solve does not depend on it (a
prior shifted by c gives the same map shifted by c, tests/test_refine.py). On simulated fields
with edge remnants that pull at the rim, 2 lost what 1 keeps (BUILD.md).

Real fields are noisier than a clean simulation and carry model errors (background remnants,
anisotropy, non-white noise): with weights chosen on clean phantoms the solve fits them, and
they come back as streaks and smooth blobs. ``noise_reference_ppm > 0`` makes the
regularisation follow the scan: the field's own noise is estimated (`field_noise_ppm`: a robust
MAD of its Laplacian) and ``mu`` and ``tv_weight`` are multiplied by
``(noise / noise_reference_ppm)^2`` (`regularisation_scale`), the maximum-a-posteriori
scaling of a regulariser against a data term with that noise (the data term weighted by
1/sigma, as MEDI weights it by the magnitude's SNR). ``mu`` and ``tv_weight`` are then the
weights for a field with ``noise_reference_ppm`` of noise; 0 keeps them as given.

Background-field removal leaves remnants: harmonic inside the mask, smooth or largest at its
edge (sources just outside). A dipole solve explains them with susceptibility, as smooth
blobs near the edge. ``smv_radius_mm > 0`` compares the fields after the spherical-mean-value
high-pass ``H = 1 - S`` (SHARP's filter, `physics.smv_kernel`) on the mask eroded by the
sphere, ``||W_e H (D chi - field)||^2`` with ``W_e = W M_e``, as single-step QSM does
(Chatnuntawech et al., NMR Biomed 2017): there ``H`` removes every harmonic field exactly (mean
value property), so remnants cannot pull chi; the lowest frequencies of chi, which ``H`` also
damps, come from the prior (the network) and the voxels within the radius of the edge from the
prior and the edge term. ``H D`` is one real kernel, so a CG step costs what it did.

Most of what background removal and brain extraction get wrong sits at the mask's edge: sources
just outside it (an imperfect background removal's remnants, tissue a too-small mask leaves
out) give a field that falls off as the cube of the distance, large in the outer few voxels
and small inside. ``data_erosion_mm > 0`` weights the data term by the mask eroded by that
radius (the voxels whose sphere lies inside the mask), without filtering the field: chi is
still solved for on the whole mask, its outer rim from the prior and the edge term, the rest
of the field unchanged. If the erosion would leave no voxel, the whole mask is kept.

How strong should the L1 term be for this scan? Fields that hold model errors the dipole model
cannot explain (correlated noise, edge remnants, a mask a few voxels off, anisotropy) need far more
than exact forward fields, and the field's noise estimate does not show those errors (they are
smooth, or correlated over voxels). The L-curve on the scan itself does: ``lcurve_stages > 0``
solves again in stages, each multiplying the L1 weight by ``lcurve_factor`` and running
``lcurve_reweights`` steps from the network's map (a warm start from the previous stage keeps the
streaks that stage fitted: the L1 term removes them far more slowly than it keeps them out),
and measures each stage's point on the log-log
L-curve, ``(||P (W field - B chi)||, mean |grad chi| over the mask)``. While the curve is steep
(``-dlog(TV) / dlog(misfit) >= lcurve_slope`` over the stage: smoothing removes as much
roughness as it gives up fit, so the roughness was fitted error) the stage is kept; the first
flat stage ends it and is discarded. On an exact forward field with white noise the curve is flat
from the start (the map's roughness is the anatomy's) and the weight stays as given. The kept
weight is returned (``return_weight``) and recorded in the sidecar (``tv_weight_used``).

At the finest scales a real field holds more noise and model error than signal, and a solve's
correction there adds as much error as it removes. ``fine_shrinkage = 1`` weighs the
correction ``chi - chi_net`` per band of |k| by the share of the field's power outside the cone
that is not noise, ``1 - P_noise / P_field`` (`fine_shrinkage`; the noise from
`field_noise_ppm`), after the solve and the L-curve: per scan, from the field alone. The gains
are recorded in the sidecar (`shrinkage_info`).

A least-squares data term trusts every voxel's field as much as its noise allows, so the few
voxels whose field the dipole model cannot explain at all (vessels with flow, unwrapping errors,
the remnants of background removal at the mask's edge) pull chi quadratically in their misfit
and spread into it as streaks and blobs. ``robust_data = c > 0`` makes the data term Huber's
loss, as robust QSM fidelities do (nonlinear MEDI's and WH-QSM's L1-like data terms), by one
reweighted step (IRLS): after the solve (and the L-curve), each voxel's projected, weighted
residual ``r`` gives it the weight ``min(1, c s / |r|)``, ``s = 1.4826 median |r|`` over the mask
(`robust_weights`), and the whole solve runs again from ``chi_net`` with the data weight
multiplied by it. Voxels within ``c`` robust deviations keep weight 1; beyond, their pull grows
linearly. On a field without such outliers it still takes weight from residual the prior
left, a small cost (tests/test_refine.py).

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

from qsmgan_tf import fine_shrinkage as shrinkage_lib
from qsmgan_tf import physics
from qsmgan_tf.classical import operators

DEFAULTS = {"mu": 0.003, "iterations": 15, "margin": operators.DEFAULT_MARGIN,
            "tv_weight": 0.0, "edge_fraction": 0.3, "reweights": 1, "tv_eps": 1e-4,
            "magnitude_edge_fraction": 0.0, "magnitude_weighting": 0, "edge_refresh": 0,
            "residual_margin": 0, "fit_offset": 0, "noise_reference_ppm": 0.0,
            "smv_radius_mm": 0.0, "data_erosion_mm": 0.0, "lcurve_stages": 0,
            "lcurve_factor": 4.0, "lcurve_slope": 0.5, "lcurve_reweights": 2,
            "fine_shrinkage": 0, "fit_level": 0, "robust_data": 0.0}
"""Refinement defaults of the library (a model's contract overrides them as
``contract['refine']``): the quadratic solve (``tv_weight`` 0) chosen on simulated validation
phantoms with a degraded-truth prior by ``python benchmarks/inference.py --study=refine``
(BUILD.md). A contract that sets ``tv_weight > 0`` adds the L1 edge prior;
``magnitude_edge_fraction`` and ``magnitude_weighting`` act only when a magnitude is given;
``noise_reference_ppm > 0`` scales ``mu`` and ``tv_weight`` by the scan's own noise
(`regularisation_scale`); ``smv_radius_mm > 0`` compares fields after the SMV high-pass
(background remnants ignored); ``data_erosion_mm > 0`` leaves the voxels that close to the mask's
edge out of the data term; ``lcurve_stages > 0`` raises the L1 weight per scan while the
L-curve is steep; ``fine_shrinkage = 1`` weighs the solve's correction per band of k by the
field's own signal-to-noise (`fine_shrinkage`); ``fit_level`` 1 or 2 leaves chi's uniform
level to the network (the data term does not see it; with 2, nor the L1 term);
``robust_data > 0`` solves again with Huber weights on the first solve's data residual."""

MAX_FIT_OFFSET = 4
"""Largest ``fit_offset``: a polynomial background up to degree 3 (20 terms)."""


def uses_magnitude(params: dict) -> bool:
  """Whether refinement parameters (`resolve_params`) would use a magnitude image."""
  return ((params["tv_weight"] > 0 and params["magnitude_edge_fraction"] > 0)
          or bool(params["magnitude_weighting"]))


def without_magnitude(params: dict) -> dict:
  """``params`` with the magnitude's uses off: what runs when no magnitude is given."""
  return {**params, "magnitude_edge_fraction": 0.0, "magnitude_weighting": 0}

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

  Raises:
    ValueError: a value that is not of its parameter's type (e.g. an evaluate spec's
      ``refine_reweights=x``), named in the message.
  """
  out = dict(DEFAULTS)
  for source in (((contract or {}).get("refine") or {}), overrides):
    for key, value in source.items():
      if key in out and value is not None:
        try:
          out[key] = type(DEFAULTS[key])(value)
        except (TypeError, ValueError):
          raise ValueError(f"refinement parameter {key}: bad value {value!r}") from None
  if out["fit_level"] not in (0, 1, 2):
    raise ValueError(f"refinement parameter fit_level: {out['fit_level']} is not 0, 1 or 2")
  if not 0 <= out["fit_offset"] <= MAX_FIT_OFFSET:
    raise ValueError(f"refinement parameter fit_offset: {out['fit_offset']} is not in "
                     f"0..{MAX_FIT_OFFSET}")
  for key, ok, rule in (("data_erosion_mm", out["data_erosion_mm"] >= 0, ">= 0"),
                        ("robust_data", out["robust_data"] >= 0, ">= 0"),
                        ("lcurve_stages", out["lcurve_stages"] >= 0, ">= 0"),
                        ("lcurve_factor", out["lcurve_factor"] > 1, "> 1"),
                        ("lcurve_reweights", out["lcurve_reweights"] >= 1, ">= 1")):
    if not ok:
      raise ValueError(f"refinement parameter {key}: {out[key]} must be {rule}")
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


def check_magnitude(magnitude, mask: np.ndarray) -> np.ndarray | None:
  """|magnitude| as float32, or None; ValueError if its shape (the boolean ``mask``'s) or its
  in-mask values (finite, positive mean) are wrong."""
  if magnitude is None:
    return None
  magnitude = np.abs(np.asarray(magnitude, dtype=np.float32))
  if magnitude.shape != mask.shape:
    raise ValueError(f"magnitude {magnitude.shape} must have the mask's shape {mask.shape}")
  if not np.all(np.isfinite(magnitude[mask])) or not magnitude[mask].mean() > 0:
    raise ValueError("magnitude must be finite with a positive mean inside the mask")
  return magnitude


def edge_weights(chi_grid: np.ndarray, mask_grid: np.ndarray, voxel_size_mm: Sequence[float],
                 edge_fraction: float, pairs: np.ndarray | None = None) -> np.ndarray:
  """M_G float32 [3, ...]: 0 on the ``edge_fraction`` largest |gradient| components of
  ``chi_grid`` inside the mask, 1 elsewhere: MEDI's edge mask (`medi.edge_mask`) with the
  network's map in place of the magnitude. With ``pairs`` (`interior_pairs`), only the
  components between two mask voxels are ranked and the rest (the step at the mask's edge) get
  0: the L1 term then does not see the map's level (`refine_cg`'s ``fit_level = 2``)."""
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


_LAPLACIAN_NOISE_GAIN = float(np.sqrt(42.0))
"""Std of the 6-neighbour Laplacian of unit white noise: sqrt(6 * 1 + 36)."""
_MAD_TO_STD = 0.6744897501960817
# A voxel is in the SMV-eroded mask when its sphere's mean of the mask is above this (1 up to
# float32 FFT rounding, ~1e-6): the whole sphere lies inside the mask.
_ERODED_MIN = 0.999
"""median(|x|) of a unit normal: a MAD divided by it estimates the std."""


def _padded_laplacian(volume: np.ndarray) -> np.ndarray:
  """6-neighbour Laplacian in voxel units with zeros outside the volume (float64)."""
  v = np.pad(np.asarray(volume, np.float64), 1)
  lap = -6.0 * v
  for axis in range(3):
    lap += np.roll(v, 1, axis) + np.roll(v, -1, axis)
  return lap[1:-1, 1:-1, 1:-1]


def field_noise_ppm(field_ppm: np.ndarray, mask: np.ndarray) -> float:
  """Robust estimate of the field's white-noise std, ppm, from the field alone.

  ``median |L field| / (0.6745 sqrt(42))`` over the voxels whose six neighbours are all in the
  mask, L the 6-neighbour Laplacian in voxel units (unit white noise gives a Laplacian of std
  sqrt(42), whatever the voxel size). The median ignores the field's own sharp structure
  (veins, lesions); smooth structure leaves a floor: a noise-free simulated 1 mm brain gives
  ~2.5e-4 ppm, the same brain at SNR 100 ~8.8e-4 (true noise 6.5e-4) and at SNR 30 ~2.3e-3
  (2.2e-3). Noise correlated between neighbours reads lower than its std: what is estimated is
  the rough part, the part an inversion amplifies.

  Args:
    field_ppm: local field, ppm of B0, [X, Y, Z].
    mask: brain mask (bool, or > 0.5 inside).

  Returns:
    The estimate, ppm (0.0 when no voxel has all six neighbours in the mask).
  """
  mask = np.asarray(mask) > 0.5
  inner = _padded_laplacian(mask.astype(np.float64)) > -0.5  # all six neighbours inside
  inner &= mask
  if not inner.any():
    return 0.0
  lap = _padded_laplacian(np.where(mask, field_ppm, 0.0))
  return float(np.median(np.abs(lap[inner])) / (_MAD_TO_STD * _LAPLACIAN_NOISE_GAIN))


def noise_info(field_ppm: np.ndarray, mask: np.ndarray, params: dict) -> dict:
  """What a sidecar records of the noise scaling that ``params`` (`resolve_params`) ask for:
  the field's noise estimate, the scale and the weights it gave; {} when it is off."""
  if not params.get("noise_reference_ppm", 0) > 0:
    return {}
  scale, noise = regularisation_scale(field_ppm, mask, params["noise_reference_ppm"])
  return {"field_noise_ppm": noise, "regularisation_scale": scale,
          "regularisation_rule":
              "mu and tv_weight times (field_noise_ppm / noise_reference_ppm)^2",
          "mu_scaled": params["mu"] * scale, "tv_weight_scaled": params["tv_weight"] * scale}


def shrinkage_info(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm, b0_dir,
                   params: dict) -> dict:
  """What a sidecar records of ``fine_shrinkage`` (`fine_shrinkage.gains`): the field's noise
  estimate and the gain per band of |k|; {} when it is off."""
  if not int(params.get("fine_shrinkage", 0)) > 0:
    return {}
  noise = field_noise_ppm(field_ppm, mask)
  gains = shrinkage_lib.gains(field_ppm, mask, voxel_size_mm, b0_dir, noise)
  return {"fine_shrinkage_noise_ppm": noise,
          "fine_shrinkage_band_cycles_per_mm": round(
              shrinkage_lib.band_width_cycles_per_mm(voxel_size_mm), 5),
          "fine_shrinkage_gains": [round(float(g), 4) for g in gains],
          "fine_shrinkage_rule": "correction weighted per band of |k| by "
                                 "1 - noise power / field power outside the cone"}


def regularisation_scale(field_ppm: np.ndarray, mask: np.ndarray,
                         noise_reference_ppm: float) -> tuple[float, float]:
  """``(scale, noise_ppm)``: the factor on ``mu`` and ``tv_weight`` for this field
  (``(noise / noise_reference_ppm)^2``, 1 when ``noise_reference_ppm`` is 0) and the noise
  estimate (`field_noise_ppm`; 0.0 when not asked for)."""
  if not noise_reference_ppm > 0:
    return 1.0, 0.0
  noise = field_noise_ppm(field_ppm, mask)
  return (noise / float(noise_reference_ppm)) ** 2, noise


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
  uniform susceptibility over the mask: `refine_cg`'s ``fit_level``): the weighted data
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
  ``level_field`` (`_level_field`, `refine_cg`'s ``fit_level``): ``P`` also removes it, so a
  uniform susceptibility over the mask is (nearly) in ``A``'s null space. Also returns ``P``:
  ``(B, A^T, P)``."""
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
  """The data term's erosion weight (`refine_cg`'s ``data_erosion_mm``): `_eroded`, or 1 when
  ``radius_mm`` is 0 or the erosion would leave no voxel."""
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


def _lcurve_point(misfit: float, x: np.ndarray, m: np.ndarray,
                  voxel_size_mm: Sequence[float],
                  pairs: np.ndarray | None = None) -> tuple[float, float]:
  """``(data misfit, total variation)`` of ``x``: the TV is ``sum |grad x|`` over the mask (the
  isotropic norm, no edge mask), per voxel; with ``pairs`` (`interior_pairs`) without the
  step at the mask's edge."""
  g = operators.gradient((m * x).astype(np.float32), voxel_size_mm).astype(np.float64)
  if pairs is not None:
    g *= pairs
  tv = np.sqrt(np.sum(g * g, axis=0))[m > 0.5]
  return misfit, float(tv.mean())


def _lcurve_continuation(x, tv_weight, solve, point, stages, factor, slope_min):
  """Raises the L1 weight by ``factor`` per stage while the L-curve is steep (module docstring).

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


def robust_weights(residual: np.ndarray, inside: np.ndarray, threshold: float) -> np.ndarray:
  """Huber's IRLS weights of a data residual: ``min(1, threshold * s / |r|)`` inside, 0 outside.

  ``s = 1.4826 * median |r|`` over ``inside`` is the residual's robust standard deviation (the
  solve fits a constant offset or the residual's mean is small, so the median of |r| about 0
  serves). With these weights the least-squares data term becomes Huber's loss at
  ``threshold * s``: voxels whose residual is that many deviations off (vessels, remnants at
  the mask's edge, the model errors the dipole model cannot explain) pull chi linearly, not
  quadratically. An exact fit (s = 0) gives weight 1 everywhere inside.
  """
  inside = np.asarray(inside) > 0.5
  magnitude = np.abs(residual).astype(np.float64)
  scale = float(np.median(magnitude[inside])) / _MAD_TO_STD if inside.any() else 0.0
  if not scale > 0:
    return inside.astype(np.float32)
  w = np.minimum(1.0, threshold * scale / np.maximum(magnitude, np.finfo(np.float64).tiny))
  return np.where(inside, w, 0.0).astype(np.float32)


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
      step (module docstring). 0 (or <= margin) = one grid.
    fit_offset: n > 0 = fit a polynomial field of degree < n jointly with chi (module
      docstring): 1 a constant offset (the data term ignores the field's in-mask weighted
      mean), 2 also linear, 3 also quadratic background remnants (up to `MAX_FIT_OFFSET`);
      0 = the field is taken as absolute.
    fit_level: 1 = the data term ignores the field of a uniform chi over the mask; 2 = the
      L1 term also leaves out the step at the mask's edge, so that nothing in the solve sees
      chi's uniform level: the map's level is chi_net's and the rest does not depend on it
      (module docstring); 0 = both see it.
    noise_reference_ppm: > 0 = ``mu`` and ``tv_weight`` are the weights for a field with
      this much noise (ppm) and are scaled by `regularisation_scale` for this field's own
      noise (module docstring); 0 = used as given.
    smv_radius_mm: > 0 = the data term compares the SMV-high-passed fields on the mask eroded
      by this radius, mm (module docstring): harmonic background remnants drop out;
      0 = the fields themselves on the whole mask.
    data_erosion_mm: > 0 = the data term leaves out the voxels within this distance of the
      mask's edge, mm (module docstring; the whole mask if none would be left); 0 = none.
    lcurve_stages: > 0 = after the solve, up to this many stages that each multiply the L1
      weight by ``lcurve_factor`` and solve again from ``chi_net``, kept while the L-curve
      is steep (``-dlog(TV) / dlog(misfit) >= lcurve_slope`` over the stage; module
      docstring); 0 = the L1 weight as given. Needs ``tv_weight > 0``.
    lcurve_factor, lcurve_slope, lcurve_reweights: the stages' weight factor, the smallest
      slope kept and the reweighting steps of each stage (each from ``chi_net``).
    robust_data: > 0 = after the solve (and the L-curve), weight each voxel's data term by
      Huber's `robust_weights` of its residual at this many robust standard deviations and
      solve again, the L-curve included, from ``chi_net`` (module docstring); 0 = one solve.
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

  def solve_weighted(weight):
    """The whole solve (and the L-curve) with data weight ``weight``: ``(x, tv_weight, r)``,
    ``r`` the map's projected, weighted data residual on the CG grid."""
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
    weighted_field_r = weight_r * f_r

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
    x = solve(x0.copy(), tv_weight, steps)
    tv_weight_used = tv_weight
    if use_tv and int(lcurve_stages) > 0:
      stage_steps = max(int(lcurve_reweights), 1)
      x, tv_weight_used, _ = _lcurve_continuation(
          x, tv_weight, lambda tv: solve(x0.copy(), tv, stage_steps),
          lambda x: _lcurve_point(misfit(x), x, m, vs, pairs), lcurve_stages, lcurve_factor,
          lcurve_slope)
    return x, tv_weight_used, from_residual_grid(residual(x))

  x, tv_weight_used, r = solve_weighted(weight)
  if robust_data > 0:
    x, tv_weight_used, _ = solve_weighted(weight * robust_weights(r, grid.mask, robust_data))
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


def refine(chi_net, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
           method: str = "cg", mu: float | None = None, iterations: int | None = None,
           margin: int | None = None, lam: float | None = None, contract: dict | None = None,
           magnitude=None):
  """Refinement by name, with residuals for the sidecar (NumPy).

  Args:
    chi_net, field_ppm, mask, voxel_size_mm, b0_dir: as `refine_cg`.
    method: 'cg', 'closed' or 'none'.
    mu, iterations, margin: CG parameters; None takes ``contract['refine']`` then `DEFAULTS`.
    lam: closed-form weight; None takes `CLOSED_FORM_DEFAULTS`.
    contract: model contract (its ``refine`` entry supplies defaults).
    magnitude: optional magnitude image (used as the contract's parameters say).

  Returns:
    ``(chi_ppm, info)``, info with the method, its parameters, the L1 weight used
    (``tv_weight_used``, cg only) and the relative field residual (`field_residual`) before and
    after.

  Raises:
    ValueError: unknown method, bad shapes or an empty mask.
  """
  method = resolve_method(method)
  params = resolve_params(contract, mu=mu, iterations=iterations, margin=margin)
  if magnitude is None:
    params = without_magnitude(params)
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
    chi, tv_used = refine_cg(chi_net, field_ppm, mask, voxel_size_mm, b0_dir, **params,
                             magnitude=magnitude, return_weight=True)
    info = {"method": "cg", **params, **noise_info(field_ppm, mask, params),
            **shrinkage_info(field_ppm, mask, voxel_size_mm, b0_dir, params),
            "tv_weight_used": tv_used}
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


def _gradient_tf(x, voxel_size_mm):
  """`operators.gradient` in TensorFlow: periodic forward differences per mm, [3, *x.shape]."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  inv = 1.0 / tf.cast(voxel_size_mm, tf.float32)
  return tf.stack([(tf.roll(x, -1, axis) - x) * inv[axis] for axis in range(3)])


def _order_statistics_tf(values, k):
  """The ``k``-th and ``k+1``-th smallest (0-based; the last one if ``k+1`` is past the end) of
  non-negative float32 ``values``, exactly, without sorting.

  Non-negative IEEE floats order like their bit patterns as int32, so 31 bisection steps over
  the bit patterns, each one counting pass, find the k-th value exactly: ~15x faster than `tf.sort`
  on the ~8 million gradient components of a head (0.1 s against 1.5 s on 2 cores), which
  matters once the edges are taken again at every step (``edge_refresh``).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  bits = tf.bitcast(values, tf.int32)

  def count_le(t):
    return tf.reduce_sum(tf.cast(bits <= t, tf.int32))

  # Invariant: the k-th value's bits are in [lo, hi]. A fixed, unrolled 31 steps (the range
  # is below 2^31): a tf.while_loop here, nested in the refinement's loops, makes Grappler's
  # dependency optimizer log "topological sort failed" errors.
  lo, hi = tf.constant(0, tf.int32), tf.reduce_max(bits)
  for _ in range(31):
    mid = lo + (hi - lo) // 2
    enough = count_le(mid) >= k + 1
    lo, hi = tf.where(enough, lo, mid + 1), tf.where(enough, mid, hi)
  v_lo = tf.bitcast(lo, tf.float32)
  larger = tf.reduce_min(tf.where(bits > lo, values, tf.float32.max))
  last = k + 1 >= tf.size(values)
  v_hi = tf.where(tf.logical_or(last, count_le(lo) >= k + 2), v_lo, larger)
  return v_lo, v_hi


def _edge_weights_tf(x, m, voxel_size_mm, edge_fraction, support=None):
  """`edge_weights` in TensorFlow (the same linear quantile, computed in float64); ``support``
  [3, ...] (> 0.5: ranked) replaces the mask's voxels as the components ranked (the caller
  multiplies by `interior_pairs` for ``fit_level = 2``)."""
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


def _padded_laplacian_tf(volume):
  """`_padded_laplacian` in TensorFlow (float32)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  v = tf.pad(volume, [[1, 1]] * 3)
  lap = -6.0 * v
  for axis in range(3):
    lap += tf.roll(v, 1, axis) + tf.roll(v, -1, axis)
  return lap[1:-1, 1:-1, 1:-1]


def _median_tf(values):
  """The median of non-negative float32 ``values`` (exact, `_order_statistics_tf`); 0 if empty."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  n = tf.size(values)

  def median():
    v_lo, v_hi = _order_statistics_tf(values, (n - 1) // 2)
    return tf.where(n % 2 == 1, v_lo, 0.5 * (v_lo + v_hi))

  return tf.cond(n > 0, median, lambda: tf.constant(0.0))


def field_noise_tf(field_ppm, mask):
  """`field_noise_ppm` in TensorFlow: the exact median by `_order_statistics_tf`; scalar."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  m = tf.cast(tf.cast(mask, tf.float32) > 0.5, tf.float32)
  inner = tf.logical_and(_padded_laplacian_tf(m) > -0.5, m > 0.5)
  lap = _padded_laplacian_tf(tf.cast(field_ppm, tf.float32) * m)
  values = tf.abs(tf.boolean_mask(lap, inner))
  return _median_tf(values) / float(_MAD_TO_STD * _LAPLACIAN_NOISE_GAIN)


def robust_weights_tf(residual, m, threshold):
  """`robust_weights` in TensorFlow (the exact median by `_order_statistics_tf`); ``m`` 0/1."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  magnitude = tf.abs(residual)
  values = tf.boolean_mask(magnitude, m > 0.5)
  scale = _median_tf(values) / float(_MAD_TO_STD)
  w = tf.minimum(1.0, tf.math.divide_no_nan(threshold * scale, magnitude))
  w = tf.where(magnitude > 0, w, 1.0)
  return tf.where(scale > 0, w, 1.0) * m


def regularisation_scale_tf(field_ppm, mask, noise_reference_ppm):
  """`regularisation_scale`'s factor in TensorFlow (1 when ``noise_reference_ppm`` is 0)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  reference = tf.cast(noise_reference_ppm, tf.float32)
  return tf.cond(reference > 0,
                 lambda: tf.square(field_noise_tf(field_ppm, mask) / reference),
                 lambda: tf.constant(1.0))


def refine_tf(chi_net, field_ppm, mask, b0_dir, voxel_size_mm, mu=DEFAULTS["mu"],
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
              robust_data=DEFAULTS["robust_data"], magnitude=None, return_weight=False):
  """CG data-consistency refinement in TensorFlow; same maths and defaults as `refine_cg`.

  Works in a tf.function with dynamic shapes (float32 CG on complex64 FFTs).

  Args:
    chi_net: network susceptibility, ppm, float32 [X, Y, Z].
    field_ppm: local field, ppm of B0, float32 [X, Y, Z].
    mask: brain mask [X, Y, Z] (> 0.5 is inside; must not be empty).
    b0_dir: TRUE B0 direction in this grid's voxel frame, float [3].
    voxel_size_mm: voxel size, mm, float [3].
    mu: prior weight (scalar, Python or tensor).
    iterations: CG iterations per (re)weighting step (scalar, Python or tensor).
    margin: zero margin around the mask's bounding box, voxels (scalar).
    tv_weight, edge_fraction, reweights, tv_eps: the L1 edge prior (module docstring);
      scalars, Python or tensors; ``tv_weight`` 0 gives the quadratic solve.
    magnitude_edge_fraction, magnitude_weighting: the magnitude's uses (`refine_cg`); scalars.
    edge_refresh: 1 = M_G from the current chi at every step after the first (`refine_cg`).
    residual_margin: margin of the grid of each step's data residual (`refine_cg`); scalar.
    fit_offset: n > 0 = fit a polynomial field of degree < n jointly with chi (`refine_cg`);
      scalar, at most `MAX_FIT_OFFSET`.
    noise_reference_ppm: > 0 = scale ``mu`` and ``tv_weight`` by the field's own noise
      (`regularisation_scale_tf`); scalar.
    smv_radius_mm: > 0 = the SMV-filtered data term (`refine_cg`); scalar.
    data_erosion_mm: > 0 = the data term without the mask's outer rim (`refine_cg`); scalar.
    lcurve_stages, lcurve_factor, lcurve_slope, lcurve_reweights: the L-curve continuation of
      the L1 weight (`refine_cg`); scalars.
    fine_shrinkage: 1 = weigh the correction per band of k (`fine_shrinkage.shrink_tf`); scalar.
    fit_level: 1 = the data term does not see chi's uniform level, 2 = nor the L1 term
      (`refine_cg`); scalar.
    robust_data: > 0 = a second solve with Huber weights at this many robust deviations of the
      first solve's data residual (`refine_cg`, `robust_weights_tf`); scalar.
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

  def high_pass(on_grid):  # `_smv_data`'s H = 1 - S on a grid; 1 without the SMV filter
    return tf.cond(use_smv, lambda: 1.0 - physics_tf.smv_kernel(on_grid, voxel_size_mm,
                                                                 smv_radius_mm),
                   lambda: tf.ones(tf.stack([on_grid[0], on_grid[1], on_grid[2] // 2 + 1])))

  def data_kernel(on_grid):  # `_smv_data`'s kernel: D H
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

  def eroded(radius_mm):  # `_eroded`
    inside = physics_tf.apply_kernel(m, physics_tf.smv_kernel(grid, voxel_size_mm, radius_mm))
    return tf.cast(tf.logical_and(inside > _ERODED_MIN, m > 0.5), tf.float32)

  def data_erosion():  # `_data_erosion`: the whole mask if the erosion leaves no voxel
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

  def projection(u, level_field):  # `_offset_projection`: the identity unless either
    def basis():  # Q on u's support, and the support's indices
      where = tf.where(u != 0)
      centre = 0.5 * (tf.cast(tf.shape(u), tf.float32) - 1.0)
      coords = ((tf.cast(where, tf.float32) - centre) * voxel_size_mm) / _POLY_SCALE_MM
      powers = tf.reduce_prod(tf.pow(coords[:, None, :], exponents[None]), axis=2)
      # float64 as in `refine_cg`: in float32 Q is orthogonal to ~1e-4 only and Q^T y sums
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
  # The SMV-filtered field on the residual's grid (as `refine_cg`).
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

  # fit_level 2: the L1 term leaves the step at the mask's edge alone too (`refine_cg`): the
  # components ranked and kept are the interior pairs instead of the mask's voxels (one
  # ranking in the graph either way: a tf.cond over two would trace the sort twice).
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

  def solve_weighted(weight, reweigh):  # `refine_cg`'s, and the next pass's data weight
    def forward(x):  # B x = W D (M x); A = P B, P applied once, in A^T (`_weighted_operator`)
      return tf.signal.irfft3d(tf.signal.rfft3d(m * x) * kernel, fft_length=grid) * weight

    def adjoint(y):  # A^T y = M D (W P y)
      return tf.signal.irfft3d(tf.signal.rfft3d(weight * project(y)) * kernel,
                               fft_length=grid) * m

    weight_r = to_residual_grid(weight)
    weighted_field_r = weight_r * field_r

    def forward_r(x_r):  # B on the residual's grid
      return tf.signal.irfft3d(tf.signal.rfft3d(m_r * x_r) * kernel_r,
                               fft_length=grid_r) * weight_r

    # The level's field of the residual's grid on both grids, as `refine_cg`: one product, and
    # none without fit_level (its column is dropped then).
    level_r = tf.cond(fit_level, lambda: forward_r(m_r), lambda: tf.zeros_like(m_r))
    project_r = projection(weight_r, lambda: level_r)
    project = projection(weight, lambda: from_residual_grid(level_r))

    def projected_residual(x):  # P (W field - B x) on the residual's grid
      return project_r(weighted_field_r - forward_r(to_residual_grid(x)))

    def data_residual(x):  # A^T (P W field - A x) on the residual's grid, as `refine_cg`
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

    def solve(x, tv_weight, steps):  # `refine_cg`'s solve: steps from x
      _, x = tf.while_loop(lambda k, _: k < steps, lambda k, x: outer_body(k, x, tv_weight),
                           (tf.constant(0), x))
      return x

    def misfit(x):  # the L-curve's residual, as `refine_cg`
      r = projected_residual(x)
      return tf.sqrt(dot(r, r))

    def point(x):  # `_lcurve_point`
      g = _gradient_tf(m * x, voxel_size_mm)
      g = tf.where(level_edges, g * pairs, g)
      tv = tf.boolean_mask(tf.sqrt(tf.reduce_sum(g * g, axis=0)), m > 0.5)
      return misfit(x), tf.reduce_mean(tv)

    x = solve(x0, tv_weight, outer)

    def stage_body(stage, x, tv_weight, misfit_x, tv_x, done):  # `_lcurve_continuation`
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

    start = tf.cond(stages > 0, lambda: point(x), lambda: (tf.constant(0.0), tf.constant(0.0)))
    _, x, used, _, _, _ = tf.while_loop(
        lambda stage, *rest: tf.logical_and(stage <= stages, tf.logical_not(rest[-1])),
        stage_body, (tf.constant(1), x, tv_weight, start[0], start[1], tf.constant(False)))
    # The next pass's weight (only when there is one: the residual costs a large-grid FFT pair).
    weight = tf.cond(reweigh, lambda: weight * robust_weights_tf(
        from_residual_grid(projected_residual(x)), m, robust_data), lambda: weight)
    return x, used, weight

  # robust_data: a second pass with Huber weights on the first's residual (`refine_cg`). One
  # loop over the passes traces the solve once (a tf.cond over two solves would trace it twice).
  robust_data = tf.cast(robust_data, tf.float32)
  passes = tf.where(robust_data > 0, 2, 1)

  def pass_body(i, weight, x, used):
    del x, used
    x, used, weight = solve_weighted(weight, i + 1 < passes)
    return i + 1, weight, x, used

  _, _, x, tv_weight = tf.while_loop(
      lambda i, *_: i < passes, pass_body, (tf.constant(0), weight, x0, tv_weight))
  inner = physics_tf.crop_from(x, size)
  full = tf.shape(m_full)
  chi = tf.pad(inner, tf.stack([begin, full - begin - size], axis=1)) * m_full
  chi = tf.cond(tf.cast(fine_shrinkage, tf.int32) > 0,
                lambda: shrinkage_lib.shrink_tf(chi, chi_net * m_full, field_ppm, m_full,
                                                voxel_size_mm, b0_dir,
                                                field_noise_tf(field_ppm, m_full))[0],
                lambda: chi)
  return (chi, tv_weight) if return_weight else chi


def field_residual_tf(chi_ppm, field_ppm, mask, b0_dir, voxel_size_mm):
  """`field_residual` in TensorFlow (2x padding of the mask's box, mask-demeaned); scalar."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel

  m, begin, size = _tf_crop_box(mask)
  chi = tf.slice(tf.convert_to_tensor(chi_ppm, tf.float32) * m, begin, size)
  field = tf.slice(tf.convert_to_tensor(field_ppm, tf.float32), begin, size)
  return physics_tf.field_residual(chi, field, tf.slice(m, begin, size), voxel_size_mm, b0_dir,
                                   pad_factor=2.0)
