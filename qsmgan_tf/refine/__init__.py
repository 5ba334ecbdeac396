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
image, so the SavedModel's ``predict_volume`` signature (field, mask, voxel size, B0) can run
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
sources are at least ``2 * margin`` voxels away from the mask). docs/history/BUILD_log.md
("The FFT margin, with a trained network") quotes the measured effect of the margin on
accuracy and time. A larger margin is more physical (a head's field does not wrap around) but
makes every CG step dearer; ``residual_margin`` buys most of it for
a few large-grid FFTs: each of the ``reweights`` steps starts from the data residual
``A^T (W field - A chi)`` computed on the box padded by ``residual_margin``, and only the CG
steps (the approximate inverse) run on the ``margin`` grid. This is defect correction
(iterative refinement): its fixed point is the large grid's solution, whatever the small
grid's error, so enough steps converge to it (tests/test_refine.py).

A local field is only defined up to a constant: background-field removal leaves an arbitrary
offset, and a periodic FFT grid adds one of its own (the mean field of the sources' periodic
images, which depends on the cell's shape in mm: on a 1x1x2 mm grid it is most of the data
term's model error, at 1 mm a small part, docs/history/BUILD_log.md "The field offset").
``fit_offset = 1`` fits that constant jointly with chi,
``min_{chi, c} ||W (D chi + c - field)||^2 + ...``, by
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
prior shifted by 0.05 ppm took a simulated brain from 8.7 to 24-29 % NRMSE
(docs/history/BUILD_log.md "The prior's level"). ``fit_level = 1`` adds ``B 1`` (the weighted
field of a uniform chi over the
mask, taken on the residual's grid for both grids: the CG grid's own, with its near periodic
images, would give its steps a near-null direction the residual's grid lacks, and defect
correction diverged along it on a simulated shape phantom) to the fitted basis of ``P``: the
data term no longer sees the level. The L1 term still does, as the step from the map to the
zero outside the mask, which pulls the edge voxels towards zero. ``fit_level = 2`` also leaves
the gradient components that cross the mask's edge out of the L1 term, its edge ranking and the
L-curve's TV (`interior_pairs`): the uniform chi is then in the null space of the whole
problem, the map's level is the network's, and the rest of the solve does not depend on it (a
prior shifted by c gives the same map shifted by c, tests/test_refine.py). On simulated fields
with edge remnants that pull at the rim, 2 lost what 1 keeps (docs/history/BUILD_log.md).

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

An L1 term takes contrast as well as roughness: it is biased towards flat maps, and the larger
its weight, the lower the map's slope on the truth. ``bregman = n > 0`` runs n Bregman passes
(Osher et al. 2005, "An iterative regularization method for total variation-based image
restoration") after the others: each solves again from ``chi_net`` at the L1 weight the last pass
kept (no L-curve), with the last pass's projected residual added to the weighted field,
``b_k+1 = b_k + P (W field - B x_k) = P (b_k - B x_k)``. What the L1 term left unexplained in the
data, contrast first, goes back in; each pass also gives back noise and model error, so n is
small. Ignored without the L1 term (tests/test_refine.py).

Two implementations with the same defaults (`DEFAULTS`): NumPy/SciPy (`refine_cg`, the
reference, float64 CG) and TensorFlow (`refine_tf`, dynamic shapes, float32; used inside the
SavedModel's ``predict_volume`` and ``refine`` signatures and by local inference, so a CLI run
and TF Serving give the same numbers). They agree to ~1e-6 (tests/test_refine.py).
Residuals for the sidecar (`field_residual`, `field_residual_tf`) follow
`physics.field_residual`: 2x padding (of the mask's box) and de-meaned over the mask.
`refine_closed_form` is the one-shot k-space variant
``chi = F^-1[(D F[field] + lam F[chi_net]) / (D^2 + lam)]`` (no mask in the data term).

Modules (each imports only those above it; this package re-exports their public names):
  * `params`: `RefineParams`, `DEFAULTS`, `resolve_params`, `resolve_method`, the input checks;
  * `terms`: the solve's NumPy terms (`edge_weights`, `interior_pairs`, the weighted data
    operator, the offset and level projection, the SMV filter, the erosions);
  * `lcurve`: the L-curve continuation of the L1 weight;
  * `statistics`: `field_noise_ppm`, `regularisation_scale`, `robust_weights` and their
    TensorFlow twins (exact medians without sorting), the sidecar's `noise_info` and
    `shrinkage_info`;
  * `reference`: `refine_cg` (the NumPy oracle), `refine_closed_form`, `field_residual`;
  * `graph`: `refine_tf`, `field_residual_tf` and their traced forms (`run_refine_tf`);
  * `entry`: `refine`, the one entry by name (`RefineParams`, engine 'tf' or 'numpy').
TensorFlow is imported inside the TensorFlow functions only: importing this package does not
load it (the classical path and ``--help`` run without it).
"""

from qsmgan_tf.refine.graph import (field_residual_tf, refine_tf, run_refine_tf,
                                    traced_field_residual_tf, traced_refine_tf)
from qsmgan_tf.refine.params import (CLOSED_FORM_DEFAULTS, DEFAULTS, MAX_FIT_OFFSET, METHODS,
                                     RefineParams, check_magnitude, resolve_method, resolve_params,
                                     uses_magnitude, without_magnitude)
from qsmgan_tf.refine.entry import ENGINES, cg_record, refine
from qsmgan_tf.refine.reference import field_residual, refine_cg, refine_closed_form
from qsmgan_tf.refine.statistics import (field_noise_ppm, field_noise_tf, noise_info,
                                         regularisation_scale, regularisation_scale_tf,
                                         robust_weights, robust_weights_tf, shrinkage_info)
from qsmgan_tf.refine.terms import edge_weights, interior_pairs
