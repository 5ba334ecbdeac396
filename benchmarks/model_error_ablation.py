r"""Which model error breaks the refinement: each realistic tuning phantom with its errors one at a time.

  python benchmarks/model_error_ablation.py [--model=saved_models/qsmgan/8] \
      [--phantoms=brain-850001,brain-850002] [--setting=key=value,...]

For every tuning phantom (`tuning_phantoms.PHANTOMS` and ``EXTENDED``, or those named in
``--phantoms``) the realistic set's levels (`model_errors.realistic_model_errors(seed, 1)`) and
SNR are drawn as `tuning_phantoms.subjects(realistic=True)` draws them, then the subject is
simulated seven times at that SNR: with every error ("all"), with none ("none"), and with each
error group alone ("corr": correlated noise, "edge": edge background, "smooth": polynomial
background, "aniso": white-matter anisotropy, "mask": the mask a few voxels off). Each variant
is reconstructed by the network alone and refined by the model's own contract and by every
``--setting`` (`exporting.parse_refine` syntax, over the contract's). Prints one JSON line per
phantom (its levels) and one per variant: NRMSE % of the network and of each refinement, and
the field-noise estimate (`refine.field_noise_ppm`). Simulated only; about a minute a variant on
2 cores.
"""

from __future__ import annotations

import dataclasses
import json

from absl import app
from absl import flags

import tuning_phantoms  # benchmarks/ is the script's folder, so on sys.path

_MODEL = flags.DEFINE_string("model", None, "SavedModel version folder (default: the newest "
                              "under saved_models/qsmgan).")
_PHANTOMS = flags.DEFINE_list("phantoms", None, "Tuning phantoms to run (default: all six).")
_SETTINGS = flags.DEFINE_multi_string("setting", [], "Refinement setting (key=value,...) to "
                                      "compare with the contract's; repeatable.")

# The error groups `ModelErrors` switches on one at a time: its fields that belong to each.
GROUPS = {"corr": ("correlated_noise_ppm", "noise_correlation_mm"),
          "edge": ("edge_background_ppm",), "smooth": ("smooth_background_ppm",),
          "aniso": ("anisotropy_ppm",), "mask": ("mask_error_vox",)}


def variants(errors) -> dict:
  """``{name: ModelErrors or None}``: all of ``errors``, none, and each group of `GROUPS` alone."""
  off = {name: 0 if name == "mask_error_vox" else 0.0
         for keys in GROUPS.values() for name in keys}
  out = {"all": errors, "none": None}
  for group, keys in GROUPS.items():
    out[group] = dataclasses.replace(errors, **{k: v for k, v in off.items() if k not in keys})
  return out


def main(argv):
  del argv
  from data_prep import model_errors  # pylint: disable=import-outside-toplevel
  from data_prep import simulate  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import exporting  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel

  backend = inference.load_backend(_MODEL.value)
  contract = refine.resolve_params(backend.contract)
  settings = {"contract": contract}
  for text in _SETTINGS.value:
    settings[text] = {**contract, **exporting.parse_refine(text)}
  only = set(_PHANTOMS.value) if _PHANTOMS.value else None
  for kind, seed, lesions, b0, voxel in tuning_phantoms.PHANTOMS + tuning_phantoms.EXTENDED:
    name = f"{kind}-{seed}"
    if only is not None and name not in only:
      continue
    errors = model_errors.realistic_model_errors(seed, 1.0)
    snr = tuning_phantoms.realistic_snr(seed)
    print(json.dumps({"phantom": name, "snr": round(snr, 1), "errors": errors.to_json()}),
          flush=True)
    for variant, errs in variants(errors).items():
      sub = simulate.simulate_subject(kind, seed, voxel_size_mm=voxel, b0_dir=b0, snr=snr,
                                      lesions=lesions, model_errors=errs)
      net, _ = inference.reconstruct_qsmgan(sub.field_ppm, sub.mask, sub.voxel_size_mm,
                                            sub.b0_dir, backend=backend, refine="none",
                                            progress=False)
      row = {"phantom": name, "variant": variant,
             "field_noise_ppm": round(refine.field_noise_ppm(sub.field_ppm, sub.mask), 5),
             "network": tuning_phantoms.scores(net, sub.chi_ppm, sub.mask)["nrmse"]}
      for label, params in settings.items():
        chi = inference.run_refine_tf(net, sub.field_ppm, sub.mask, sub.voxel_size_mm,
                                      sub.b0_dir, params)
        row[label] = tuning_phantoms.scores(chi, sub.chi_ppm, sub.mask)["nrmse"]
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
