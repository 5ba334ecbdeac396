r"""Exports a trained generator as a versioned SavedModel for TF Serving.

  python -m qsmgan_tf.export --model_dir=runs/cpu_small --export_base=saved_models/qsmgan \
      [--version=3] [--which=best|final] [--refine=mu=0.001,tv_weight=3e-4,reweights=2]
  python -m qsmgan_tf.export --from_model=saved_models/qsmgan/8 --export_base=saved_models/qsmgan \
      --refine=lcurve_stages=0 --version=6

The second form exports an already exported model's generator again with new refinement
parameters (no retraining; the rest of its contract is kept).

The layout, the signatures and the contract are described in `qsmgan_tf.exporting`, the library
this binary calls (and that training, inference and tests import).
"""

from __future__ import annotations

from absl import app
from absl import flags

from qsmgan_tf import cli
from qsmgan_tf import exporting
from qsmgan_tf.errors import InputError

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Training output folder (contract.json, "
                                 "generator_best.keras, generator_final.keras).")
_FROM_MODEL = flags.DEFINE_string("from_model", None, "Instead of --model_dir: an exported "
                                  "SavedModel (version folder or model base path) whose "
                                  "generator and contract are exported again with --refine.")
_EXPORT_BASE = flags.DEFINE_string("export_base", None, "Model base path TF Serving polls; the "
                                   "SavedModel goes to <export_base>/<version>/.")
_VERSION = flags.DEFINE_integer("version", None, "Integer version (>= 1); default: newest "
                                "existing version + 1 (1 for an empty base).", lower_bound=1)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "final"], "Which generator to export: "
                           "best validation NRMSE or the last epoch.")


_REFINE = flags.DEFINE_string("refine", None, "Refinement parameters recorded in the contract "
                              "(key=value,...; keys of qsmgan_tf.refine.DEFAULTS), e.g. chosen "
                              "by benchmarks/tune_refine.py; unset keys keep the defaults.")


_FIELD_REFERENCE = flags.DEFINE_float(
    "field_reference_std_ppm", None, "Field amplitude (robust std inside the mask, ppm) the "
    "network runs at: each field is scaled to it and the network's output scaled back "
    "(recorded in the contract's 'inference'); 0 = off; unset keeps the source's "
    "(benchmarks/field_amplitude.py measures it on the tuning phantoms).")


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
  if (_MODEL_DIR.value is None) == (_FROM_MODEL.value is None):
    raise InputError("give exactly one of --model_dir (a training folder) and --from_model "
                     "(an exported SavedModel)")
  refine_params = exporting.parse_refine(_REFINE.value)
  inference_params = ({} if _FIELD_REFERENCE.value is None
                      else {"field_reference_std_ppm": _FIELD_REFERENCE.value})
  if _FROM_MODEL.value:
    path = exporting.reexport_model(_FROM_MODEL.value, _EXPORT_BASE.value, _VERSION.value,
                                    refine_params, inference_params)
  else:
    path = exporting.export_model(_MODEL_DIR.value, _EXPORT_BASE.value, _VERSION.value,
                                  _WHICH.value, refine_params=refine_params,
                                  inference_params=inference_params)
  print(path)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["export_base"])
  app.run(main)
