r"""The field amplitude the network was trained at, and what a field off it costs the network.

  python benchmarks/field_amplitude.py [--model=saved_models/qsmgan/8] [--scales=0.5,1,2,3] \
      [--phantoms=brain-850001] [--reference_std_ppm=...]

1. The reference: the robust std (`inference.robust_std`, 1.4826 x MAD) of the field inside
   the mask of every tuning phantom (`tuning_phantoms.PHANTOMS` and ``EXTENDED``, SNR 100, no
   model errors; the same phantoms with ``--realistic`` errors for comparison). The median over
   the brains is the ``field_reference_std_ppm`` a model can record in its contract
   (``python -m qsmgan_tf.export --field_reference_std_ppm=...``): the amplitude of the
   simulator's brains, which the training sets draw from with chi scaled by 0.8-1.25.
2. The network alone (the model's generator, `inference.make_network_volume_fn`) on the fields
   of ``--phantoms`` multiplied by each of ``--scales``: the dipole inversion is linear, so an
   exact inverse gives the same map times the scale. For each scale, without amplitude
   scaling and with it (the reference of step 1, or ``--reference_std_ppm``): the regression
   slope of the output / scale against the true chi, the correlation and NRMSE % (demeaned,
   inside the mask).

Prints one JSON line per phantom (step 1), one summary line, then one line per phantom, scale
and setting (step 2). Simulated only; about a minute on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app
from absl import flags

import tuning_phantoms  # benchmarks/ is the script's folder, so on sys.path

_MODEL = flags.DEFINE_string("model", None, "SavedModel version folder (default: the newest "
                              "under saved_models/qsmgan).")
_SCALES = flags.DEFINE_list("scales", ["0.5", "1", "2", "3"], "Field multipliers of step 2.")
_PHANTOMS = flags.DEFINE_list("phantoms", ["brain-850001"], "Tuning phantoms of step 2.")
_REFERENCE = flags.DEFINE_float("reference_std_ppm", None, "Reference of step 2 (default: the "
                                "median over the tuning brains of step 1).")


def _row(chi, truth, mask, scale):
  """Slope, correlation and NRMSE % of ``chi / scale`` against the truth (both demeaned)."""
  from qsmgan_tf import metrics  # pylint: disable=import-outside-toplevel
  chi = chi / np.float32(scale)
  scores = metrics.evaluate(chi, truth, mask)
  return {"slope": round(metrics.contrast_slope(chi, truth, mask), 4),
          "corr": round(scores["correlation"], 4), "nrmse": round(scores["nrmse"], 2)}


def main(argv):
  del argv
  from qsmgan_tf import exporting  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel

  stds = {}
  for realistic in (False, True):
    for name, sub in tuning_phantoms.subjects(extended=True, realistic=realistic):
      std = inference.robust_std(sub.field_ppm[sub.mask])
      print(json.dumps({"phantom": name, "realistic": realistic,
                        "robust_std_ppm": round(std, 6),
                        "std_ppm": round(float(sub.field_ppm[sub.mask].std()), 6)}), flush=True)
      if not realistic and name.startswith("brain"):
        stds[name] = std
  reference = float(np.median(list(stds.values())))
  print(json.dumps({"summary": "field_reference_std_ppm", "median_of_clean_brains": round(
      reference, 6), "brains": len(stds)}), flush=True)
  if _REFERENCE.value is not None:
    reference = float(_REFERENCE.value)

  generator, contract = exporting.generator_from_saved_model(
      _MODEL.value or inference.default_model_path())
  settings = {}
  for label, value in (("as given", 0.0), ("amplitude-scaled", reference)):
    settings[label] = inference.make_network_volume_fn(
        generator, {**contract, "inference": {**inference.tiling_params(contract),
                                              "field_reference_std_ppm": value}})
  for name, sub in tuning_phantoms.subjects(extended=True, only=set(_PHANTOMS.value)):
    mask = sub.mask
    for scale in (float(s) for s in _SCALES.value):
      for label, fn in settings.items():
        chi = fn(field_ppm=(sub.field_ppm * np.float32(scale)).astype(np.float32),
                 mask=mask.astype(np.float32))["chi_ppm"].numpy()
        print(json.dumps({"phantom": name, "scale": scale, "setting": label,
                          "reference_std_ppm": round(reference, 6) if label != "as given"
                          else 0.0, **_row(chi, sub.chi_ppm, mask, scale)}), flush=True)


if __name__ == "__main__":
  app.run(main)
