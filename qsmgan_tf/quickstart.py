r"""The main job end to end on built-in synthetic data: data -> training -> export -> evaluation.

  python -m qsmgan_tf.quickstart --work_dir=runs/quickstart

Each stage is one of the project's own command lines, printed before it runs, so a user can
re-run or change any single step:

  1. ``python -m data_prep.make_tfrecords``: simulated ICBM152 brains (some with microbleeds and
     calcifications) and anatomy-free shape phantoms -> sharded TFRecords (Apache Beam);
  2. ``python -m qsmgan_tf.train``: the ``cpu_small`` preset, L1 pretraining then WGAN-GP;
  3. the SavedModel for TF Serving under ``<work_dir>/saved_models`` (``train --export_base`` on
     the first run; ``python -m qsmgan_tf.export`` when a re-run retrained the model);
  4. ``python -m data_prep.make_phantom``: a validation brain from a seed never used for training;
  5. ``python -m qsmgan_tf.evaluate``: qsmgan (refined and not) against TKD, L2, iLSQR, MEDI and TV
     on that brain: a markdown table on stdout, results.json and figure.png.

Re-running the command reuses what is complete (the dataset, the validation phantom) and resumes
training from its last checkpoint. The run sets ``TF_CPP_MIN_LOG_LEVEL=1`` unless the environment
sets it: TensorFlow's C++ INFO lines that honour it (the CPU-feature notice) are hidden,
warnings and errors shown. The "oneDNN custom operations are on" line is printed before
TensorFlow reads that variable and stays (only ``TF_ENABLE_ONEDNN_OPTS=0`` removes it, and
oneDNN with it). Measured on 2 CPU cores: about 10-12 minutes with the defaults (BUILD.md).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from absl import app
from absl import flags

from qsmgan_tf import cli

_WORK_DIR = flags.DEFINE_string("work_dir", "runs/quickstart", "Folder for everything the run "
                                "writes (dataset, model, export, validation phantom, report).")
_PRESET = flags.DEFINE_enum("preset", "cpu_small", ["paper", "cpu_small", "test_tiny"],
                            "Network preset for training.")
_BRAINS = flags.DEFINE_integer("synthetic_brains", 6, "Simulated brains in the dataset.")
_SHAPES = flags.DEFINE_integer("synthetic_shapes", 3, "Anatomy-free shape phantoms in the dataset.")
_PATCHES = flags.DEFINE_integer("max_patches_per_subject", 96, "Cap on patch pairs per subject.")
_SUBJECT_SHAPE = flags.DEFINE_string("subject_shape", None, "Simulation grid i,j,k of training "
                                     "subjects (default: the phantoms' natural 1 mm grid).")
_TOTAL_STEPS = flags.DEFINE_integer("total_steps", None, "Training steps (default: the preset's).")
_INPUT_PATCH = flags.DEFINE_integer("input_patch", None, "Field patch edge (default: the preset's).")
_OUTPUT_PATCH = flags.DEFINE_integer("output_patch", None, "Target patch edge (default: the "
                                     "preset's).")
_VAL_SHAPE = flags.DEFINE_string("val_shape", "144,176,144", "Grid of the validation phantom.")
_SEED = flags.DEFINE_integer("seed", 0, "Dataset seed (training subjects derive from it).")
_VAL_SEED = flags.DEFINE_integer("val_seed", 900001, "Validation phantom seed: keep it outside "
                                 "the training seeds.")
_METHODS = flags.DEFINE_string("methods", "qsmgan,qsmgan:refine=none,tkd,cfl2,ilsqr,medi,tv",
                               "Methods compared in the final table.")
_QUIET = flags.DEFINE_bool("quiet", False, "Less output from the stages.")


def _preset_patches(preset: str) -> tuple[int, int]:
  """Input/output patch edges of a network preset (imports TF: called after --help)."""
  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel

  config = networks.PRESETS[preset]
  return config.input_patch, config.output_patch


def _run(step: str, args: list[str]) -> None:
  """Runs one stage as a subprocess; a failure ends the quickstart with that stage's status."""
  command = [sys.executable, "-m"] + args
  print(f"\n=== {step}\n$ {shlex.join(command)}", flush=True)
  start = time.time()
  status = subprocess.call(command)
  if status != 0:
    raise SystemExit(cli.fail(f"quickstart step '{step}' failed with status {status}; "
                              "fix the cause and re-run the same command to resume")
                     if status == 2 else status)
  print(f"--- {step}: {time.time() - start:.0f} s", flush=True)


