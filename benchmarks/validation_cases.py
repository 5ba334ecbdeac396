"""The simulated validation cases: `data_prep.make_phantom` arguments per case name.

Seeds >= 900000, never used by a training set (dataset seeds derive subject seeds below that).
Shared by `validate_model.py` (the model card's table) and `prior_level.py`.
"""

import os
import subprocess
import sys

SIN20, COS20 = 0.3420201, 0.9396926
CASES = {
    "healthy": ["--kind=brain", "--seed=900101"],
    "lesions": ["--kind=brain", "--seed=900102", "--lesions"],
    "oblique20": ["--kind=brain", "--seed=900103", f"--b0_dir={SIN20},0,{COS20}"],
    "shapes": ["--kind=shapes", "--seed=900104"],
    "aniso_1x1x2": ["--kind=brain", "--seed=900105", "--voxel_size_mm=1,1,2"],
}


def ensure_phantom(work_dir: str, case: str) -> str:
  """``<work_dir>/phantoms/<case>``, written by `data_prep.make_phantom` when missing."""
  phantoms = os.path.join(work_dir, "phantoms")
  subject = os.path.join(phantoms, case)
  if not os.path.isdir(subject):
    os.makedirs(phantoms, exist_ok=True)
    args = ["data_prep.make_phantom", f"--out_dir={phantoms}", f"--subject_id={case}"] + CASES[case]
    proc = subprocess.run([sys.executable, "-m"] + args, check=False)
    if proc.returncode:
      raise SystemExit(f"failed ({proc.returncode}): python -m {' '.join(args)}")
  return subject
