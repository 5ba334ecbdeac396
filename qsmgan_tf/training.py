"""The training library behind ``python -m qsmgan_tf.train``: build, compile, fit, resume.

One call, `train(config)`, runs the planned stages ('pretrain', then 'wgan_gp', or one of them)
inside one strategy and precision policy, writing into ``config.model_dir``:

  flags.json             the resolved configuration (written at every start)
  contract.json          generator config, patch sizes, trained voxel sizes, B0 directions,
                         dipole convention, normalisation, data manifest SHA-256, code version
  ckpt/<stage>/          tf.train.CheckpointManager: both networks, both optimizers (their step
                         counters included) every ``checkpoint_every_steps`` generator steps
  logs/                  TensorBoard: scalars every ``log_every_steps`` steps, per-epoch
                         validation, and axial/coronal/sagittal slice images
  generator_best.keras   lowest validation NRMSE so far (best.json says when)
  generator_final.keras  the generator at the end of the last stage
  critic_final.keras     the critic at the end of a WGAN-GP stage

Continue in a new folder, across sessions, from a folder that keeps no checkpoints (e.g. one
committed without ``ckpt/``): ``--init_from=<that folder>`` starts the generator from its
``generator_best.keras`` (else ``generator_final.keras``) and a WGAN-GP stage's critic from its
``critic_final.keras`` when it has one (optimizer states start afresh).

Resume: run the same command again. Each stage restores its newest checkpoint and continues from
its step (at most ``checkpoint_every_steps`` steps are redone); a finished stage is skipped. The
input pipeline is re-seeded with the resume step, so a resumed run does not replay the first
batches (the exact data position is not restored).

A non-finite loss stops the run with `NonFiniteLossError`; checkpoints are only written while
the loss and the weights are finite, so the last checkpoint stays good.

This module reads the data, builds, compiles and fits; beside it, `qsmgan_tf.training_config`
(`TrainConfig`, presets, the stage plan), `qsmgan_tf.training_folder` (the contract, atomic saves,
checkpoint folders, ``--init_from``) and `qsmgan_tf.training_callbacks` (stage control,
TensorBoard, slice images, the best generator).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from typing import Any

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from qsmgan_tf import data
from qsmgan_tf import distribute
from qsmgan_tf import gan
from qsmgan_tf import model_location
from qsmgan_tf import networks
from qsmgan_tf import nifti_io
from qsmgan_tf import records
from qsmgan_tf.errors import InputError
from qsmgan_tf.training_callbacks import (BestGenerator, StageControl, SteppedTensorBoard,
                                          ValidationImages)
from qsmgan_tf.training_config import TrainConfig, plan_stages, validate
from qsmgan_tf.training_folder import (_checkpoint_dir, _copy_weights, _load_init_critic,
                                       _load_init_generator, _manifest_info, build_contract,
                                       save_keras_atomic)


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the message names the step and the last good checkpoint."""


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def dataset_patch_sizes(data_dir) -> tuple[int, int]:
  """(input_patch, output_patch) of a TFRecord dataset, from its manifest."""
  features = records.load_manifest(data_dir)["features"]
  return int(features["field"]["shape"][0]), int(features["chi"]["shape"][0])


def _tfrecord_datasets(config: TrainConfig, strategy, seed: int):
  train = data.dataset_for_strategy(strategy, config.data_dir, "train", config.global_batch_size,
                                    seed=seed)
  val = None
  if config.val_steps:
    batches = data.make_dataset(config.data_dir, "val", config.global_batch_size, shuffle=False,
                                repeat=False, deterministic=True).take(config.val_steps)
    with data.shard_errors_named(config.data_dir, "val"):
      val = in_memory_validation(batches, config.global_batch_size)
  return train, val


def in_memory_validation(batches: tf.data.Dataset, batch_size: int) -> tf.data.Dataset | None:
  """The validation batches read once and held in memory, with a known length.

  Every epoch then scores exactly the same patches (a fair best-model choice), and Keras sees
  the dataset's end without the "ran out of data" warning.
  """
  fields, chis = [], []
  for field, chi in batches:
    fields.append(np.asarray(field))
    chis.append(np.asarray(chi))
  if not fields:
    return None
  return tf.data.Dataset.from_tensor_slices(
      (np.concatenate(fields), np.concatenate(chis))).batch(batch_size)


def _first_batch(dataset) -> tuple[np.ndarray, np.ndarray] | None:
  if dataset is None:
    return None
  for field, chi in dataset.take(1):
    return np.asarray(field), np.asarray(chi)
  return None


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _optimizers(stage: str, steps: int, config: TrainConfig):
  def cosine(lr, decay_steps):
    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, decay_steps), alpha=0.05)

  if stage == "pretrain":
    return keras.optimizers.Adam(cosine(config.gen_lr, steps)), None
  # WGAN-GP: Adam(0.5, 0.999) as in HFP-QSMGAN / Gulrajani et al.
  gen = keras.optimizers.Adam(cosine(config.gan_gen_lr, steps), beta_1=0.5, beta_2=0.999)
  critic = keras.optimizers.Adam(cosine(config.critic_lr, steps * config.n_critic), beta_1=0.5,
                                 beta_2=0.999)
  return gen, critic


