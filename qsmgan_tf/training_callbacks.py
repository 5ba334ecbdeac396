"""The Keras callbacks of a training stage (`qsmgan_tf.training`).

`StageControl` ends the stage at its last step, catches non-finite losses and writes checkpoints
only of finite weights; `SteppedTensorBoard` continues TensorBoard's step from the global step;
`ValidationImages` writes `slice_panel` images of a fixed validation patch each epoch;
`BestGenerator` keeps generator_best.keras at the lowest validation NRMSE.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from qsmgan_tf import nifti_io
from qsmgan_tf.training_folder import save_keras_atomic

# Display windows of the TensorBoard slice images, ppm (fixed, so epochs compare).
CHI_WINDOW_PPM = 0.15
FIELD_WINDOW_PPM = 0.05


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
  """Keeps generator_best.keras at the lowest val_nrmse (best.json holds the score and its
  standard error over the validation patches, ``val_nrmse_se``: how far the score itself could
  move on another draw of patches. Checkpoints of one run share most of their errors, so the
  error of their difference is smaller, a quarter to a sixth of it on the realistic simulator;
  ``benchmarks/checkpoint_ranking.py`` measures it)."""

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
    error = float((logs or {}).get("val_nrmse_se", math.nan))
    save_keras_atomic(self.model.generator, self.path)
    nifti_io.write_json(self.record, {"val_nrmse": value,
                                      "val_nrmse_se": error if math.isfinite(error) else None,
                                      "step": self.step_fn(), "stage": self.stage,
                                      "epoch": epoch + 1})
    logging.info("new best val NRMSE %.2f +- %.2f %% at step %d", value, error, self.step_fn())
