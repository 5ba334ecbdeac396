r"""Chooses the refinement parameters of a trained model on its own tuning phantoms.

  python benchmarks/tune_refine.py --model=saved_models/qsmgan/8 [--grid=small|full]

The network runs once per phantom (seeds 850001-850004: a healthy brain, a brain with lesions,
a brain with B0 tilted 10 deg, a shape phantom; none is in a training set or in the model
card's validation cases, which use seeds >= 900000), then `refine.refine_tf` runs for every
parameter set of the grid: ``mu`` (prior weight), CG ``iterations``, and the L1 edge prior
(``tv_weight``, ``reweights``; 0 = the quadratic solve) and, with ``--grid=magnitude``, the
magnitude's edges and noise weighting (the phantoms' simulated magnitude is passed to every
setting; settings that do not use it ignore it). Prints one JSON line per phantom and
setting (NRMSE and HFEN in %, seconds) and a last line ``{"best": ...}``: the setting with the
lowest mean NRMSE over the phantoms (optionally among those within ``--max_seconds`` per brain,
when the cores are otherwise idle). Record it in the model's contract when exporting:
``python -m qsmgan_tf.export ... --refine=mu=...,tv_weight=...,reweights=...``.

``--extended_phantoms`` adds a brain with B0 at 20 deg and one at 1x1x2 mm (seeds 850005-6).
``--setting=<setting>`` scores one setting only (to compare generators under one refinement);
``--ablate=<setting>`` runs one setting from three priors (the network's map, zero, TKD): with
a zero prior the edge mask is empty and the solve is a plain TV-regularised inversion, so the
difference is what the network contributes (its edges, its start and its cone content).
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
from absl import app
from absl import flags

import tuning_phantoms  # benchmarks/ is the script's folder, so on sys.path

_MODEL = flags.DEFINE_string("model", None, "SavedModel version folder or generator .keras.")
_GRID = flags.DEFINE_enum("grid", "small", ["small", "full", "fine", "converge", "magnitude",
                                            "margin", "edges", "correction", "correction2",
                                            "v3", "offset", "offset2", "noise",
                                            "noise2", "background", "background2",
                                            "erosion", "lcurve", "robust", "lcurve_cap",
                                            "lcurve_cap2", "reginska", "bregman"],
                          "Parameter grid: 'small' and 'full' scan mu and the L1 weight; 'fine' "
                          "probes around the shipped model's choice, 'converge' below its mu "
                          "and with more iterations; 'magnitude' adds the magnitude's edges and "
                          "noise weighting to it; 'margin' varies the zero margin of the FFT "
                          "grid around the shipped setting; 'edges' takes the edge mask from "
                          "the refined map at every step after the first (edge_refresh); 'correction' computes "
                          "each step's data residual on a larger grid (residual_margin), 'correction2' "
                          "probes around its best, 'v3' around version 3's contract, 'offset' "
                          "fits a constant field offset (fit_offset) around it, 'offset2' "
                          "probes around the best of 'offset'; 'noise' scales mu and the L1 "
                          "weight by the field's own noise (noise_reference_ppm) over a range "
                          "of base weights (use with --realistic), 'noise2' above it; 'background' "
                          "fits a polynomial background (fit_offset 3-4) and/or filters the "
                          "data term by SMV (smv_radius_mm) around version 4's contract, "
                          "'background2' fits it on the noise-scaled version 4; 'erosion' "
                          "leaves the mask's outer rim out of the data term (data_erosion_mm); "
                          "'lcurve' chooses the L1 weight per scan (lcurve_stages); 'robust' "
                          "adds a Huber-weighted second solve to version 7 (robust_data); "
                          "'lcurve_cap' is version 8 with one more L-curve stage, "
                          "'lcurve_cap2' with caps of 6.3e-3 and 6.3e-2; 'reginska' keeps a "
                          "stage while the L-curve's slope is >= 1 (Reginska's minimum of "
                          "misfit x TV); 'bregman' adds one or two Bregman passes to "
                          "version 8.")
_ABLATE = flags.DEFINE_string("ablate", None, "Instead of a grid: run this one setting "
                              "(key=value,...) from three priors, the network's map, zero and "
                              "TKD, to show what the network contributes to the refined result.")
_SETTING = flags.DEFINE_string("setting", None, "Instead of a grid: run this one setting "
                               "(key=value,...) from the network's map, e.g. to compare "
                               "generators under the same refinement.")
_EXTENDED = flags.DEFINE_bool("extended_phantoms", False, "Also tune on the 20 deg and the "
                              "1x1x2 mm brains (tuning_phantoms.EXTENDED; seeds 850005-6).")
_REALISTIC = flags.DEFINE_bool("realistic", False, "Tune on the tuning phantoms with the "
                                "model errors of real data and lower SNR "
                                "(tuning_phantoms.subjects(realistic=True)).")
_DETAIL = flags.DEFINE_enum("detail", "none", ["none", "fine"], "The brains' fine anatomy "
                             "(tuning_phantoms.subjects(detail=...)): none, or fine (thin veins, "
                             "texture, folded borders; data_prep.phantoms.brain_phantom).")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 0.0, "Largest refinement time (s, brain) a "
                                  "setting may take to be chosen (0 = no limit; timings are "
                                  "only meaningful on otherwise idle cores).")

GRIDS = {
    "small": dict(mu=(0.001, 0.003, 0.01), iterations=(15,), tv=((0.0, 1),
                  (1e-4, 2), (3e-4, 2), (1e-3, 2))),
    "full": dict(mu=(0.0003, 0.001, 0.003), iterations=(15,),
                 tv=((0.0, 1), (3e-5, 2), (1e-4, 2), (3e-4, 2))),
    "fine": dict(mu=(0.0001, 0.0003), iterations=(15,), tv=((1e-4, 2), (1e-4, 3))),
    # Below the edge of 'fine' (mu), and closer to convergence (more CG steps and reweights).
    "converge": dict(mu=(0.0001, 0.00003), iterations=(15, 30), tv=((1e-4, 3), (1e-4, 5))),
}
# The magnitude's uses around the shipped setting (mu 1e-4, 15 iterations, L1 weight 1e-4,
# 3 reweights): network edges, magnitude edges, both, and the noise weighting.
_SHIPPED = dict(mu=0.0001, iterations=15, tv_weight=1e-4, reweights=3)
MAGNITUDE_SETTINGS = [
    {**_SHIPPED, "edge_fraction": ef, "magnitude_edge_fraction": mef, "magnitude_weighting": w}
    for ef, mef, w in ((0.3, 0.0, 0), (0.3, 0.3, 0), (0.0, 0.3, 0), (0.3, 0.15, 0),
                       (0.3, 0.0, 1), (0.3, 0.3, 1), (0.0, 0.3, 1))] + [
    {**_SHIPPED, "tv_weight": 3e-4, "edge_fraction": ef, "magnitude_edge_fraction": 0.3}
    for ef in (0.3, 0.0)] + [
    {**_SHIPPED, "mu": 3e-5, "edge_fraction": 0.3, "magnitude_edge_fraction": 0.3}]
# The FFT grid's zero margin (voxels a side) at the shipped setting: the periodic images of the
# in-mask sources are 2 * margin voxels away, so a small margin is a model error of the data
# term (largest next to strong sources at the mask's edge, e.g. a sinus).
# Fewer CG iterations per step pay for the larger grid.
MARGIN_SETTINGS = ([{**_SHIPPED, "margin": m} for m in (12, 24, 32, 48)]
                   + [{**_SHIPPED, "margin": m, "iterations": it} for m in (32, 48) for it in (8, 10)])

# M_G from the current refined map after the first step (edge_refresh), around the shipped
# setting: more steps and a stronger L1 weight can use the better edges.
EDGE_SETTINGS = [{**_SHIPPED, "edge_refresh": 0}] + [
    {**_SHIPPED, "edge_refresh": 1, "reweights": rw, "tv_weight": tv, "edge_fraction": ef}
    for rw, tv, ef in ((3, 1e-4, 0.3), (4, 1e-4, 0.3), (3, 2e-4, 0.3), (3, 1e-4, 0.2),
                       (3, 2e-4, 0.2))]
# The data residual of every reweighting step on a larger grid than the CG steps'
# (residual_margin, defect correction): most of a large margin's accuracy at a small one's cost.
CORRECTION_SETTINGS = ([{**_SHIPPED, "margin": 12}, {**_SHIPPED, "margin": 48}]
                       + [{**_SHIPPED, "residual_margin": rm, "reweights": rw, "iterations": it}
                          for rm, rw, it in ((48, 3, 15), (32, 3, 15), (64, 3, 15), (48, 4, 15),
                                             (48, 4, 11))])
# Round two around the best of CORRECTION_SETTINGS (residual_margin 48, 4 steps of 15).
_CORRECTED = {**_SHIPPED, "residual_margin": 48, "reweights": 4}
CORRECTION2_SETTINGS = [{**_CORRECTED, "reweights": rw, "iterations": it} for rw, it in
                        ((5, 12), (5, 15))] + [
    {**_CORRECTED, "residual_margin": 32}, {**_CORRECTED, "tv_weight": 2e-4},
    {**_CORRECTED, "tv_weight": 2e-4, "edge_fraction": 0.2, "edge_refresh": 1}]
# Around version 3's contract, for the extended tuning set (--extended_phantoms): the L1
# weight, the prior weight and the edge refresh.
_V3 = {**_SHIPPED, "residual_margin": 48, "reweights": 5}
V3_SETTINGS = [_V3, {**_V3, "tv_weight": 5e-5}, {**_V3, "tv_weight": 2e-4}, {**_V3, "mu": 3e-5},
               {**_V3, "tv_weight": 2e-4, "edge_fraction": 0.2, "edge_refresh": 1}]
# The constant field offset fitted with chi (fit_offset): most of a small grid's model error
# is a constant over the mask, so it may also make the large residual grid unnecessary.
_REFRESH = {"tv_weight": 2e-4, "edge_fraction": 0.2, "edge_refresh": 1}
OFFSET_SETTINGS = [_V3, {**_V3, "fit_offset": 1}, {**_V3, **_REFRESH, "fit_offset": 1},
                   {**_V3, "fit_offset": 1, "residual_margin": 24},
                   {**_V3, "fit_offset": 1, "residual_margin": 0},
                   {**_V3, **_REFRESH, "fit_offset": 1, "residual_margin": 24}]
# Round two around the best of OFFSET_SETTINGS (edge refresh, offset, residual margin 48).
_OFFSET = {**_V3, **_REFRESH, "fit_offset": 1}
OFFSET2_SETTINGS = [_OFFSET, {**_OFFSET, "mu": 3e-5}, {**_OFFSET, "reweights": 4},
                    {**_OFFSET, "tv_weight": 3e-4}, {**_OFFSET, "edge_fraction": 0.3}]
# The regularisation scaled by each field's own noise estimate (noise_reference_ppm 0.001:
# mu and tv_weight are the weights at 0.001 ppm of noise; version 4's weights, chosen at SNR 100
# where the estimate reads ~0.0009, are about the first scaled row), from version 4's L1
# weight up to 20x it, against version 4 itself (unscaled).
_NOISE = {**_OFFSET, "mu": 3e-5, "noise_reference_ppm": 0.001}
NOISE_SETTINGS = ([{**_OFFSET, "mu": 3e-5}]
                  + [{**_NOISE, "tv_weight": tv} for tv in (2e-4, 5e-4, 1e-3, 2e-3, 4e-3)]
                  + [{**_NOISE, "tv_weight": 1e-3, "mu": 3e-4}])
# Round two: the realistic phantoms' best was at the top of NOISE_SETTINGS' L1 weights.
NOISE2_SETTINGS = ([{**_NOISE, "tv_weight": tv} for tv in (4e-3, 8e-3, 1.6e-2, 3.2e-2)]
                   + [{**_NOISE, "tv_weight": 8e-3, "mu": 3e-4},
                      {**_NOISE, "tv_weight": 8e-3, "reweights": 8}])
# Background remnants: a polynomial background fitted with chi (fit_offset 3: up to quadratic,
# 4: cubic) and the SMV-filtered data term (smv_radius_mm), around version 4's contract.
_V4 = {**_OFFSET, "mu": 3e-5}
BACKGROUND_SETTINGS = [_V4, {**_V4, "fit_offset": 3}, {**_V4, "fit_offset": 4},
                       {**_V4, "fit_offset": 3, "tv_weight": 1e-3},
                       {**_V4, "fit_offset": 3, "tv_weight": 1e-3, "noise_reference_ppm": 0.001},
                       {**_V4, "fit_offset": 3, "tv_weight": 1e-3, "smv_radius_mm": 3.0},
                       {**_V4, "tv_weight": 1e-3, "smv_radius_mm": 3.0}]
# Round two: the polynomial background on the noise-scaled version 4 (its weights at a field
# noise of 0.001 ppm, about the clean tuning phantoms' own), so clean fields keep version 4's.
_V4_NOISE = {**_V4, "noise_reference_ppm": 0.001}
BACKGROUND2_SETTINGS = [_V4_NOISE, {**_V4_NOISE, "fit_offset": 3}, {**_V4_NOISE, "fit_offset": 4},
                        {**_V4_NOISE, "fit_offset": 3, "tv_weight": 3e-4},
                        {**_V4_NOISE, "fit_offset": 3, "mu": 1e-4}]
# Edge remnants (sources just outside the mask, a mask a few voxels small) are largest in the
# mask's outer rim: the data term without it (data_erosion_mm), unscaled and noise-scaled.
EROSION_SETTINGS = ([_V4] + [{**_V4, "data_erosion_mm": r} for r in (1.5, 2.0, 2.5, 4.0)]
                    + [{**_V4_NOISE, "data_erosion_mm": 4.0, "tv_weight": tv}
                       for tv in (2e-4, 5e-4, 1e-3)])
# The L1 weight chosen per scan on its own L-curve (lcurve_stages): version 4's weight, then
# stages of 10x while the curve is steep, at two thresholds of the slope.
_LCURVE = {**_V4, "lcurve_stages": 2, "lcurve_factor": 10.0, "lcurve_reweights": 3}
LCURVE_SETTINGS = [{**_LCURVE, "lcurve_slope": slope} for slope in (0.3, 0.5)]
# Version 7's contract, then its solve repeated with Huber weights on the first solve's data
# residual (robust_data: the threshold in robust deviations of the residual).
_V7 = {**_LCURVE, "lcurve_slope": 0.3, "fine_shrinkage": 1}
ROBUST_SETTINGS = [_V7] + [{**_V7, "robust_data": c} for c in (2.0, 3.0, 4.0)]
# Version 8's contract, and the same with one more L-curve stage: version 8's curve keeps both
# stages (its cap, 2e-2) on most realistic tuning runs; is the cap binding?
_V8 = {**_V7, "robust_data": 2.0}
LCURVE_CAP_SETTINGS = [_V8, {**_V8, "lcurve_stages": 3}]
# Where the simulator puts the cap: two L-curve stages of 10^0.75 and 10^1.25 (caps 6.3e-3 and
# 6.3e-2 around version 8's 2e-2).
LCURVE_CAP2_SETTINGS = [{**_V8, "lcurve_factor": 10 ** 0.75}, {**_V8, "lcurve_factor": 10 ** 1.25}]
# Regińska's rule (minimum of misfit x TV, the L-curve's corner for alpha = 1): a stage is kept
# while -dlog(TV)/dlog(misfit) >= 1, at version 8's stages and at half-decade stages up to 6.3e-2.
REGINSKA_SETTINGS = [{**_V8, "lcurve_slope": 1.0},
                     {**_V8, "lcurve_slope": 1.0, "lcurve_factor": 10 ** 0.5, "lcurve_stages": 5}]
# Version 8 with one and two Bregman passes: the contrast the L1 term took goes back in.
BREGMAN_SETTINGS = [{**_V8, "bregman": 1}, {**_V8, "bregman": 2}]
EXTRA_SETTINGS = {"magnitude": MAGNITUDE_SETTINGS, "margin": MARGIN_SETTINGS,
                  "edges": EDGE_SETTINGS, "correction": CORRECTION_SETTINGS,
                  "correction2": CORRECTION2_SETTINGS, "v3": V3_SETTINGS,
                  "offset": OFFSET_SETTINGS, "offset2": OFFSET2_SETTINGS,
                  "noise": NOISE_SETTINGS, "noise2": NOISE2_SETTINGS,
                  "background": BACKGROUND_SETTINGS, "background2": BACKGROUND2_SETTINGS,
                  "erosion": EROSION_SETTINGS, "lcurve": LCURVE_SETTINGS,
                  "robust": ROBUST_SETTINGS, "lcurve_cap": LCURVE_CAP_SETTINGS,
                  "lcurve_cap2": LCURVE_CAP2_SETTINGS, "reginska": REGINSKA_SETTINGS,
                  "bregman": BREGMAN_SETTINGS}


def main(argv):
  del argv
  from qsmgan_tf import classical  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import exporting  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel

  backend = inference.load_backend(_MODEL.value)
  if _GRID.value in EXTRA_SETTINGS:
    settings = EXTRA_SETTINGS[_GRID.value]
  else:
    grid = GRIDS[_GRID.value]
    settings = [dict(mu=mu, iterations=it, tv_weight=tv, reweights=rw)
                for mu, it, (tv, rw) in itertools.product(grid["mu"], grid["iterations"],
                                                          grid["tv"])]
  priors = ["network"]
  if _SETTING.value:
    settings = [exporting.parse_refine(_SETTING.value)]
  if _ABLATE.value:
    settings = [exporting.parse_refine(_ABLATE.value)]
    priors = ["network", "zero", "tkd"]
  results = {i: [] for i in range(len(settings))}
  seconds = {i: [] for i in range(len(settings))}
  for name, sub in tuning_phantoms.subjects(_EXTENDED.value, realistic=_REALISTIC.value,
                                            detail=_DETAIL.value):
    mask = sub.mask
    net, _ = inference.reconstruct_qsmgan(sub.field_ppm, mask, sub.voxel_size_mm, sub.b0_dir,
                                          backend=backend, refine="none", progress=False)
    base = {"phantom": name, "shape": list(mask.shape),
            "b0_dir": [round(float(v), 4) for v in sub.b0_dir]}
    print(json.dumps({**base, "setting": "network alone",
                      **tuning_phantoms.scores(net, sub.chi_ppm, mask)}), flush=True)
    maps = {"network": net}
    if "zero" in priors:
      maps["zero"] = np.zeros_like(net)
    if "tkd" in priors:
      maps["tkd"] = classical.reconstruct("tkd", sub.field_ppm, mask, sub.voxel_size_mm,
                                          sub.b0_dir)
    for prior_name, (i, setting) in itertools.product(priors, enumerate(settings)):
      t0 = time.perf_counter()
      chi, tv_used = inference.run_refine_tf(maps[prior_name], sub.field_ppm, mask,
                                             sub.voxel_size_mm, sub.b0_dir,
                                             {**refine.DEFAULTS, **setting},
                                             magnitude=sub.magnitude, return_weight=True)
      dt = time.perf_counter() - t0
      scores = tuning_phantoms.scores(chi, sub.chi_ppm, mask)
      if prior_name == "network":
        results[i].append(scores["nrmse"])
        if name.startswith("brain"):
          seconds[i].append(dt)
      print(json.dumps({**base, "prior": prior_name, "setting": setting, **scores,
                        "tv_weight_used": float(f"{tv_used:.4g}"), "seconds": round(dt, 2)}),
            flush=True)
  ranked = sorted(((float(np.mean(results[i])), i) for i in results
                   if not _MAX_SECONDS.value or max(seconds[i]) <= _MAX_SECONDS.value))
  if not ranked:
    print(json.dumps({"best": None, "reason": f"no setting within {_MAX_SECONDS.value} s"}))
    return
  nrmse, i = ranked[0]
  print(json.dumps({"best": settings[i], "mean_nrmse": round(nrmse, 2),
                    "max_brain_seconds": round(max(seconds[i]), 2),
                    "runner_up": [{"setting": settings[j], "mean_nrmse": round(n, 2)}
                                  for n, j in ranked[1:4]]}), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("model")
  app.run(main)
