"""Model errors: what a measured local field holds that the dipole model of a scalar chi does not.

`data_prep.simulate.simulate_subject` computes the local field as the exact dipole model of the
true chi plus white noise (``D * chi + white noise``). What separates a measured local field from
that model in vivo, each of which this module can add to a simulated subject:

* spatially correlated noise: multi-echo fitting, unwrapping and background removal correlate the
  field noise over a voxel or two (`correlated_noise`);
* residual background from sources just outside the mask, harmonic inside it and largest at its
  edge, as imperfect background removal leaves it (`edge_background`), and a smooth polynomial one
  (`polynomial_background`, also `simulate_subject`'s ``background_order`` model);
* orientation-dependent white-matter frequency shifts: local and non-dipolar, no scalar chi
  explains them (`anisotropy_field` over `fibre_directions`);
* a given mask a few voxels off the true one (`adjust_mask`).

Parameters tuned on exact forward fields with white noise over-trust the data. `ModelErrors` holds
the levels (all 0 = off); `ModelErrors.draw` and `realistic_model_errors` give random levels for
tuning and training phantoms; `apply` adds them to a simulated subject (`simulate_subject` calls it
for ``model_errors=``), each from its own random stream, so the rest of the subject stays that of
the error-free one.

Example:
  errors = ModelErrors.draw(np.random.default_rng(8))
  realistic = simulate.simulate_subject("brain", seed=8, snr=40, model_errors=errors)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import scipy.ndimage

from data_prep import drawing
from data_prep import tissues
from qsmgan_tf import physics

# Ranges `ModelErrors.draw` samples (assumptions, see its docstring). ppm levels are log-uniform,
# the correlation length uniform, the polynomial order and the mask error uniform integers.
MODEL_ERROR_RANGES = {
    "correlated_noise_ppm": (0.001, 0.006),
    "noise_correlation_mm": (0.5, 2.0),
    "edge_background_ppm": (0.001, 0.006),
    "smooth_background_ppm": (0.0005, 0.003),
    "smooth_background_order": (1, 3),
    "anisotropy_ppm": (0.002, 0.01),
    "mask_error_vox": (-2, 2),
}
# Probability that `ModelErrors.draw` switches each error on (independently).
MODEL_ERROR_PROBABILITY = 0.7
# Where the edge background's sources sit: this far outside the given mask, mm.
EDGE_SOURCE_SHELL_MM = (1.0, 8.0)
# Edge background sources: [low, high) blob count and blob Gaussian sigma range, mm.
_EDGE_BLOBS = (4, 25)
_EDGE_BLOB_SIGMA_MM = (2.0, 6.0)
# Control-point spacing (mm) of the smooth random fibre-direction field.
FIBRE_SPACING_MM = 12.0
# Seeds of the model-error streams: np.random.default_rng([*stream, key, component]), ``stream``
# the simulation's ``[seed, kind index]`` (see `apply`), apart from the simulation's own stream
# ([seed, kind index, 7919]) so that switching errors on leaves the rest of a subject unchanged,
# and one component's draw does not move another's.
_ERROR_STREAM_KEY = 104729
_ERROR_COMPONENTS = ("correlated_noise", "edge_background", "smooth_background", "anisotropy",
                     "mask")
# Seed key of the realistic levels `realistic_model_errors` draws for a subject seed.
_REALISTIC_DRAW_KEY = 6007
# `simulate.write_phantom`'s (and ``--model_errors``') choices.
MODEL_ERROR_MODES = ("none", "realistic")


@dataclasses.dataclass(frozen=True)
class ModelErrors:
  """Departures of the simulated local field from ``D * chi + white noise`` (all 0 = off).

  Every error lives inside the mask the reconstruction is given (`Subject.mask`). Levels are
  std/rms over that mask after removing its mean (a constant field offset is not chi's: chi is
  relative), except ``anisotropy_ppm``, an amplitude.
  """
  correlated_noise_ppm: float = 0.0
  """Std (ppm) of an additive spatially correlated Gaussian noise field (what multi-echo fitting,
  unwrapping and background removal leave): white noise smoothed by a Gaussian, then rescaled."""
  noise_correlation_mm: float = 0.0
  """Sigma (mm, per axis converted with the voxel size) of that smoothing Gaussian; 0 = white."""
  edge_background_ppm: float = 0.0
  """Rms (ppm) of a residual background field from sources outside the mask: random Gaussian
  susceptibility blobs in a shell `EDGE_SOURCE_SHELL_MM` outside the given mask, forward-simulated
  (zero-padded, no wrap-around) at the subject's B0. Harmonic inside the mask and largest near its
  edge, as imperfect background removal leaves it."""
  smooth_background_ppm: float = 0.0
  """Std (ppm) of a random low-order polynomial over the mask (the ``background_order`` model of
  `simulate_subject`, at this std)."""
  smooth_background_order: int = 2
  """Highest total degree of that polynomial (>= 1); unused when ``smooth_background_ppm`` is 0."""
  anisotropy_ppm: float = 0.0
  """Amplitude a (ppm, either sign) of a local orientation-dependent white-matter frequency shift
  ``a * wm * (sin^2 theta - 2/3)``, theta the angle between B0 and a smooth random unit
  fibre-direction field, wm the white-matter label (8) of a brain phantom's seg (hollow-cylinder
  fibre model, Wharton & Bowtell 2012: a few ppb). Local and non-dipolar: no scalar chi explains
  it. Shapes phantoms have no white matter (their label 8 is the objects' background tissue):
  no effect there, recorded as ``applied: false``."""
  mask_error_vox: int = 0
  """The given mask is the true one eroded (< 0) or dilated (> 0) by this many voxels
  (6-connected structuring element iterated: voxels within this taxicab distance)."""

  def __post_init__(self):
    for name in ("correlated_noise_ppm", "noise_correlation_mm", "edge_background_ppm",
                 "smooth_background_ppm"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"ModelErrors.{name} must be finite and >= 0, got {value}")
    if not math.isfinite(self.anisotropy_ppm):
      raise ValueError(f"ModelErrors.anisotropy_ppm must be finite, got {self.anisotropy_ppm}")
    if int(self.smooth_background_order) != self.smooth_background_order or \
        self.smooth_background_order < 1:
      raise ValueError("ModelErrors.smooth_background_order must be an integer >= 1, got "
                       f"{self.smooth_background_order}")
    if int(self.mask_error_vox) != self.mask_error_vox:
      raise ValueError(f"ModelErrors.mask_error_vox must be an integer, got {self.mask_error_vox}")

  @property
  def active(self) -> bool:
    """Whether any error is on."""
    return bool(self.correlated_noise_ppm or self.edge_background_ppm
                or self.smooth_background_ppm or self.anisotropy_ppm or self.mask_error_vox)

  def to_json(self) -> dict[str, Any]:
    """The levels as a JSON-serialisable dict."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = int(value) if f.type in ("int", int) else float(value)
    return out

  @classmethod
  def draw(cls, rng: np.random.Generator,
           probability: float = MODEL_ERROR_PROBABILITY) -> "ModelErrors":
    """Random error levels for tuning and training phantoms, mild to severe.

    Each error is on with ``probability``, independently; its level is drawn in
    `MODEL_ERROR_RANGES` (ppm levels log-uniform, the correlation length uniform, the polynomial
    order in {1, 2, 3}, the mask error in {-2, -1, 1, 2} voxels; the anisotropy's sign either
    way). Every value is drawn whether or not its error is on, so one error's level does not depend
    on another's switch.

    The ranges are assumptions at literature orders of magnitude (3 T, ~1 mm), not a fit:
    * correlated noise 0.001-0.006 ppm, 0.5-2 mm: white field noise of single- and multi-echo GRE
      at SNR 20-100 is ~0.0005-0.005 ppm; multi-echo fitting, Laplacian unwrapping and SHARP-type
      background removal (a spherical mean filter) correlate it over about a voxel or two
      (Schweser et al., NMR Biomed 2017; Robinson et al., NMR Biomed 2017).
    * edge background 0.001-0.006 ppm and smooth background 0.0005-0.003 ppm: background removal
      leaves residuals of a few ppb, largest near the brain edge, where air-tissue and bone fields
      are 10-100x stronger than the tissue's (Schweser et al. 2017; Zhou, Liu et al., NMR Biomed
      2014 for PDF; Li et al., NeuroImage 2014 for V-SHARP).
    * anisotropy 0.002-0.01 ppm: orientation-dependent white-matter frequency shifts of a few ppb
      (He & Yablonskiy, PNAS 2009; Lee et al., PNAS 2010; Wharton & Bowtell, PNAS 2012, hollow
      cylinder fibre model); the sign depends on the compartment model, so it is drawn.
    * mask error -2..2 voxels: brain extraction (e.g. FSL BET) and the erosion QSM pipelines
      apply commonly move the edge by one to a few voxels.
    One real scan (the 2016 QSM challenge subject: its field differs from the COSMOS forward
    field by about 0.006 ppm rms, mostly rough, more at the edge) falls inside these ranges.

    Args:
      rng: the generator; the same state gives the same levels.
      probability: chance that each error is on.

    Returns:
      A `ModelErrors`.
    """
    r = MODEL_ERROR_RANGES

    def log_uniform(name):
      lo, hi = r[name]
      return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    on = rng.uniform(size=5) < probability   # correlated, edge, smooth, anisotropy, mask
    corr_ppm = log_uniform("correlated_noise_ppm")
    corr_mm = float(rng.uniform(*r["noise_correlation_mm"]))
    edge_ppm = log_uniform("edge_background_ppm")
    smooth_ppm = log_uniform("smooth_background_ppm")
    order = int(rng.integers(r["smooth_background_order"][0], r["smooth_background_order"][1] + 1))
    aniso_ppm = log_uniform("anisotropy_ppm") * (1.0 if rng.uniform() < 0.5 else -1.0)
    lo, hi = r["mask_error_vox"]
    mask_vox = int(rng.choice([v for v in range(lo, hi + 1) if v != 0]))
    return cls(correlated_noise_ppm=corr_ppm if on[0] else 0.0,
               noise_correlation_mm=corr_mm if on[0] else 0.0,
               edge_background_ppm=edge_ppm if on[1] else 0.0,
               smooth_background_ppm=smooth_ppm if on[2] else 0.0,
               smooth_background_order=order,
               anisotropy_ppm=aniso_ppm if on[3] else 0.0,
               mask_error_vox=mask_vox if on[4] else 0)


def realistic_model_errors(seed: int, probability: float = 0.7) -> ModelErrors:
  """`ModelErrors.draw` from a generator seeded by ``seed`` (``--model_errors=realistic``);
  ``probability``: of each error being on (1 = all on, at random levels)."""
  return ModelErrors.draw(np.random.default_rng([int(seed), _REALISTIC_DRAW_KEY]), probability)


def adjust_mask(mask: np.ndarray, change_vox: int) -> np.ndarray:
  """The mask eroded (``change_vox`` < 0) or dilated (> 0) by ``|change_vox|`` voxels (6-connected
  structuring element, iterated; the grid's outside counts as outside the mask)."""
  mask = np.asarray(mask, dtype=bool)
  k = int(change_vox)
  if k > 0:
    return scipy.ndimage.binary_dilation(mask, iterations=k)
  if k < 0:
    return scipy.ndimage.binary_erosion(mask, iterations=-k, border_value=0)
  return mask.copy()


def given_mask(mask: np.ndarray, errors: ModelErrors | None) -> np.ndarray:
  """The mask a reconstruction gets: ``mask`` itself, or with a mask error `adjust_mask` of it.

  Raises:
    ValueError: the mask error empties the mask.
  """
  if errors is None or not errors.mask_error_vox:
    return mask
  given = adjust_mask(mask, errors.mask_error_vox)
  if not given.any():
    raise ValueError(f"mask_error_vox={errors.mask_error_vox} leaves an empty mask")
  return given


def polynomial_background(mask: np.ndarray, order: int, rng: np.random.Generator,
                          std_ppm: float | None = None) -> tuple[np.ndarray, float]:
  """Random polynomial (total degree 1..order) over the mask, zero mean over it.

  Args:
    mask: where the polynomial is kept (0 outside) and normalised.
    order: highest total degree (>= 1).
    rng: draws the coefficients (and the std when ``std_ppm`` is None).
    std_ppm: std over the mask, ppm; None draws it U(0.005, 0.02) after the coefficients
      (`simulate.simulate_subject`'s ``background_order``).

  Returns:
    ``(polynomial ppm float32, its std ppm)``.
  """
  coords = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in mask.shape]
  x, y, z = (c.reshape([-1 if a == i else 1 for a in range(3)]) for i, c in enumerate(coords))
  poly = np.zeros(mask.shape, np.float32)
  for i in range(order + 1):
    for j in range(order + 1 - i):
      for k in range(order + 1 - i - j):
        if i + j + k == 0:
          continue
        poly += np.float32(rng.standard_normal()) * (x**i * y**j * z**k)
  inside = poly[mask]
  std = float(inside.std())
  target = float(rng.uniform(0.005, 0.02)) if std_ppm is None else float(std_ppm)
  poly = (poly - float(inside.mean())) * np.float32(target / max(std, 1e-12))
  return np.where(mask, poly, 0.0).astype(np.float32), target


