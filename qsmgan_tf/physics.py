"""QSM physics: the one implementation of the dipole model for the whole project.

Conventions (docs/conventions.md):
  * susceptibility ``chi_ppm`` in ppm, local field ``field_ppm`` in ppm of B0;
  * dipole kernel ``D(k) = 1/3 - (k.b)^2/|k|^2`` with ``D(0) = 0``, ``k`` from
    ``fftfreq(n, d=voxel_size_mm)`` (cycles/mm) and ``b`` the unit B0 direction in
    the voxel frame; a paramagnetic source gives a positive field along B0;
  * arrays keep nibabel's voxel order (i, j, k).

Every other module (data preparation, classical methods, training, refinement,
tests) calls these functions instead of re-deriving the kernel.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import scipy.fft
import scipy.ndimage

GAMMA_BAR_HZ_PER_T = 42.57747892e6
"""Proton gyromagnetic ratio over 2*pi, Hz/T."""

FIELD_UNITS = ("ppm", "hz", "rad")

# NIfTI xform codes: which world frame an affine maps into.
_XFORM_UNKNOWN = 0
_XFORM_SCANNER = 1
_XFORM_ALIGNED = 2
_XFORM_NAMES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------
def ppm_to_hz(field_ppm, b0_tesla: float):
  """Field in ppm of B0 -> frequency offset in Hz."""
  return np.asarray(field_ppm) * 1e-6 * GAMMA_BAR_HZ_PER_T * b0_tesla


def hz_to_ppm(field_hz, b0_tesla: float):
  """Frequency offset in Hz -> field in ppm of B0."""
  return np.asarray(field_hz) / (1e-6 * GAMMA_BAR_HZ_PER_T * b0_tesla)


def hz_to_rad(field_hz, te_seconds: float):
  """Frequency offset in Hz -> phase in rad accumulated at echo time TE."""
  return 2.0 * np.pi * np.asarray(field_hz) * te_seconds


def rad_to_hz(phase_rad, te_seconds: float):
  """Phase in rad at echo time TE -> frequency offset in Hz."""
  return np.asarray(phase_rad) / (2.0 * np.pi * te_seconds)


def to_ppm(field, units: str, b0_tesla: float | None = None, te_seconds: float | None = None):
  """Converts a field in ``units`` ('ppm', 'hz' or 'rad') to ppm of B0.

  Args:
    field: the field array in ``units``.
    units: one of FIELD_UNITS.
    b0_tesla: main field strength, T; needed for 'hz' and 'rad'.
    te_seconds: echo time, s; needed for 'rad'.

  Returns:
    The field in ppm of B0, float32.

  Raises:
    ValueError: unknown unit, or a unit whose conversion needs B0/TE that is missing or not
      positive.
  """
  units = str(units).lower()
  if units not in FIELD_UNITS:
    raise ValueError(f"unknown field unit {units!r}; expected one of {', '.join(FIELD_UNITS)}")
  if units == "ppm":
    return np.asarray(field, dtype=np.float32)
  if b0_tesla is None or not b0_tesla > 0:
    raise ValueError(f"field units {units!r} need a positive B0 field strength (--b0_tesla)")
  if units == "rad":
    if te_seconds is None or not te_seconds > 0:
      raise ValueError("field units 'rad' need a positive echo time (--te_seconds)")
    field = rad_to_hz(field, te_seconds)
  return hz_to_ppm(field, b0_tesla).astype(np.float32)


def from_ppm(field_ppm, units: str, b0_tesla: float | None = None, te_seconds: float | None = None):
  """Inverse of `to_ppm`: ppm of B0 -> ``units``."""
  units = str(units).lower()
  scale = float(to_ppm(np.float64(1.0), units, b0_tesla, te_seconds))
  return np.asarray(field_ppm) / scale


# --------------------------------------------------------------------------------------
# B0 direction
# --------------------------------------------------------------------------------------
def unit_vector(b0_dir: Sequence[float]) -> np.ndarray:
  """Normalises a direction; raises ValueError on a zero-length or non-finite vector."""
  v = np.asarray(b0_dir, dtype=np.float64).reshape(-1)
  if v.shape != (3,):
    raise ValueError(f"B0 direction must have 3 components, got {v.size}")
  norm = float(np.linalg.norm(v))
  if not np.isfinite(norm) or norm < 1e-12:
    raise ValueError("B0 direction has zero length (or is not finite)")
  return v / norm


def polar_rotation(matrix: np.ndarray) -> np.ndarray:
  """Orthogonal factor R of the polar decomposition ``matrix = R @ P`` (P symmetric PSD).

  Scaling and shear of a voxel-to-world matrix live in P; R is the closest orthogonal matrix,
  so it can carry a reflection (det -1) when the voxel axes are flipped.
  """
  u, _, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64)[:3, :3])
  return u @ vt


def b0_dir_from_affine(affine: np.ndarray) -> np.ndarray:
  """Unit B0 direction in the voxel frame from a voxel-to-scanner (RAS+) affine.

  Scanner z is B0; the voxel-frame direction is ``R.T @ (0, 0, 1)`` with R the rotation of
  the affine's 3x3 part from a polar decomposition (voxel sizes and shear drop out).
  """
  rot = polar_rotation(np.asarray(affine)[:3, :3])
  return unit_vector(rot.T @ np.array([0.0, 0.0, 1.0]))


def b0_dir_from_nifti(img, logger: logging.Logger | None = None) -> tuple[np.ndarray, str | None]:
  """B0 direction (voxel frame) of a nibabel image, and a warning text or None.

  The affine tells B0 only when it maps into the scanner's frame. An image whose sform/qform
  code says it was registered to a template (talairach/mni/template) or that has no
  orientation at all gets a warning: the caller should ask for an explicit ``--b0_dir``.
  """
  header = img.header
  sform_code = int(header["sform_code"]) if "sform_code" in header else _XFORM_UNKNOWN
  qform_code = int(header["qform_code"]) if "qform_code" in header else _XFORM_UNKNOWN
  code = sform_code if sform_code > 0 else qform_code
  warning = None
  if code not in (_XFORM_SCANNER, _XFORM_ALIGNED):
    warning = (f"the image's sform/qform code is '{_XFORM_NAMES.get(code, code)}', not scanner "
               "space: its affine may not tell the B0 direction; pass --b0_dir to be sure")
    (logger or _log).warning(warning)
  return b0_dir_from_affine(img.affine), warning


def rotation_between(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
  """Proper rotation matrix R (det +1) with ``R @ unit(a) = unit(b)``, the shortest one."""
  a, b = unit_vector(a), unit_vector(b)
  v = np.cross(a, b)
  c = float(np.dot(a, b))
  s = float(np.linalg.norm(v))
  if s < 1e-12:
    if c > 0:
      return np.eye(3)
    # Antiparallel: rotate by pi about any axis orthogonal to a.
    axis = np.cross(a, [1.0, 0.0, 0.0])
    if np.linalg.norm(axis) < 1e-6:
      axis = np.cross(a, [0.0, 1.0, 0.0])
    axis = axis / np.linalg.norm(axis)
    return 2.0 * np.outer(axis, axis) - np.eye(3)
  vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
  return np.eye(3) + vx + vx @ vx * ((1.0 - c) / s**2)


def rotate_volume(volume: np.ndarray, rotation: np.ndarray,
                  voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0), order: int = 1,
                  cval: float = 0.0) -> np.ndarray:
  """Rotates a volume about its centre, in physical (mm) space, onto the same grid.

  Output voxel at physical position p (relative to the centre) takes the input value at
  ``rotation.T @ p``: an object at position q moves to ``rotation @ q``. To make B0 lie along
  z, use ``rotation_between(b0_dir, (0, 0, 1))``; to undo, rotate by its transpose.

  Args:
    volume: 3D array.
    rotation: 3x3 proper rotation in the voxel-aligned physical frame.
    voxel_size_mm: voxel size, mm (anisotropic voxels are handled in mm).
    order: spline order (1 = trilinear; 0 for label maps and masks).
    cval: value outside the input.

  Returns:
    Rotated volume, same shape and dtype as the input.
  """
  rotation = np.asarray(rotation, dtype=np.float64)
  scale = np.diag(np.asarray(voxel_size_mm, dtype=np.float64))
  # input_index = S^-1 R^T S (out_index - c) + c
  matrix = np.linalg.inv(scale) @ rotation.T @ scale
  centre = (np.asarray(volume.shape, dtype=np.float64) - 1.0) / 2.0
  offset = centre - matrix @ centre
  out = scipy.ndimage.affine_transform(
      np.asarray(volume, dtype=np.float32 if order > 0 else volume.dtype), matrix,
      offset=offset, order=order, mode="constant", cval=cval, prefilter=order > 1)
  return out.astype(volume.dtype, copy=False)


# --------------------------------------------------------------------------------------
# FFT grids
# --------------------------------------------------------------------------------------
def fft_shape(shape: Sequence[int], factor: float = 1.0,
              margin: int | Sequence[int] = 0) -> tuple[int, ...]:
  """Padded FFT grid: each axis at least ``factor * n`` and ``n + 2 * margin``, fast size
  (``margin``: one number for every axis, or one per axis)."""
  margins = [margin] * len(shape) if np.ndim(margin) == 0 else list(margin)
  out = []
  for n, m in zip(shape, margins):
    target = max(int(math.ceil(n * factor)), n + 2 * int(m))
    out.append(scipy.fft.next_fast_len(target, real=True))
  return tuple(out)


def pad_to(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Zero-pads a volume centrally to ``shape`` (each axis >= the volume's)."""
  pads = []
  for n, p in zip(volume.shape, shape):
    if p < n:
      raise ValueError(f"cannot pad axis of {n} to {p}")
    before = (p - n) // 2
    pads.append((before, p - n - before))
  return np.pad(volume, pads)


