"""The dipole model in TensorFlow, for graphs whose volume shape is only known at run time.

`physics` (NumPy/SciPy) is the reference implementation of the project's conventions; this
module mirrors the few pieces a SavedModel needs in-graph (the kernel, the forward operator,
bounding boxes, padding to fast FFT sizes, the field residual), with the same definitions:

  * ``D(k) = 1/3 - (k.b)^2/|k|^2``, ``D(0) = 0``, k from ``fftfreq(n, d=voxel_size_mm)``
    (cycles/mm), ``b`` the unit B0 direction in the voxel frame;
  * fast FFT sizes are the 2,3,5-smooth numbers `scipy.fft.next_fast_len(n, real=True)`
    returns, so a NumPy and a TF solver pick the same grid;
  * padding is central, as `physics.pad_to`/`physics.crop_from`.

Shapes are int32 tensors ``[3]``; ``voxel_size_mm`` and ``b0_dir`` are float tensors ``[3]``
(Python sequences are accepted too). Everything is float32; FFTs are complex64.
`tests/test_physics_tf.py` checks each function against `physics`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_MAX_FAST_LEN = 8192


def _smooth_numbers(limit: int) -> np.ndarray:
  """Sorted 2,3,5-smooth integers in [1, limit] (the sizes pocketfft/ducc handle fastest)."""
  out = []
  p2 = 1
  while p2 <= limit:
    p3 = p2
    while p3 <= limit:
      p5 = p3
      while p5 <= limit:
        out.append(p5)
        p5 *= 5
      p3 *= 3
    p2 *= 2
  return np.array(sorted(out), dtype=np.int32)


_FAST_LENS = _smooth_numbers(_MAX_FAST_LEN)


def next_fast_len(n):
  """Smallest 2,3,5-smooth integer >= n (elementwise), as `scipy.fft.next_fast_len(real=True)`.

  Args:
    n: int32 tensor (any shape) of sizes in [1, 8192].

  Returns:
    int32 tensor of n's shape.
  """
  n = tf.convert_to_tensor(n, tf.int32)
  table = tf.constant(_FAST_LENS)
  flat = tf.reshape(n, [-1])
  idx = tf.searchsorted(table, flat, side="left")
  idx = tf.minimum(idx, tf.size(table) - 1)
  return tf.reshape(tf.gather(table, idx), tf.shape(n))


def fft_shape(shape, factor: float = 1.0, margin=0):
  """TF `physics.fft_shape`: each axis >= ``ceil(factor * n)`` and ``n + 2 * margin``, fast.

  Args:
    shape: int32 tensor [3].
    factor: minimum size as a multiple of n.
    margin: minimum zero margin per side, voxels (int or int32 scalar tensor).

  Returns:
    int32 tensor [3].
  """
  shape = tf.convert_to_tensor(shape, tf.int32)
  by_factor = tf.cast(tf.math.ceil(tf.cast(shape, tf.float64) * factor), tf.int32)
  by_margin = shape + 2 * tf.convert_to_tensor(margin, tf.int32)
  return next_fast_len(tf.maximum(by_factor, by_margin))


def _fftfreq(n, d, rfft: bool = False):
  """``scipy.fft.fftfreq(n, d)`` (or ``rfftfreq``) for a scalar int32 tensor ``n``, float32."""
  n = tf.convert_to_tensor(n, tf.int32)
  d = tf.cast(d, tf.float32)
  if rfft:
    idx = tf.range(n // 2 + 1)
  else:
    idx = tf.range(n)
    # fftfreq ordering: 0, 1, ..., ceil(n/2)-1, -floor(n/2), ..., -1
    idx = tf.where(idx < (n + 1) // 2, idx, idx - n)
  return tf.cast(idx, tf.float32) / (tf.cast(n, tf.float32) * d)


def _nyquist(n, rfft: bool = False):
  """Boolean [n] (or [n//2+1]): True at the Nyquist sample of an even axis."""
  n = tf.convert_to_tensor(n, tf.int32)
  idx = tf.range(n // 2 + 1) if rfft else tf.range(n)
  return tf.logical_and(tf.equal(n % 2, 0), tf.equal(idx, n // 2))


def dipole_kernel(shape, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                  rfft: bool = True):
  """Unit dipole kernel on an FFT grid, as `physics.dipole_kernel`.

  Args:
    shape: FFT grid shape, int32 tensor [3].
    voxel_size_mm: voxel size, mm, float tensor [3].
    b0_dir: B0 direction in the voxel frame, float tensor [3] (normalised here).
    rfft: return the half-spectrum grid of `tf.signal.rfft3d` (last axis n//2+1).

  Returns:
    float32 tensor of the (half-)grid's shape, ``D(0) = 0``.
  """
  shape = tf.convert_to_tensor(shape, tf.int32)
  voxel = tf.cast(tf.convert_to_tensor(voxel_size_mm), tf.float32)
  b = tf.cast(tf.convert_to_tensor(b0_dir), tf.float32)
  b = b / tf.norm(b)
  ki = tf.reshape(_fftfreq(shape[0], voxel[0]), [-1, 1, 1])
  kj = tf.reshape(_fftfreq(shape[1], voxel[1]), [1, -1, 1])
  kk = tf.reshape(_fftfreq(shape[2], voxel[2], rfft=rfft), [1, 1, -1])
  k2 = ki**2 + kj**2 + kk**2
  # Nyquist samples of even axes stand for both signs: (k.b)^2 is averaged over them, exactly
  # as in physics.dipole_kernel (see there): E[(a + s c)^2] = a^2 + c^2.
  views = ([-1, 1, 1], [1, -1, 1], [1, 1, -1])
  kb = tf.zeros([1, 1, 1], tf.float32)
  nyquist_sq = tf.zeros([1, 1, 1], tf.float32)
  for axis, k in enumerate((ki, kj, kk)):
    term = k * b[axis]
    nyq = tf.reshape(_nyquist(shape[axis], rfft=rfft and axis == 2), views[axis])
    nyquist_sq = nyquist_sq + tf.where(nyq, term * term, 0.0)
    kb = kb + tf.where(nyq, 0.0, term)
  # k2 is 0 only at the origin, where D(0) = 0 by convention (not 1/3).
  return tf.where(k2 > 0, 1.0 / 3.0 - tf.math.divide_no_nan(kb**2 + nyquist_sq, k2), 0.0)


def smv_kernel(shape, voxel_size_mm, radius_mm):
  """`physics.smv_kernel` in TensorFlow: the SMV filter's half-spectrum transfer function.

  Args:
    shape: FFT grid shape, int32 tensor [3].
    voxel_size_mm: voxel size, mm, float tensor [3].
    radius_mm: sphere radius, mm (scalar).

  Returns:
    float32 tensor of the half-spectrum grid's shape, ``S(0) = 1``.
  """
  shape = tf.convert_to_tensor(shape, tf.int32)
  voxel = tf.cast(tf.convert_to_tensor(voxel_size_mm), tf.float32)
  radius_mm = tf.cast(radius_mm, tf.float32)
  r2 = tf.zeros([1, 1, 1], tf.float32)
  for axis, view in enumerate(([-1, 1, 1], [1, -1, 1], [1, 1, -1])):
    # Signed periodic offsets in mm: fftfreq(n, 1/n) * d.
    offsets = _fftfreq(shape[axis], 1.0) * tf.cast(shape[axis], tf.float32) * voxel[axis]
    r2 = r2 + tf.reshape(tf.square(offsets), view)
  sphere = tf.cast(r2 <= tf.square(radius_mm), tf.float32)
  sphere = sphere / tf.reduce_sum(sphere)
  return tf.math.real(tf.signal.rfft3d(sphere))


def apply_kernel(volume, kernel_rfft):
  """Periodic convolution of a real volume with a real half-spectrum kernel (same grid)."""
  spectrum = tf.signal.rfft3d(volume)
  out = tf.signal.irfft3d(spectrum * tf.cast(kernel_rfft, tf.complex64),
                          fft_length=tf.shape(volume))
  return out


def pad_to(volume, shape):
  """Zero-pads a 3D volume centrally to ``shape`` (int32 [3], each >= the volume's)."""
  shape = tf.convert_to_tensor(shape, tf.int32)
  extra = shape - tf.shape(volume)
  before = extra // 2
  return tf.pad(volume, tf.stack([before, extra - before], axis=1))


def crop_from(volume, shape):
  """Inverse of `pad_to`: the central region of ``shape`` (int32 [3])."""
  shape = tf.convert_to_tensor(shape, tf.int32)
  begin = (tf.shape(volume) - shape) // 2
  return tf.slice(volume, begin, shape)


def forward_field(chi_ppm, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                  pad_factor: float = 2.0, margin=0):
  """Field (ppm of B0) of a susceptibility map (ppm), as `physics.forward_field`.

  Args:
    chi_ppm: float32 [X, Y, Z].
    voxel_size_mm: float [3], mm.
    b0_dir: float [3], voxel frame.
    pad_factor: minimum padded size as a multiple of the input size (2 for simulation).
    margin: minimum zero margin per side, voxels.

  Returns:
    float32 [X, Y, Z].
  """
  chi_ppm = tf.convert_to_tensor(chi_ppm, tf.float32)
  shape = tf.shape(chi_ppm)
  grid = fft_shape(shape, pad_factor, margin)
  kernel = dipole_kernel(grid, voxel_size_mm, b0_dir, rfft=True)
  return crop_from(apply_kernel(pad_to(chi_ppm, grid), kernel), shape)


def _as_float(mask):
  """A mask of any dtype (bool, int, float) as float32."""
  return tf.cast(tf.convert_to_tensor(mask), tf.float32)


def bounding_box(mask, margin=0):
  """Begin and size (int32 [3] each) of the mask's bounding box grown by ``margin``, clipped.

  The mask must not be empty (a caller's contract: the result is meaningless otherwise).
  """
  idx = tf.cast(tf.where(_as_float(mask) > 0), tf.int32)
  margin = tf.convert_to_tensor(margin, tf.int32)
  lo = tf.maximum(tf.reduce_min(idx, axis=0) - margin, 0)
  hi = tf.minimum(tf.reduce_max(idx, axis=0) + 1 + margin, tf.shape(mask))
  return lo, hi - lo


def demeaned_residual(model_field, field_ppm, mask):
  """``||M(model - field)|| / ||M field||`` after removing each field's mean over the mask.

  The `physics.field_residual` definition, on fields already computed; float32 scalar.
  """
  m = tf.cast(_as_float(mask) > 0, tf.float32)
  count = tf.maximum(tf.reduce_sum(m), 1.0)
  model_field = tf.cast(model_field, tf.float32)
  field_ppm = tf.cast(field_ppm, tf.float32)
  a = (model_field - tf.reduce_sum(model_field * m) / count) * m
  b = (field_ppm - tf.reduce_sum(field_ppm * m) / count) * m
  return tf.norm(a - b) / tf.maximum(tf.norm(b), 1e-30)


def field_residual(chi_ppm, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0),
                   b0_dir=(0.0, 0.0, 1.0), pad_factor: float = 2.0, margin=0):
  """Relative field residual, as `physics.field_residual` (mask-demeaned); float32 scalar."""
  model = forward_field(chi_ppm, voxel_size_mm, b0_dir, pad_factor, margin)
  return demeaned_residual(model, field_ppm, mask)
