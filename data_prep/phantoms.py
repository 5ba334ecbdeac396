"""Anatomical susceptibility phantoms on the ICBM152 2009 template nilearn ships.

Each seed gives a different brain: the template's grey/white-matter maps (bundled inside the
nilearn wheel, nothing is downloaded) get a random affine (rotation, per-axis scaling, translation)
and a smooth random non-linear warp; deep grey nuclei and thalamus are synthesised as soft
ellipsoids at approximate MNI coordinates in both hemispheres; veins are random tubes plus a
superior-sagittal-sinus-like tube traced along the midline convexity; tissue susceptibilities are
drawn around literature values with smooth and fine within-tissue textures and an iron texture in
the nuclei; optional pathology adds microbleeds and a calcification. Proton density and R2* (the
magnitude) follow their own model, related to chi but not sharing its edges (`_template_canvas`).
The result is a `Phantom`: susceptibility (ppm), qsm-ci segmentation labels, brain mask, and the
proton density and R2* the magnitude simulation (`data_prep.simulate`) needs.

This module also holds the drawing primitives (`Grid`, soft ellipsoids, cylinders and tubes, smooth
random fields, lesions) that the anatomy-free phantoms in `data_prep.shapes` reuse.

Example:
  phantom = brain_phantom(seed=7, shape=(160, 192, 160), voxel_size_mm=(1, 1, 1), lesions=True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import numpy as np
import scipy.ndimage

# qsm-ci segmentation labels (qsm_ci.qsm_eval.DSEG_LABELS) plus 17 for microbleeds and 12 for the
# compact objects of anatomy-free phantoms (12 is unused by qsm-ci).
LABELS = {
    "caudate": 1, "globus_pallidus": 2, "putamen": 3, "red_nucleus": 4, "dentate": 5,
    "substantia_nigra": 6, "thalamus": 7, "white_matter": 8, "grey_matter": 9, "csf": 10,
    "vessel": 11, "object": 12, "calcification": 16, "microbleed": 17,
}

# Susceptibility ranges (ppm, relative to CSF) each seed draws from, per label: in-vivo values at
# 3T/7T (e.g. Deistung 2013, Lim 2013, the QSM challenge 2.0 head phantom).
CHI_RANGES_PPM = {
    1: (0.06, 0.09),    # caudate
    2: (0.15, 0.19),    # globus pallidus
    3: (0.07, 0.11),    # putamen
    4: (0.10, 0.15),    # red nucleus
    5: (0.10, 0.15),    # dentate
    6: (0.12, 0.19),    # substantia nigra
    7: (0.02, 0.05),    # thalamus
    8: (-0.045, -0.015),  # white matter
    9: (0.01, 0.035),   # cortical grey matter
    10: (-0.01, 0.01),  # CSF
    11: (0.30, 0.45),   # venous blood
    16: (-0.5, -0.2),   # calcification
    17: (0.5, 1.5),     # microbleed (haemosiderin)
}

# Proton density (a.u., CSF = 1) and R2* (1/s at 3T) per label, for the magnitude image.
PD = {1: 0.78, 2: 0.72, 3: 0.78, 4: 0.74, 5: 0.74, 6: 0.72, 7: 0.76, 8: 0.69, 9: 0.80, 10: 1.0,
      11: 0.85, 12: 0.80, 16: 0.25, 17: 0.65}
R2STAR_HZ = {1: 21.0, 2: 38.0, 3: 25.0, 4: 30.0, 5: 30.0, 6: 35.0, 7: 20.0, 8: 20.0, 9: 15.0,
             10: 3.0, 11: 45.0, 12: 20.0, 16: 90.0, 17: 180.0}

# Brain phantom detail levels (`brain_phantom(detail=...)`).
DETAIL_MODES = ("none", "fine")

# Natural field of view of a brain phantom at 1 mm: the template's brain (about 145 x 182 x 155 mm)
# with room for the random transforms, each axis a multiple of 16.
BRAIN_FOV_MM = (176, 208, 176)
# Margin (mm) kept free on each side when a requested field of view forces the anatomy to shrink.
_FIT_MARGIN_MM = 4.0

# Deep grey nuclei and thalamus as ellipsoids, right hemisphere (x > 0) in MNI mm; mirrored to the
# left. (label, centre, semi-axes, rotation about x/y/z in degrees). Approximate: the random warp
# moves them with the rest of the brain.
_NUCLEI = (
    (7, (11.0, -18.0, 7.0), (7.0, 13.0, 8.0), (0.0, 0.0, -15.0)),      # thalamus
    (3, (25.0, 3.0, 1.0), (5.0, 14.0, 8.0), (0.0, 0.0, 8.0)),          # putamen
    (2, (19.0, -3.0, -1.0), (3.5, 8.0, 4.5), (0.0, 0.0, 15.0)),        # globus pallidus
    (1, (13.0, 14.0, 8.0), (4.5, 8.0, 7.0), (0.0, 0.0, 0.0)),          # caudate head
    (1, (16.0, -8.0, 19.0), (3.0, 11.0, 3.5), (20.0, 0.0, 0.0)),       # caudate body
    (4, (5.0, -20.0, -9.0), (3.0, 3.5, 4.0), (0.0, 0.0, 0.0)),         # red nucleus
    (6, (11.0, -17.0, -12.0), (2.5, 8.0, 2.5), (-20.0, 0.0, 30.0)),    # substantia nigra
    (5, (15.0, -58.0, -33.0), (6.0, 9.0, 5.0), (0.0, 0.0, 20.0)),      # dentate
)


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Phantom:
  """A susceptibility phantom on a voxel grid.

  Attributes:
    chi_ppm: susceptibility, ppm, float32; 0 outside the mask.
    seg: qsm-ci labels (see `LABELS`), int16; 0 outside the mask.
    mask: brain (or object) mask, bool.
    pd: proton density, a.u. (CSF = 1), float32; 0 outside the mask.
    r2star_hz: R2*, 1/s, float32.
    voxel_size_mm: voxel size, mm.
    meta: JSON-serialisable description (kind, seed, drawn tissue values, lesions, transform).
  """
  chi_ppm: np.ndarray
  seg: np.ndarray
  mask: np.ndarray
  pd: np.ndarray
  r2star_hz: np.ndarray
  voxel_size_mm: tuple[float, float, float]
  meta: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Grid:
  """A voxel grid in physical space: voxel (i, j, k) sits at ``origin_mm + index * voxel``."""
  shape: tuple[int, int, int]
  voxel_size_mm: tuple[float, float, float]
  origin_mm: tuple[float, float, float]

  @classmethod
  def centred(cls, shape: Sequence[int], voxel_size_mm: Sequence[float]) -> "Grid":
    """A grid whose centre is the physical origin."""
    shape = tuple(int(n) for n in shape)
    vox = tuple(float(v) for v in voxel_size_mm)
    return cls(shape, vox, tuple(-(n - 1) / 2.0 * v for n, v in zip(shape, vox)))

  def axes_mm(self) -> list[np.ndarray]:
    """Physical coordinates (mm) of the voxel centres along each axis."""
    return [o + np.arange(n, dtype=np.float32) * v
            for n, v, o in zip(self.shape, self.voxel_size_mm, self.origin_mm)]

  def box(self, lo_mm, hi_mm):
    """Voxels whose centres lie in the physical box [lo, hi].

    Returns:
      ``(slices, coords)`` with coords three broadcastable arrays (mm) of the box's voxel
      centres, or None if the box misses the grid.
    """
    slices, coords = [], []
    for axis in range(3):
      n, v, o = self.shape[axis], self.voxel_size_mm[axis], self.origin_mm[axis]
      i0 = max(int(math.ceil((lo_mm[axis] - o) / v)), 0)
      i1 = min(int(math.floor((hi_mm[axis] - o) / v)) + 1, n)
      if i1 <= i0:
        return None
      view = [1, 1, 1]
      view[axis] = i1 - i0
      slices.append(slice(i0, i1))
      coords.append((o + np.arange(i0, i1, dtype=np.float32) * v).reshape(view))
    return tuple(slices), coords

  @property
  def edge_mm(self) -> float:
    """Width of a soft edge: the geometric mean voxel size."""
    return float(np.prod(self.voxel_size_mm) ** (1.0 / 3.0))


@dataclasses.dataclass
class Canvas:
  """Volumes painted together: susceptibility, labels, proton density, R2*."""
  grid: Grid
  chi: np.ndarray
  seg: np.ndarray
  pd: np.ndarray
  r2s: np.ndarray

  @classmethod
  def empty(cls, grid: Grid) -> "Canvas":
    return cls(grid, np.zeros(grid.shape, np.float32), np.zeros(grid.shape, np.int16),
               np.zeros(grid.shape, np.float32), np.zeros(grid.shape, np.float32))

  def paint(self, region, chi, label: int | None, *, pd: float | None = None,
            r2s: float | None = None, weight: np.ndarray | None = None, additive: bool = False,
            appearance: bool = True):
    """Blends an object into the canvas with its soft occupancy (partial volume).

    Args:
      region: ``(slices, occupancy)`` from one of the ``*_region`` functions, or None.
      chi: the object's susceptibility, ppm: a scalar or an array of the region's shape.
      label: seg label where the occupancy is >= 0.5 (None: labels unchanged).
      pd: proton density (default from `PD` by label).
      r2s: R2*, 1/s (default from `R2STAR_HZ` by label).
      weight: optional full-grid multiplier of the occupancy (e.g. keep out of CSF).
      additive: add ``occupancy * chi`` instead of replacing (overlapping sources).
      appearance: also blend proton density and R2*; False leaves them to `paint_appearance`
        (an object whose magnitude boundary differs from its susceptibility boundary).
    """
    if region is None:
      return
    sl, occ = region
    if weight is not None:
      occ = occ * weight[sl]
    chi_view = self.chi[sl]
    if additive:
      chi_view += occ * chi
    else:
      chi_view *= 1.0 - occ
      chi_view += occ * chi
    if appearance:
      self.paint_appearance((sl, occ), PD.get(label, 0.8) if pd is None else pd,
                            R2STAR_HZ.get(label, 20.0) if r2s is None else r2s)
    if label is not None:
      self.seg[sl][occ >= 0.5] = label

  def paint_appearance(self, region, pd, r2s, weight: np.ndarray | None = None):
    """Blends proton density (a.u.) and R2* (1/s, scalar or region-shaped) into the canvas only."""
    if region is None:
      return
    sl, occ = region
    if weight is not None:
      occ = occ * weight[sl]
    for view, value in ((self.pd[sl], pd), (self.r2s[sl], r2s)):
      view *= 1.0 - occ
      view += occ * value


# --------------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------------
def euler_rotation(degrees: Sequence[float]) -> np.ndarray:
  """Rotation matrix ``Rz @ Ry @ Rx`` from angles (degrees) about x, y, z."""
  ax, ay, az = np.deg2rad(np.asarray(degrees, dtype=np.float64))
  rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
  ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
  rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
  """A rotation with each Euler angle uniform in [-max_deg, max_deg]."""
  return euler_rotation(rng.uniform(-max_deg, max_deg, size=3))


def _occupancy(dist_mm, edge_mm: float) -> np.ndarray:
  """Soft occupancy from a signed distance to the surface (positive inside): a one-voxel ramp."""
  return np.clip(0.5 + np.asarray(dist_mm, dtype=np.float32) / edge_mm, 0.0, 1.0)


def ellipsoid_region(grid: Grid, center_mm, semi_axes_mm, rotation=None):
  """Soft ellipsoid: ``(slices, occupancy)`` over its bounding box, or None off the grid.

  The signed distance to the surface is the first-order estimate ``(1 - rho) / |grad rho|`` with
  rho the ellipsoidal radius, so the edge is a one-voxel partial-volume ramp.
  """
  center = np.asarray(center_mm, dtype=np.float64)
  axes = np.maximum(np.asarray(semi_axes_mm, dtype=np.float64), 1e-3)
  rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
  reach = axes.max() + grid.edge_mm
  found = grid.box(center - reach, center + reach)
  if found is None:
    return None
  sl, coords = found
  d = [c - np.float32(center[i]) for i, c in enumerate(coords)]
  rho2 = 0.0
  g2 = 0.0
  for k in range(3):
    q = d[0] * np.float32(rot[0, k]) + d[1] * np.float32(rot[1, k]) + d[2] * np.float32(rot[2, k])
    rho2 = rho2 + (q / np.float32(axes[k]))**2
    g2 = g2 + (q / np.float32(axes[k]**2))**2
  rho = np.sqrt(rho2)
  g = np.sqrt(g2)
  with np.errstate(divide="ignore", invalid="ignore"):
    scale = np.where(g > 0, rho / g, np.float32(axes.min()))
  occ = _occupancy((1.0 - rho) * scale, grid.edge_mm)
  return sl, np.broadcast_to(occ, tuple(s.stop - s.start for s in sl)).astype(np.float32)


def cylinder_region(grid: Grid, center_mm, axis, radius_mm: float, half_length_mm: float):
  """Soft finite cylinder: ``(slices, occupancy)``, or None off the grid."""
  center = np.asarray(center_mm, dtype=np.float64)
  u = np.asarray(axis, dtype=np.float64)
  u = u / np.linalg.norm(u)
  reach = math.hypot(radius_mm, half_length_mm) + grid.edge_mm
  found = grid.box(center - reach, center + reach)
  if found is None:
    return None
  sl, coords = found
  d = [c - np.float32(center[i]) for i, c in enumerate(coords)]
  along = d[0] * np.float32(u[0]) + d[1] * np.float32(u[1]) + d[2] * np.float32(u[2])
  radial = np.sqrt(np.maximum(d[0]**2 + d[1]**2 + d[2]**2 - along**2, 0.0))
  dist = np.minimum(radius_mm - radial, half_length_mm - np.abs(along))
  return sl, _occupancy(dist, grid.edge_mm)


def bezier_points(points_mm, step_mm: float = 0.25) -> np.ndarray:
  """Dense samples (n, 3) along the Bezier curve with control points ``points_mm``."""
  ctrl = np.asarray(points_mm, dtype=np.float64)
  length = float(np.sum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1)))
  t = np.linspace(0.0, 1.0, max(int(length / step_mm) + 2, 2))[:, None]
  n = len(ctrl) - 1
  curve = np.zeros((t.shape[0], 3))
  for i, p in enumerate(ctrl):
    curve += math.comb(n, i) * (1 - t)**(n - i) * t**i * p
  return curve


def tube_region(grid: Grid, points_mm, radius_mm: float, chunk: int = 48):
  """Soft tube of ``radius_mm`` around a densely sampled curve (n, 3): ``(slices, occupancy)``.

  The distance to the curve is the distance to its nearest sample, computed chunk by chunk in
  small boxes so a long vessel costs little.
  """
  pts = np.asarray(points_mm, dtype=np.float64)
  reach = radius_mm + grid.edge_mm
  found = grid.box(pts.min(axis=0) - reach, pts.max(axis=0) + reach)
  if found is None:
    return None
  sl, _ = found
  occ = np.zeros(tuple(s.stop - s.start for s in sl), np.float32)
  for start in range(0, len(pts), chunk):
    part = pts[start:start + chunk + 1]
    sub = grid.box(part.min(axis=0) - reach, part.max(axis=0) + reach)
    if sub is None:
      continue
    sub_sl, coords = sub
    best = None
    for p in part.astype(np.float32):
      d2 = (coords[0] - p[0])**2 + (coords[1] - p[1])**2 + (coords[2] - p[2])**2
      best = d2 if best is None else np.minimum(best, d2)
    local = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sub_sl, sl))
    np.maximum(occ[local], _occupancy(radius_mm - np.sqrt(best), grid.edge_mm), out=occ[local])
  return sl, occ


def smooth_field(shape: Sequence[int], rng: np.random.Generator, spacing_vox: Sequence[float],
                 dtype=np.float32) -> np.ndarray:
  """Smooth random field with zero mean and unit standard deviation.

  A tensor product of Gaussian bumps on a coarse control grid (``spacing_vox`` voxels apart per
  axis, spanning the grid plus 1.5 spacings each side) with random normal weights, evaluated
  separably: cheap even for a whole 1 mm volume.
  """
  shape = tuple(int(n) for n in shape)
  spacing = np.broadcast_to(np.asarray(spacing_vox, dtype=np.float64), (3,))
  axes = [np.arange(n, dtype=np.float64) for n in shape]
  return _smooth(axes, [-0.5] * 3, [n - 0.5 for n in shape], spacing, rng, dtype)


def smooth_field_mm(grid: Grid, rng: np.random.Generator, spacing_mm: Sequence[float],
                    dtype=np.float32) -> np.ndarray:
  """`smooth_field` with its control grid in physical space over the grid's field of view, so
  grids of one field of view but different voxel sizes sample the same random field."""
  spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
  lo = [o - v / 2.0 for o, v in zip(grid.origin_mm, grid.voxel_size_mm)]
  hi = [o + (n - 0.5) * v for n, v, o in zip(grid.shape, grid.voxel_size_mm, grid.origin_mm)]
  return _smooth([a.astype(np.float64) for a in grid.axes_mm()], lo, hi, spacing, rng, dtype)


def _smooth(axes, lo, hi, spacing, rng, dtype):
  bases = []
  for x, a, b, s in zip(axes, lo, hi, spacing):
    s = max(float(s), 1e-3)
    n_ctrl = int(math.ceil((b - a) / s + 3.0)) + 1
    centres = np.linspace(a - 1.5 * s, b + 1.5 * s, n_ctrl)
    basis = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / s)**2)
    basis /= np.sqrt(np.sum(basis**2, axis=1, keepdims=True))
    bases.append(basis.astype(dtype))
  weights = rng.standard_normal(tuple(b.shape[1] for b in bases)).astype(dtype)
  out = np.tensordot(weights, bases[2], axes=([2], [1]))      # (a, b, z)
  out = np.tensordot(out, bases[1], axes=([1], [1]))          # (a, z, y)
  out = np.tensordot(bases[0], out, axes=([1], [0]))          # (x, z, y)
  out = np.ascontiguousarray(out.transpose(0, 2, 1))
  out -= out.mean()
  out /= max(float(out.std()), 1e-12)
  return out.astype(dtype, copy=False)


def draw_value(rng: np.random.Generator, label: int) -> float:
  """A susceptibility (ppm) for ``label`` uniform in its literature range."""
  lo, hi = CHI_RANGES_PPM[label]
  return float(rng.uniform(lo, hi))


def add_lesions(canvas: Canvas, mask: np.ndarray, rng: np.random.Generator,
                host_labels: Sequence[int], n_microbleeds: tuple[int, int] = (2, 5),
                n_calcifications: tuple[int, int] = (1, 1)) -> list[dict]:
  """Draws microbleeds (label 17) and calcifications (label 16) as soft spheres.

  Sizes are physical (microbleeds 2-5 mm, calcifications 3-6 mm diameter) whatever the grid; the
  centre voxel is always labelled, so a lesion smaller than a voxel still counts. Lesions sit in
  voxels of ``host_labels``, fully inside the mask and apart from each other, so each is one
  connected component of its label. One calcification by default: qsm-ci's calcification metrics
  expect a single one.

  Returns:
    One dict per lesion: type, label, centre_mm, diameter_mm, chi_ppm.
  """
  grid = canvas.grid
  vox = np.asarray(grid.voxel_size_mm)
  origin = np.asarray(grid.origin_mm)
  host = np.isin(canvas.seg, np.asarray(host_labels)) & mask
  candidates = np.flatnonzero(host)
  n_bleeds = int(rng.integers(n_microbleeds[0], n_microbleeds[1] + 1))
  n_calcs = int(rng.integers(n_calcifications[0], n_calcifications[1] + 1))
  plan = ([("microbleed", 17, (2.0, 5.0))] * n_bleeds
          + [("calcification", 16, (3.0, 6.0))] * n_calcs)
  placed: list[dict] = []
  if candidates.size == 0:
    return placed
  for kind, label, (dmin, dmax) in plan:
    diameter = float(rng.uniform(dmin, dmax))
    radius = diameter / 2.0
    for _ in range(200):
      idx = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], grid.shape))
      centre = origin + idx * vox
      # Keep a voxel of brain around the lesion and a gap between lesions.
      half = np.ceil((radius + 1.5 * vox) / vox).astype(int)
      lo, hi = idx - half, idx + half + 1
      if np.any(lo < 0) or np.any(hi > np.asarray(grid.shape)):
        continue
      if not mask[tuple(slice(a, b) for a, b in zip(lo, hi))].all():
        continue
      if any(np.linalg.norm(centre - np.asarray(p["centre_mm"])) < radius + p["diameter_mm"] / 2
             + 2.0 * float(vox.max()) for p in placed):
        continue
      break
    else:
      continue
    chi = draw_value(rng, label)
    region = ellipsoid_region(grid, centre, (radius,) * 3)
    canvas.paint(region, chi, label)
    canvas.seg[tuple(idx)] = label
    placed.append({"type": kind, "label": label, "centre_mm": [round(float(c), 3) for c in centre],
                   "diameter_mm": round(diameter, 3), "chi_ppm": round(chi, 5)})
  return placed


def fit_zoom(shape: Sequence[int], voxel_size_mm: Sequence[float], extent_mm: Sequence[float],
             margin_mm: float = _FIT_MARGIN_MM) -> float:
  """Uniform anatomy scale (<= 1) that fits ``extent_mm`` into the grid's field of view."""
  fov = np.asarray(shape, dtype=np.float64) * np.asarray(voxel_size_mm, dtype=np.float64)
  ratio = (fov - 2.0 * margin_mm) / np.asarray(extent_mm, dtype=np.float64)
  return float(min(1.0, max(ratio.min(), 1e-3)))