def crop_from(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Inverse of `pad_to`: the central region of ``shape``."""
  sl = tuple(slice((p - n) // 2, (p - n) // 2 + n) for n, p in zip(shape, volume.shape))
  return volume[sl]


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
  """Slices of the mask's bounding box grown by ``margin`` voxels, clipped to the volume.

  Raises:
    ValueError: the mask is empty.
  """
  idx = np.nonzero(mask)
  if idx[0].size == 0:
    raise ValueError("mask is empty")
  return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + 1 + margin, n))
               for i, n in zip(idx, mask.shape))


# --------------------------------------------------------------------------------------
# Dipole kernel and forward model
# --------------------------------------------------------------------------------------
def kspace_grid(shape: Sequence[int], voxel_size_mm: Sequence[float], rfft: bool = False):
  """Spatial frequencies (cycles/mm) of an FFT grid, broadcastable: (ki, kj, kk).

  With ``rfft=True`` the last axis holds ``rfftfreq`` (for `scipy.fft.rfftn`).
  """
  shape = tuple(int(n) for n in shape)
  voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
  if len(shape) != 3 or len(voxel_size_mm) != 3:
    raise ValueError("shape and voxel size must have 3 entries")
  ks = []
  for axis, (n, d) in enumerate(zip(shape, voxel_size_mm)):
    if rfft and axis == 2:
      k = scipy.fft.rfftfreq(n, d=d)
    else:
      k = scipy.fft.fftfreq(n, d=d)
    view = [1, 1, 1]
    view[axis] = k.size
    ks.append(k.reshape(view))
  return tuple(ks)


def dipole_kernel(shape: Sequence[int], voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                  b0_dir: Sequence[float] = (0.0, 0.0, 1.0), rfft: bool = False,
                  dtype=np.float32) -> np.ndarray:
  """Unit dipole kernel ``D(k) = 1/3 - (k.b)^2/|k|^2`` on an FFT grid, ``D(0) = 0``.

  Args:
    shape: FFT grid shape (i, j, k).
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame (normalised here).
    rfft: return the half-spectrum grid of `scipy.fft.rfftn` (last axis n//2+1).
    dtype: output dtype.

  Returns:
    Real kernel array of the grid's shape.
  """
  b = unit_vector(b0_dir)
  # Float32 arithmetic on broadcast axes: ~20x faster than float64 on a padded 1 mm head grid,
  # and the kernel itself is O(1), so the rounding (~1e-7) is far below any field noise.
  ks = [k.astype(np.float32) for k in kspace_grid(shape, voxel_size_mm, rfft=rfft)]
  # On an even axis the Nyquist sample stands for both +k/2 and -k/2. With an oblique B0 the
  # two give different (k.b)^2, so D is averaged over both signs there: the operator stays
  # real-symmetric (D(k) = D(-k) on the grid), the rfft and full-FFT grids agree and axis swaps
  # are exact. Averaging over the sign s of a Nyquist component c: E[(a + s c)^2] = a^2 + c^2.
  kb = np.float32(0.0)
  nyquist_sq = np.float32(0.0)
  for axis, (k, n, bi) in enumerate(zip(ks, shape, b)):
    term = k * np.float32(bi)
    if int(n) % 2 == 0:
      nyq = np.zeros(k.shape, dtype=bool)
      index = [0, 0, 0]
      index[axis] = int(n) // 2 if not (rfft and axis == 2) else k.size - 1
      nyq[tuple(index)] = True
      nyquist_sq = nyquist_sq + np.where(nyq, term * term, np.float32(0.0))
      term = np.where(nyq, np.float32(0.0), term)
    kb = kb + term
  ki, kj, kk = ks
  k2 = ki * ki + kj * kj + kk * kk
  k2[0, 0, 0] = 1.0  # D(0) is set below; avoid 0/0.
  d = np.float32(1.0 / 3.0) - (kb * kb + nyquist_sq) / k2
  d[0, 0, 0] = 0.0
  return d.astype(dtype, copy=False)


def smv_kernel(shape: Sequence[int], voxel_size_mm: Sequence[float],
               radius_mm: float) -> np.ndarray:
  """Half-spectrum transfer function of the spherical mean value (SMV) filter on an FFT grid.

  The normalised sphere of ``radius_mm`` (voxel centres within the radius, periodic offsets),
  Fourier-transformed (`scipy.fft.rfftn`; real, as the sphere is symmetric). ``1 - S`` removes
  every harmonic field inside the mask eroded by the radius (mean value property): SHARP's
  filter, and the data filter of `refine`'s ``smv_radius_mm``.

  Returns:
    float32 array of the half-spectrum grid's shape, ``S(0) = 1``.
  """
  coords = []
  for axis, (n, d) in enumerate(zip(shape, voxel_size_mm)):
    offsets = scipy.fft.fftfreq(int(n), d=1.0 / int(n)) * float(d)  # signed periodic, mm
    view = [1, 1, 1]
    view[axis] = int(n)
    coords.append(offsets.reshape(view))
  sphere = (coords[0]**2 + coords[1]**2 + coords[2]**2 <= float(radius_mm)**2)
  sphere = sphere.astype(np.float32)
  sphere /= sphere.sum()
  return np.real(scipy.fft.rfftn(sphere, workers=-1)).astype(np.float32)


def _fftn(x):
  return scipy.fft.rfftn(x, workers=-1)


def _ifftn(x, shape):
  return scipy.fft.irfftn(x, s=shape, workers=-1)


def apply_kernel(volume: np.ndarray, kernel_rfft: np.ndarray) -> np.ndarray:
  """Periodic convolution of a volume (already on the kernel's grid) with a real kernel.

  ``kernel_rfft`` is a half-spectrum kernel from ``dipole_kernel(..., rfft=True)``.
  """
  return _ifftn(_fftn(volume) * kernel_rfft, volume.shape).astype(np.float32)


def forward_field(chi_ppm: np.ndarray, voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                  b0_dir: Sequence[float] = (0.0, 0.0, 1.0), pad_factor: float = 2.0,
                  margin: int | Sequence[int] = 0) -> np.ndarray:
  """Local field (ppm of B0) of a susceptibility map (ppm): ``F^-1[D . F[chi]]``.

  Zero-pads to ``pad_factor`` x the shape (default 2x, for simulation: the FFT is periodic,
  and less padding lets fields wrap around) plus an optional margin, then crops back.

  Args:
    chi_ppm: susceptibility, ppm, 3D.
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame.
    pad_factor: minimum padded size per axis as a multiple of the input size.
    margin: minimum zero margin per side, voxels (one for every axis, or one per axis).

  Returns:
    Field in ppm of B0, float32, the input's shape.
  """
  chi_ppm = np.asarray(chi_ppm, dtype=np.float32)
  grid = fft_shape(chi_ppm.shape, pad_factor, margin)
  kernel = dipole_kernel(grid, voxel_size_mm, b0_dir, rfft=True)
  return crop_from(apply_kernel(pad_to(chi_ppm, grid), kernel), chi_ppm.shape)


def field_residual(chi_ppm: np.ndarray, field_ppm: np.ndarray, mask: np.ndarray,
                   voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                   b0_dir: Sequence[float] = (0.0, 0.0, 1.0), pad_factor: float = 2.0) -> float:
  """Relative field residual ``||M(D chi - field)|| / ||M field||`` (0 = perfect consistency).

  The mean over the mask is removed from both fields first: chi is relative, so its dipole
  field is known up to a constant offset only where D(0) = 0.
  """
  mask = np.asarray(mask, dtype=bool)
  model = forward_field(chi_ppm, voxel_size_mm, b0_dir, pad_factor)[mask]
  meas = np.asarray(field_ppm, dtype=np.float64)[mask]
  model = model - model.mean()
  meas = meas - meas.mean()
  return float(np.linalg.norm(model - meas) / max(np.linalg.norm(meas), 1e-30))


def cosmos(fields_ppm: Sequence[np.ndarray], voxel_size_mm: Sequence[float],
           b0_dirs: Sequence[Sequence[float]], floor: float = 1e-3,
           pad_factor: float = 2.0) -> np.ndarray:
  """COSMOS susceptibility (ppm) from N >= 3 co-registered fields (ppm).

  ``chi(k) = sum_n D_n(k) field_n(k) / max(sum_n D_n(k)^2, floor)``, all fields on one voxel
  grid with their own B0 directions in that grid's frame.

  Args:
    fields_ppm: N co-registered local fields, ppm of B0.
    voxel_size_mm: voxel size of the common grid, mm.
    b0_dirs: N B0 directions in the voxel frame, one per field.
    floor: lower bound of ``sum_n D_n(k)^2``.
    pad_factor: FFT padding factor.

  Raises:
    ValueError: fewer than 3 orientations, or fields of different shapes.
  """
  if len(fields_ppm) != len(b0_dirs):
    raise ValueError("one B0 direction per field is needed")
  if len(fields_ppm) < 3:
    raise ValueError(f"COSMOS needs at least 3 orientations, got {len(fields_ppm)}")
  shape = np.shape(fields_ppm[0])
  if any(np.shape(f) != shape for f in fields_ppm):
    raise ValueError("COSMOS fields must be co-registered (same shape)")
  grid = fft_shape(shape, pad_factor)
  num = None
  den = None
  for field, b0 in zip(fields_ppm, b0_dirs):
    d = dipole_kernel(grid, voxel_size_mm, b0, rfft=True).astype(np.float64)
    term = d * _fftn(pad_to(np.asarray(field, dtype=np.float32), grid))
    num = term if num is None else num + term
    den = d**2 if den is None else den + d**2
  chi = _ifftn(num / np.maximum(den, floor), grid)
  return crop_from(chi, shape).astype(np.float32)
