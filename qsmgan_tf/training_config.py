"""A training run's configuration: `TrainConfig`, the per-preset defaults (`PRESET_TRAINING`),
`resolve_config` (dataclass defaults < preset < explicit values), `validate` and `plan_stages`
(the stages in order, with their steps and global step offsets).

`qsmgan_tf.training.train` runs a resolved configuration; ``python -m qsmgan_tf.train`` resolves
one from its flags.

Example:
  config = resolve_config("cpu_small", model_dir="/runs/cpu_small", data_dir="/data/qsm_train")
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qsmgan_tf import networks
from qsmgan_tf.errors import InputError

STAGE_CHOICES = ("pretrain", "wgan_gp", "both")


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
    # 250 validation batches (500 patches): enough to rank checkpoints 0.7 NRMSE points apart
    # (paired standard error ~0.35 at 500 patches; benchmarks/checkpoint_ranking.py, BUILD.md);
    # 64 patches only ranked differences of ~2 points. ~75 s per validation on 2 cores.
    "paper": dict(total_steps=20000, steps_per_epoch=500, global_batch_size=2,
                  checkpoint_every_steps=500, log_every_steps=50, val_steps=250),
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