def natural_shape(fov_mm: Sequence[float], voxel_size_mm: Sequence[float],
                  multiple: int = 8) -> tuple[int, int, int]:
  """Grid shape covering ``fov_mm`` at ``voxel_size_mm``, each axis rounded up to ``multiple``."""
  return tuple(int(math.ceil(f / v / multiple) * multiple) for f, v in zip(fov_mm, voxel_size_mm))


# --------------------------------------------------------------------------------------------------
# ICBM152 template
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Template:
  grid: Grid          # template grid in MNI mm (cropped to the brain)
  p_gm: np.ndarray    # tissue fractions inside the mask, summing to 1
  p_wm: np.ndarray
  p_csf: np.ndarray
  mask: np.ndarray
  seg: np.ndarray     # 8/9/10 by the largest fraction
  centre_mm: np.ndarray
  extent_mm: np.ndarray
  midline_sinus: np.ndarray  # dense (n, 3) samples, MNI mm
  t1: np.ndarray      # T1 template intensity, white matter = 1, 0 outside the mask
  soft: np.ndarray    # (3, ...) WM/GM/CSF fractions sharpened less (p^2): magnitude borders


@functools.lru_cache(maxsize=1)
def load_template() -> _Template:
  """Loads and prepares the ICBM152 2009 GM/WM/T1 maps bundled with nilearn (no download).

  The brain mask is the T1 template above 0.1 with enclosed holes (ventricles) filled; CSF is the
  part of the mask the GM and WM fractions leave. Cached per process.
  """
  # nilearn's loaders read files inside its wheel (checked in tests with the network blocked).
  from nilearn import datasets  # pylint: disable=import-outside-toplevel

  gm_img = datasets.load_mni152_gm_template()
  gm = np.asarray(gm_img.get_fdata(dtype=np.float32))
  wm = np.asarray(datasets.load_mni152_wm_template().get_fdata(dtype=np.float32))
  t1 = np.asarray(datasets.load_mni152_template().get_fdata(dtype=np.float32))
  affine = gm_img.affine
  if not np.allclose(affine[:3, :3], np.eye(3)):
    raise RuntimeError("unexpected ICBM152 template orientation")
  mask = t1 > 0.1
  mask = scipy.ndimage.binary_closing(mask, iterations=2)
  mask = scipy.ndimage.binary_fill_holes(mask)
  crop = tuple(slice(max(s.start - 4, 0), min(s.stop + 4, n))
               for s, n in zip(scipy.ndimage.find_objects(mask.astype(np.int8))[0], mask.shape))
  gm, wm, mask, t1 = gm[crop], wm[crop], mask[crop], t1[crop]
  origin = tuple(float(affine[i, 3] + crop[i].start) for i in range(3))
  grid = Grid(mask.shape, (1.0, 1.0, 1.0), origin)
  gm = np.clip(gm, 0, 1) * mask
  wm = np.clip(wm, 0, 1) * mask
  over = np.maximum(gm + wm, 1.0)
  gm, wm = gm / over, wm / over
  csf = np.clip(1.0 - gm - wm, 0, 1) * mask
  # The template averages 152 brains, so its tissue borders are several mm wide; one brain's are
  # about a voxel. Sharpening the fractions (p^4, renormalised) restores that.
  # The magnitude maps use a milder sharpening (p^2), so magnitude and chi borders differ by a
  # fraction of a voxel to a voxel, as a real magnitude's partial volume does.
  stack = np.stack([wm, gm, csf])
  soft = stack ** 2
  soft /= np.maximum(soft.sum(axis=0), 1e-12)
  soft = (soft * mask).astype(np.float32)
  sharp = stack ** 4
  sharp /= np.maximum(sharp.sum(axis=0), 1e-12)
  wm, gm, csf = sharp * mask
  t1 = np.clip(t1 / max(float(np.median(t1[wm > 0.9])), 1e-6), 0.0, 1.5) * mask
  seg = np.zeros(mask.shape, np.int16)
  stack = np.stack([wm, gm, csf])
  seg[mask] = np.asarray([8, 9, 10], np.int16)[np.argmax(stack[:, mask], axis=0)]
  idx = np.nonzero(mask)
  lo = np.array([i.min() for i in idx], np.float64) + origin
  hi = np.array([i.max() for i in idx], np.float64) + origin
  template = _Template(grid, gm.astype(np.float32), wm.astype(np.float32),
                       csf.astype(np.float32), mask, seg, (lo + hi) / 2.0, hi - lo + 1.0,
                       _trace_midline_sinus(mask, grid), t1.astype(np.float32), soft)
  for arr in (template.p_gm, template.p_wm, template.p_csf, template.mask, template.seg,
              template.t1, template.soft):
    arr.setflags(write=False)
  return template


