"""One entry point for every reconstruction method, and the shared input checks.

`run_method` dispatches a local field (ppm) to a classical inversion (`qsmgan_tf.classical`) or
to the network (`qsmgan_tf.inference.reconstruct_qsmgan`, imported only when asked for, so the
classical path never loads TensorFlow), applies the reference and returns chi (ppm) with an info
dict for the output's sidecar. The predict and evaluate binaries both call it.

`load_inputs` reads and validates a field/mask(/magnitude) set of NIfTI files with the rules and
one-line messages of the CLIs (missing or non-NIfTI file, not 3D, shapes differ, empty mask,
NaN/Inf, units that need B0/TE, zero-length B0 direction), converts the field to ppm and resolves
the B0 direction; data_prep uses it to validate real subjects the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from qsmgan_tf import classical
from qsmgan_tf import nifti_io
from qsmgan_tf import physics
from qsmgan_tf.errors import InputError

CLASSICAL_METHODS = tuple(classical.METHODS)
METHOD_NAMES = CLASSICAL_METHODS + ("qsmgan",)
REFERENCES = ("mask_mean", "none")

# Classical parameters that the CLI fills from --b0_tesla/--te_seconds when a method has them.
_ACQUISITION_PARAMS = ("b0_tesla", "te_seconds")

_log = logging.getLogger(__name__)


def apply_reference(chi_ppm: np.ndarray, mask: np.ndarray, reference: str = "mask_mean"):
  """Zeroes chi outside the mask and references it.

  Args:
    chi_ppm: susceptibility, ppm.
    mask: region of interest (bool).
    reference: 'mask_mean' subtracts chi's mean over the mask (chi is relative: D(0) = 0);
      'none' keeps the level the method produced.

  Returns:
    (chi float32, offset_ppm): the map and the value subtracted inside the mask.
  """
  if reference not in REFERENCES:
    raise InputError(f"unknown reference {reference!r}; expected one of "
                              f"{', '.join(REFERENCES)}")
  mask = np.asarray(mask).astype(bool)
  chi = np.where(mask, np.asarray(chi_ppm, dtype=np.float32), np.float32(0.0))
  offset = 0.0
  if reference == "mask_mean":
    offset = float(chi[mask].mean(dtype=np.float64))
    chi[mask] -= np.float32(offset)
  return chi.astype(np.float32, copy=False), offset


def run_method(name: str, field_ppm: np.ndarray, mask: np.ndarray,
               voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
               b0_dir: Sequence[float] = (0.0, 0.0, 1.0), magnitude: np.ndarray | None = None,
               reference: str = "mask_mean", params: Mapping[str, Any] | None = None,
               **options) -> tuple[np.ndarray, dict[str, Any]]:
  """Reconstructs chi (ppm) from a local field (ppm) with method ``name``.

  Args:
    name: one of METHOD_NAMES.
    field_ppm: local field, ppm of B0, 3D.
    mask: region of interest (bool), the field's shape.
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame.
    magnitude: optional magnitude image (MEDI's weights and edge mask; qsmgan's refinement
      uses it when its model's contract says so, unless ``use_magnitude=False``).
    reference: 'mask_mean' or 'none' (see `apply_reference`): 'none' keeps the level the method
      produced.
    params: classical methods: overrides of `classical.DEFAULTS[name]`; 'qsmgan': keyword
      arguments of `inference.reconstruct_qsmgan` (merged under ``options``).
    **options: keyword arguments of `inference.reconstruct_qsmgan` (model, server, rest_url,
      refine, inference, overlap, mode, sw_batch_size, threads, progress). Classical methods
      take none; ones given are ignored and listed in the info.

  Returns:
    (chi, info): chi in ppm, float32, the field's shape, zero outside the mask; info holds
    ``method``, ``parameters`` (resolved), ``reference``, ``reference_offset_ppm``, ``seconds``
    and, for 'qsmgan', the network's own info under ``method_info``.

  Raises:
    InputError: unknown method, reference or parameter, or bad inputs.
  """
  if name not in METHOD_NAMES:
    raise InputError(f"unknown method {name!r}; expected one of {', '.join(METHOD_NAMES)}")
  if reference not in REFERENCES:
    raise InputError(f"unknown reference {reference!r}; expected one of "
                              f"{', '.join(REFERENCES)}")
  b0 = physics.unit_vector(b0_dir)
  mask = np.asarray(mask).astype(bool)
  info: dict[str, Any] = {"method": name, "reference": reference}
  start = time.perf_counter()
  if name == "qsmgan":
    # TensorFlow comes with this import: keep it off the classical path.
    from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel

    kwargs = {**dict(params or {}), **options}
    # use_magnitude=false (an evaluate spec option) runs qsmgan as if no magnitude were given.
    use_magnitude = kwargs.pop("use_magnitude", True)
    chi, method_info = inference.reconstruct_qsmgan(
        field_ppm, mask, voxel_size_mm, b0, magnitude=magnitude if use_magnitude else None,
        **kwargs)
    info["parameters"] = kwargs
    info["method_info"] = method_info
  else:

    chi = classical.reconstruct(name, field_ppm, mask, voxel_size_mm, b0, magnitude=magnitude,
                                params=params)
    info["parameters"] = {**classical.DEFAULTS[name], **dict(params or {})}
    ignored = sorted(k for k, v in options.items() if v is not None)
    if ignored:
      _log.info("options %s apply to qsmgan only; ignored for %s", ", ".join(ignored), name)
      info["ignored_options"] = ignored
  info["seconds"] = round(time.perf_counter() - start, 3)
  chi = np.asarray(chi, dtype=np.float32)
  if chi.shape != mask.shape:
    raise RuntimeError(f"{name} returned shape {chi.shape}, expected {mask.shape}")
  chi, offset = apply_reference(chi, mask, reference)
  info["reference_offset_ppm"] = offset
  return chi, info


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Inputs:
  """A validated reconstruction input set.

  Attributes:
    field_ppm: local field, ppm of B0, float32, 3D.
    mask: bool, the field's shape, not empty.
    magnitude: float32 or None.
    voxel_size_mm: from the field's header, mm.
    b0_dir: unit B0 direction in the voxel frame.
    b0_dir_source: 'flag' (given) or 'affine' (from the field's sform/qform).
    b0_dir_warning: why the affine may not tell B0, or None.
    image: the field's nibabel image (grid, affine and header for the output).
    field_units: the units the field file was in.
    ppm_per_unit: factor that took the field to ppm (1 for ppm).
    b0_tesla: B0 field strength, T, or None.
    te_seconds: echo time, s, or None.
    files: input file names without directories, {'field': ..., 'mask': ..., 'magnitude': ...}.
  """
  field_ppm: np.ndarray
  mask: np.ndarray
  magnitude: np.ndarray | None
  voxel_size_mm: tuple[float, float, float]
  b0_dir: np.ndarray
  b0_dir_source: str
  b0_dir_warning: str | None
  image: Any
  field_units: str
  ppm_per_unit: float
  b0_tesla: float | None
  te_seconds: float | None
  files: dict[str, str | None]


def check_units(field_units: str, b0_tesla: float | None = None,
                te_seconds: float | None = None) -> float:
  """Validates a field unit with its acquisition parameters; returns ppm per unit.

  Raises:
    InputError: unknown unit, or B0 (hz, rad) / TE (rad) missing or not positive.
  """
  for value, flag in ((b0_tesla, "--b0_tesla"), (te_seconds, "--te_seconds")):
    if value is not None and not (np.isfinite(value) and value > 0):
      raise InputError(f"{flag} must be positive, got {value}")
  try:
    return float(physics.to_ppm(np.float64(1.0), field_units, b0_tesla, te_seconds))
  except ValueError as exc:
    raise InputError(str(exc)) from None


def load_inputs(field_path, mask_path, field_units: str = "ppm", b0_tesla: float | None = None,
                te_seconds: float | None = None, b0_dir=None, magnitude_path=None,
                logger: logging.Logger | None = None) -> Inputs:
  """Loads and validates a field, its mask and an optional magnitude from NIfTI files.

  Cheap checks (units, B0 direction syntax) run before any file is read.

  Args:
    field_path: field NIfTI (3D, or 4D with one volume), in ``field_units``.
    mask_path: mask NIfTI of the field's shape; non-zero voxels are inside.
    field_units: 'ppm', 'hz' or 'rad' (phase at ``te_seconds``).
    b0_tesla: B0 field strength, T (needed for hz and rad).
    te_seconds: echo time, s (needed for rad).
    b0_dir: None to read B0 from the field's affine (warning when its sform/qform code is not
      scanner space), or 'x,y,z' / a 3-vector in the voxel frame.
    magnitude_path: optional magnitude NIfTI of the field's shape.
    logger: where the B0 warning goes (default: this module's logger).

  Returns:
    The validated `Inputs`.

  Raises:
    InputError: with a one-line message naming the file.
  """
  ppm_per_unit = check_units(field_units, b0_tesla, te_seconds)
  given_b0 = None
  if b0_dir is not None:
    if isinstance(b0_dir, str):
      given_b0 = nifti_io.parse_b0_dir(b0_dir)
    else:
      try:
        given_b0 = physics.unit_vector(b0_dir)
      except ValueError as exc:
        raise InputError(f"--b0_dir: {exc}") from None
  field, img = nifti_io.load_field(field_path)
  mask = nifti_io.load_mask(mask_path, field.shape)
  magnitude = None
  if magnitude_path:
    magnitude = nifti_io.load_matching(magnitude_path, field.shape, "magnitude")
  voxel_size = nifti_io.voxel_size_mm(img)
  if given_b0 is not None:
    b0, source, warning = given_b0, "flag", None
  else:
    b0, warning = physics.b0_dir_from_nifti(img, logger or _log)
    source = "affine"
  field_ppm = (field * np.float32(ppm_per_unit)).astype(np.float32)
  return Inputs(
      field_ppm=field_ppm, mask=mask, magnitude=magnitude, voxel_size_mm=voxel_size,
      b0_dir=np.asarray(b0, dtype=np.float64), b0_dir_source=source, b0_dir_warning=warning,
      image=img, field_units=str(field_units).lower(), ppm_per_unit=ppm_per_unit,
      b0_tesla=b0_tesla, te_seconds=te_seconds,
      files={"field": os.path.basename(str(field_path)), "mask": os.path.basename(str(mask_path)),
             "magnitude": os.path.basename(str(magnitude_path)) if magnitude_path else None})


def acquisition_params(name: str, b0_tesla: float | None,
                       te_seconds: float | None) -> dict[str, float]:
  """The acquisition parameters (B0, TE) that classical method ``name`` takes, where given."""
  if name not in CLASSICAL_METHODS:
    return {}

  given = {"b0_tesla": b0_tesla, "te_seconds": te_seconds}
  return {k: float(given[k]) for k in _ACQUISITION_PARAMS
          if given[k] is not None and k in classical.DEFAULTS[name]}
