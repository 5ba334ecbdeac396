"""Geometry: resampling and rotation into the model's frame (voxel size and B0 axis) and back."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import scipy.ndimage

from qsmgan_tf import physics

ROTATE_MIN_DEG = 1.0
"""B0 closer than this to the model's axis is not rotated (the refinement uses the true B0)."""
VOXEL_RTOL = 0.01
"""Voxel sizes within 1 % of the model's are not resampled."""


def resample(volume: np.ndarray, voxel_size_mm: Sequence[float],
             new_voxel_size_mm: Sequence[float], shape: Sequence[int] | None = None,
             order: int = 1) -> np.ndarray:
  """Resamples a volume onto a grid of another voxel size, centres aligned (in mm).

  Args:
    volume: 3D array on a grid of ``voxel_size_mm``.
    voxel_size_mm: its voxel size, mm.
    new_voxel_size_mm: the target voxel size, mm.
    shape: target shape; default ``round(n * voxel / new_voxel)`` per axis.
    order: spline order (1 trilinear; 0 nearest for labels).

  Returns:
    float32 volume of ``shape`` (edges extended by the nearest value).
  """
  old = np.asarray(voxel_size_mm, np.float64)
  new = np.asarray(new_voxel_size_mm, np.float64)
  n = np.asarray(volume.shape, np.float64)
  if shape is None:
    shape = tuple(int(max(round(v), 1)) for v in n * old / new)
  scale = new / old
  offset = (n - 1) / 2.0 - scale * (np.asarray(shape, np.float64) - 1) / 2.0
  return scipy.ndimage.affine_transform(np.asarray(volume, np.float32), scale, offset=offset,
                                        output_shape=tuple(shape), order=order,
                                        mode="nearest", prefilter=False)


def extend_outside(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Fills voxels outside ``mask`` with the nearest inside value.

  Interpolation across the mask's edge then mixes tissue with tissue, not with zeros, so the
  edge of a resampled or rotated map keeps its values.
  """
  mask = np.asarray(mask) > 0.5
  if mask.all():
    return np.asarray(volume, np.float32)
  idx = scipy.ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
  return np.asarray(volume, np.float32)[tuple(idx)]


class ModelFrame:
  """Maps a volume onto the model's grid and B0 axis and back.

  Forward: crop to the mask's box (+2 voxels), resample to the model's voxel size, pad so the
  brain fits any rotation, rotate B0 onto the model's axis. Backward undoes each step on the
  network's output. Identity (no copy) when nothing is needed.

  Args:
    mask: brain mask, original grid.
    voxel_size_mm: original voxel size, mm.
    b0_dir: true B0 direction, original voxel frame.
    model_voxel_sizes: voxel sizes the model knows (mm); [] means any.
    model_axis: the model's B0 direction.
    tolerance_deg: B0 tilt the model was trained to handle.
    rotate_min_deg: tilts below this are not rotated.
  """

  def __init__(self, mask, voxel_size_mm, b0_dir, model_voxel_sizes, model_axis,
               tolerance_deg: float = 0.0, rotate_min_deg: float = ROTATE_MIN_DEG):
    self.mask = np.asarray(mask) > 0.5
    self.voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
    b0 = physics.unit_vector(b0_dir)
    axis = physics.unit_vector(model_axis)
    self.angle_deg = float(np.degrees(np.arccos(np.clip(abs(np.dot(b0, axis)), -1.0, 1.0))))
    # B0 and -B0 give the same field; rotate onto whichever end is nearer.
    self.target_axis = axis if np.dot(b0, axis) >= 0 else -axis
    self.model_voxel_known = bool(model_voxel_sizes)
    self.model_voxel_mm = self.voxel_size_mm
    if model_voxel_sizes and not any(
        np.allclose(self.voxel_size_mm, v, rtol=VOXEL_RTOL) for v in model_voxel_sizes):
      self.model_voxel_mm = tuple(float(x) for x in model_voxel_sizes[0])
    self.resampled = self.model_voxel_mm != self.voxel_size_mm
    self.tolerance_deg = float(tolerance_deg)
    self.rotated = self.angle_deg > max(rotate_min_deg, tolerance_deg)
    self.rotation = physics.rotation_between(b0, self.target_axis) if self.rotated else np.eye(3)
    self.identity = not (self.resampled or self.rotated)
    self.model_b0 = self.rotation @ b0
    if not self.identity:
      self.box = physics.bounding_box(self.mask, margin=2)
      self.sub_mask = self.mask[self.box]

  def info(self) -> dict[str, Any]:
    return {"resampled": self.resampled,
            "model_voxel_size_mm": (list(self.model_voxel_mm) if self.model_voxel_known
                                    else None),
            "b0_angle_to_model_deg": round(self.angle_deg, 3),
            "b0_tilt_trained_deg": round(self.tolerance_deg, 3), "rotated": self.rotated}

  def forward(self, field_ppm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Field on the original grid -> (field, mask) on the model's grid and orientation."""
    if self.identity:
      return field_ppm, self.mask
    field = extend_outside(field_ppm[self.box], self.sub_mask)
    mask = self.sub_mask.astype(np.float32)
    if self.resampled:
      field = resample(field, self.voxel_size_mm, self.model_voxel_mm)
      mask = resample(mask, self.voxel_size_mm, self.model_voxel_mm)
    self._model_shape = field.shape
    if self.rotated:
      # Pad so the rotated box stays inside: its corners span |R| @ half-extent (mm).
      vox = np.asarray(self.model_voxel_mm)
      half_mm = (np.asarray(field.shape) - 1) / 2.0 * vox
      need = np.abs(self.rotation) @ half_mm
      target = [max(int(math.ceil(2 * h / v)) + 3, n)
                for h, v, n in zip(need, vox, field.shape)]
      field = physics.pad_to(field, target)
      mask = physics.pad_to(mask, target)
      field = physics.rotate_volume(field, self.rotation, self.model_voxel_mm, order=1)
      mask = physics.rotate_volume(mask, self.rotation, self.model_voxel_mm, order=1)
    mask = mask > 0.5
    return np.where(mask, field, np.float32(0.0)).astype(np.float32), mask

  def backward(self, chi_model: np.ndarray, mask_model: np.ndarray) -> np.ndarray:
    """Network output on the model's grid -> chi on the original grid (0 outside the mask)."""
    if self.identity:
      return np.asarray(chi_model, np.float32) * self.mask
    chi = extend_outside(chi_model, mask_model)
    if self.rotated:
      chi = physics.rotate_volume(chi, self.rotation.T, self.model_voxel_mm, order=1)
      chi = physics.crop_from(chi, self._model_shape)
    if self.resampled:
      chi = resample(chi, self.model_voxel_mm, self.voxel_size_mm, shape=self.sub_mask.shape)
    out = np.zeros(self.mask.shape, np.float32)
    out[self.box] = chi
    return out * self.mask