def _trace_midline_sinus(mask: np.ndarray, grid: Grid, inset_mm: float = 3.0) -> np.ndarray:
  """Samples just inside the brain's outline in the midsagittal plane, from frontal over the
  vertex to occipital: the course of the superior sagittal sinus."""
  i0 = int(round(-grid.origin_mm[0]))
  plane = mask[i0]
  centre = np.array([-20.0, 15.0])  # (y, z) MNI mm, roughly the corpus callosum
  points = []
  for theta in np.deg2rad(np.linspace(15.0, 200.0, 75)):
    direction = np.array([math.cos(theta), math.sin(theta)])
    r_edge = None
    for r in np.arange(5.0, 120.0, 0.5):
      y, z = centre + r * direction
      j = int(round(y - grid.origin_mm[1]))
      k = int(round(z - grid.origin_mm[2]))
      if not (0 <= j < plane.shape[0] and 0 <= k < plane.shape[1]):
        break
      if plane[j, k]:
        r_edge = r
    if r_edge is not None:
      y, z = centre + (r_edge - inset_mm) * direction
      points.append((0.0, y, z))
  pts = np.asarray(points)
  # A light moving average removes the staircase of the voxel outline.
  kernel = np.ones(5) / 5.0
  smooth = np.stack([np.convolve(np.pad(pts[:, a], 2, mode="edge"), kernel, "valid")
                     for a in range(3)], axis=1)
  return np.concatenate([bezier_points([a, b], 0.25)[:-1] for a, b in zip(smooth[:-1], smooth[1:])])


