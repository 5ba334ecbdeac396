r"""Prediction time vs the refinement's FFT margins, side by side in one process.

  mkdir -p runs/speed && python -m data_prep.make_phantom --kind=brain --seed=900106 \
      --shape=160,192,160 --out_dir=runs/speed
  python benchmarks/refine_margin_speed.py [runs/speed/brain-900106 [<model>]]

Runs `inference.reconstruct_qsmgan` with the newest shipped model (or ``<model>``) and its
contract's refinement (one call of the in-graph ``predict_volume``), then with the network
signature and the traced refinement at: the contract without the edge refresh, without the
fitted field offset, one grid with margin 12 (3 steps, version 2's refinement), and margin 12
with each step's residual on the margin-48 grid (4 steps), twice each, and prints one JSON
line per call with its timings. The second round is warm (no tracing).
"""
import json
import sys
import time

from qsmgan_tf import inference
from qsmgan_tf import nifti_io


def main(subject: str, model: str | None = None) -> None:
  field, _ = nifti_io.load_field(f"{subject}/field.nii.gz")
  mask = nifti_io.load_mask(f"{subject}/mask.nii.gz", field.shape)
  backend = inference.load_backend(model)
  one_grid = {"residual_margin": 0, "reweights": 3}
  settings = ({}, {"edge_refresh": 0}, {"fit_offset": 0}, {**one_grid, "margin": 12},
              {"margin": 12, "residual_margin": 48, "reweights": 4})
  for setting in settings * 2:
    t0 = time.perf_counter()
    _, info = inference.reconstruct_qsmgan(field, mask, backend=backend, progress=False,
                                           **{f"refine_{k}": v for k, v in setting.items()})
    params = {k: info["refine"][k] for k in ("margin", "residual_margin", "reweights",
                                             "iterations", "edge_refresh", "fit_offset")}
    print(json.dumps({**params, "in_graph": info["refine"]["in_graph"],
                      "seconds": round(time.perf_counter() - t0, 2),
                      "timings": info.get("seconds")}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/speed/brain-900106",
       sys.argv[2] if len(sys.argv) > 2 else None)
