"""The brain phantom's anatomy in template space (MNI mm), before any random transform.

`load_template` prepares the ICBM152 2009 grey/white-matter and T1 maps bundled inside the
nilearn wheel (nothing is downloaded): sharpened tissue fractions, labels, brain mask, the T1
weighting of the magnitude and a superior-sagittal-sinus-like course traced along the midline
convexity. `_NUCLEI` places the deep grey nuclei and thalamus as ellipsoids at approximate MNI
coordinates; `_random_vessels` and `_short_vessels` draw vessel courses between and from points
of the brain. `data_prep.phantoms` paints them (`_template_canvas`) and warps the result onto
the output grid (`brain_phantom`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.ndimage

from data_prep.drawing import Grid, bezier_points

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
  # Imported here: nilearn takes about 2 s to import, and only brain phantoms need it.
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
