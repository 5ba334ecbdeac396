"""Anatomical susceptibility phantoms on the ICBM152 2009 template nilearn ships.

Each seed gives a different brain: the template's grey/white-matter maps (bundled inside the
nilearn wheel, nothing is downloaded) get a random affine (rotation, per-axis scaling, translation)
and a smooth random non-linear warp; deep grey nuclei and thalamus are synthesised as soft
ellipsoids at approximate MNI coordinates in both hemispheres; veins are random tubes plus a
superior-sagittal-sinus-like tube traced along the midline convexity; tissue susceptibilities are
drawn around literature values with smooth and fine within-tissue textures and an iron texture in
the nuclei; optional pathology adds microbleeds and a calcification. Proton density and R2* (the
magnitude) follow their own model, related to chi but not sharing its edges (`_template_canvas`).
The result is a `Phantom` (`data_prep.drawing`): susceptibility (ppm), qsm-ci segmentation
labels, brain mask, and the proton density and R2* the magnitude simulation (`data_prep.simulate`)
needs.

This module paints one brain and warps it onto the output grid. Its parts live beside it:
`data_prep.tissues` (labels and tissue values), `data_prep.drawing` (the drawing primitives the
anatomy-free phantoms in `data_prep.shapes` also use: `Grid`, `Canvas`, soft ellipsoids,
cylinders and tubes, smooth random fields, lesions) and `data_prep.brain_anatomy` (the ICBM152
template, the nuclei's MNI coordinates and the vessel courses).

Example:
  phantom = brain_phantom(seed=7, shape=(160, 192, 160), voxel_size_mm=(1, 1, 1), lesions=True)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.ndimage

from data_prep.brain_anatomy import (_NUCLEI, _Template, _random_vessels, _short_vessels,
                                     load_template)
from data_prep.drawing import (Canvas, Grid, Phantom, add_lesions, ellipsoid_region,
                               euler_rotation, finish_phantom, fit_zoom, natural_shape,
                               smooth_field, smooth_field_mm, tube_region)
from data_prep.tissues import CHI_RANGES_PPM, PD, R2STAR_HZ, draw_value

# Brain phantom detail levels (`brain_phantom(detail=...)`).
DETAIL_MODES = ("none", "fine")

# Natural field of view of a brain phantom at 1 mm: the template's brain (about 145 x 182 x 155 mm)
# with room for the random transforms, each axis a multiple of 16.
BRAIN_FOV_MM = (176, 208, 176)


# --------------------------------------------------------------------------------------------------
# Brain phantom
# --------------------------------------------------------------------------------------------------
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