def _rescaled(values: np.ndarray, mask: np.ndarray, std_ppm: float) -> np.ndarray:
  """``values`` minus its mean over the mask, scaled to ``std_ppm`` there, 0 outside; float32."""
  inside = values[mask].astype(np.float64)
  std = float(inside.std())
  if std <= 0.0:
    return np.zeros(mask.shape, np.float32)
  out = (values - np.float32(inside.mean())) * np.float32(std_ppm / std)
  return np.where(mask, out, 0.0).astype(np.float32)


def correlated_noise(mask: np.ndarray, voxel_size_mm: Sequence[float], std_ppm: float,
                     correlation_mm: float, rng: np.random.Generator) -> np.ndarray:
  """Gaussian noise smoothed by a Gaussian of sigma ``correlation_mm`` (mm; 0 = white), with zero
  mean and std ``std_ppm`` over the mask, 0 outside; ppm, float32."""
  noise = rng.standard_normal(mask.shape, dtype=np.float32)
  if correlation_mm > 0:
    noise = scipy.ndimage.gaussian_filter(
        noise, [correlation_mm / v for v in voxel_size_mm], mode="wrap")
  return _rescaled(noise, mask, std_ppm)


def edge_background(mask: np.ndarray, voxel_size_mm: Sequence[float], b0_dir: Sequence[float],
                    rms_ppm: float, rng: np.random.Generator,
                    shell_mm: Sequence[float] = EDGE_SOURCE_SHELL_MM) -> tuple[np.ndarray, dict]:
  """Residual background field inside the mask from random sources just outside it.

  4-24 Gaussian susceptibility blobs (sigma 2-6 mm, normal weights) centred at random voxels of
  the shell ``shell_mm`` outside the mask (Euclidean distance in mm) and cut to that shell; their
  field (`physics.forward_field`, zero-padded 2x) is kept inside the mask, its mean there removed
  and its std scaled to ``rms_ppm``. With no shell on the grid (the mask fills it) it is 0.

  Returns:
    ``(field ppm float32, record)``, record the JSON-serialisable blobs and shell.
  """
  vox = tuple(float(v) for v in voxel_size_mm)
  dist = scipy.ndimage.distance_transform_edt(~mask, sampling=vox)
  shell = (dist >= shell_mm[0]) & (dist <= shell_mm[1])
  del dist
  record: dict[str, Any] = {"shell_mm": [float(shell_mm[0]), float(shell_mm[1])], "blobs": []}
  candidates = np.flatnonzero(shell)
  count = int(rng.integers(*_EDGE_BLOBS))
  picks = rng.choice(candidates, size=count) if candidates.size else np.zeros(0, np.int64)
  sigmas = rng.uniform(*_EDGE_BLOB_SIGMA_MM, size=count)
  weights = rng.standard_normal(count)
  if candidates.size == 0:
    return np.zeros(mask.shape, np.float32), record
  source = np.zeros(mask.shape, np.float32)
  for flat, sigma, weight in zip(picks, sigmas, weights):
    centre = np.unravel_index(int(flat), mask.shape)
    box, axes = [], []
    for a in range(3):
      reach = int(math.ceil(3.0 * sigma / vox[a]))
      lo, hi = max(centre[a] - reach, 0), min(centre[a] + reach + 1, mask.shape[a])
      box.append(slice(lo, hi))
      d = (np.arange(lo, hi, dtype=np.float32) - centre[a]) * np.float32(vox[a])
      axes.append(d.reshape([-1 if b == a else 1 for b in range(3)]))
    r2 = axes[0]**2 + axes[1]**2 + axes[2]**2
    source[tuple(box)] += np.float32(weight) * np.exp(-0.5 * r2 / np.float32(sigma)**2)
    record["blobs"].append({"centre_vox": [int(c) for c in centre],
                            "sigma_mm": round(float(sigma), 4), "weight": round(float(weight), 6)})
  source = np.where(shell, source, 0.0).astype(np.float32)
  field = physics.forward_field(source, vox, b0_dir)
  return _rescaled(field, mask, rms_ppm), record