def _brain_points(rng: np.random.Generator, template: _Template):
  """A function drawing one random voxel of the brain per call, as a point in mm (the template's
  grid is 1 mm: origin + index)."""
  idx = np.flatnonzero(template.mask)
  origin = np.asarray(template.grid.origin_mm)
  return lambda: origin + np.array(np.unravel_index(idx[rng.integers(idx.size)],
                                                    template.grid.shape))


def _short_vessels(rng: np.random.Generator, template: _Template, count: int,
                   length_mm: tuple[float, float]) -> list:
  """Random short curved vessels from points of the brain in random directions (Bezier samples)."""
  point = _brain_points(rng, template)
  vessels = []
  for _ in range(count):
    a = point()
    direction = rng.standard_normal(3)
    length = float(rng.uniform(*length_mm))
    b = a + direction / max(float(np.linalg.norm(direction)), 1e-9) * length
    mid = (a + b) / 2.0 + rng.normal(0.0, 0.2 * length, size=3)
    vessels.append(bezier_points([a, mid, b]))
  return vessels


def _fine_detail(canvas: Canvas, template: _Template, rng: np.random.Generator,
                 vein_ppm: float) -> dict:
  """Adds what one brain has and the 152-brain template averages away (``detail='fine'``).

  * Many thin veins (pial and medullary veins, 0.3-0.7 mm radius, 8-40 mm long; in vivo they are
    the brightest fine structure of a susceptibility map), at 70-110 % of the large veins' value;
  * a fine tissue texture of about 1.2 mm (cortical layers, iron and myelin at the scale of a
    voxel), 0.005-0.010 ppm over grey and white matter.

  Drawn from their own stream, so the rest of the phantom is the default one's.
  """
  grid = template.grid
  inside = template.mask.astype(np.float32)
  count = int(rng.integers(80, 161))
  for points in _short_vessels(rng, template, count, (8.0, 40.0)):
    canvas.paint(tube_region(grid, points, float(rng.uniform(0.3, 0.7))),
                 vein_ppm * float(rng.uniform(0.7, 1.1)), 11, weight=inside)
  texture_ppm = float(rng.uniform(0.005, 0.010))
  canvas.chi += ((template.p_gm + template.p_wm) * smooth_field(grid.shape, rng, 1.2)
                 * np.float32(texture_ppm))
  return {"n_thin_vessels": count, "fine_texture_ppm": round(texture_ppm, 5)}


