r"""How much the refined map depends on the network's uniform level (`refine` ``fit_level``).

  python benchmarks/prior_level.py --model=saved_models/qsmgan/8 [--cases=healthy,shapes] \
      [--shifts_ppm=-0.05,0,0.05] [--work_dir=runs/validation]

Simulated only. For each validation case (`benchmarks/validate_model.py`'s phantoms; made in
``<work_dir>/phantoms`` when missing), the model's network map is computed once; then the
model's own refinement (its contract) runs from that map shifted by each of ``--shifts_ppm``
over the mask, with ``fit_level`` 0, 1 and 2 (`refine`: 1 = the data term does not see the
level, 2 = nor the L1 term). A shift is a change of the network's uniform level only, which
the demeaned NRMSE does not see: a refinement that does not depend on it gives the same NRMSE
in every column. Prints one JSON
line per case, shift and setting (NRMSE %, demeaned over the mask as QSM-CI) and a markdown
table.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qsmgan_tf import cli  # pylint: disable=wrong-import-position
from qsmgan_tf import metrics  # pylint: disable=wrong-import-position
from qsmgan_tf import nifti_io  # pylint: disable=wrong-import-position
from qsmgan_tf.errors import InputError  # pylint: disable=wrong-import-position
from validation_cases import CASES, ensure_phantom  # pylint: disable=wrong-import-position

_MODEL = flags.DEFINE_string("model", None, "QSMGAN SavedModel version folder (default: the "
                             "newest shipped one).")
_CASES = flags.DEFINE_list("cases", ["healthy", "shapes"], "Validation cases "
                           "(benchmarks/validation_cases.py).")
_SHIFTS = flags.DEFINE_list("shifts_ppm", ["-0.05", "0", "0.05"], "Shifts of the network's "
                            "map over the mask, ppm.")
_WORK_DIR = flags.DEFINE_string("work_dir", "runs/validation", "Where the validation phantoms "
                                "are (or are made).")


def _subject(case: str):
  folder = ensure_phantom(_WORK_DIR.value, case)
  with open(os.path.join(folder, "subject.json"), encoding="utf-8") as f:
    meta = json.load(f)
  volumes = {name: nifti_io.load_volume(os.path.join(folder, f"{name}.nii.gz"), name)[0]
             for name in ("field", "mask", "chi")}
  return volumes, meta["voxel_size_mm"], meta["b0_dir"]


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = sorted(set(_CASES.value) - set(CASES))
  if unknown:
    raise InputError(f"unknown cases {unknown}; expected some of {list(CASES)}")
  try:
    shifts = [float(s) for s in _SHIFTS.value]
  except ValueError:
    raise InputError(f"--shifts_ppm must be numbers, got {','.join(_SHIFTS.value)}") from None
  # TensorFlow only once the flags are known to be good.
  from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel
  backend = inference.load_backend(_MODEL.value)
  rows = []
  for case in _CASES.value:
    volumes, voxel, b0 = _subject(case)
    mask = volumes["mask"] > 0
    chi_net, _ = inference.reconstruct_qsmgan(volumes["field"], mask, voxel, b0, refine="none",
                                              backend=backend, progress=False)
    for level in (0, 1, 2):
      params = refine.resolve_params(backend.contract, fit_level=level)
      for shift in shifts:
        start = np.where(mask, chi_net + np.float32(shift), 0.0)
        chi = inference.run_refine_tf(start, volumes["field"], mask, voxel, b0, params)
        row = {"case": case, "fit_level": level, "shift_ppm": shift,
               "nrmse": round(metrics.evaluate(chi, volumes["chi"], mask)["nrmse"], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
  print("\n| case | fit_level | " + " | ".join(f"shift {s:+g} ppm" for s in shifts) + " |")
  print("|---|---|" + "---:|" * len(shifts))
  for case in _CASES.value:
    for level in (0, 1, 2):
      values = [r["nrmse"] for r in rows if r["case"] == case and r["fit_level"] == level]
      print(f"| {case} | {level} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
  app.run(main)
