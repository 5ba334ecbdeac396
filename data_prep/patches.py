"""Patch pairs for training: input field patches and centred target patches, with augmentation.

A pair is an input patch of the local field (default 64^3) and the target patch (default 48^3,
chi or COSMOS) at the same centre: the target is the centre crop of the input region, the part a
network with "same" padding sees with full context. Centres lie on a regular grid (``stride``)
over the volume; those inside the mask make brain patches, and a share of those outside it but
near the edge (the input region touches the mask) make background patches.

Augmentation keeps the physics right. A signed axis permutation P (flips and axis swaps, applied
about the patch centre) maps chi(x) to chi(P^-1 x), and its field is the transformed field with
B0 moved to ``P b0`` and the voxel size permuted: the dipole kernel depends on (k.b0)^2 only.
By default only the P that leave B0 (up to sign) and the voxel size unchanged are used, so every
pair still belongs to the acquisition geometry the model is trained for (B0 along z: flips of
x, y and z and the x<->y swap, 16 transforms). ``b0_change=True`` allows all 48 and records the
new B0 direction. The field scales linearly with chi, so both are multiplied by one random
factor per subject.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator, Sequence

import numpy as np

from qsmgan_tf import physics
from qsmgan_tf import records


@dataclasses.dataclass(frozen=True)
class PatchConfig:
  """How patch pairs are cut from a subject.

  Attributes:
    input_patch: edge of the cubic field patch, voxels (even).
    output_patch: edge of the centred target patch, voxels (even, <= input_patch).
    stride: spacing of the grid of patch centres, voxels.
    background_fraction: background patches per brain patch (0.5: one per two).
    augment: apply random physics-preserving flips/permutations and chi scaling.
    b0_change: also allow permutations that move B0 (recorded in meta/b0_dir).
    chi_scale_range: (low, high) of the per-subject chi (and field) scale when augmenting.
    max_patches: at most this many pairs per subject (random subset, brain/background shares
      kept); 0 = all.
    dtype: storage dtype of field and target ('float16' or 'float32').
    mask_inputs: zero the field and target outside the mask, as at inference time.
  """
  input_patch: int = 64
  output_patch: int = 48
  stride: int = 16
  background_fraction: float = 0.5
  augment: bool = False
  b0_change: bool = False
  chi_scale_range: tuple[float, float] = (0.8, 1.25)
  max_patches: int = 0
  dtype: str = "float16"
  mask_inputs: bool = True

  def __post_init__(self):
    if self.input_patch <= 0 or self.input_patch % 2:
      raise ValueError(f"input_patch must be a positive even number, got {self.input_patch}")
    if self.output_patch <= 0 or self.output_patch % 2 or self.output_patch > self.input_patch:
      raise ValueError(f"output_patch must be even and <= input_patch ({self.input_patch}), got "
                       f"{self.output_patch}")
    if self.stride <= 0:
      raise ValueError(f"stride must be positive, got {self.stride}")
    if self.background_fraction < 0:
      raise ValueError("background_fraction must be >= 0")
    low, high = self.chi_scale_range
    if not 0 < low <= high:
      raise ValueError(f"chi_scale_range must be 0 < low <= high, got {self.chi_scale_range}")
    if self.dtype not in ("float16", "float32"):
      raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")

  @property
  def margin(self) -> int:
    """Voxels between the input patch's edge and the target patch's edge."""
    return (self.input_patch - self.output_patch) // 2

  def storage_dtypes(self) -> dict[str, str]:
    return {"field": self.dtype, "chi": self.dtype, "mask": "uint8"}


# --------------------------------------------------------------------------------------
# Centres
# --------------------------------------------------------------------------------------
def grid_centres(shape: Sequence[int], stride: int) -> np.ndarray:
  """Centres of a regular grid with spacing ``stride``, centred in the volume: int [N, 3]."""
  axes = []
  for n in shape:
    count = (n - 1) // stride + 1
    start = (n - 1 - (count - 1) * stride) // 2
    axes.append(start + stride * np.arange(count))
  grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
  return grid.reshape(-1, 3).astype(np.int64)


def _box_sums(volume: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
  """Sum of ``volume`` over the cube of edge ``size`` at each centre ([c - size/2, c + size/2))."""
  table = np.zeros(tuple(n + 1 for n in volume.shape), dtype=np.int64)
  table[1:, 1:, 1:] = volume.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
  lo = np.clip(centres - size // 2, 0, np.array(volume.shape))
  hi = np.clip(centres - size // 2 + size, 0, np.array(volume.shape))
  total = np.zeros(len(centres), dtype=np.int64)
  for corner in itertools.product((0, 1), repeat=3):
    idx = tuple(np.where(c, hi[:, a], lo[:, a]) for a, c in enumerate(corner))
    sign = (-1) ** (3 - sum(corner))
    total += sign * table[idx]
  return total


def select_centres(mask: np.ndarray, config: PatchConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Patch centres of one subject: grid points in the mask plus a share of background points.

  Background centres are grid points outside the mask whose input region touches the mask
  (near its edge); if there are too few, other outside points fill up.

  Args:
    mask: boolean brain mask.
    config: patch settings.
    rng: random generator (which background points, which subset with ``max_patches``).

  Returns:
    ``(centres int [N, 3], background bool [N])``, brain centres first, each group in grid order.
  """
  mask = np.asarray(mask, dtype=bool)
  grid = grid_centres(mask.shape, config.stride)
  inside = mask[tuple(grid.T)]
  brain = grid[inside]
  outside = grid[~inside]
  n_background = int(round(config.background_fraction * len(brain)))
  if config.max_patches:
    share = len(brain) / max(len(brain) + n_background, 1)
    n_brain = min(len(brain), int(round(config.max_patches * share)))
    n_background = min(n_background, config.max_patches - n_brain)
    keep = np.sort(rng.choice(len(brain), size=n_brain, replace=False))
    brain = brain[keep]
  n_background = min(n_background, len(outside))
  touching = _box_sums(mask, outside, config.input_patch) > 0 if len(outside) else np.zeros(0, bool)
  near, far = np.flatnonzero(touching), np.flatnonzero(~touching)
  chosen = rng.choice(near, size=min(n_background, len(near)), replace=False)
  if len(chosen) < n_background:
    chosen = np.concatenate([chosen, rng.choice(far, size=n_background - len(chosen),
                                                replace=False)])
  background = outside[np.sort(chosen.astype(np.int64))]
  centres = np.concatenate([brain, background]).reshape(-1, 3)
  is_background = np.concatenate([np.zeros(len(brain), bool), np.ones(len(background), bool)])
  return centres, is_background


