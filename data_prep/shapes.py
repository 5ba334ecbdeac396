"""Anatomy-free susceptibility phantoms: random objects over a smooth background.

DeepQSM and NeXtQSM showed that networks trained on such sources generalise to brains: they cannot
memorise anatomy, and they cover susceptibilities and geometries (streaking sources in every
orientation, -1..+1.5 ppm) that a healthy brain never shows.

A phantom is a random blob (an ellipsoid with a smooth radial perturbation) as mask, a smooth
two-"tissue" background (-0.05..+0.05 ppm), and 15-40 overlapping spheres, ellipsoids, finite
cylinders and curved tubes, each replacing or adding to what lies below. Labels: 8 background,
11 tubes (vessel-like), 12 compact objects, and 16/17 for the optional lesions (same model as the
brain phantoms).

The magnitude does not mirror chi: half of the objects (`MAGNITUDE_HIDDEN_FRACTION`)
leave proton density and R2* unchanged, and a few magnitude-only objects change them where chi
does not, as in vivo, where not every susceptibility boundary shows in the magnitude and not every
magnitude boundary is a susceptibility one. (Otherwise magnitude-edge priors such as MEDI's would
know every chi edge.) These draws come from their own random stream, so a seed's chi does not
depend on them (its simulated field noise, which follows the magnitude, does).

Example:
  phantom = shapes_phantom(seed=3, shape=(128, 128, 128), voxel_size_mm=(1, 1, 1))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_prep import drawing as P

# Natural field of view (mm): a head-sized cube.
SHAPES_FOV_MM = (128, 128, 128)
CHI_RANGE_PPM = (-1.0, 1.5)
MAGNITUDE_HIDDEN_FRACTION = 0.5
MAGNITUDE_ONLY_OBJECTS = (5, 13)  # [low, high) count of objects seen in the magnitude only


def _object_chi(rng: np.random.Generator) -> float:
  """Mostly tissue-like values, a third of the time anywhere in `CHI_RANGE_PPM`."""
  if rng.uniform() < 0.67:
    return float(rng.uniform(-0.2, 0.4))
  return float(rng.uniform(*CHI_RANGE_PPM))


def shapes_phantom(seed: int, shape: Sequence[int] | None = None,
                   voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                   lesions: bool = False) -> P.Phantom:
  """A random anatomy-free phantom.

  Sizes scale with the field of view (``shape * voxel_size_mm``, centred), except tube radii and
  lesions, which are physical (0.5-3 mm, 2-6 mm), so small grids still get thin structures.

  Args:
    seed: random seed; the same seed gives the same phantom.
    shape: output grid (i, j, k); None = `SHAPES_FOV_MM` at ``voxel_size_mm``.
    voxel_size_mm: voxel size, mm.
    lesions: add microbleeds and a calcification in the background.

  Returns:
    A `drawing.Phantom`.
  """
  vox = tuple(float(v) for v in voxel_size_mm)
  shape = P.natural_shape(SHAPES_FOV_MM, vox) if shape is None else tuple(int(n) for n in shape)
  rng = np.random.default_rng([int(seed), 2])
  look = np.random.default_rng([int(seed), 3])  # magnitude-only draws: chi stays seed-stable
  grid = P.Grid.centred(shape, vox)
  fov = np.asarray(shape, dtype=np.float64) * np.asarray(vox)
  spacing = 0.25 * fov  # mm: a few bumps across the field of view

  # Mask: ellipsoidal radius below 1 plus a smooth perturbation.
  semi = fov * rng.uniform(0.34, 0.46, size=3)
  rot = P.random_rotation(rng, 30.0)
  x, y, z = grid.axes_mm()
  coords = (x[:, None, None], y[None, :, None], z[None, None, :])
  rho2 = 0.0
  for k in range(3):
    q = sum(coords[i] * np.float32(rot[i, k]) for i in range(3))
    rho2 = rho2 + (q / np.float32(semi[k]))**2
  mask = np.sqrt(rho2) < 1.0 + 0.12 * P.smooth_field_mm(grid, rng, spacing)

  # Background: two smooth "tissues" with a soft border, plus a slow drift.
  split = P.smooth_field_mm(grid, rng, 0.7 * spacing)
  frac = 1.0 / (1.0 + np.exp(-4.0 * split))
  low, high = sorted(rng.uniform(-0.05, 0.05, size=2))
  drift = P.smooth_field_mm(grid, rng, spacing)
  chi = (low + (high - low) * frac + 0.01 * drift).astype(np.float32)
  canvas = P.Canvas(grid, chi, np.full(shape, 8, np.int16),
                    (0.75 + 0.1 * frac).astype(np.float32),
                    (18.0 + 6.0 * frac).astype(np.float32))

  inside = mask.astype(np.float32)
  size = float(fov.min())
  n_objects = int(rng.integers(15, 41))
  for _ in range(n_objects):
    kind = rng.choice(["sphere", "ellipsoid", "cylinder", "tube"], p=[0.25, 0.3, 0.2, 0.25])
    centre = (rng.uniform(-0.5, 0.5, size=3) * semi * 2.0) * 0.8
    chi_value = _object_chi(rng)
    # Iron/haemosiderin-like: R2* grows with |chi|, by a random factor per object, so magnitude
    # contrast does not mirror chi contrast (some objects faint, some dark).
    r2s = 20.0 + 80.0 * abs(chi_value) * float(rng.uniform(0.3, 1.0))
    label = 12
    if kind == "sphere":
      region = P.ellipsoid_region(grid, centre, (rng.uniform(0.02, 0.1) * size,) * 3)
    elif kind == "ellipsoid":
      region = P.ellipsoid_region(grid, centre, rng.uniform(0.02, 0.14, size=3) * size,
                                  P.random_rotation(rng, 180.0))
    elif kind == "cylinder":
      region = P.cylinder_region(grid, centre, rng.standard_normal(3),
                                 rng.uniform(0.01, 0.05) * size, rng.uniform(0.05, 0.25) * size)
    else:
      ends = [centre + rng.normal(0.0, 0.25 * size, size=3) for _ in range(3)]
      radius = max(float(rng.uniform(0.5, 3.0)), 0.6 * min(vox))
      region = P.tube_region(grid, P.bezier_points(ends), radius)
      label = 11
    canvas.paint(region, chi_value, label, weight=inside,
                 additive=bool(rng.uniform() < 0.4), pd=float(rng.uniform(0.5, 1.0)), r2s=r2s,
                 appearance=bool(look.uniform() >= MAGNITUDE_HIDDEN_FRACTION))
  for _ in range(int(look.integers(*MAGNITUDE_ONLY_OBJECTS))):
    centre = (look.uniform(-0.5, 0.5, size=3) * semi * 2.0) * 0.8
    region = P.ellipsoid_region(grid, centre, look.uniform(0.03, 0.12, size=3) * size,
                                P.random_rotation(look, 180.0))
    canvas.paint_appearance(region, float(look.uniform(0.5, 1.0)),
                            float(look.uniform(15.0, 40.0)), weight=inside)
  # Overlapping additive objects can sum past the intended range.
  np.clip(canvas.chi, *CHI_RANGE_PPM, out=canvas.chi)
  placed = []
  if lesions:
    placed = P.add_lesions(canvas, mask, rng, host_labels=(8,))
  meta = {"kind": "shapes", "seed": int(seed), "shape": list(shape), "voxel_size_mm": list(vox),
          "n_objects": n_objects, "background_chi_ppm": [round(float(low), 5),
                                                         round(float(high), 5)],
          "lesions": placed}
  return P.finish_phantom(canvas, mask, meta)