def train(config: TrainConfig, datasets: tuple | None = None,
          gen_config: networks.GeneratorConfig | None = None) -> dict[str, Any]:
  """Runs the planned stages; resumes from checkpoints in ``config.model_dir``.

  Args:
    config: a validated TrainConfig (see `training_config.resolve_config`).
    datasets: optional ``(train, val)`` tf.data datasets of (field ppm, chi ppm) batches, used
      instead of ``config.data_dir`` (in-memory tests and benchmarks). ``train`` must repeat.
    gen_config: override of the preset's GeneratorConfig.

  Returns:
    Summary dict: per-stage steps run, final step, best val NRMSE, paths, precision.

  Raises:
    InputError: bad configuration, dataset or --init_from.
    NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
  """
  validate(config)
  if datasets is None and not config.data_dir:
    raise InputError("--data_dir is required (a TFRecord dataset folder with manifest.json)")
  strategy = distribute.make_strategy(config.strategy)
  precision = distribute.set_precision(config.precision)
  chief = distribute.is_chief(strategy)
  model_dir = os.path.abspath(config.model_dir)
  keras.utils.set_random_seed(config.seed)

  gen_config = gen_config or networks.PRESETS[config.preset]
  init_model, init_contract, init_critic = (None, None, None)
  if config.init_from:
    # The starting weights bring their own architecture (from their contract when known).
    init_model, init_contract = _load_init_generator(config.init_from)
    if any(stage == "wgan_gp" for stage, _, _ in plan_stages(config)):
      init_critic = _load_init_critic(config.init_from)
    if init_contract and "generator" in init_contract:
      gen_config = networks.GeneratorConfig.from_dict(init_contract["generator"])
  if config.output_transform:
    gen_config = gen_config.replace(output_transform=config.output_transform)
  if datasets is None:
    size_in, size_out = dataset_patch_sizes(config.data_dir)
    if (size_in, size_out) != (gen_config.input_patch, gen_config.output_patch):
      logging.info("patch sizes from the dataset: %d -> %d", size_in, size_out)
      try:
        gen_config = gen_config.replace(input_patch=size_in, output_patch=size_out)
      except ValueError as exc:
        raise InputError(f"dataset patches do not fit preset {config.preset}: {exc}") from None
  critic_config = networks.CRITIC_PRESETS[config.preset]

  data_info = _manifest_info(config.data_dir) if datasets is None else {}
  # Created once the inputs are checked: a bad --init_from or dataset leaves no empty folder.
  os.makedirs(model_dir, exist_ok=True)
  if chief:
    nifti_io.write_json(os.path.join(model_dir, "flags.json"), config.to_dict())
    build_contract(gen_config, critic_config, config, data_info, precision).write(
        os.path.join(model_dir, "contract.json"))

  with strategy.scope():
    generator = networks.build_generator(gen_config)
  if init_model is not None:
    _copy_weights(init_model, generator, f"--init_from {config.init_from}")
    del init_model

  summary: dict[str, Any] = {"precision": precision, "replicas": strategy.num_replicas_in_sync,
                             "stages": {}, "model_dir": model_dir}
  stages = plan_stages(config)
  # A stage with a checkpoint of a later stage is finished: do not restore or rerun it.
  later_started = [any(tf.train.latest_checkpoint(_checkpoint_dir(model_dir, s, strategy))
                       for s, _, _ in stages[i + 1:]) for i in range(len(stages))]
  for (stage, steps, offset), skip in zip(stages, later_started):
    if skip:
      summary["stages"][stage] = {"skipped": "a later stage has checkpoints"}
      continue
    summary["stages"][stage] = _run_stage(stage, steps, offset, config, strategy, generator,
                                          gen_config, critic_config, datasets, chief, model_dir,
                                          init_critic)

  final = os.path.join(model_dir, "generator_final.keras")
  if chief:
    save_keras_atomic(generator, final)
  else:
    task_type, task_id = distribute.task_info(strategy)
    shutil.rmtree(os.path.join(model_dir, ".workers", f"{task_type}_{task_id}"),
                  ignore_errors=True)
    with contextlib.suppress(OSError):
      os.rmdir(os.path.join(model_dir, ".workers"))  # the last worker out removes it
  summary["generator_final"] = final
  summary["chief"] = chief
  best_record = os.path.join(model_dir, "best.json")
  if os.path.exists(best_record):
    with open(best_record, encoding="utf-8") as f:
      summary["best"] = json.load(f)
  return summary


