"""Drawing primitives on a physical voxel grid, shared by the brain phantoms (`data_prep.phantoms`)
and the anatomy-free ones (`data_prep.shapes`).

`Grid` places voxels in mm; a `Canvas` paints susceptibility, labels, proton density and R2*
together with a one-voxel partial-volume edge; soft ellipsoids, cylinders and tubes (Bezier
curves) are ``(slices, occupancy)`` regions to paint; smooth random fields give textures and
warps; `add_lesions` draws microbleeds and calcifications; `finish_phantom` packs a `Phantom`.
`fit_zoom` and `natural_shape` size anatomy and grids to a field of view.

Example:
  grid = Grid.centred((64, 64, 64), (1, 1, 1))
  canvas = Canvas.empty(grid)
  canvas.paint(ellipsoid_region(grid, (0, 0, 0), (9, 6, 5)), 0.1, tissues.LABELS["object"])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from data_prep.tissues import PD, R2STAR_HZ, draw_value

# Margin (mm) kept free on each side when a requested field of view forces the anatomy to shrink.
_FIT_MARGIN_MM = 4.0


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Phantom:
  """A susceptibility phantom on a voxel grid.

  Attributes:
    chi_ppm: susceptibility, ppm, float32; 0 outside the mask.
    seg: qsm-ci labels (see `tissues.LABELS`), int16; 0 outside the mask.
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
      pd: proton density (default from `tissues.PD` by label).
      r2s: R2*, 1/s (default from `tissues.R2STAR_HZ` by label).
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


def finish_phantom(canvas: Canvas, mask: np.ndarray, meta: dict) -> Phantom:
  """Zeroes everything outside the mask and packs a `Phantom`."""
  chi = np.where(mask, canvas.chi, 0.0).astype(np.float32)
  seg = np.where(mask, canvas.seg, 0).astype(np.int16)
  pd = np.where(mask, canvas.pd, 0.0).astype(np.float32)
  r2s = np.where(mask, canvas.r2s, 0.0).astype(np.float32)
  return Phantom(chi, seg, mask, pd, r2s, canvas.grid.voxel_size_mm, meta)