def _random_vessels(rng: np.random.Generator, template: _Template, count: int) -> list:
  """Random curved vessels between points of the brain, as dense Bezier samples."""
  point = _brain_points(rng, template)
  vessels = []
  while len(vessels) < count:
    a, b = point(), point()
    length = float(np.linalg.norm(b - a))
    if not 15.0 <= length <= 70.0:
      continue
    mid = (a + b) / 2.0 + rng.normal(0.0, 0.25 * length, size=3)
    vessels.append(bezier_points([a, mid, b]))
  return vessels


# --------------------------------------------------------------------------------------------------
# Brain phantom
# --------------------------------------------------------------------------------------------------
def _template_canvas(rng: np.random.Generator, template: _Template,
                     detail_rng: np.random.Generator | None = None) -> tuple[Canvas, dict]:
  """One random brain in template space: tissue values, textures, nuclei and veins
  (and `_fine_detail` from ``detail_rng`` if given).

  Susceptibility and magnitude are built from related but different models, as in vivo, so a
  magnitude edge does not mark every susceptibility edge (which would flatter magnitude-guided
  methods such as MEDI):

  * chi: sharp (p^4) tissue fractions times tissue values, each tissue with its own smooth
    (about 10 mm) and fine (about 2.5 mm) random texture, plus the nuclei's iron texture;
  * proton density: milder (p^2) fractions times tissue PD, weighted by the T1 template's
    intensity (a GRE's T1 weighting, and borders of a population average);
  * R2*: tissue R2* from the same p^2 fractions, plus an iron term ``k chi_nucleus f`` per
    nucleus with ``f ~ U(0.3, 1)`` (so some nuclei are dark, some faint), drawn on an ellipsoid
    displaced from the chi one, plus an independent smooth field;
  * both maps blurred by a Gaussian of sigma 0.7-1.2 mm.
  """
  grid = template.grid
  values = {label: draw_value(rng, label) for label in CHI_RANGES_PPM if label not in (16, 17)}
  # Smooth textures: iron distribution within nuclei; per-tissue slow and fine variations
  # (in-vivo WM/GM chi varies by about +-0.01 ppm with fibre orientation, myelin and iron).
  iron = np.clip(smooth_field(grid.shape, rng, 6.0), -2.5, 2.5)
  texture_ppm = {8: rng.uniform(0.008, 0.015), 9: rng.uniform(0.008, 0.015)}
  fine_ppm = float(rng.uniform(0.003, 0.006))
  fine = smooth_field(grid.shape, rng, 2.5)
  p_gm, p_wm, p_csf = template.p_gm, template.p_wm, template.p_csf
  chi = p_csf * np.float32(values[10])
  for label, frac in ((9, p_gm), (8, p_wm)):
    tissue = smooth_field(grid.shape, rng, float(rng.uniform(5.0, 15.0)))
    # Centred over the tissue, so its mean stays the drawn literature value.
    tissue -= np.float32(np.sum(frac * tissue, dtype=np.float64) / max(float(frac.sum()), 1e-6))
    tissue *= np.float32(texture_ppm[label])
    tissue += np.float32(values[label])
    chi += frac * tissue
    del tissue
  chi += (p_gm + p_wm) * fine * np.float32(fine_ppm)
  chi = chi.astype(np.float32)
  del fine
  s_wm, s_gm, s_csf = template.soft
  t1_weight = float(rng.uniform(0.15, 0.35))
  pd = ((s_gm * PD[9] + s_wm * PD[8] + s_csf * PD[10])
        * np.maximum(template.t1, 0.05) ** np.float32(t1_weight)).astype(np.float32)
  r2s = (s_gm * R2STAR_HZ[9] + s_wm * R2STAR_HZ[8] + s_csf * R2STAR_HZ[10]).astype(np.float32)
  canvas = Canvas(grid, chi, template.seg.copy(), pd, r2s)
  not_csf = (1.0 - p_csf).astype(np.float32)
  # R2* per ppm of iron-related susceptibility (deep grey matter at 3T: about 100-200 1/s/ppm).
  r2s_per_ppm = float(rng.uniform(120.0, 180.0))
  visibility = {}
  for label, centre, axes, angles in _NUCLEI:
    for side in (1.0, -1.0):
      c = np.array(centre) * np.array([side, 1.0, 1.0]) + rng.normal(0.0, 1.0, size=3)
      a = np.array(axes) * rng.uniform(0.88, 1.12, size=3)
      ang = np.array(angles) * np.array([1.0, side, side]) + rng.uniform(-6.0, 6.0, size=3)
      # The magnitude sees a slightly displaced, resized copy of the nucleus.
      c_mag = c + rng.normal(0.0, 0.7, size=3)
      a_mag = a * rng.uniform(0.93, 1.07, size=3)
      factor = float(rng.uniform(0.3, 1.0))
      region = ellipsoid_region(grid, c, a, euler_rotation(ang))
      if region is None:
        continue
      value = values[label] * (1.0 + 0.15 * iron[region[0]])
      canvas.paint(region, value, label, weight=not_csf, appearance=False)
      mag_region = ellipsoid_region(grid, c_mag, a_mag, euler_rotation(ang))
      if mag_region is not None:
        iron_ppm = max(values[label] - values[9], 0.0) * (1.0 + 0.15 * iron[mag_region[0]])
        canvas.paint_appearance(mag_region, PD[label],
                                R2STAR_HZ[9] + r2s_per_ppm * factor * iron_ppm, weight=not_csf)
      visibility.setdefault(str(label), []).append(round(factor, 3))
  # Veins: the midline sinus, then random smaller vessels (inside the brain only).
  inside = template.mask.astype(np.float32)
  vessels = [(template.midline_sinus, rng.uniform(2.0, 3.2))]
  vessels += [(v, rng.uniform(0.6, 1.4)) for v in _random_vessels(rng, template,
                                                                   int(rng.integers(8, 17)))]
  for points, radius in vessels:
    canvas.paint(tube_region(grid, points, radius), values[11] * rng.uniform(0.9, 1.1), 11,
                 weight=inside)
  detail = (_fine_detail(canvas, template, detail_rng, values[11]) if detail_rng is not None
            else None)
  # R2* independent of chi (water content, fibre orientation, ...), then the magnitude blur;
  # normalised by the blurred mask so the brain's outline does not darken.
  canvas.r2s += (2.0 * smooth_field(grid.shape, rng, 8.0)) * inside
  np.maximum(canvas.r2s, 1.0, out=canvas.r2s)
  blur_mm = float(rng.uniform(0.7, 1.2))
  weight = np.maximum(scipy.ndimage.gaussian_filter(inside, blur_mm), 1e-3)
  # Outside the mask the maps continue the nearest brain voxel's values: the magnitude's own warp
  # (`brain_phantom`) must not pull zero signal (uniform phase noise) into the mask's rim.
  nearest = scipy.ndimage.distance_transform_edt(~template.mask, return_distances=False,
                                                 return_indices=True)
  for vol in (canvas.pd, canvas.r2s):
    vol[...] = (scipy.ndimage.gaussian_filter(vol, blur_mm) / weight)[tuple(nearest)]
  del nearest
  meta = {"tissue_chi_ppm": {str(k): round(v, 5) for k, v in sorted(values.items())},
          "n_vessels": len(vessels),
          "chi_texture_ppm": {"8": round(texture_ppm[8], 5), "9": round(texture_ppm[9], 5),
                              "fine": round(fine_ppm, 5)},
          "magnitude": {"t1_weight": round(t1_weight, 4), "blur_mm": round(blur_mm, 3),
                        "r2star_per_ppm": round(r2s_per_ppm, 2),
                        "nucleus_r2star_visibility": visibility}}
  if detail is not None:
    meta["detail"] = detail
  return canvas, meta


