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

Resume: run the same command again. Each stage restores its newest checkpoint and continues from
its step (at most ``checkpoint_every_steps`` steps are redone); a finished stage is skipped. The
input pipeline is re-seeded with the resume step, so a resumed run does not replay the first
batches (the exact data position is not restored).

A non-finite loss stops the run with `NonFiniteLossError`; checkpoints are only written while
the loss and the weights are finite, so the last checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import shutil
from typing import Any, Callable

from absl import logging
import keras
import numpy as np
import tensorflow as tf

import qsmgan_tf
from qsmgan_tf import distribute
from qsmgan_tf import gan
from qsmgan_tf import networks
from qsmgan_tf.errors import InputError
from qsmgan_tf import nifti_io

STAGE_CHOICES = ("pretrain", "wgan_gp", "both")
DIPOLE_CONVENTION = ("D(k) = 1/3 - (k.b0)^2/|k|^2, D(0) = 0: a paramagnetic source gives a "
                     "positive field along B0")
# Display windows of the TensorBoard slice images, ppm (fixed, so epochs compare).
CHI_WINDOW_PPM = 0.15
FIELD_WINDOW_PPM = 0.05


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainConfig:
  """Everything one training run needs; `PRESET_TRAINING` supplies per-preset defaults.

  Attributes:
    model_dir: output folder (created; resumed when it holds checkpoints).
    data_dir: TFRecord dataset folder with manifest.json ('train' and 'val' splits).
    preset: generator/critic preset name (networks.PRESETS).
    stage: 'pretrain', 'wgan_gp' or 'both' (pretrain, then WGAN-GP).
    total_steps: generator steps of the whole run (all stages).
    gan_fraction: share of total_steps given to WGAN-GP when stage == 'both'.
    steps_per_epoch: steps between validations, images and best-model checks.
    global_batch_size: patch pairs per step over all replicas.
    gen_lr: pretraining generator learning rate (cosine decay over the stage).
    gan_gen_lr: generator learning rate in the WGAN-GP stage.
    critic_lr: critic learning rate.
    lambda_gp: gradient-penalty weight.
    n_critic: critic updates per generator update.
    lambda_adv: adversarial loss weight relative to the voxel loss.
    gradient_loss_weight: weight of the finite-difference gradient L1 term (0 = off).
    output_transform: override of the preset's output transform (None = keep).
    init_from: generator .keras file or a model_dir to start from (when no checkpoint exists).
    checkpoint_every_steps: checkpoint period, generator steps.
    log_every_steps: TensorBoard scalar period, steps.
    val_steps: validation batches per epoch (the same batches every time).
    max_checkpoints: checkpoints kept per stage.
    strategy: distribute.STRATEGIES.
    precision: distribute.PRECISIONS.
    seed: weights, data order and gradient-penalty draws.
    quiet: no progress bar.
  """

  model_dir: str = ""
  data_dir: str | None = None
  preset: str = "cpu_small"
  stage: str = "both"
  total_steps: int = 2000
  gan_fraction: float = 0.25
  steps_per_epoch: int = 100
  global_batch_size: int = 2
  gen_lr: float = 1e-3
  gan_gen_lr: float = 1e-4
  critic_lr: float = 1e-4
  lambda_gp: float = 10.0
  n_critic: int = 5
  lambda_adv: float = 1e-2
  gradient_loss_weight: float = 0.0
  output_transform: str | None = None
  init_from: str | None = None
  checkpoint_every_steps: int = 100
  log_every_steps: int = 10
  val_steps: int = 8
  max_checkpoints: int = 3
  strategy: str = "auto"
  precision: str = "auto"
  seed: int = 0
  quiet: bool = False

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Named bundles of defaults (presets are flag defaults, not code). Explicit values win.
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "paper": dict(total_steps=20000, steps_per_epoch=500, global_batch_size=2,
                  checkpoint_every_steps=500, log_every_steps=50, val_steps=32),
    # ~0.32 s per pretrain step in bfloat16 on 2 cores (benchmarks/train_step.py): 800 pretrain
    # + 200 WGAN-GP steps fit the README's 20-minute end-to-end budget.
    "cpu_small": dict(total_steps=1000, gan_fraction=0.2, steps_per_epoch=100,
                      global_batch_size=2, checkpoint_every_steps=100, log_every_steps=10,
                      val_steps=8),
    "test_tiny": dict(total_steps=6, gan_fraction=0.5, steps_per_epoch=3, global_batch_size=2,
                      n_critic=2, checkpoint_every_steps=2, log_every_steps=1, val_steps=2),
}


