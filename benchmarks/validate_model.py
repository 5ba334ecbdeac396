r"""The shipped model's validation table: five unseen phantoms, every method, one run per case.

  python benchmarks/validate_model.py --model=saved_models/qsmgan/8 \
      --unet_model=RUN_PRETRAIN/generator_final.keras --work_dir=runs/validation

For each case (seeds >= 900000, never used by a training set: dataset seeds derive subject
seeds below that), `data_prep.make_phantom` writes the subject once, then ONE
`python -m qsmgan_tf.evaluate` run scores every method on it: qsmgan refined (the default; with
the phantom's magnitude, which the refinement uses if the model's contract says so), the same
without the magnitude (``use_magnitude=false``: field, mask and B0 only), qsmgan without
refinement, the stage-1 U-Net alone (``--unet_model``) and TKD, closed-form L2,
iLSQR, MEDI and TV at their documented defaults. A second qsmgan row switches the refinement's L1
edge prior off (the quadratic data-consistency solve alone) to show what that term adds. Prints one JSON line per case and method
(machine-readable) and writes ``<work_dir>/validation.md``: the per-case tables plus, per case,
qsmgan's NRMSE as a ratio of the best classical method's (the model card's goal is <= 0.85).

Cases: a healthy brain; a brain with microbleeds and a calcification; an oblique B0 (20 deg
from the voxel z axis); an anatomy-free shape phantom; a 1x1x2 mm acquisition.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from validation_cases import CASES, ensure_phantom  # the script's folder is on sys.path

_MODEL = flags.DEFINE_string("model", None, "QSMGAN SavedModel version folder (default: the "
                             "newest under saved_models/qsmgan).")
_UNET = flags.DEFINE_string("unet_model", None, "Stage-1 (pretrained U-Net) model for the "
                            "'U-Net alone' row; omitted when not given.")
_EXTRA = flags.DEFINE_list("extra", [], "More method specs to score, e.g. "
                           "'qsmgan:model=RUN/generator_best.keras:label=no lesions'.")
_WORK_DIR = flags.DEFINE_string("work_dir", "runs/validation", "Phantoms and reports go here.")
_CASES = flags.DEFINE_list("cases", None, "Subset of cases (default: all).")
_CLASSICAL = flags.DEFINE_list("classical", ["tkd", "cfl2", "ilsqr", "medi", "tv"],
                               "Classical methods to compare.")

CLASSICAL_LABELS = {"tkd": "TKD", "cfl2": "L2 (closed form)", "ilsqr": "iLSQR", "medi": "MEDI",
                    "tv": "TV"}


def _run(args: list[str]) -> None:
  proc = subprocess.run([sys.executable, "-m"] + args, check=False)
  if proc.returncode:
    raise SystemExit(f"failed ({proc.returncode}): python -m {' '.join(args)}")


def method_specs() -> list[str]:
  specs = ["qsmgan:label=qsmgan refined",
           "qsmgan:use_magnitude=false:label=qsmgan refined, field only",
           "qsmgan:refine_tv_weight=0:label=qsmgan, quadratic refinement only",
           "qsmgan:refine=none:label=qsmgan (no refinement)"]
  if _UNET.value:
    specs.append(f"qsmgan:model={_UNET.value}:refine=none:label=U-Net stage 1 alone")
  specs += list(_EXTRA.value)
  specs += [f"{m}:label={CLASSICAL_LABELS.get(m, m)}" for m in _CLASSICAL.value]
  return specs


def main(argv):
  del argv
  cases = _CASES.value or list(CASES)
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    raise SystemExit(f"unknown cases {unknown}; expected some of {list(CASES)}")
  sections = []
  for case in cases:
    subject = ensure_phantom(_WORK_DIR.value, case)
    report = os.path.join(_WORK_DIR.value, "reports", case)
    args = ["qsmgan_tf.evaluate", f"--field={subject}/field.nii.gz",
            f"--mask={subject}/mask.nii.gz", f"--truth={subject}/chi.nii.gz",
            f"--methods={','.join(method_specs())}", f"--out_dir={report}", "--quiet"]
    for name, flag in (("seg.nii.gz", "seg"), ("magnitude.nii.gz", "magnitude")):
      if os.path.exists(os.path.join(subject, name)):
        args.append(f"--{flag}={subject}/{name}")
    if _MODEL.value:
      args.append(f"--model={_MODEL.value}")
    start = time.time()
    _run(args)
    with open(os.path.join(report, "results.json"), encoding="utf-8") as f:
      results = json.load(f)
    rows = results["methods"]
    classical = [r for r in rows if r["method"] != "qsmgan"]
    best = min(classical, key=lambda r: r["metrics"]["nrmse"]) if classical else None
    for r in rows:
      print(json.dumps({"case": case, "label": r["label"], "metrics": r["metrics"],
                        "seconds": r["seconds"]}), flush=True)
    with open(os.path.join(report, "results.md"), encoding="utf-8") as f:
      table = f.read().strip()
    lines = [f"### {case} ({' '.join(CASES[case])})", "", table, ""]
    if best is not None:
      for r in rows:
        if r["method"] == "qsmgan":
          ratio = r["metrics"]["nrmse"] / best["metrics"]["nrmse"]
          lines.append(f"- {r['label']}: NRMSE {ratio:.2f} x the best classical "
                       f"({best['label']}, {best['metrics']['nrmse']:.2f} %)")
    lines.append(f"- wall time of the evaluate run: {time.time() - start:.0f} s")
    sections.append("\n".join(lines) + "\n")
  out = os.path.join(_WORK_DIR.value, "validation.md")
  with open(out + ".tmp", "w", encoding="utf-8") as f:
    f.write("\n".join(sections))
  os.replace(out + ".tmp", out)
  print(json.dumps({"report": out}))


if __name__ == "__main__":
  app.run(main)