def brain_phantom(seed: int, shape: Sequence[int] | None = None,
                  voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                  lesions: bool = False, detail: str = "none") -> Phantom:
  """A random brain phantom (different anatomy and tissue values per seed).

  Geometry: the output grid is centred on the brain. ``shape=None`` covers `BRAIN_FOV_MM` at
  ``voxel_size_mm``. A given shape crops or pads around the brain; when its field of view is
  smaller than the brain (enlarged 10 % for the random scaling, plus a 4 mm margin) the anatomy
  shrinks uniformly to fit (recorded as
  ``meta['anatomy_zoom']``), so small test grids still hold a whole brain. The phantom is sampled
  straight from its 1 mm template definition onto the grid (trilinear for values, nearest for
  labels), in one resampling that composes the random affine and warp; anisotropic voxels are
  point-sampled, not averaged.

  Args:
    seed: random seed; the same seed gives the same phantom.
    shape: output grid (i, j, k), or None.
    voxel_size_mm: voxel size, mm.
    lesions: add 2-5 microbleeds and one calcification.
    detail: 'none', or 'fine': the small-scale structure a 152-brain average lacks, from a
      stream of its own (the rest of the phantom stays the default one's): thin veins and a
      1.2 mm texture (`_fine_detail`) and a fine warp (about 6 mm, 0.8-1.6 mm std) that folds
      the tissue borders as an individual cortex is folded. Real susceptibility maps carry
      much more of their energy at fine scales than the default brains (BUILD.md, "Fine
      anatomy").

  Returns:
    A `Phantom`.

  Raises:
    ValueError: unknown ``detail``.
  """
  if detail not in DETAIL_MODES:
    raise ValueError(f"detail must be one of {', '.join(DETAIL_MODES)}, got {detail!r}")
  template = load_template()
  detail_rng = np.random.default_rng([int(seed), 3]) if detail == "fine" else None
  vox = tuple(float(v) for v in voxel_size_mm)
  shape = natural_shape(BRAIN_FOV_MM, vox) if shape is None else tuple(int(n) for n in shape)
  rng = np.random.default_rng([int(seed), 1])
  canvas, meta = _template_canvas(rng, template, detail_rng)

  # Output mm -> template mm: q = centre + t + L p + u(p), L = rotation / (scale * zoom).
  # Fit the largest random scaling (1.1) so the random transform rarely pushes brain off the grid.
  zoom = fit_zoom(shape, vox, 1.1 * template.extent_mm)
  angles = rng.uniform(-8.0, 8.0, size=3)
  scale = rng.uniform(0.9, 1.1, size=3)
  translation = rng.uniform(-5.0, 5.0, size=3) * zoom
  warp_std = float(rng.uniform(1.0, 2.5))
  linear = euler_rotation(angles) @ np.diag(1.0 / (scale * zoom))
  grid = Grid.centred(shape, vox)
  p = grid.axes_mm()
  coords = []
  for j in range(3):
    q = smooth_field_mm(grid, rng, 32.0 * zoom) * np.float32(warp_std / zoom)
    q += np.float32(template.centre_mm[j] + translation[j] / zoom - template.grid.origin_mm[j])
    for i in range(3):
      q += np.float32(linear[j, i]) * p[i].reshape([-1 if a == i else 1 for a in range(3)])
    coords.append(q)
  coords = np.stack(coords)
  if detail_rng is not None:
    fold_mm = float(detail_rng.uniform(0.8, 1.6))
    for j in range(3):
      coords[j] += smooth_field_mm(grid, detail_rng, 6.0 * zoom) * np.float32(fold_mm / zoom)
    meta["detail"]["fold_warp_mm"] = round(fold_mm, 3)

  def sample(vol, order):
    return scipy.ndimage.map_coordinates(vol, coords, order=order, mode="constant", cval=0,
                                         prefilter=False)

  chi, seg = sample(canvas.chi, 1), sample(canvas.seg, 0)
  # The magnitude maps go through a separate mild warp (about 0.5 mm): in vivo, magnitude and
  # susceptibility borders do not coincide voxel for voxel.
  mag_warp_mm = float(rng.uniform(0.3, 0.7))
  for j in range(3):
    coords[j] += smooth_field_mm(grid, rng, 12.0 * zoom) * np.float32(mag_warp_mm / zoom)
  out = Canvas(grid, chi, seg, sample(canvas.pd, 1), sample(canvas.r2s, 1))
  del coords, chi, seg
  mask = out.seg > 0
  placed = []
  if lesions:
    placed = add_lesions(out, mask, rng, host_labels=(8, 9))
  meta.update({
      "kind": "brain", "seed": int(seed), "shape": list(shape), "voxel_size_mm": list(vox),
      "template": "ICBM152 2009c nonlinear symmetric (nilearn bundled)",
      "anatomy_zoom": round(zoom, 5), "rotation_deg": np.round(angles, 3).tolist(),
      "scale": np.round(scale, 4).tolist(), "translation_mm": np.round(translation, 3).tolist(),
      "warp_std_mm": round(warp_std, 3), "magnitude_warp_mm": round(mag_warp_mm, 3),
      "lesions": placed})
  return finish_phantom(out, mask, meta)


def finish_phantom(canvas: Canvas, mask: np.ndarray, meta: dict) -> Phantom:
  """Zeroes everything outside the mask and packs a `Phantom`."""
  chi = np.where(mask, canvas.chi, 0.0).astype(np.float32)
  seg = np.where(mask, canvas.seg, 0).astype(np.int16)
  pd = np.where(mask, canvas.pd, 0.0).astype(np.float32)
  r2s = np.where(mask, canvas.r2s, 0.0).astype(np.float32)
  return Phantom(chi, seg, mask, pd, r2s, canvas.grid.voxel_size_mm, meta)