def fibre_directions(grid: drawing.Grid, rng: np.random.Generator,
                     spacing_mm: float = FIBRE_SPACING_MM) -> np.ndarray:
  """A smooth random unit vector field (3, i, j, k): three `drawing.smooth_field_mm` draws,
  normalised per voxel (isotropic: each voxel's direction is uniform on the sphere)."""
  v = np.stack([drawing.smooth_field_mm(grid, rng, spacing_mm) for _ in range(3)])
  v /= np.maximum(np.sqrt(np.sum(v * v, axis=0)), np.float32(1e-6))
  return v


def anisotropy_field(wm_fraction: np.ndarray, fibre_dirs: np.ndarray, b0_dir: Sequence[float],
                     amplitude_ppm: float) -> np.ndarray:
  """``amplitude_ppm * wm_fraction * (sin^2 theta - 2/3)``, theta the angle between B0 and the
  fibre direction (``fibre_dirs`` (3, i, j, k) unit vectors, voxel frame): -2/3 a along B0, 0 at
  the magic angle, +1/3 a across it; zero mean over random orientations. ppm, float32."""
  b = physics.unit_vector(b0_dir).astype(np.float32)
  cos = fibre_dirs[0] * b[0] + fibre_dirs[1] * b[1] + fibre_dirs[2] * b[2]
  return (np.float32(amplitude_ppm) * wm_fraction * (np.float32(1.0 / 3.0) - cos * cos)) \
      .astype(np.float32)