def _newest_version(export_base: str) -> str | None:
  versions = [int(v) for v in os.listdir(export_base) if v.isdigit()] if os.path.isdir(
      export_base) else []
  return os.path.join(export_base, str(max(versions))) if versions else None


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # this process and the stages (docstring)
  work = os.path.abspath(_WORK_DIR.value)
  os.makedirs(work, exist_ok=True)
  data_dir = os.path.join(work, "data")
  model_dir = os.path.join(work, "model")
  export_base = os.path.join(work, "saved_models", "qsmgan")
  val_root = os.path.join(work, "validation")
  report_dir = os.path.join(work, "report")
  quiet = ["--quiet"] if _QUIET.value else []
  started = time.time()

  input_patch, output_patch = _preset_patches(_PRESET.value)
  input_patch = _INPUT_PATCH.value or input_patch
  output_patch = _OUTPUT_PATCH.value or output_patch

  if os.path.exists(os.path.join(data_dir, "manifest.json")):
    print(f"\n=== dataset: reusing {data_dir}")
  else:
    args = ["data_prep.make_tfrecords", f"--out_dir={data_dir}",
            f"--synthetic_brains={_BRAINS.value}", f"--synthetic_shapes={_SHAPES.value}",
            f"--seed={_SEED.value}", "--val_fraction=0.2", "--lesion_fraction=0.5",
            "--snr=50,100,200", "--b0_tilt_deg=0,0,10", "--augment",
            f"--input_patch={input_patch}", f"--output_patch={output_patch}",
            f"--max_patches_per_subject={_PATCHES.value}", "--shards=8", "--val_shards=2"]
    if _SUBJECT_SHAPE.value:
      args.append(f"--subject_shape={_SUBJECT_SHAPE.value}")
    _run("dataset", args)

  train_args = ["qsmgan_tf.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                f"--preset={_PRESET.value}", "--stage=both"] + quiet
  if _TOTAL_STEPS.value:
    train_args.append(f"--total_steps={_TOTAL_STEPS.value}")
  exported_by_training = _newest_version(export_base) is None
  if exported_by_training:
    train_args.append(f"--export_base={export_base}")  # the first run exports as it ends
  _run("training", train_args)

  version = _newest_version(export_base)
  exported_at = os.path.getmtime(version) if version else 0.0
  trained_at = max((os.path.getmtime(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                    if f.endswith(".keras")), default=0.0)
  if version and exported_at >= trained_at:
    how = "written by the training step" if exported_by_training else "reusing"
    print(f"\n=== export: {how}: {version}")
  else:
    _run("export", ["qsmgan_tf.export", f"--model_dir={model_dir}",
                    f"--export_base={export_base}"])
    version = _newest_version(export_base)

  subject_id = f"val-brain-{_VAL_SEED.value}"
  subject = os.path.join(val_root, subject_id)
  if os.path.isdir(subject):
    print(f"\n=== validation phantom: reusing {subject}")
  else:
    os.makedirs(val_root, exist_ok=True)
    _run("validation phantom", ["data_prep.make_phantom", "--kind=brain", "--lesions",
                                f"--seed={_VAL_SEED.value}", f"--out_dir={val_root}",
                                f"--subject_id={subject_id}", f"--shape={_VAL_SHAPE.value}"])

  seg = os.path.join(subject, "seg.nii.gz")
  magnitude = os.path.join(subject, "magnitude.nii.gz")
  eval_args = ["qsmgan_tf.evaluate", f"--field={os.path.join(subject, 'field.nii.gz')}",
               f"--mask={os.path.join(subject, 'mask.nii.gz')}",
               f"--truth={os.path.join(subject, 'chi.nii.gz')}",
               f"--methods={_METHODS.value}", f"--model={version}", f"--out_dir={report_dir}"]
  if os.path.exists(seg):
    eval_args.append(f"--seg={seg}")
  if os.path.exists(magnitude):
    eval_args.append(f"--magnitude={magnitude}")
  _run("evaluation", eval_args + quiet)

  minutes = (time.time() - started) / 60.0
  print(f"\nquickstart finished in {minutes:.1f} min. Everything is under {work}:")
  print(f"  dataset (TFRecords + manifest.json)  {data_dir}")
  print(f"  training run (checkpoints, flags)    {model_dir}")
  print(f"  SavedModel for TF Serving            {version}")
  print(f"  validation phantom (NIfTI)           {subject}")
  print(f"  evaluation table and figure          {report_dir}/results.md, {report_dir}/figure.png")
  print(f"Watch the losses (critic loss, gradient penalty, ...):  "
        f"tensorboard --logdir={os.path.join(model_dir, 'logs')}")
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
