r"""How much of a small FFT grid's model error is a constant field offset (`refine` fit_offset).

  python benchmarks/field_offset.py [--phantoms=brain-850001,brain-850006] [--margins=12,24,48,96]

For tuning phantoms (`tuning_phantoms.py`, simulated on demand) it computes the field of the
TRUE chi on the grids the refinement uses (the mask's bounding box padded by ``margin`` voxels a
side, rounded up to a fast FFT size) and compares it inside the mask with the simulation's
field (2x zero padding of the whole field of view, `physics.forward_field`). Per margin, one
JSON line with the error relative to the field's RMS over the mask: ``rms``, its in-mask mean
``offset`` and what is left after removing that mean, ``demeaned``, for the margin counted in
voxels on every axis (what `refine` does) and in mm (``margin / voxel size`` voxels per axis,
so the periodic cell is closer to cubic in mm on an anisotropic grid). Numbers only; nothing is
timed. Takes about a minute.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app
from absl import flags

import tuning_phantoms  # benchmarks/ is the script's folder, so on sys.path

_PHANTOMS = flags.DEFINE_list("phantoms", ["brain-850001", "brain-850006"],
                              "Tuning phantoms by name (tuning_phantoms.py, extended set).")
_MARGINS = flags.DEFINE_list("margins", ["12", "24", "48", "96"],
                             "Margins a side, in voxels and (second line each) in mm.")


def offset_errors(chi_ppm, field_ppm, mask, voxel_size_mm, b0_dir, margins):
  """Relative in-mask error of the field of ``chi_ppm`` on its mask's box padded by ``margins``
  (voxels a side, one per axis, then a fast FFT size) against ``field_ppm``:
  ``{"rms", "offset", "demeaned", "cell_mm"}``, the first three as fractions of the field's RMS
  over the mask."""
  from qsmgan_tf import physics  # pylint: disable=import-outside-toplevel
  box = physics.bounding_box(mask)
  inside = mask[box]
  chi = chi_ppm[box] * inside
  small = physics.forward_field(chi, voxel_size_mm, b0_dir, pad_factor=1.0, margin=margins)
  grid = physics.fft_shape(chi.shape, 1.0, margins)
  error = (small - field_ppm[box])[inside].astype(np.float64)
  scale = float(np.sqrt(np.mean(np.square(field_ppm[box][inside], dtype=np.float64))))
  return {"rms": float(np.sqrt(np.mean(error ** 2))) / scale,
          "offset": float(error.mean()) / scale, "demeaned": float(error.std()) / scale,
          "cell_mm": [round(g * v, 1) for g, v in zip(grid, voxel_size_mm)]}


def main(argv):
  del argv
  from qsmgan_tf import physics  # pylint: disable=import-outside-toplevel
  for name, sub in tuning_phantoms.subjects(extended=True, only=set(_PHANTOMS.value)):
    # The simulation's clean field (no noise): the model error alone.
    clean = physics.forward_field(sub.chi_ppm, sub.voxel_size_mm, sub.b0_dir) * sub.mask
    for margin in (int(m) for m in _MARGINS.value):
      for unit in ("voxels", "mm"):
        margins = ([margin] * 3 if unit == "voxels"
                   else [int(round(margin / v)) for v in sub.voxel_size_mm])
        errors = offset_errors(sub.chi_ppm, clean, sub.mask, sub.voxel_size_mm, sub.b0_dir,
                               margins)
        print(json.dumps({"phantom": name, "voxel_size_mm": list(sub.voxel_size_mm),
                          "margin": margin, "unit": unit, "cell_mm": errors.pop("cell_mm"),
                          **{k: round(v, 4) for k, v in errors.items()}}), flush=True)


if __name__ == "__main__":
  app.run(main)