def _error_rng(stream: Sequence[int], component: str) -> np.random.Generator:
  return np.random.default_rng([*stream, _ERROR_STREAM_KEY, _ERROR_COMPONENTS.index(component)])


def _error_parts(errors: ModelErrors, stream: Sequence[int], kind: str, given: np.ndarray,
                 seg: np.ndarray, vox, b0) -> tuple[dict[str, np.ndarray], dict]:
  """The additive model-error fields inside the given mask and their JSON record."""
  parts: dict[str, np.ndarray] = {}
  record: dict[str, Any] = {}
  if errors.correlated_noise_ppm > 0:
    parts["correlated_noise_ppm"] = correlated_noise(
        given, vox, errors.correlated_noise_ppm, errors.noise_correlation_mm,
        _error_rng(stream, "correlated_noise"))
    record["correlated_noise"] = {"std_ppm": float(errors.correlated_noise_ppm),
                                  "correlation_mm": float(errors.noise_correlation_mm)}
  if errors.edge_background_ppm > 0:
    part, blobs = edge_background(given, vox, b0, errors.edge_background_ppm,
                                  _error_rng(stream, "edge_background"))
    parts["edge_background_ppm"] = part
    edge = given & ~scipy.ndimage.binary_erosion(given, iterations=3, border_value=0)
    core = given & ~edge
    blobs["rms_ppm"] = float(np.sqrt(np.mean(np.square(part[given], dtype=np.float64))))
    blobs["edge3_rms_ppm"] = (float(np.sqrt(np.mean(np.square(part[edge], dtype=np.float64))))
                              if edge.any() else None)
    blobs["core_rms_ppm"] = (float(np.sqrt(np.mean(np.square(part[core], dtype=np.float64))))
                             if core.any() else None)
    record["edge_background"] = blobs
  if errors.smooth_background_ppm > 0:
    part, std = polynomial_background(given, int(errors.smooth_background_order),
                                      _error_rng(stream, "smooth_background"),
                                      std_ppm=errors.smooth_background_ppm)
    parts["smooth_background_ppm"] = part
    record["smooth_background"] = {"std_ppm": std, "order": int(errors.smooth_background_order)}
  if errors.anisotropy_ppm != 0:
    applied = kind == "brain"
    wm = (seg == tissues.LABELS["white_matter"]) & given if applied else None
    rec = {"amplitude_ppm": float(errors.anisotropy_ppm), "applied": bool(applied),
           "fibre_spacing_mm": FIBRE_SPACING_MM,
           "wm_voxels": int(wm.sum()) if applied else 0}
    if applied:
      dirs = fibre_directions(drawing.Grid.centred(given.shape, vox),
                              _error_rng(stream, "anisotropy"))
      part = anisotropy_field(wm.astype(np.float32), dirs, b0, errors.anisotropy_ppm)
      parts["anisotropy_ppm"] = part
      rec["rms_ppm"] = float(np.sqrt(np.mean(np.square(part[given], dtype=np.float64))))
    record["anisotropy"] = rec
  return parts, record


