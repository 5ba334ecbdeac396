"""Per-scan shrinkage of the refinement's correction at the scales the field does not resolve.

The refinement (`refine`) corrects the network's map towards the measured field. At fine scales
a real field holds more noise (and model error) than signal, and there the correction adds as
much error as it removes: on the 2016 challenge subject, version 6's refined map is no better
than a zero map above 0.3 cycles/mm (BUILD.md, "Where the real error lies, and fine anatomy").
This module weighs the correction per radial band of k by a Wiener-type gain that the field
itself gives, so nothing is tuned and the weight follows each scan:

    G_b = clip(1 - P_noise / P_field(b), 0, 1)

``P_field(b)``: mean power of the field (demeaned over the mask, zero outside, on the mask's box
padded by `MARGIN` voxels) over the band's k samples outside the dipole's cone (|D| >= `CONE`,
where the field carries chi); ``P_noise = sigma^2 N``: the power that white noise of the field's
noise estimate (std sigma, `refine.field_noise_ppm`; N mask voxels) puts on every sample. So G is
the share of the field's power that is not noise, band by band. Bands are `SHELLS` equal slices
of |k| from 0 to the grid's corner frequency; a band with fewer than `MIN_SAMPLES` samples outside
the cone keeps gain 1, and the gains are then made non-increasing with |k| (noise is white and
chi's spectrum falls, so a band finer than a noise-dominated one cannot be trusted more). The
shrunk map is

    chi = chi_net + M F^-1[G(|k|) F[chi_refined - chi_net]]

on the same padded box: the network's own fine structure is kept, only the part the field put
in is weighed. On a clean field the gains stay near 1 up to where the noise floor is reached; on a
noisy one they fall early.

NumPy (`gains`, `shrink`, the reference) and TensorFlow (`gains_tf`, `shrink_tf`, used inside
`refine.refine_tf` and so in the SavedModel) compute the same numbers (tests/test_refine.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsmgan_tf import physics

SHELLS = 16
"""Radial bands of |k| between 0 and the grid's corner frequency."""
CONE = 0.1
"""|D(k)| below this is the cone: those samples do not measure chi and are left out of P_field."""
MARGIN = 8
"""Zero margin around the mask's box, voxels, for the FFTs."""
MIN_SAMPLES = 10
"""Fewest samples outside the cone for a band to get its own gain."""


def band_width_cycles_per_mm(voxel_size_mm: Sequence[float]) -> float:
  """Width of one band: the grid's corner frequency (Nyquist on every axis) over `SHELLS`."""
  corner = float(np.sqrt(np.sum((0.5 / np.asarray(voxel_size_mm, np.float64)) ** 2)))
  return corner / SHELLS


def _monotone(raw: np.ndarray) -> np.ndarray:
  return np.minimum.accumulate(raw)


def _box_grid(mask: np.ndarray):
  box = physics.bounding_box(mask)
  size = [s.stop - s.start for s in box]
  return box, size, physics.fft_shape(size, 1.0, MARGIN)


def _shells(grid, voxel_size_mm) -> np.ndarray:
  ki, kj, kk = physics.kspace_grid(grid, voxel_size_mm, rfft=True)
  radial = np.sqrt(ki ** 2 + kj ** 2 + kk ** 2)
  return np.minimum((radial / band_width_cycles_per_mm(voxel_size_mm)).astype(np.int64),
                    SHELLS - 1)


def gains(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float],
          b0_dir: Sequence[float], noise_ppm: float) -> np.ndarray:
  """The gains per band, float64 [`SHELLS`] (see the module docstring).

  Args:
    field_ppm: local field, ppm of B0, [X, Y, Z].
    mask: brain mask (bool, or > 0.5 inside; not empty).
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame.
    noise_ppm: the field's white-noise std, ppm (`refine.field_noise_ppm`).
  """
  m = np.asarray(mask) > 0.5
  box, _, grid = _box_grid(m)
  return _gains_on(field_ppm, m, box, grid, _shells(grid, voxel_size_mm), voxel_size_mm, b0_dir,
                   noise_ppm)


def _gains_on(field_ppm, m, box, grid, shell, voxel_size_mm, b0_dir, noise_ppm) -> np.ndarray:
  field = np.where(m, field_ppm - np.mean(field_ppm[m], dtype=np.float64), 0.0)
  power = np.abs(np.fft.rfftn(physics.pad_to(field[box], grid))) ** 2
  outside = np.abs(physics.dipole_kernel(grid, voxel_size_mm, b0_dir, rfft=True)) >= CONE
  counts = np.bincount(shell[outside], minlength=SHELLS)
  sums = np.bincount(shell[outside], weights=power[outside], minlength=SHELLS)
  noise_power = float(noise_ppm) ** 2 * float(m.sum())
  with np.errstate(divide="ignore", invalid="ignore"):
    raw = np.clip(1.0 - noise_power * counts / sums, 0.0, 1.0)
  raw = np.where((counts >= MIN_SAMPLES) & (sums > 0), raw, 1.0)
  return _monotone(raw)


