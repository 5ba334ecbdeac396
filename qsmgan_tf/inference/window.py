"""Tiling on the network's pooling grid, and the NumPy sliding window (bounded memory).

The arithmetic both tilings share: the single pass's input edge (`_padded_size`), tiles per
axis (`_tile_count`), the step between tiles (`window_step`) and the blending weights
(`importance_map`). `sliding_window` tiles on the client, patch by patch (MONAI vocabulary:
``roi_size`` = output patch, ``overlap``, ``mode``, ``sigma_scale``, ``sw_batch_size``);
`graph.volume_tiles_tf` is its in-graph twin.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from qsmgan_tf import physics
from qsmgan_tf.errors import InputError

BLEND_MODES = ("gaussian", "constant")
DEFAULT_SIGMA_SCALE = 0.125
"""Gaussian blending: sigma = sigma_scale * roi_size per axis (MONAI's default)."""
IMPORTANCE_FLOOR = 1e-3
"""Smallest blending weight, relative to the peak (MONAI's guard against dividing by ~0)."""


def _padded_size(size, margin: int, multiple: int):
  """Network input edge for ``size`` output voxels: size + 2 margin rounded up to multiple.

  Plain integer arithmetic: the same formula for Python ints (plans) and int32 tensors.
  """
  return (size + 2 * margin + multiple - 1) // multiple * multiple


def _tile_count(region_out, tile_out, step):
  """Tiles along one axis: starts 0, step, 2 step, ... with the last one flush with the end."""
  return (region_out - tile_out + step - 1) // step + 1


def _importance_profiles(roi_size: Sequence[int], mode: str,
                         sigma_scale: float) -> list[np.ndarray]:
  """The per-axis factors of `importance_map` (float64, not normalised)."""
  if mode not in BLEND_MODES:
    raise InputError(f"blend mode must be one of {', '.join(BLEND_MODES)}, got {mode!r}")
  profiles = []
  for n in (int(r) for r in roi_size):
    x = np.arange(n) - (n - 1) / 2.0
    sigma = max(sigma_scale * n, 1e-6)
    profiles.append(np.ones(n) if mode == "constant" else np.exp(-0.5 * (x / sigma) ** 2))
  return profiles


def importance_map(roi_size: Sequence[int], mode: str = "gaussian",
                   sigma_scale: float = DEFAULT_SIGMA_SCALE) -> np.ndarray:
  """Blending weights of one output window: separable Gaussian (max 1) or constant 1.

  The Gaussian's smallest weight is floored at `IMPORTANCE_FLOOR` of its peak (MONAI's guard
  against dividing by ~0 where only window edges overlap). `graph.volume_tiles_tf` builds the same
  weights in the graph from the same factors.
  """
  px, py, pz = _importance_profiles(roi_size, mode, sigma_scale)
  w = px[:, None, None] * py[None, :, None] * pz[None, None, :]
  return np.maximum(w / w.max(), IMPORTANCE_FLOOR).astype(np.float32)


def window_step(roi: int, overlap: float, multiple: int) -> int:
  """Step between windows: ``roi * (1 - overlap)`` rounded down to a multiple of ``multiple``
  (so windows stay on the pooling grid), at least ``multiple``, at most ``roi``."""
  return min(max(multiple, int(roi * (1.0 - overlap)) // multiple * multiple), roi)


def _window_layout(begin: int, size: int, roi: int, step: int, anchor: int, multiple: int):
  """Window starts on one axis: cover [begin, begin + size), starts = anchor + k * multiple."""
  count = max(int(math.ceil(max(size - roi, 0) / step)) + 1, 1)
  extent = (count - 1) * step + roi
  start = begin - (extent - size) // 2
  start = anchor + ((start - anchor) // multiple) * multiple  # round down onto the grid
  while start + (count - 1) * step + roi < begin + size:
    count += 1
  return [start + k * step for k in range(count)]


def single_pass_region(mask: np.ndarray, margin: int, multiple: int):
  """Output-region start (per axis) `graph.volume_pass_tf` uses: the pooling-grid anchor."""
  box = physics.bounding_box(mask)
  out = []
  for sl in box:
    size = sl.stop - sl.start
    n_in = _padded_size(size, margin, multiple)
    out.append(sl.start - (n_in - 2 * margin - size) // 2)
  return out


def sliding_window(field_ppm: np.ndarray, mask: np.ndarray,
                   patch_fn: Callable[[np.ndarray], np.ndarray], *, roi_size: int, margin: int,
                   multiple: int = 1, overlap: float = 0.25, mode: str = "gaussian",
                   sigma_scale: float = DEFAULT_SIGMA_SCALE, sw_batch_size: int = 1,
                   progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
  """Overlapping-window inference on the OUTPUT grid, blending only the output region.

  Windows of ``roi_size`` output voxels cover the mask's bounding box; each reads
  ``roi_size + 2 * margin`` input voxels (the masked field, zero outside the volume). The step
  is ``roi_size * (1 - overlap)`` rounded DOWN to a multiple of ``multiple`` (2**depth), and
  windows sit on the single pass's pooling grid, so a translation-equivariant network gives
  the single-pass result away from window borders.

  Args:
    field_ppm: local field, ppm of B0, [X, Y, Z].
    mask: brain mask [X, Y, Z].
    patch_fn: ``[B, in, in, in, 1]`` float32 field ppm -> ``[B, roi, roi, roi, 1]`` chi ppm.
    roi_size: output window edge, voxels (``roi_size + 2 * margin`` divisible by multiple).
    margin: the network's crop margin, voxels.
    multiple: the network's size multiple (2**depth).
    overlap: requested fraction of overlap between neighbouring windows, in [0, 1).
    mode: 'gaussian' or 'constant' blending.
    sigma_scale: Gaussian sigma as a fraction of roi_size.
    sw_batch_size: windows per patch_fn call.
    progress: show a tqdm progress bar.

  Returns:
    ``(chi_ppm [X, Y, Z] float32 zero outside the mask, info)`` with the window count, step
    and effective overlap.

  Raises:
    InputError: bad roi_size, overlap, mode or batch size.
  """
  roi = int(roi_size)
  if roi < 1 or (roi + 2 * margin) % multiple:
    raise InputError(f"roi_size {roi} + 2 x crop margin {margin} must be divisible by "
                     f"{multiple}")
  if not 0.0 <= overlap < 1.0:
    raise InputError(f"overlap must be in [0, 1), got {overlap}")
  if int(sw_batch_size) < 1:
    raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
  weights = importance_map((roi,) * 3, mode, sigma_scale)
  mask = np.asarray(mask) > 0.5
  field = np.where(mask, np.asarray(field_ppm, np.float32), np.float32(0.0))
  step = window_step(roi, overlap, multiple)
  box = physics.bounding_box(mask)
  anchors = single_pass_region(mask, margin, multiple)
  starts = [_window_layout(sl.start, sl.stop - sl.start, roi, step, a, multiple)
            for sl, a in zip(box, anchors)]
  lo = [s[0] for s in starts]
  hi = [s[-1] + roi for s in starts]
  ext = [h - l for l, h in zip(lo, hi)]
  # The canvas holds the input for every window: region [lo - margin, hi + margin).
  canvas = np.zeros([e + 2 * margin for e in ext], np.float32)
  src = tuple(slice(max(l - margin, 0), min(h + margin, n))
              for l, h, n in zip(lo, hi, field.shape))
  dst = tuple(slice(s.start - (l - margin), s.stop - (l - margin)) for s, l in zip(src, lo))
  canvas[dst] = field[src]
  acc = np.zeros(ext, np.float32)
  wsum = np.zeros(ext, np.float32)
  corners = [(i - lo[0], j - lo[1], k - lo[2])
             for i in starts[0] for j in starts[1] for k in starts[2]]
  size_in = roi + 2 * margin
  bar = None
  if progress:
    bar = tqdm(total=len(corners), desc="qsmgan windows", unit="win", leave=False)
  try:
    for b in range(0, len(corners), int(sw_batch_size)):
      batch = corners[b:b + int(sw_batch_size)]
      x = np.stack([canvas[i:i + size_in, j:j + size_in, k:k + size_in] for i, j, k in batch])
      y = np.asarray(patch_fn(x[..., None]), np.float32)
      if y.shape != (len(batch), roi, roi, roi, 1):
        raise InputError(f"the model maps a {size_in}^3 window to {y.shape[1:]}, expected "
                         f"{roi}^3: roi_size does not match the model's crop margin")
      for (i, j, k), yy in zip(batch, y[..., 0]):
        acc[i:i + roi, j:j + roi, k:k + roi] += yy * weights
        wsum[i:i + roi, j:j + roi, k:k + roi] += weights
      if bar is not None:
        bar.update(len(batch))
  finally:
    if bar is not None:
      bar.close()
  blended = acc / np.maximum(wsum, 1e-12)
  out = np.zeros(field.shape, np.float32)
  src = tuple(slice(max(l, 0), min(h, n)) for l, h, n in zip(lo, hi, field.shape))
  out[src] = blended[tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))]
  out *= mask
  info = {"windows": len(corners), "roi_size": roi, "step": step,
          "overlap_effective": round(1.0 - step / roi, 4), "mode": mode,
          "sigma_scale": sigma_scale, "sw_batch_size": int(sw_batch_size)}
  return out, info