def resolve_config(preset: str, **explicit) -> TrainConfig:
  """TrainConfig = dataclass defaults < preset bundle < explicit values (None = not given)."""
  if preset not in networks.PRESETS:
    raise InputError(f"unknown preset {preset!r}; expected one of {', '.join(networks.PRESETS)}")
  values = dict(PRESET_TRAINING.get(preset, {}))
  values.update({k: v for k, v in explicit.items() if v is not None})
  values["preset"] = preset
  config = TrainConfig(**values)
  validate(config)
  return config


def validate(config: TrainConfig) -> None:
  """Raises InputError on values no run can use."""
  if not config.model_dir:
    raise InputError("--model_dir is required")
  if config.stage not in STAGE_CHOICES:
    raise InputError(f"--stage must be one of {', '.join(STAGE_CHOICES)}, got {config.stage!r}")
  for name in ("total_steps", "steps_per_epoch", "global_batch_size", "n_critic",
               "checkpoint_every_steps", "log_every_steps", "max_checkpoints"):
    if getattr(config, name) < 1:
      raise InputError(f"--{name} must be >= 1, got {getattr(config, name)}")
  if config.val_steps < 0:
    raise InputError(f"--val_steps must be >= 0, got {config.val_steps}")
  if not 0.0 < config.gan_fraction < 1.0 and config.stage == "both":
    raise InputError(f"--gan_fraction must be in (0, 1), got {config.gan_fraction}")
  if config.output_transform and config.output_transform not in networks.OUTPUT_TRANSFORMS:
    raise InputError(f"--output_transform must be one of {', '.join(networks.OUTPUT_TRANSFORMS)}")


def plan_stages(config: TrainConfig) -> list[tuple[str, int, int]]:
  """``[(stage, steps, global step offset)]``: the run's stages in order."""
  if config.stage != "both":
    return [(config.stage, config.total_steps, 0)]
  gan_steps = min(config.total_steps - 1, max(1, round(config.total_steps * config.gan_fraction)))
  pre_steps = config.total_steps - gan_steps
  return [("pretrain", pre_steps, 0), ("wgan_gp", gan_steps, pre_steps)]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def save_keras_atomic(model: keras.Model, path) -> None:
  """model.save to a temporary .keras beside ``path``, then rename: never half-written."""
  with nifti_io.atomic_output(path) as tmp:
    model.save(tmp)


def _manifest_info(data_dir) -> dict[str, Any]:
  """What contract.json records about the training data (empty without a dataset)."""
  if not data_dir:
    return {}
  from qsmgan_tf import records  # pylint: disable=import-outside-toplevel

  manifest = records.load_manifest(data_dir)
  train = manifest.get("splits", {}).get("train", {})
  b0_dirs = sorted({tuple(round(float(v), 6) for v in d["b0_dir"])
                    for d in train.get("subject_details", []) if "b0_dir" in d})
  return {
      "data_manifest_sha256": records.file_sha256(os.path.join(data_dir, records.MANIFEST_NAME)),
      "data_example_digest": manifest.get("example_digest"),
      "data_target": manifest.get("target"),
      "voxel_sizes_mm": train.get("voxel_sizes_mm", []),
      "b0_dirs": [list(b) for b in b0_dirs],
      "patches": manifest.get("patches", {}),
      "data_code_version": manifest.get("code_version"),
  }