def crop(padded: np.ndarray, centre: Sequence[int], size: int, pad: int) -> np.ndarray:
  """View of the cube ``[c - size/2, c + size/2)`` of a volume zero-padded by ``pad`` a side."""
  lo = [int(c) - size // 2 + pad for c in centre]
  if min(lo) < 0 or any(l + size > n for l, n in zip(lo, padded.shape)):
    raise ValueError(f"patch at {tuple(centre)} leaves the padded volume")
  return padded[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size]


# --------------------------------------------------------------------------------------
# Physics-preserving transforms
# --------------------------------------------------------------------------------------
def signed_permutations() -> list[np.ndarray]:
  """All 48 signed 3x3 permutation matrices (the cube's symmetries), identity first."""
  out = []
  for perm in itertools.permutations(range(3)):
    for signs in itertools.product((1, -1), repeat=3):
      m = np.zeros((3, 3), dtype=np.int64)
      m[np.arange(3), perm] = signs
      out.append(m)
  return out


def canonical_b0(b0_dir: Sequence[float]) -> np.ndarray:
  """B0 and -B0 give the same dipole kernel: pick the sign with the largest component > 0."""
  b = physics.unit_vector(b0_dir)
  return b if b[int(np.argmax(np.abs(b)))] > 0 else -b


def symmetry_group(voxel_size_mm: Sequence[float], b0_dir: Sequence[float],
                   b0_change: bool = False, tol: float = 1e-6) -> list[np.ndarray]:
  """Signed axis permutations usable as augmentation for this geometry.

  Without ``b0_change``: those with ``P b0 = +-b0`` and ``|P| voxel = voxel``, which leave the
  dipole kernel unchanged. With it: all 48 (the caller records the new B0 and voxel size).
  """
  b = physics.unit_vector(b0_dir)
  v = np.asarray(voxel_size_mm, dtype=np.float64)
  if b0_change:
    return signed_permutations()
  group = []
  for m in signed_permutations():
    pb = m @ b
    if min(np.abs(pb - b).max(), np.abs(pb + b).max()) > tol:
      continue
    if np.abs(np.abs(m) @ v - v).max() > tol * max(v.max(), 1.0):
      continue
    group.append(m)
  return group


def transform_volume(volume: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Applies a signed permutation about the volume's centre: ``out[P x] = in[x]`` (a view).

  Row i of ``matrix`` has its non-zero in column j: output axis i is input axis j, reversed
  when the entry is -1.
  """
  matrix = np.asarray(matrix)
  axes = [int(np.flatnonzero(row)[0]) for row in matrix]
  out = np.transpose(volume, axes)
  flips = tuple(i for i, row in enumerate(matrix) if row[axes[i]] < 0)
  return np.flip(out, flips) if flips else out


def transform_geometry(matrix: np.ndarray, voxel_size_mm: Sequence[float],
                       b0_dir: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """B0 direction (canonical sign) and voxel size after `transform_volume` with ``matrix``."""
  matrix = np.asarray(matrix, dtype=np.float64)
  b0 = canonical_b0(matrix @ physics.unit_vector(b0_dir))
  voxel = np.abs(matrix) @ np.asarray(voxel_size_mm, dtype=np.float64)
  return b0, voxel


# --------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------
def patch_pairs(subject, config: PatchConfig, seed: int,
                kind: str | None = None) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
  """Cuts one subject into (arrays, meta) patch pairs, ready for `records.codec.encode`.

  Args:
    subject: a `data_prep.simulate.Subject` (field_ppm, target_ppm, mask, voxel_size_mm,
      b0_dir, snr, subject_id).
    config: patch settings.
    seed: the subject's seed; the pairs depend on it only (not on the order of subjects).
    kind: value for meta/kind (default: ``subject.meta['kind']`` or 'real').

  Yields:
    ``({'field': [P]^3, 'chi': [Q]^3, 'mask': [Q]^3 uint8}, meta)``; arrays already in the
    storage dtype (the whole volume is converted once: per-patch float16 conversion is slow).

  Raises:
    ValueError: an empty mask, mismatched shapes or values the storage dtype cannot hold.
  """
  mask = np.asarray(subject.mask, dtype=bool)
  field = np.asarray(subject.field_ppm, dtype=np.float32)
  target = np.asarray(subject.target_ppm, dtype=np.float32)
  sid = str(subject.subject_id)
  if field.shape != mask.shape or target.shape != mask.shape:
    raise ValueError(f"{sid}: field {field.shape}, target {target.shape} and mask "
                     f"{mask.shape} differ in shape")
  if not mask.any():
    raise ValueError(f"{sid}: empty mask")
  # Independent streams, so turning augmentation on does not move the patch centres.
  scale = (float(np.random.default_rng([int(seed), 0x9A7B]).uniform(*config.chi_scale_range))
           if config.augment else 1.0)
  if config.mask_inputs:
    field = field * mask
    target = target * mask
  if scale != 1.0:
    field = field * np.float32(scale)
    target = target * np.float32(scale)
  pad = config.input_patch // 2
  dtype = config.dtype
  field = np.pad(records.to_storage(field, dtype, f"{sid} field"), pad)
  target = np.pad(records.to_storage(target, dtype, f"{sid} target"), pad)
  mask_u8 = np.pad(mask.astype(np.uint8), pad)
  centres, background = select_centres(mask, config, np.random.default_rng([int(seed), 0x9A7C]))
  voxel = tuple(float(v) for v in subject.voxel_size_mm)
  b0 = physics.unit_vector(subject.b0_dir)
  group = symmetry_group(voxel, b0, config.b0_change) if config.augment else [np.eye(3, dtype=int)]
  if kind is None:
    kind = (getattr(subject, "meta", None) or {}).get("kind", "real")
  snr = float(getattr(subject, "snr", 0.0) or 0.0)
  for index, (centre, is_bg) in enumerate(zip(centres, background)):
    matrix = group[int(np.random.default_rng([int(seed), 0x9A7D, index]).integers(len(group)))]
    arrays = {
        "field": crop(field, centre, config.input_patch, pad),
        "chi": crop(target, centre, config.output_patch, pad),
        "mask": crop(mask_u8, centre, config.output_patch, pad),
    }
    arrays = {name: transform_volume(a, matrix) for name, a in arrays.items()}
    new_b0, new_voxel = transform_geometry(matrix, voxel, b0)
    meta = {
        "subject_id": sid,
        "kind": kind,
        "voxel_size_mm": new_voxel,
        "b0_dir": new_b0,
        "centre": centre,
        "background": int(is_bg),
        "transform": matrix.reshape(-1),
        "chi_scale": scale,
        "snr": snr,
    }
    yield arrays, meta
