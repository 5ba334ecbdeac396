r"""How much fine structure the simulated brains have, beside a measured map.

  python benchmarks/phantom_spectrum.py [--seeds=850001,850002,850003] [--data_dir=...]

For each seed, the brain phantom at 1 mm with ``detail='none'`` (the default) and
``detail='fine'`` (`data_prep.phantoms.brain_phantom`): `metrics.fine_energy_fraction` of its chi
(the share of energy above 0.2 cycles/mm, demeaned over the mask), side by side with the ratio,
and the build time of each. When the 2016 challenge subject is beside the repository
(``../shared/real/qsm2016``, not distributed), the same number for its COSMOS map is printed as
a reference: it is a validation subject, so it is reported, never fitted (the fine detail's
levels come from anatomy, `data_prep.phantoms._fine_detail`). COSMOS's fine energy also holds
its own noise, so it is an upper bound on the anatomy's.

Prints one JSON line per seed and one for the reference.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import phantoms  # pylint: disable=wrong-import-position
from qsmgan_tf import cli  # pylint: disable=wrong-import-position
from qsmgan_tf import metrics  # pylint: disable=wrong-import-position
from qsmgan_tf import nifti_io  # pylint: disable=wrong-import-position
from qsmgan_tf.errors import InputError  # pylint: disable=wrong-import-position

_SEEDS = flags.DEFINE_list("seeds", ["850001", "850002", "850003"], "Brain phantom seeds.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with mask.nii.gz and chi_cosmos.nii.gz "
                                "(default: ../shared/real/qsm2016 beside the repository).")


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise InputError(f"--seeds must be integers, got {','.join(_SEEDS.value)}") from None
  for seed in seeds:
    row = {"seed": seed}
    for detail in phantoms.DETAIL_MODES:
      t0 = time.perf_counter()
      phantom = phantoms.brain_phantom(seed, detail=detail)
      row[f"seconds_{detail}"] = round(time.perf_counter() - t0, 2)
      row[f"fine_energy_{detail}"] = round(metrics.fine_energy_fraction(
          phantom.chi_ppm, phantom.mask, phantom.voxel_size_mm), 4)
    row["ratio"] = round(row["fine_energy_fine"] / row["fine_energy_none"], 3)
    print(json.dumps(row), flush=True)
  folder = pathlib.Path(_DATA_DIR.value) if _DATA_DIR.value else (
      pathlib.Path(__file__).resolve().parents[1].parent / "shared/real/qsm2016")
  if (folder / "chi_cosmos.nii.gz").is_file() and (folder / "mask.nii.gz").is_file():
    chi, image = nifti_io.load_volume(str(folder / "chi_cosmos.nii.gz"))
    mask, _ = nifti_io.load_volume(str(folder / "mask.nii.gz"))
    vox = tuple(float(v) for v in image.header.get_zooms()[:3])
    print(json.dumps({"reference": "2016 challenge COSMOS (validation, not fitted)",
                      "fine_energy": round(metrics.fine_energy_fraction(chi, mask > 0, vox), 4)}))
  else:
    print(json.dumps({"reference": None, "reason": f"{folder} is not there"}))


if __name__ == "__main__":
  app.run(main)
