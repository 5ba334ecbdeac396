r"""Writes one simulated subject in the real-subject folder layout (`data_prep.subjects`).

The folder ``<out_dir>/<subject_id>`` (default id ``<kind>-<seed:05d>``) appears whole or not at
all; the predict and evaluate CLIs read it like a real subject.

Example:
  python -m data_prep.make_phantom --kind=brain --seed=7 --out_dir=/tmp/val --lesions \
      --b0_dir=0.2,0,1 --voxel_size_mm=1,1,2 --snr=100 --target=cosmos
  python -m data_prep.make_phantom --kind=brain --seed=8 --out_dir=/tmp/val --snr=40 \
      --model_errors=realistic --detail=fine
"""

from __future__ import annotations

from absl import app
from absl import flags

from data_prep import simulate
from qsmgan_tf import cli
from qsmgan_tf.errors import InputError

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
_MODEL_ERRORS = flags.DEFINE_enum(
    "model_errors", "none", ["none", "realistic"],
    "Departures from the dipole model (data_prep.model_errors.ModelErrors): none, or realistic "
    "levels drawn from --seed (correlated noise, background residuals, WM anisotropy, mask error).")
_DETAIL = flags.DEFINE_enum(
    "detail", "none", ["none", "fine"],
    "Brains' fine anatomy: none, or fine (thin veins, a 1.2 mm texture and folded tissue borders "
    "from a stream of their own; data_prep.phantoms.brain_phantom).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing subject folder.")


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
  simulate.write_phantom(_KIND.value, _SEED.value, _OUT_DIR.value, subject_id=_SUBJECT_ID.value,
               lesions=_LESIONS.value, b0_dir=_B0_DIR.value, voxel_size_mm=_VOXEL_SIZE.value,
               shape=_SHAPE.value, snr=_SNR.value, background_order=_BACKGROUND_ORDER.value,
               target=_TARGET.value, overwrite=_OVERWRITE.value,
               model_errors=_MODEL_ERRORS.value, detail=_DETAIL.value)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["seed", "out_dir"])
  app.run(main)
