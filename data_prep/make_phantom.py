r"""Writes one simulated subject in the real-subject folder layout (`data_prep.subjects`).

The folder ``<out_dir>/<subject_id>`` (default id ``<kind>-<seed:05d>``) appears whole or not at
all; the predict and evaluate CLIs read it like a real subject.

Example:
  python -m data_prep.make_phantom --kind=brain --seed=7 --out_dir=/tmp/val --lesions \
      --b0_dir=0.2,0,1 --voxel_size_mm=1,1,2 --snr=100 --target=cosmos
"""

from __future__ import annotations

import pathlib

from absl import app
from absl import flags
from absl import logging

from qsmgan_tf import cli
from qsmgan_tf import nifti_io

_KIND = flags.DEFINE_enum("kind", "brain", ["brain", "shapes"],
                          "Phantom: warped ICBM152 brain or anatomy-free shapes.")
_SEED = flags.DEFINE_integer("seed", None, "Phantom and noise seed.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Existing folder to write the subject folder in.")
_SUBJECT_ID = flags.DEFINE_string("subject_id", None, "Folder name (default <kind>-<seed>).")
_LESIONS = flags.DEFINE_bool("lesions", False, "Add microbleeds and a calcification.")
_B0_DIR = flags.DEFINE_string("b0_dir", "0,0,1", "B0 direction x,y,z in the voxel frame.")
_VOXEL_SIZE = flags.DEFINE_string("voxel_size_mm", "1,1,1", "Voxel size x,y,z, mm.")
_SHAPE = flags.DEFINE_string("shape", None, "Grid i,j,k (default: the phantom's natural grid).")
_SNR = flags.DEFINE_float("snr", 100.0, "Mean magnitude over the mask / noise std; 0 = no noise.")
_BACKGROUND_ORDER = flags.DEFINE_integer(
    "background_order", 0, "Degree of a residual background field polynomial (0 = none).")
_TARGET = flags.DEFINE_enum("target", "chi", ["chi", "cosmos"],
                            "chi.nii.gz holds the true chi or a 3-orientation COSMOS.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing subject folder.")


def parse_numbers(text: str, flag: str, cast=float, positive: bool = True) -> tuple:
  """Parses ``a,b,c`` into three numbers; InputError on bad syntax or non-positive values."""
  try:
    values = tuple(cast(v) for v in str(text).replace(" ", "").split(","))
  except ValueError:
    raise nifti_io.InputError(f"--{flag} must be three numbers a,b,c, got {text!r}") from None
  if len(values) != 3 or (positive and not all(v > 0 for v in values)):
    raise nifti_io.InputError(f"--{flag} must be three positive numbers a,b,c, got {text!r}")
  return values


def make_phantom(kind: str, seed: int, out_dir: str, *, subject_id: str | None = None,
                 lesions: bool = False, b0_dir: str = "0,0,1", voxel_size_mm: str = "1,1,1",
                 shape: str | None = None, snr: float = 100.0, background_order: int = 0,
                 target: str = "chi", overwrite: bool = False):
  """Simulates one subject and writes it; returns the folder. Flags as in the module."""
  from data_prep import simulate  # pylint: disable=import-outside-toplevel

  b0 = nifti_io.parse_b0_dir(b0_dir)
  vox = parse_numbers(voxel_size_mm, "voxel_size_mm")
  grid = parse_numbers(shape, "shape", int) if shape else None
  if snr < 0:
    raise nifti_io.InputError(f"--snr must be >= 0 (0 = no noise), got {snr}")
  if background_order < 0:
    raise nifti_io.InputError(f"--background_order must be >= 0, got {background_order}")
  subject = simulate.simulate_subject(
      kind, seed, shape=grid, voxel_size_mm=vox, b0_dir=b0, snr=snr if snr > 0 else None,
      lesions=lesions, background_order=background_order, target=target, subject_id=subject_id)
  folder = simulate.write_subject(subject, pathlib.Path(out_dir) / subject.subject_id, overwrite)
  logging.info("wrote %s (%s, shape %s, voxel %s mm, B0 %s)", folder, kind,
               subject.field_ppm.shape, vox, b0.round(4).tolist())
  return folder


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise nifti_io.InputError(f"unexpected arguments: {' '.join(argv[1:])}")
  make_phantom(_KIND.value, _SEED.value, _OUT_DIR.value, subject_id=_SUBJECT_ID.value,
               lesions=_LESIONS.value, b0_dir=_B0_DIR.value, voxel_size_mm=_VOXEL_SIZE.value,
               shape=_SHAPE.value, snr=_SNR.value, background_order=_BACKGROUND_ORDER.value,
               target=_TARGET.value, overwrite=_OVERWRITE.value)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["seed", "out_dir"])
  app.run(main)
