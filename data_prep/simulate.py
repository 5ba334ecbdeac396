"""Simulated QSM subjects: phantom -> local field, noise, magnitude, mask, labels, target.

`simulate_subject` turns a phantom (`data_prep.phantoms` brains or `data_prep.shapes` objects) into
a `Subject`, the record every later stage consumes (TFRecord writer, evaluation, tests):

* local field: ``physics.forward_field`` (zero-padded 2x) at the given B0 direction (voxel frame)
  and voxel size, kept inside the mask (a background-removed field is zero outside);
* noise: one complex Gaussian draw per voxel on the simulated GRE signal ``M exp(i phase)``, with
  ``sigma = mean(M over the mask) / snr``. The magnitude image is ``|M + n|`` and the field noise is
  the phase error ``angle(M + n)`` converted to ppm at ``b0_tesla`` and ``te_seconds``
  (3 T, 20 ms by default): about ``1 / (snr_voxel * 2 pi gamma B0 TE)`` where the signal is strong,
  uniform phase where it is not (inside microbleeds), consistently with the magnitude's noise;
* optional residual background field: a random polynomial of degree <= ``background_order`` over
  the mask (std 0.005-0.02 ppm), mimicking imperfect background removal; 0 adds none;
* magnitude: ``PD exp(-TE R2*)`` from the phantom's own proton density and R2* maps (for brains
  a separate model from chi's: T1-weighted, partial-volume, displaced and blurred borders, R2*
  only partly following iron, see `phantoms._template_canvas`), times intravoxel dephasing from
  the local field's gradient (so veins and microbleeds are dark and bloom), times a smooth bias
  field, plus noise;
* target: the true chi (``target='chi'``) or COSMOS (``target='cosmos'``) from three simulated
  orientations: the acquisition B0 and B0 tilted by 25 degrees about each of two orthogonal axes,
  each with its own noise, referenced to the truth's mean over the mask.

* optional model errors (`data_prep.model_errors`, off by default): what separates a measured
  local field from the dipole model of a scalar chi in vivo: spatially correlated noise, residual
  background from sources just outside the mask (largest at the edge) and a smooth polynomial one,
  orientation-dependent white-matter frequency shifts, and a given mask a few voxels off the true
  one. `model_errors.ModelErrors.draw` gives random levels for tuning and training phantoms.

chi, target and field are 0 outside the mask.

Example:
  subject = simulate_subject("brain", seed=7, voxel_size_mm=(1, 1, 2), b0_dir=(0.2, 0, 1),
                             lesions=True, target="cosmos")
  write_subject(subject, "/data/val/brain-00007")
  errors = model_errors.ModelErrors.draw(np.random.default_rng(8))
  realistic = simulate_subject("brain", seed=8, snr=40, model_errors=errors)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
import scipy.fft

from data_prep import drawing
from data_prep import model_errors as model_errors_lib
from data_prep import phantoms as phantoms_lib
from data_prep import shapes as shapes_lib
from qsmgan_tf import nifti_io
from qsmgan_tf import physics
from qsmgan_tf.errors import InputError

_log = logging.getLogger(__name__)

KINDS = ("brain", "shapes")
TARGETS = ("chi", "cosmos")
B0_TESLA = 3.0
TE_SECONDS = 0.020
COSMOS_TILT_DEG = 25.0

# Real-subject folder layout (see data_prep.subjects).
FIELD_FILE = "field.nii.gz"
MASK_FILE = "mask.nii.gz"
CHI_FILE = "chi.nii.gz"
TRUTH_FILE = "chi_truth.nii.gz"
MAGNITUDE_FILE = "magnitude.nii.gz"
SEG_FILE = "seg.nii.gz"
JSON_FILE = "subject.json"


@dataclasses.dataclass
class Subject:
  """One subject, simulated or loaded from disk (all maps share one voxel grid).

  Attributes:
    subject_id: identifier (folder name for real subjects, ``<kind>-<seed>`` when simulated).
    chi_ppm: true susceptibility, ppm, float32 (for real subjects: the target).
    target_ppm: training/evaluation target (chi or COSMOS), ppm, float32.
    field_ppm: local field with noise, ppm of B0, float32, 0 outside the mask.
    mask: brain mask, bool.
    magnitude: magnitude image (a.u.), float32, or None.
    seg: qsm-ci labels, int16, or None.
    voxel_size_mm: voxel size, mm.
    b0_dir: unit B0 direction in the voxel frame.
    snr: signal-to-noise ratio of the simulation (None: unknown or noise-free).
    meta: JSON-serialisable details (phantom, B0/TE, noise, background, target).
    components: diagnostic arrays of a simulation (``clean_field_ppm``, ``noise_ppm``,
      ``background_ppm``, ``clean_magnitude``), not written to disk.
  """
  subject_id: str
  chi_ppm: np.ndarray
  target_ppm: np.ndarray
  field_ppm: np.ndarray
  mask: np.ndarray
  magnitude: np.ndarray | None
  seg: np.ndarray | None
  voxel_size_mm: tuple[float, float, float]
  b0_dir: np.ndarray
  snr: float | None
  meta: dict[str, Any]
  components: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)


def make_phantom(kind: str, seed: int, shape: Sequence[int] | None = None,
                 voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                 lesions: bool = False, detail: str = "none") -> drawing.Phantom:
  """The phantom of ``kind`` ('brain' or 'shapes') for ``seed`` on the requested grid.

  ``detail`` ('none' or 'fine', `phantoms.DETAIL_MODES`) applies to brains; shapes ignore it."""
  if detail not in phantoms_lib.DETAIL_MODES:
    raise ValueError(f"detail must be one of {', '.join(phantoms_lib.DETAIL_MODES)}, "
                     f"got {detail!r}")
  if kind == "brain":
    return phantoms_lib.brain_phantom(seed, shape, voxel_size_mm, lesions, detail)
  if kind == "shapes":
    return shapes_lib.shapes_phantom(seed, shape, voxel_size_mm, lesions)
  raise ValueError(f"unknown phantom kind {kind!r}; expected one of {', '.join(KINDS)}")


def cosmos_directions(b0_dir: Sequence[float], tilt_deg: float = COSMOS_TILT_DEG) -> list:
  """Three B0 directions (voxel frame): ``b0_dir`` and ``b0_dir`` tilted by ``tilt_deg`` about
  two axes orthogonal to it and to each other."""
  b = physics.unit_vector(b0_dir)
  helper = np.array([1.0, 0.0, 0.0]) if abs(b[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
  u = np.cross(b, helper)
  u /= np.linalg.norm(u)
  w = np.cross(b, u)
  t = math.radians(tilt_deg)
  return [b, math.cos(t) * b + math.sin(t) * w, math.cos(t) * b - math.sin(t) * u]


def cosmos_masked(fields_ppm, mask: np.ndarray, voxel_size_mm, b0_dirs, iterations: int = 4):
  """COSMOS from fields known only inside the mask, as in a real acquisition.

  The closed form (`physics.cosmos`) treats the zeros outside the mask as measured and errs by
  about 14 % (NRMSE, noise-free brain); ``iterations`` of
  ``chi += M cosmos({M (f_n - D_n chi)})`` converge to the mask-weighted least-squares COSMOS that
  in-vivo pipelines solve (about 2 % after 4 iterations). 0 returns the closed form.

  Returns:
    chi, ppm, float32, 0 outside the mask.
  """
  chi = np.where(mask, physics.cosmos(fields_ppm, voxel_size_mm, b0_dirs), 0.0).astype(np.float32)
  if int(iterations) <= 0:
    return chi
  # The iterations reuse one set of kernels on physics.cosmos's 2x grid (computing them is the
  # costly part at 1 mm); the update is physics.cosmos's closed form applied to the residuals.
  shape = chi.shape
  grid = physics.fft_shape(shape, 2.0)
  kernels = [physics.dipole_kernel(grid, voxel_size_mm, d, rfft=True) for d in b0_dirs]
  den = np.maximum(sum(k * k for k in kernels), np.float32(1e-3))

  def rfft(volume):
    return scipy.fft.rfftn(physics.pad_to(volume, grid), workers=-1)

  def irfft(spectrum):
    return physics.crop_from(scipy.fft.irfftn(spectrum, s=grid, workers=-1), shape)

  for _ in range(int(iterations)):
    chi_k = rfft(chi)
    num = 0
    for kernel, field in zip(kernels, fields_ppm):
      residual = np.where(mask, field - irfft(kernel * chi_k), 0.0).astype(np.float32)
      num = num + kernel * rfft(residual)
    chi += np.where(mask, irfft(num / den), 0.0).astype(np.float32)
  return chi


def field_noise_sigma_ppm(snr: float, b0_tesla: float = B0_TESLA,
                          te_seconds: float = TE_SECONDS) -> float:
  """Field noise std (ppm) where the magnitude equals its mean over the mask: the phase noise
  ``1/snr`` rad converted at B0 and TE."""
  return float(physics.to_ppm(np.float64(1.0 / snr), "rad", b0_tesla, te_seconds))


def _dephasing(field_ppm: np.ndarray, voxel_factor: float) -> np.ndarray:
  """Intravoxel dephasing: product over axes of |sinc(cycles of phase across the voxel)|."""
  atten = np.ones(field_ppm.shape, np.float32)
  for axis in range(3):
    cycles = np.gradient(field_ppm, axis=axis) * np.float32(voxel_factor)
    atten *= np.abs(np.sinc(cycles)).astype(np.float32)
  return atten


def simulate_subject(kind: str, seed: int, shape: Sequence[int] | None = None,
                     voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                     b0_dir: Sequence[float] = (0.0, 0.0, 1.0), snr: float | None = 100.0,
                     lesions: bool = False, background_order: int = 0, target: str = "chi", *,
                     b0_tesla: float = B0_TESLA, te_seconds: float = TE_SECONDS,
                     subject_id: str | None = None, cosmos_iterations: int = 4,
                     model_errors: model_errors_lib.ModelErrors | None = None,
                     detail: str = "none") -> Subject:
  """Simulates one subject from a phantom (see the module docstring for the models).

  Args:
    kind: 'brain' (warped ICBM152 anatomy) or 'shapes' (anatomy-free objects).
    seed: phantom and noise seed; the same arguments give the same subject.
    shape: voxel grid (i, j, k); None = the phantom's natural grid at this voxel size.
    voxel_size_mm: voxel size, mm (anisotropic allowed).
    b0_dir: B0 direction in the voxel frame (normalised here).
    snr: mean magnitude over the mask divided by the complex noise std; None or inf = no noise.
    lesions: add microbleeds and a calcification.
    background_order: degree of a residual background polynomial added to the field (0 = none).
    target: 'chi' (the truth) or 'cosmos' (three simulated orientations).
    b0_tesla: field strength for the noise and magnitude models, T.
    te_seconds: echo time for the noise and magnitude models, s.
    subject_id: identifier; default ``<kind>-<seed:05d>``.
    cosmos_iterations: data-consistency iterations of the COSMOS target (`cosmos_masked`).
    detail: brain phantoms' fine anatomy, 'none' or 'fine' (`phantoms.brain_phantom`).
    model_errors: departures from the dipole model added to the field
      (`data_prep.model_errors.ModelErrors`, added by `data_prep.model_errors.apply`); None or
      all 0 gives the subject without them, array for array. Drawn from their own streams: the
      phantom, magnitude, white noise, ``background_order`` polynomial and COSMOS target stay
      those of the subject without errors (the COSMOS target does not see the errors: it is the
      reference, not a measurement). With a mask error, `Subject.mask` is the adjusted (given)
      mask: chi, target, seg and field are those of the error-free subject inside it and 0
      outside; in a dilated rim the field is the true forward field (chi's field exists outside
      its support) plus white noise at the field noise of the mean magnitude; an eroded rim's chi
      becomes a source outside the mask, as in vivo.

  Returns:
    A `Subject`; ``components`` holds the noise-free field, the field noise and the background;
    with model errors also ``model_error_ppm`` (their sum), each error on
    (``correlated_noise_ppm``, ``edge_background_ppm``, ``smooth_background_ppm``,
    ``anisotropy_ppm``) and, with a mask error, ``true_mask``; ``meta['model_errors']`` records
    the levels and every drawn value.

  Raises:
    ValueError: unknown kind or target, bad snr, voxel size or direction, or a mask error that
      empties the mask.
  """
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
  vox = tuple(float(v) for v in voxel_size_mm)
  if len(vox) != 3 or not all(v > 0 and math.isfinite(v) for v in vox):
    raise ValueError(f"voxel size must be 3 positive numbers, got {voxel_size_mm}")
  b0 = physics.unit_vector(b0_dir)
  noisy = snr is not None and math.isfinite(snr)
  if noisy and not snr > 0:
    raise ValueError(f"snr must be positive (or None for no noise), got {snr}")
  if int(background_order) < 0:
    raise ValueError(f"background_order must be >= 0, got {background_order}")

  phantom = make_phantom(kind, seed, shape, vox, lesions, detail)
  mask, chi = phantom.mask, phantom.chi_ppm
  errors = model_errors if model_errors is not None and model_errors.active else None
  given = model_errors_lib.given_mask(mask, errors)  # the mask the reconstruction gets
  # A separate stream from the phantom's: the anatomy does not change with snr or target. The
  # model errors draw from their own extensions of ``stream``.
  stream = [int(seed), 1 + KINDS.index(kind)]
  rng = np.random.default_rng(stream + [7919])

  full_field = physics.forward_field(chi, vox, b0)
  clean = np.where(mask, full_field, 0.0).astype(np.float32)
  cycles_per_ppm = physics.ppm_to_hz(1.0, b0_tesla) * te_seconds
  grid = drawing.Grid.centred(mask.shape, vox)
  bias = np.exp(0.15 * drawing.smooth_field_mm(grid, rng, 48.0))
  signal = (phantom.pd * np.exp(-te_seconds * phantom.r2star_hz)
            * _dephasing(full_field, cycles_per_ppm) * bias).astype(np.float32)
  signal = np.where(mask, signal, 0.0).astype(np.float32)
  sigma = float(signal[mask].mean()) / snr if noisy else 0.0

  def noise_draw():
    """Magnitude and field noise (ppm) of one complex Gaussian draw on the signal."""
    if not noisy:
      return signal.copy(), np.zeros_like(signal)
    n = (rng.standard_normal(signal.shape, np.float32)
         + 1j * rng.standard_normal(signal.shape, np.float32)) * np.float32(sigma)
    measured = signal + n
    phase_noise = np.angle(measured).astype(np.float32)
    return (np.abs(measured).astype(np.float32),
            np.where(mask, physics.to_ppm(phase_noise, "rad", b0_tesla, te_seconds), 0.0)
            .astype(np.float32))

  magnitude, noise = noise_draw()
  background, background_std = (np.zeros_like(clean), 0.0)
  if background_order > 0:
    background, background_std = model_errors_lib.polynomial_background(
        given, int(background_order), rng)
  field = (clean + noise + background).astype(np.float32)

  meta: dict[str, Any] = {
      "kind": kind, "seed": int(seed), "source": "synthetic", "b0_tesla": b0_tesla,
      "te_seconds": te_seconds, "field_units": "ppm", "snr": snr if noisy else None,
      "noise_sigma_magnitude": sigma,
      "field_noise_sigma_ppm_at_mean_magnitude": (field_noise_sigma_ppm(snr, b0_tesla, te_seconds)
                                                  if noisy else 0.0),
      "background_order": int(background_order), "background_std_ppm": background_std,
      "target": target, "phantom": phantom.meta,
  }
  if target == "cosmos":
    dirs = cosmos_directions(b0)
    fields = [field - background]
    for direction in dirs[1:]:
      fields.append(np.where(mask, physics.forward_field(chi, vox, direction), 0.0)
                    + noise_draw()[1])
    cosmos = cosmos_masked(fields, mask, vox, dirs, cosmos_iterations)
    # chi is relative: reference the COSMOS map to the truth's mean over the mask.
    cosmos += np.float32(chi[mask].mean() - cosmos[mask].mean())
    target_ppm = np.where(mask, cosmos, 0.0).astype(np.float32)
    meta["cosmos_b0_dirs"] = [np.round(d, 6).tolist() for d in dirs]
    meta["cosmos_iterations"] = int(cosmos_iterations)
  else:
    target_ppm = chi
  subject = Subject(
      subject_id=subject_id or f"{kind}-{int(seed):05d}", chi_ppm=chi, target_ppm=target_ppm,
      field_ppm=field, mask=given, magnitude=magnitude, seg=phantom.seg, voxel_size_mm=vox,
      b0_dir=b0, snr=float(snr) if noisy else None, meta=meta,
      components={"clean_field_ppm": clean, "noise_ppm": noise, "background_ppm": background,
                  "clean_magnitude": signal})
  if errors is None:
    return subject
  # Only the mask and background are on the given mask so far; `apply` moves the rest onto it.
  return model_errors_lib.apply(subject, errors, true_mask=mask, full_field_ppm=full_field,
                                stream=stream)


def subject_affine(shape: Sequence[int], voxel_size_mm: Sequence[float],
                   b0_dir: Sequence[float]) -> np.ndarray:
  """Scanner-space affine of a grid whose B0 direction (voxel frame) is ``b0_dir``.

  The rotation R satisfies ``R.T @ (0, 0, 1) = b0_dir``, so `physics.b0_dir_from_affine` gives
  ``b0_dir`` back; the grid's centre sits at the scanner origin.
  """
  rot = physics.rotation_between(b0_dir, (0.0, 0.0, 1.0))
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag(np.asarray(voxel_size_mm, dtype=np.float64))
  affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0)
  return affine


def write_subject(subject: Subject, folder, overwrite: bool = False) -> pathlib.Path:
  """Writes a subject in the real-subject folder layout (`data_prep.subjects`).

  Files: field.nii.gz (ppm), mask.nii.gz, chi.nii.gz (the target), chi_truth.nii.gz (when the
  target is not the truth), magnitude.nii.gz, seg.nii.gz (int16), subject.json. The folder is
  built under a temporary name beside ``folder`` and renamed: it appears whole or not at all.

  Args:
    subject: the subject.
    folder: destination folder (its parent must exist).
    overwrite: replace an existing folder.

  Returns:
    The folder path.

  Raises:
    InputError: the parent folder is missing, or the folder exists and ``overwrite`` is False.
  """
  import nibabel as nib  # pylint: disable=import-outside-toplevel

  folder = pathlib.Path(folder)
  parent = folder.parent
  if not parent.is_dir():
    raise InputError(f"output folder does not exist: {parent}")
  if folder.exists() and not overwrite:
    raise InputError(f"subject folder already exists (use --overwrite): {folder}")
  affine = subject_affine(subject.field_ppm.shape, subject.voxel_size_mm, subject.b0_dir)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
  try:
    def save(name, data, dtype):
      img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
      img.set_sform(affine, code=1)   # scanner space: the affine tells B0
      img.set_qform(affine, code=1)
      img.header.set_xyzt_units("mm")
      if name == CHI_FILE or name == TRUTH_FILE or name == FIELD_FILE:
        img.header["descrip"] = b"ppm"
      nib.save(img, str(tmp / name))

    save(FIELD_FILE, subject.field_ppm, np.float32)
    save(MASK_FILE, subject.mask, np.uint8)
    save(CHI_FILE, subject.target_ppm, np.float32)
    if subject.meta.get("target", "chi") != "chi":
      save(TRUTH_FILE, subject.chi_ppm, np.float32)
    if subject.magnitude is not None:
      save(MAGNITUDE_FILE, subject.magnitude, np.float32)
    if subject.seg is not None:
      save(SEG_FILE, subject.seg, np.int16)
    payload = {
        "subject_id": subject.subject_id,
        "field_units": "ppm",
        "b0_tesla": subject.meta.get("b0_tesla", B0_TESLA),
        "te_seconds": subject.meta.get("te_seconds", TE_SECONDS),
        "b0_dir": np.round(np.asarray(subject.b0_dir, dtype=np.float64), 8).tolist(),
        "voxel_size_mm": list(subject.voxel_size_mm),
        "snr": subject.snr,
        "target": subject.meta.get("target", "chi"),
        "meta": subject.meta,
    }
    nifti_io.write_json(tmp / JSON_FILE, payload)
    os.chmod(tmp / JSON_FILE, 0o644)
    os.chmod(tmp, 0o755)
    if folder.exists():
      trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=parent))
      os.replace(folder, trash / folder.name)
      os.replace(tmp, folder)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder


def parse_numbers(text: str, flag: str, cast=float, positive: bool = True) -> tuple:
  """Parses ``a,b,c`` into three numbers; InputError on bad syntax or non-positive values."""
  try:
    values = tuple(cast(v) for v in str(text).replace(" ", "").split(","))
  except ValueError:
    raise InputError(f"--{flag} must be three numbers a,b,c, got {text!r}") from None
  if len(values) != 3 or (positive and not all(v > 0 for v in values)):
    raise InputError(f"--{flag} must be three positive numbers a,b,c, got {text!r}")
  return values


def write_phantom(kind: str, seed: int, out_dir: str, *, subject_id: str | None = None,
                 lesions: bool = False, voxel_size_mm: str = "1,1,1", b0_dir: str = "0,0,1",
                 shape: str | None = None, snr: float = 100.0, background_order: int = 0,
                 target: str = "chi", overwrite: bool = False, model_errors: str = "none",
                 detail: str = "none"):
  """Simulates one subject and writes it; returns the folder (`python -m data_prep.make_phantom`).

  ``model_errors``: 'none', or 'realistic' for `model_errors.realistic_model_errors` (seed);
  ``detail``: 'none', or 'fine' for brains' fine anatomy (`phantoms.brain_phantom`)."""
  b0 = nifti_io.parse_b0_dir(b0_dir)
  vox = parse_numbers(voxel_size_mm, "voxel_size_mm")
  grid = parse_numbers(shape, "shape", int) if shape else None
  if snr < 0:
    raise InputError(f"--snr must be >= 0 (0 = no noise), got {snr}")
  if background_order < 0:
    raise InputError(f"--background_order must be >= 0, got {background_order}")
  if model_errors not in model_errors_lib.MODEL_ERROR_MODES:
    raise InputError("--model_errors must be one of "
                              f"{', '.join(model_errors_lib.MODEL_ERROR_MODES)}, "
                              f"got {model_errors!r}")
  if detail not in phantoms_lib.DETAIL_MODES:
    raise InputError(f"--detail must be one of {', '.join(phantoms_lib.DETAIL_MODES)}, "
                              f"got {detail!r}")
  errors = (model_errors_lib.realistic_model_errors(seed) if model_errors == "realistic"
            else None)
  subject = simulate_subject(
      kind, seed, shape=grid, voxel_size_mm=vox, b0_dir=b0, snr=snr if snr > 0 else None,
      lesions=lesions, background_order=background_order, target=target, subject_id=subject_id,
      model_errors=errors, detail=detail)
  folder = write_subject(subject, pathlib.Path(out_dir) / subject.subject_id, overwrite)
  _log.info("wrote %s (%s, shape %s, voxel %s mm, B0 %s)", folder, kind,
               subject.field_ppm.shape, vox, b0.round(4).tolist())
  return folder