def build_contract(gen_config: networks.GeneratorConfig, critic_config: networks.CriticConfig,
                   config: TrainConfig, data_info: dict[str, Any], precision: str
                   ) -> dict[str, Any]:
  """The model's contract (docs/conventions.md, Models): everything a user of the weights needs."""
  voxel_sizes = data_info.get("voxel_sizes_mm") or [[1.0, 1.0, 1.0]]
  b0_dirs = data_info.get("b0_dirs") or [[0.0, 0.0, 1.0]]
  return {
      "generator": gen_config.to_dict(),
      "critic": critic_config.to_dict(),
      "input_patch": gen_config.input_patch,
      "output_patch": gen_config.output_patch,
      "crop_margin": networks.crop_margin(gen_config),
      "size_multiple": 2**gen_config.depth,
      "voxel_sizes_mm": voxel_sizes,
      "b0_dir": b0_dirs[0] if len(b0_dirs) == 1 else [0.0, 0.0, 1.0],
      "b0_dirs_trained": b0_dirs,
      "dipole_convention": DIPOLE_CONVENTION,
      "units": {"input": "local field, ppm of B0", "output": "susceptibility, ppm"},
      "normalisation": {
          "input": f"field_ppm * {gen_config.field_scale} (inside the model)",
          "output": f"{gen_config.output_transform} transform, chi_scale {gen_config.chi_scale} "
                    "(inside the model)"},
      "training": {"preset": config.preset, "stage": config.stage,
                   "total_steps": config.total_steps, "precision": precision,
                   "global_batch_size": config.global_batch_size},
      **{k: v for k, v in data_info.items() if k not in ("voxel_sizes_mm",)},
      "code_version": qsmgan_tf.__version__,
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _load_init_generator(path: str) -> tuple[keras.Model, dict | None]:
  """(generator, contract or None) from a .keras file, a training model_dir, or an exported
  SavedModel (a version folder or a model base path such as saved_models/qsmgan)."""
  from qsmgan_tf import exporting  # pylint: disable=import-outside-toplevel
  p = pathlib.Path(path)
  contract = None
  if (p / "saved_model.pb").exists() or exporting.list_versions(p):
    try:
      return exporting.generator_from_saved_model(p)
    except InputError as exc:
      raise InputError(f"--init_from {exc}") from None
  if p.is_dir():
    if (p / "contract.json").exists():
      contract = json.loads((p / "contract.json").read_text())
    for name in ("generator_final.keras", "generator_best.keras"):
      if (p / name).exists():
        p = p / name
        break
    else:
      raise InputError(f"--init_from folder has no generator_final.keras or "
                       f"generator_best.keras: {path}")
  if not p.exists():
    raise InputError(f"--init_from not found: {path}")
  try:
    model = keras.models.load_model(p, compile=False)
  except Exception as exc:  # pylint: disable=broad-except
    raise InputError(f"--init_from is not a loadable .keras generator: {path} ({exc})") from None
  return model, contract


def _copy_weights(source: keras.Model, target: keras.Model, what: str) -> None:
  src, dst = source.get_weights(), target.weights
  if len(src) != len(dst) or any(a.shape != tuple(b.shape) for a, b in zip(src, dst)):
    raise InputError(f"{what}: its layers do not match the generator of this preset "
                     f"({len(src)} vs {len(dst)} weights); pick the matching --preset")
  target.set_weights(src)


# --------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------
def _all_finite(variables) -> bool:
  return all(bool(np.all(np.isfinite(v.numpy()))) for v in variables)


class StageControl(keras.callbacks.Callback):
  """Stops at the stage's last step, catches non-finite losses, saves checkpoints.

  Order matters: the loss is checked before a checkpoint is written, and a checkpoint is written
  only when the generator's (and critic's) weights are finite, so the newest checkpoint is good.
  """

  def __init__(self, stage_steps: int, manager: tf.train.CheckpointManager, step_var,
               every: int, watched: list, global_offset: int):
    super().__init__()
    self.stage_steps = stage_steps
    self.manager = manager
    self.step_var = step_var
    self.every = every
    self.watched = watched
    self.global_offset = global_offset
    self.bad_step = None
    self.bad_logs = None

  def step(self) -> int:
    return int(self.step_var.numpy())

  def save(self, step: int) -> bool:
    if self.bad_step is not None or not _all_finite(self.watched):
      return False
    self.manager.save(checkpoint_number=step)
    return True

  def on_train_batch_end(self, batch, logs=None):
    step = self.step()
    values = {k: float(v) for k, v in (logs or {}).items()}
    if any(not math.isfinite(v) for v in values.values()):
      self.bad_step, self.bad_logs = step, values
      self.model.stop_training = True
      return
    if step % self.every == 0:
      self.save(step)
    if step >= self.stage_steps:
      self.model.stop_training = True


class SteppedTensorBoard(keras.callbacks.TensorBoard):
  """Keras' TensorBoard callback, with its batch counter continuing from the global step.

  Keras restarts the counter at 0 in every fit(), which would overlay resumed runs and stages.
  """

  def __init__(self, start_step: int, **kwargs):
    super().__init__(**kwargs)
    self.start_step = start_step

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    self._global_train_batch = self.start_step


def slice_panel(field_ppm: np.ndarray, chi_pred_ppm: np.ndarray, chi_true_ppm: np.ndarray,
                chi_window_ppm: float = CHI_WINDOW_PPM,
                field_window_ppm: float = FIELD_WINDOW_PPM) -> np.ndarray:
  """One grayscale image, rows field/prediction/target/error, columns axial/coronal/sagittal.

  Args:
    field_ppm: [X, Y, Z] input patch (cropped to the output's centre here).
    chi_pred_ppm, chi_true_ppm: [x, y, z] output patches.
    chi_window_ppm: chi and error shown in [-w, w].
    field_window_ppm: field shown in [-w, w].

  Returns:
    float32 [1, 4*x, 3*x, 1] in [0, 1] (image summaries need [0, 1]).
  """
  size = chi_true_ppm.shape
  margin = [(f - s) // 2 for f, s in zip(field_ppm.shape, size)]
  field = field_ppm[margin[0]:margin[0] + size[0], margin[1]:margin[1] + size[1],
                    margin[2]:margin[2] + size[2]]
  rows = []
  for volume, window in ((field, field_window_ppm), (chi_pred_ppm, chi_window_ppm),
                         (chi_true_ppm, chi_window_ppm), (chi_pred_ppm - chi_true_ppm,
                                                          chi_window_ppm)):
    centre = [s // 2 for s in volume.shape]
    views = (volume[:, :, centre[2]], volume[:, centre[1], :], volume[centre[0], :, :])
    # rot90: first voxel axis left-right, second bottom-top, as radiological viewers show it.
    views = [np.rot90(v) for v in views]
    height = max(v.shape[0] for v in views)
    views = [np.pad(v, ((0, height - v.shape[0]), (0, 0))) for v in views]
    rows.append(np.clip((np.concatenate(views, axis=1) + window) / (2 * window), 0, 1))
  return np.concatenate(rows, axis=0)[None, :, :, None].astype(np.float32)


class ValidationImages(keras.callbacks.Callback):
  """Each epoch, slices of a fixed validation patch to TensorBoard (``logs/images``)."""

  def __init__(self, log_dir: str, field: np.ndarray, chi: np.ndarray,
               step_fn: Callable[[], int]):
    super().__init__()
    # The patch with the most structure: a flat background patch shows nothing.
    index = int(np.argmax(np.std(chi.reshape(chi.shape[0], -1), axis=1)))
    self.field = field[index:index + 1]
    self.chi = chi[index]
    self.step_fn = step_fn
    self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "images"))

  def on_epoch_end(self, epoch, logs=None):
    pred = np.asarray(self.model.generator(tf.constant(self.field), training=False))
    image = slice_panel(self.field[0, ..., 0], pred[0, ..., 0], self.chi[..., 0])
    with self.writer.as_default():
      tf.summary.image("val_slices/field_pred_target_error", image, step=self.step_fn())
    self.writer.flush()


class BestGenerator(keras.callbacks.Callback):
  """Keeps generator_best.keras at the lowest val_nrmse (best.json holds the score)."""

  def __init__(self, model_dir: str, stage: str, step_fn: Callable[[], int]):
    super().__init__()
    self.path = os.path.join(model_dir, "generator_best.keras")
    self.record = os.path.join(model_dir, "best.json")
    self.stage = stage
    self.step_fn = step_fn
    self.best = math.inf
    if os.path.exists(self.record):
      with open(self.record, encoding="utf-8") as f:
        self.best = float(json.load(f).get("val_nrmse", math.inf))

  def on_epoch_end(self, epoch, logs=None):
    value = float((logs or {}).get("val_nrmse", math.nan))
    if not math.isfinite(value) or value >= self.best:
      return
    if not _all_finite(self.model.generator.weights):
      return
    self.best = value
    save_keras_atomic(self.model.generator, self.path)
    nifti_io.write_json(self.record, {"val_nrmse": value, "step": self.step_fn(),
                                      "stage": self.stage, "epoch": epoch + 1})
    logging.info("new best val NRMSE %.2f %% at step %d", value, self.step_fn())


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def dataset_patch_sizes(data_dir) -> tuple[int, int]:
  """(input_patch, output_patch) of a TFRecord dataset, from its manifest."""
  from qsmgan_tf import records  # pylint: disable=import-outside-toplevel

  features = records.load_manifest(data_dir)["features"]
  return int(features["field"]["shape"][0]), int(features["chi"]["shape"][0])


def _tfrecord_datasets(config: TrainConfig, strategy, seed: int):
  from qsmgan_tf import data  # pylint: disable=import-outside-toplevel

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


def _checkpoint_dir(model_dir: str, stage: str, strategy) -> str:
  task_type, task_id = distribute.task_info(strategy)
  if distribute.is_chief(strategy):
    return os.path.join(model_dir, "ckpt", stage)
  # Every multi-worker process must save (the save is collective); non-chiefs write to a
  # scratch folder that nobody restores from.
  return os.path.join(model_dir, ".workers", f"{task_type}_{task_id}", "ckpt", stage)


def train(config: TrainConfig, datasets: tuple | None = None,
          gen_config: networks.GeneratorConfig | None = None) -> dict[str, Any]:
  """Runs the planned stages; resumes from checkpoints in ``config.model_dir``.

  Args:
    config: a validated TrainConfig (see `resolve_config`).
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
  os.makedirs(model_dir, exist_ok=True)
  keras.utils.set_random_seed(config.seed)

  gen_config = gen_config or networks.PRESETS[config.preset]
  init_model, init_contract = (None, None)
  if config.init_from:
    # The starting weights bring their own architecture (from their contract when known).
    init_model, init_contract = _load_init_generator(config.init_from)
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
  if chief:
    nifti_io.write_json(os.path.join(model_dir, "flags.json"), config.to_dict())
    nifti_io.write_json(os.path.join(model_dir, "contract.json"),
                        build_contract(gen_config, critic_config, config, data_info, precision))

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
                                          gen_config, critic_config, datasets, chief, model_dir)

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
               datasets, chief, model_dir) -> dict[str, Any]:
  with strategy.scope():
    critic = networks.build_critic(critic_config, gen_config) if stage == "wgan_gp" else None
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

  global_step = lambda: offset + int(step_var.numpy())  # pylint: disable=unnecessary-lambda-assignment
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
  return result


def _data_errors(config: TrainConfig):
  if not config.data_dir:
    return contextlib.nullcontext()
  from qsmgan_tf import data  # pylint: disable=import-outside-toplevel

  return data.shard_errors_named(config.data_dir, "train")
