r"""Chooses the refinement parameters of a trained model on its own tuning phantoms.

  python benchmarks/tune_refine.py --model=saved_models/qsmgan/1 [--grid=small|full]

The network runs once per phantom (seeds 850001-850004: a healthy brain, a brain with lesions,
a brain with B0 tilted 10 deg, a shape phantom; none is in a training set or in the model
card's validation cases, which use seeds >= 900000), then `refine.refine_tf` runs for every
parameter set of the grid: ``mu`` (prior weight), CG ``iterations``, and the L1 edge prior
(``tv_weight``, ``reweights``; 0 = the quadratic solve). Prints one JSON line per phantom and
setting (NRMSE and HFEN in %, seconds) and a last line ``{"best": ...}``: the setting with the
lowest mean NRMSE over the phantoms (optionally among those within ``--max_seconds`` per brain,
when the cores are otherwise idle). Record it in the model's contract when exporting:
``python -m qsmgan_tf.export ... --refine=mu=...,tv_weight=...,reweights=...``.

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

_MODEL = flags.DEFINE_string("model", None, "SavedModel version folder or generator .keras.")
_GRID = flags.DEFINE_enum("grid", "small", ["small", "full", "fine"], "Parameter grid: 'small' "
                          "and 'full' scan mu and the L1 weight; 'fine' probes around the "
                          "shipped model's choice.")
_ABLATE = flags.DEFINE_string("ablate", None, "Instead of a grid: run this one setting "
                              "(key=value,...) from three priors, the network's map, zero and "
                              "TKD, to show what the network contributes to the refined result.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 0.0, "Largest refinement time (s, brain) a "
                                  "setting may take to be chosen (0 = no limit; timings are "
                                  "only meaningful on otherwise idle cores).")

PHANTOMS = (("brain", 850001, False, (0.0, 0.0, 1.0)), ("brain", 850002, True, (0.0, 0.0, 1.0)),
            ("brain", 850003, False, (0.1736482, 0.0, 0.9848078)),
            ("shapes", 850004, False, (0.0, 0.0, 1.0)))
GRIDS = {
    "small": dict(mu=(0.001, 0.003, 0.01), iterations=(15,), tv=((0.0, 1),
                  (1e-4, 2), (3e-4, 2), (1e-3, 2))),
    "full": dict(mu=(0.0003, 0.001, 0.003), iterations=(15,),
                 tv=((0.0, 1), (3e-5, 2), (1e-4, 2), (3e-4, 2))),
    "fine": dict(mu=(0.0001, 0.0003), iterations=(15,), tv=((1e-4, 2), (1e-4, 3))),
}


def _scores(chi, truth, mask):
  from qsmgan_tf import metrics  # pylint: disable=import-outside-toplevel
  out = metrics.evaluate(chi, truth, mask)
  return {"nrmse": round(out["nrmse"], 2), "hfen": round(out["hfen"], 2)}


def main(argv):
  del argv
  from data_prep import simulate  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import classical  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import exporting  # pylint: disable=import-outside-toplevel

  backend = inference.load_backend(_MODEL.value)
  grid = GRIDS[_GRID.value]
  settings = [dict(mu=mu, iterations=it, tv_weight=tv, reweights=rw)
              for mu, it, (tv, rw) in itertools.product(grid["mu"], grid["iterations"],
                                                        grid["tv"])]
  priors = ["network"]
  if _ABLATE.value:
    settings = [exporting.parse_refine(_ABLATE.value)]
    priors = ["network", "zero", "tkd"]
  results = {i: [] for i in range(len(settings))}
  seconds = {i: [] for i in range(len(settings))}
  for kind, seed, lesions, b0 in PHANTOMS:
    sub = simulate.simulate_subject(kind, seed, b0_dir=b0, snr=100.0, lesions=lesions)
    mask = sub.mask
    net, _ = inference.reconstruct_qsmgan(sub.field_ppm, mask, sub.voxel_size_mm, sub.b0_dir,
                                          backend=backend, refine="none", progress=False)
    base = {"phantom": f"{kind}-{seed}", "shape": list(mask.shape),
            "b0_dir": [round(float(v), 4) for v in sub.b0_dir]}
    print(json.dumps({**base, "setting": "network alone",
                      **_scores(net, sub.chi_ppm, mask)}), flush=True)
    maps = {"network": net}
    if "zero" in priors:
      maps["zero"] = np.zeros_like(net)
    if "tkd" in priors:
      maps["tkd"] = classical.reconstruct("tkd", sub.field_ppm, mask, sub.voxel_size_mm,
                                          sub.b0_dir)
    for prior_name, (i, setting) in itertools.product(priors, enumerate(settings)):
      t0 = time.perf_counter()
      chi = inference.run_refine_tf(maps[prior_name], sub.field_ppm, mask, sub.b0_dir,
                                    sub.voxel_size_mm, {**refine.DEFAULTS, **setting})
      dt = time.perf_counter() - t0
      scores = _scores(chi, sub.chi_ppm, mask)
      if prior_name == "network":
        results[i].append(scores["nrmse"])
        if kind == "brain":
          seconds[i].append(dt)
      print(json.dumps({**base, "prior": prior_name, "setting": setting, **scores,
                        "seconds": round(dt, 2)}), flush=True)
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
