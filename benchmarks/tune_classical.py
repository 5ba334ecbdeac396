r"""Tunes the classical methods' regularisation on the tuning phantoms, for a solver-fair table.

  python benchmarks/tune_classical.py [--methods=tv,medi]

The model card compares qsmgan (whose refinement parameters `tune_refine.py` chose on these
phantoms) with the classical methods at their documented defaults. This study gives the
classical methods the same chance: each method runs over its grid (`GRIDS`) on the four tuning
phantoms of `tuning_phantoms.py` (seeds 850001-850004, with their magnitude for MEDI), and the
setting with the lowest mean NRMSE wins. Pass it to the validation as an extra spec, e.g.
``validate_model.py --extra='tv:lam=3e-4:label=TV (tuned)'``.

Prints one JSON line per phantom, method and setting (NRMSE and HFEN in %, seconds) and one
``{"best": ...}`` line per method (with its defaults' mean for comparison).
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
from absl import app
from absl import flags

import tuning_phantoms  # benchmarks/ is the script's folder, so on sys.path

_METHODS = flags.DEFINE_list("methods", ["tv", "medi"], "Classical methods to tune (keys of "
                             "GRIDS).")

# Each grid is a product of parameter values; the defaults (classical.DEFAULTS) are in each.
GRIDS = {
    "tkd": {"threshold": (0.1, 0.15, 0.19, 0.25)},
    "cfl2": {"lam": (0.003, 0.01, 0.03, 0.1)},
    "tv": {"lam": (3e-5, 1e-4, 3e-4, 1e-3), "rho_factor": (10.0, 100.0)},
    "medi": {"lam": (300.0, 1000.0, 3000.0, 10000.0)},
}


def settings(method: str) -> list[dict]:
  grid = GRIDS[method]
  return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def main(argv):
  del argv
  from qsmgan_tf import classical  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import reconstruct  # pylint: disable=import-outside-toplevel

  unknown = sorted(set(_METHODS.value) - set(GRIDS))
  if unknown:
    raise SystemExit(f"no grid for {unknown}; expected some of {sorted(GRIDS)}")
  results = {m: {i: [] for i in range(len(settings(m)))} for m in _METHODS.value}
  for name, sub in tuning_phantoms.subjects():
    for method in _METHODS.value:
      for i, setting in enumerate(settings(method)):
        t0 = time.perf_counter()
        chi = classical.reconstruct(method, sub.field_ppm, sub.mask, sub.voxel_size_mm,
                                    sub.b0_dir, magnitude=sub.magnitude, params=setting)
        chi, _ = reconstruct.apply_reference(chi, sub.mask, "mask_mean")  # as evaluate does
        scores = tuning_phantoms.scores(chi, sub.chi_ppm, sub.mask)
        results[method][i].append(scores["nrmse"])
        print(json.dumps({"phantom": name, "method": method, "setting": setting, **scores,
                          "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
  for method in _METHODS.value:
    grid = settings(method)
    means = {i: float(np.mean(v)) for i, v in results[method].items()}
    best = min(means, key=means.get)
    defaults = classical.DEFAULTS[method]
    default_i = next((i for i, s in enumerate(grid)
                      if all(defaults.get(k) == v for k, v in s.items())), None)
    print(json.dumps({"best": {"method": method, "setting": grid[best],
                               "mean_nrmse": round(means[best], 2),
                               "per_phantom": results[method][best],
                               "defaults_mean_nrmse": (None if default_i is None
                                                       else round(means[default_i], 2))}}),
          flush=True)


if __name__ == "__main__":
  app.run(main)