def apply(subject, errors: ModelErrors, *, true_mask: np.ndarray, full_field_ppm: np.ndarray,
          stream: Sequence[int]):
  """The simulated ``subject`` with model errors (`simulate.simulate_subject`'s ``model_errors``).

  Args:
    subject: a `simulate.Subject` simulated without errors, except that its ``mask`` is already
      `given_mask` (its ``background_ppm`` polynomial drawn over it); its chi, target, seg,
      ``clean_field_ppm`` and ``noise_ppm`` are still on ``true_mask``. Its meta's ``kind``
      (anisotropy only in 'brain' phantoms) and ``field_noise_sigma_ppm_at_mean_magnitude`` (the
      white noise of a dilated rim) are used.
    errors: the levels.
    true_mask: the phantom's mask.
    full_field_ppm: the noise-free forward field of the true chi on the whole grid, ppm.
    stream: the simulation's ``[seed, kind index]``; the errors' random streams extend it.

  Returns:
    A new subject: the clean field, noise, field, chi, target and seg on the given mask (0
    outside), ``components`` with each error on, ``model_error_ppm`` (their sum) and, with a mask
    error, ``true_mask``; ``meta['model_errors']`` the levels and every drawn value.
  """
  mask, given = true_mask, subject.mask
  record: dict[str, Any] = {"levels": errors.to_json()}
  noise = subject.components["noise_ppm"]
  if errors.mask_error_vox:
    rim_sigma_ppm = subject.meta["field_noise_sigma_ppm_at_mean_magnitude"]
    rim = given & ~mask
    rim_noise = np.zeros(mask.shape, np.float32)
    if rim.any() and rim_sigma_ppm > 0:
      rim_noise[rim] = _error_rng(stream, "mask").standard_normal(
          int(rim.sum()), dtype=np.float32) * np.float32(rim_sigma_ppm)
    noise = (np.where(given, noise, 0.0) + rim_noise).astype(np.float32)
    record["mask"] = {"error_vox": int(errors.mask_error_vox), "true_voxels": int(mask.sum()),
                      "given_voxels": int(given.sum()),
                      "rim_noise_sigma_ppm": rim_sigma_ppm if rim.any() else None}
  clean = np.where(given, full_field_ppm, 0.0).astype(np.float32)
  parts, part_record = _error_parts(errors, stream, subject.meta["kind"], given, subject.seg,
                                    subject.voxel_size_mm, subject.b0_dir)
  record.update(part_record)
  total = np.zeros(mask.shape, np.float32)
  for part in parts.values():
    total += part
  parts["model_error_ppm"] = total
  record["rms_ppm"] = float(np.sqrt(np.mean(np.square(total[given], dtype=np.float64))))
  field = (clean + noise + subject.components["background_ppm"] + total).astype(np.float32)
  components = {**subject.components, "clean_field_ppm": clean, "noise_ppm": noise, **parts}
  chi, target, seg = subject.chi_ppm, subject.target_ppm, subject.seg
  if errors.mask_error_vox:
    components["true_mask"] = mask
    chi = np.where(given, chi, 0.0).astype(np.float32)
    target = np.where(given, target, 0.0).astype(np.float32)
    seg = np.where(given, seg, 0).astype(seg.dtype)
  return dataclasses.replace(subject, chi_ppm=chi, target_ppm=target, field_ppm=field, seg=seg,
                             meta={**subject.meta, "model_errors": record},
                             components=components)
