"""What a training run keeps in its ``model_dir`` besides the fit itself (the folder's layout is
in `qsmgan_tf.training`): the model's contract (`build_contract`, with what the dataset's manifest
says about the data), atomic .keras saves (`save_keras_atomic`), each stage's checkpoint folder
(`_checkpoint_dir`), and the starting generator and critic of ``--init_from``
(`_load_init_generator`, `_load_init_critic`, `_copy_weights`).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import keras
from absl import logging

import qsmgan_tf
from qsmgan_tf import distribute
from qsmgan_tf import exporting
from qsmgan_tf import model_location
from qsmgan_tf import networks
from qsmgan_tf import nifti_io
from qsmgan_tf import records
from qsmgan_tf.errors import InputError
from qsmgan_tf.model_contract import ModelContract
from qsmgan_tf.training_config import TrainConfig

DIPOLE_CONVENTION = ("D(k) = 1/3 - (k.b0)^2/|k|^2, D(0) = 0: a paramagnetic source gives a "
                     "positive field along B0")


def save_keras_atomic(model: keras.Model, path) -> None:
  """model.save to a temporary .keras beside ``path``, then rename: never half-written."""
  with nifti_io.atomic_output(path) as tmp:
    model.save(tmp)


def _manifest_info(data_dir) -> dict[str, Any]:
  """What contract.json records about the training data (empty without a dataset)."""
  if not data_dir:
    return {}
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
                   ) -> ModelContract:
  """The model's contract (docs/conventions.md, Models): everything a user of the weights needs."""
  voxel_sizes = data_info.get("voxel_sizes_mm") or [[1.0, 1.0, 1.0]]
  b0_dirs = data_info.get("b0_dirs") or [[0.0, 0.0, 1.0]]
  return ModelContract.from_dict({
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
  })


def _load_init_generator(path: str) -> tuple[keras.Model, ModelContract | None]:
  """(generator, contract or None) from what ``--init_from`` names: a .keras file, a training
  folder (its generator as `model_location.GENERATOR_FILES` order them, best first) or an
  exported SavedModel (a version folder or a model base path such as saved_models/qsmgan)."""
  try:
    return exporting.generator_from(path)
  except InputError as exc:
    raise InputError(f"--init_from {exc}") from None


def _load_init_critic(path: str) -> keras.Model | None:
  """The critic ``--init_from`` names, or None: `model_location.CRITIC_FILE` beside a training
  folder's generator (a SavedModel or a bare generator file brings none)."""
  location = model_location.resolve_model(path)
  critic_file = location.path.parent / model_location.CRITIC_FILE
  if location.kind != "keras" or not critic_file.is_file():
    return None
  try:
    critic = keras.models.load_model(critic_file, compile=False)
  except Exception as exc:  # pylint: disable=broad-except
    raise InputError(f"--init_from critic is not a loadable .keras model: {critic_file} "
                     f"({exc})") from None
  logging.info("--init_from: critic %s", critic_file)
  return critic


def _copy_weights(source: keras.Model, target: keras.Model, what: str) -> None:
  src, dst = source.get_weights(), target.weights
  if len(src) != len(dst) or any(a.shape != tuple(b.shape) for a, b in zip(src, dst)):
    raise InputError(f"{what}: its layers do not match the generator of this preset "
                     f"({len(src)} vs {len(dst)} weights); pick the matching --preset")
  target.set_weights(src)


def _checkpoint_dir(model_dir: str, stage: str, strategy) -> str:
  task_type, task_id = distribute.task_info(strategy)
  if distribute.is_chief(strategy):
    return os.path.join(model_dir, "ckpt", stage)
  # Every multi-worker process must save (the save is collective); non-chiefs write to a
  # scratch folder that nobody restores from.
  return os.path.join(model_dir, ".workers", f"{task_type}_{task_id}", "ckpt", stage)