def shrink(chi_refined: np.ndarray, chi_net: np.ndarray, field_ppm: np.ndarray,
           mask: np.ndarray, voxel_size_mm: Sequence[float], b0_dir: Sequence[float],
           noise_ppm: float) -> tuple[np.ndarray, np.ndarray]:
  """``chi_net`` plus the band-weighted correction; ``(chi_ppm float32, gains)``, 0 outside."""
  m = np.asarray(mask) > 0.5
  box, size, grid = _box_grid(m)
  shell = _shells(grid, voxel_size_mm)
  g = _gains_on(field_ppm, m, box, grid, shell, voxel_size_mm, b0_dir, noise_ppm)
  delta = physics.pad_to((np.asarray(chi_refined, np.float64)
                          - np.asarray(chi_net, np.float64))[box], grid)
  weighted = np.fft.irfftn(g[shell] * np.fft.rfftn(delta), s=grid, axes=(0, 1, 2))
  out = np.asarray(chi_net, np.float64).copy()
  out[box] += physics.crop_from(weighted, size)
  return np.where(m, out, 0.0).astype(np.float32), g


def _grid_tf(mask):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel
  m = tf.cast(tf.cast(mask, tf.float32) > 0.5, tf.float32)
  begin, size = physics_tf.bounding_box(m)
  return m, begin, size, physics_tf.fft_shape(size, 1.0, MARGIN)


def _shells_tf(grid, voxel_size_mm):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel
  vs = tf.cast(voxel_size_mm, tf.float32)
  ki = physics_tf._fftfreq(grid[0], vs[0])[:, None, None]  # pylint: disable=protected-access
  kj = physics_tf._fftfreq(grid[1], vs[1])[None, :, None]  # pylint: disable=protected-access
  kk = physics_tf._fftfreq(grid[2], vs[2], rfft=True)[None, None, :]  # pylint: disable=protected-access
  radial = tf.sqrt(ki * ki + kj * kj + kk * kk)
  width = tf.sqrt(tf.reduce_sum(tf.square(0.5 / vs))) / SHELLS  # `band_width_cycles_per_mm`
  return tf.minimum(tf.cast(radial / width, tf.int32), SHELLS - 1)


def gains_tf(field_ppm, mask, voxel_size_mm, b0_dir, noise_ppm):
  """`gains` in TensorFlow (dynamic shapes, float32 FFTs); float32 [`SHELLS`]."""
  m, begin, size, grid = _grid_tf(mask)
  return _gains_on_tf(field_ppm, m, begin, size, grid, _shells_tf(grid, voxel_size_mm),
                      voxel_size_mm, b0_dir, noise_ppm)


def _gains_on_tf(field_ppm, m, begin, size, grid, shell, voxel_size_mm, b0_dir, noise_ppm):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel
  field = tf.cast(field_ppm, tf.float32)
  mean = tf.reduce_sum(field * m) / tf.reduce_sum(m)
  box = physics_tf.pad_to(tf.slice((field - mean) * m, begin, size), grid)
  power = tf.square(tf.abs(tf.signal.rfft3d(box)))
  outside = tf.cast(tf.abs(physics_tf.dipole_kernel(grid, voxel_size_mm, b0_dir, rfft=True))
                    >= CONE, tf.float32)
  ids = tf.reshape(shell, [-1])
  counts = tf.math.unsorted_segment_sum(tf.reshape(outside, [-1]), ids, SHELLS)
  sums = tf.math.unsorted_segment_sum(tf.reshape(power * outside, [-1]), ids, SHELLS)
  noise_power = tf.square(tf.cast(noise_ppm, tf.float32)) * tf.reduce_sum(m)
  raw = tf.clip_by_value(1.0 - tf.math.divide_no_nan(noise_power * counts, sums), 0.0, 1.0)
  raw = tf.where(tf.logical_and(counts >= MIN_SAMPLES, sums > 0), raw, 1.0)
  # Running minimum over the bands (`_monotone`): min over j <= i, by a triangular mask.
  lower = tf.linalg.band_part(tf.ones([SHELLS, SHELLS], tf.bool), -1, 0)
  return tf.reduce_min(tf.where(lower, raw[None, :], 1.0), axis=1)


def shrink_tf(chi_refined, chi_net, field_ppm, mask, voxel_size_mm, b0_dir, noise_ppm):
  """`shrink` in TensorFlow; ``(chi_ppm float32 [X, Y, Z], gains [SHELLS])``."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics_tf  # pylint: disable=import-outside-toplevel
  m, begin, size, grid = _grid_tf(mask)
  shell = _shells_tf(grid, voxel_size_mm)
  g = _gains_on_tf(field_ppm, m, begin, size, grid, shell, voxel_size_mm, b0_dir, noise_ppm)
  chi_net = tf.cast(chi_net, tf.float32)
  delta = physics_tf.pad_to(tf.slice(tf.cast(chi_refined, tf.float32) - chi_net, begin, size),
                            grid)
  weight = tf.cast(tf.gather(g, shell), tf.complex64)
  weighted = physics_tf.crop_from(
      tf.signal.irfft3d(tf.signal.rfft3d(delta) * weight, fft_length=grid), size)
  full = tf.shape(m)
  correction = tf.pad(weighted, tf.stack([begin, full - begin - size], axis=1))
  return (chi_net + correction) * m, g