def _run_stage(stage, steps, offset, config, strategy, generator, gen_config, critic_config,
               datasets, chief, model_dir, init_critic=None) -> dict[str, Any]:
  with strategy.scope():
    critic = networks.build_critic(critic_config, gen_config) if stage == "wgan_gp" else None
    if critic is not None and init_critic is not None:
      # A stage checkpoint, when there is one, is restored over it below.
      _copy_weights(init_critic, critic, f"--init_from {config.init_from} critic")
    model = gan.QSMGAN(generator, critic, stage=stage, n_critic=config.n_critic,
                       lambda_gp=config.lambda_gp, lambda_adv=config.lambda_adv,
                       gradient_loss_weight=config.gradient_loss_weight,
                       chi_scale=gen_config.chi_scale, seed=config.seed)
    gen_opt, critic_opt = _optimizers(stage, steps, config)
    model.compile(gen_opt, critic_opt)
  objects = {"generator": generator, "gen_optimizer": model.gen_optimizer}
  if critic is not None:
    objects.update(critic=critic, critic_optimizer=model.critic_optimizer)
  checkpoint = tf.train.Checkpoint(**objects)
  ckpt_dir = _checkpoint_dir(model_dir, stage, strategy)
  manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=config.max_checkpoints)
  if manager.latest_checkpoint:
    try:
      checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    except (ValueError, AssertionError) as err:  # another architecture wrote it
      first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
      raise InputError(f"{stage}: the checkpoint {manager.latest_checkpoint} does not fit this "
                       f"code's networks (written by another version or preset?): {first}; "
                       f"use a new --model_dir, or --init_from the old generator") from err
    logging.info("%s: resumed from %s", stage, manager.latest_checkpoint)
  step_var = model.gen_optimizer.iterations
  start = int(step_var.numpy())
  result = {"steps": steps, "start_step": start, "resumed": bool(manager.latest_checkpoint)}
  if start >= steps:
    result["end_step"] = start
    return result

  if datasets is None:
    train_ds, val_ds = _tfrecord_datasets(config, strategy, seed=config.seed + offset + start)
    fixed = _first_batch(val_ds)
  else:
    train_ds, val_ds = datasets
    fixed = _first_batch(val_ds)

  # pylint: disable-next=unnecessary-lambda-assignment
  global_step = lambda: offset + int(step_var.numpy())
  control = StageControl(steps, manager, step_var, config.checkpoint_every_steps,
                         generator.weights + (critic.weights if critic is not None else []),
                         offset)
  callbacks = [control]
  if chief:
    log_dir = os.path.join(model_dir, "logs")
    callbacks.append(SteppedTensorBoard(offset + start, log_dir=log_dir,
                                        update_freq=config.log_every_steps, write_graph=False,
                                        profile_batch=0))
    if fixed is not None:
      callbacks.append(ValidationImages(log_dir, fixed[0], fixed[1], global_step))
    if val_ds is not None:
      callbacks.append(BestGenerator(model_dir, stage, global_step))

  spe = config.steps_per_epoch
  initial_epoch = (offset + start) // spe
  epochs = initial_epoch + math.ceil((steps - start) / spe)
  logging.info("%s: steps %d..%d of %d (global offset %d), epochs %d..%d", stage, start, steps,
               steps, offset, initial_epoch, epochs)
  context = _data_errors(config)
  with context:
    # shuffle=False: the dataset shuffles itself (qsmgan_tf.data); Keras' default True is
    # ignored for a tf.data.Dataset and only warns.
    model.fit(train_ds, steps_per_epoch=spe, epochs=epochs, initial_epoch=initial_epoch,
              validation_data=val_ds, callbacks=callbacks, shuffle=False,
              verbose=1 if chief and not config.quiet else 0)
  end = int(step_var.numpy())
  if control.bad_step is not None:
    latest = manager.latest_checkpoint or "none yet"
    values = ", ".join(f"{k}={v:.4g}" for k, v in sorted(control.bad_logs.items()))
    raise NonFiniteLossError(
        f"{stage}: non-finite loss at step {control.bad_step} ({values}); training stopped. "
        f"Last good checkpoint: {latest}. Lower the learning rate or check the data, then rerun "
        f"the same command to resume from it.")
  if end % config.checkpoint_every_steps:
    control.save(end)
  result["end_step"] = end
  if critic is not None:
    result["critic_steps"] = int(model.critic_optimizer.iterations.numpy())
    if chief:
      save_keras_atomic(critic, os.path.join(model_dir, model_location.CRITIC_FILE))
  return result


def _data_errors(config: TrainConfig):
  if not config.data_dir:
    return contextlib.nullcontext()
  return data.shard_errors_named(config.data_dir, "train")
