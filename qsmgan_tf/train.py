r"""Trains QSMGAN: pretraining (L1) then WGAN-GP, resumable, on one or many devices.

  python -m qsmgan_tf.train --data_dir=/data/qsm_train --model_dir=/runs/cpu_small \
      --preset=cpu_small --stage=both --total_steps=1000

Run the same command again to resume after an interruption (at most --checkpoint_every_steps
steps are redone). TensorBoard: ``tensorboard --logdir=<model_dir>/logs``.

Presets (``paper``, ``cpu_small``, ``test_tiny``) choose the network size and default values of
the training flags; flags given explicitly override them. Multi-worker training reads TF_CONFIG
(``--strategy=multi_worker``, or ``auto`` with more than one worker listed).

With ``--export_base=saved_models/qsmgan`` the best generator is exported for TF Serving when
training ends (the next integer version; see ``python -m qsmgan_tf.export``).

Exit status: 0 done, 1 non-finite loss (the last good checkpoint is kept), 2 bad input.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from qsmgan_tf import cli

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFRecord dataset folder (manifest.json, "
                                "'train' and 'val' splits) from data_prep.make_tfrecords.")
_TRAIN_DIR = flags.DEFINE_string("train_dir", None, "Alias of --data_dir.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Output folder: checkpoints, logs, "
                                 "generator_best.keras, generator_final.keras, contract.json.")
_PRESET = flags.DEFINE_enum("preset", "cpu_small", ["paper", "cpu_small", "test_tiny"],
                            "Network size and training defaults.")
_STAGE = flags.DEFINE_enum("stage", "both", ["pretrain", "wgan_gp", "both"],
                           "Training stage(s); 'both' runs pretrain then wgan_gp.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs of --steps_per_epoch steps; sets "
                               "--total_steps when that is not given.")
_STEPS_PER_EPOCH = flags.DEFINE_integer("steps_per_epoch", None, "Steps between validations, "
                                        "slice images and best-model checks.")
_TOTAL_STEPS = flags.DEFINE_integer("total_steps", None, "Generator steps of the whole run "
                                    "(learning rates follow a cosine decay over each stage).")
_GAN_FRACTION = flags.DEFINE_float("gan_fraction", None, "Share of --total_steps spent in "
                                   "WGAN-GP with --stage=both.")
_BATCH = flags.DEFINE_integer("global_batch_size", None, "Patch pairs per step, all replicas.")
_GEN_LR = flags.DEFINE_float("gen_lr", None, "Generator learning rate, pretraining (1e-3).")
_GAN_GEN_LR = flags.DEFINE_float("gan_gen_lr", None, "Generator learning rate, WGAN-GP (1e-4).")
_CRITIC_LR = flags.DEFINE_float("critic_lr", None, "Critic learning rate (1e-4).")
_LAMBDA_GP = flags.DEFINE_float("lambda_gp", None, "Gradient-penalty weight (10).")
_N_CRITIC = flags.DEFINE_integer("n_critic", None, "Critic updates per generator update (5).")
_LAMBDA_ADV = flags.DEFINE_float("lambda_adv", None, "Adversarial weight relative to L1 (1e-2).")
_GRAD_WEIGHT = flags.DEFINE_float("gradient_loss_weight", None, "Weight of the finite-"
                                  "difference gradient L1 term (0 = off).")
_OUTPUT_TRANSFORM = flags.DEFINE_string(
    "output_transform", None, "Override the preset's output transform: a name in "
    "networks.OUTPUT_TRANSFORMS (checked before anything is written).")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Generator .keras file, model_dir or "
                                 "exported SavedModel (e.g. saved_models/qsmgan) to start from "
                                 "(e.g. a pretrained U-Net for --stage=wgan_gp); a model_dir's "
                                 "critic_final.keras starts the WGAN-GP critic.")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every_steps", None, "Checkpoint period, steps.")
_LOG_EVERY = flags.DEFINE_integer("log_every_steps", None, "TensorBoard scalar period, steps.")
_VAL_STEPS = flags.DEFINE_integer("val_steps", None, "Validation batches per epoch.")
_STRATEGY = flags.DEFINE_enum("strategy", "auto", ["auto", "mirrored", "multi_worker",
                                                   "one_device"], "Distribution strategy.")
_PRECISION = flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_bfloat16",
                                                     "mixed_float16"],
                               "auto: float16 on GPU, bfloat16 on CPUs with AVX512-BF16/AMX, "
                               "else float32.")
_SEED = flags.DEFINE_integer("seed", None, "Seed for weights, data order and GP draws.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_EXPORT_BASE = flags.DEFINE_string("export_base", None, "If set, export the best generator "
                                   "as the next SavedModel version under this base path when "
                                   "training ends (chief only), as `python -m qsmgan_tf.export`.")


def _config_from_flags():
  # Imported here: it loads TensorFlow, which --help must not.
  from qsmgan_tf import training_config  # pylint: disable=import-outside-toplevel

  data_dir = _DATA_DIR.value or _TRAIN_DIR.value
  total = _TOTAL_STEPS.value
  if total is None and _EPOCHS.value is not None:
    preset_defaults = training_config.PRESET_TRAINING[_PRESET.value]
    spe = _STEPS_PER_EPOCH.value or preset_defaults["steps_per_epoch"]
    total = _EPOCHS.value * spe
  return training_config.resolve_config(
      _PRESET.value, model_dir=_MODEL_DIR.value, data_dir=data_dir, stage=_STAGE.value,
      total_steps=total, gan_fraction=_GAN_FRACTION.value, steps_per_epoch=_STEPS_PER_EPOCH.value,
      global_batch_size=_BATCH.value, gen_lr=_GEN_LR.value, gan_gen_lr=_GAN_GEN_LR.value,
      critic_lr=_CRITIC_LR.value, lambda_gp=_LAMBDA_GP.value, n_critic=_N_CRITIC.value,
      lambda_adv=_LAMBDA_ADV.value, gradient_loss_weight=_GRAD_WEIGHT.value,
      output_transform=_OUTPUT_TRANSFORM.value, init_from=_INIT_FROM.value,
      checkpoint_every_steps=_CKPT_EVERY.value, log_every_steps=_LOG_EVERY.value,
      val_steps=_VAL_STEPS.value, strategy=_STRATEGY.value, precision=_PRECISION.value,
      seed=_SEED.value, quiet=_QUIET.value)


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from qsmgan_tf import records  # pylint: disable=import-outside-toplevel

  data_dir = _DATA_DIR.value or _TRAIN_DIR.value
  if data_dir:
    records.load_manifest(data_dir)  # a bad --data_dir fails before TensorFlow loads
  from qsmgan_tf import training  # pylint: disable=import-outside-toplevel

  config = _config_from_flags()
  try:
    summary = training.train(config)
  except training.NonFiniteLossError as exc:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return 1
  best = summary.get("best", {})
  logging.info("done: %s", summary)
  print(f"generator_final: {summary['generator_final']}")
  if best:
    print(f"generator_best: {os.path.join(summary['model_dir'], 'generator_best.keras')} "
          f"(val NRMSE {best['val_nrmse']:.2f} % at step {best['step']})")
  print(f"TensorBoard: tensorboard --logdir={os.path.join(summary['model_dir'], 'logs')}")
  if _EXPORT_BASE.value and summary.get("chief", True):
    from qsmgan_tf import exporting as export  # pylint: disable=import-outside-toplevel

    print(f"SavedModel: {export.export_model(summary['model_dir'], _EXPORT_BASE.value)}")
  return 0


def run():
  flags.mark_flags_as_required(["model_dir"])
  app.run(main)


if __name__ == "__main__":
  run()
