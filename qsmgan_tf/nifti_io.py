"""NIfTI input validation and atomic output, shared by every CLI and by data_prep.

Bad input raises `InputError` with a one-line message meant for the user; binaries catch it,
print ``error: <message>`` on stderr and exit with status 2 (see `cli.one_line_errors`).
Outputs are written to a temporary file in the destination folder and renamed, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any

import nibabel as nib
import numpy as np

from qsmgan_tf import physics
from qsmgan_tf.errors import InputError  # also reachable as nifti_io.InputError

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _name(path) -> str:
  return os.path.basename(str(path))


def nifti_stem(path) -> str:
  """File name without directory and without .nii/.nii.gz."""
  name = _name(path)
  for suffix in (".nii.gz", ".nii"):
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name


def load_nifti(path, what: str = "image"):
  """Loads a NIfTI image (nibabel), with clear errors for a missing or non-NIfTI file."""
  path = str(path)
  if not os.path.exists(path):
    raise InputError(f"{what} file not found: {path}")
  if os.path.isdir(path):
    raise InputError(f"{what} path is a directory, not a NIfTI file: {path}")
  try:
    img = nib.load(path)
  except Exception as exc:  # nibabel raises many types for foreign files.
    raise InputError(f"{what} file is not a readable NIfTI image: {_name(path)} "
                     f"({type(exc).__name__})") from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise InputError(f"{what} file is not a NIfTI image: {_name(path)}")
  return img


def as_3d(data: np.ndarray, what: str, path) -> np.ndarray:
  """Accepts (x, y, z) or (x, y, z, 1); anything else is bad input."""
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise InputError(f"{what} must be a 3D volume, got shape {tuple(data.shape)} in {_name(path)}")
  if min(data.shape) < 2:
    raise InputError(f"{what} must be a 3D volume, got shape {tuple(data.shape)} in {_name(path)}")
  return data


def load_volume(path, what: str = "field", dtype=np.float32):
  """Loads a 3D NIfTI volume as ``dtype``; returns ``(array, image)``.

  Raises:
    InputError: missing file, not NIfTI, not 3D, or non-finite values (for float volumes).
  """
  img = load_nifti(path, what)
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as exc:
    raise InputError(f"{what} file could not be read: {_name(path)} ({type(exc).__name__})") from None
  data = as_3d(data, what, path)
  if np.iscomplexobj(data):
    raise InputError(f"{what} must be real-valued, got complex data in {_name(path)}")
  data = np.asarray(data, dtype=dtype)
  return data, img


def check_finite(data: np.ndarray, what: str, path) -> None:
  """Raises InputError if the volume holds NaN or Inf."""
  bad = ~np.isfinite(data)
  if bad.any():
    raise InputError(f"{what} contains {int(bad.sum())} NaN/Inf voxel(s): {_name(path)}")


def load_field(path) -> tuple[np.ndarray, Any]:
  """A field/phase volume: 3D, finite, float32."""
  data, img = load_volume(path, "field")
  check_finite(data, "field", path)
  return data, img


def load_mask(path, shape, what: str = "mask") -> np.ndarray:
  """A boolean mask of ``shape``; non-zero (and finite) voxels are inside."""
  data, _ = load_volume(path, what, dtype=np.float32)
  if tuple(data.shape) != tuple(shape):
    raise InputError(f"{what} shape {tuple(data.shape)} does not match the field shape "
                     f"{tuple(shape)}: {_name(path)}")
  mask = np.isfinite(data) & (data != 0)
  if not mask.any():
    raise InputError(f"{what} is empty (no non-zero voxel): {_name(path)}")
  return mask


def load_matching(path, shape, what: str) -> np.ndarray:
  """An auxiliary float volume (magnitude, truth) that must match ``shape`` and be finite."""
  data, _ = load_volume(path, what)
  if tuple(data.shape) != tuple(shape):
    raise InputError(f"{what} shape {tuple(data.shape)} does not match the field shape "
                     f"{tuple(shape)}: {_name(path)}")
  check_finite(data, what, path)
  return data


def voxel_size_mm(img) -> tuple[float, float, float]:
  """Voxel size in mm from the header; InputError if not positive."""
  zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
    raise InputError(f"voxel size in the header must be 3 positive numbers, got {zooms}")
  return zooms


def parse_b0_dir(text: str) -> np.ndarray:
  """Parses ``x,y,z`` into a unit vector; InputError on bad syntax or zero length."""
  try:
    values = [float(v) for v in str(text).replace(" ", "").split(",")]
  except ValueError:
    raise InputError(f"--b0_dir must be three numbers x,y,z, got {text!r}") from None
  if len(values) != 3:
    raise InputError(f"--b0_dir must be three numbers x,y,z, got {text!r}")
  try:
    return physics.unit_vector(values)
  except ValueError as exc:
    raise InputError(f"--b0_dir: {exc}") from None


def _atomic_target(path) -> tuple[pathlib.Path, str]:
  path = pathlib.Path(path)
  folder = path.parent if str(path.parent) else pathlib.Path(".")
  if not folder.is_dir():
    raise InputError(f"output folder does not exist: {folder}")
  fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp" + "".join(
      s for s in path.suffixes[-2:] if s in (".nii", ".gz", ".json", ".md", ".png", ".keras")),
      dir=folder)
  os.close(fd)
  # mkstemp creates 0600 files; outputs are ordinary readable files. (Reading the umask would
  # mean setting it, which is process-global and races with other threads.)
  os.chmod(tmp, 0o644)
  return path, tmp


@contextlib.contextmanager
def atomic_output(path):
  """Yields a temporary path beside ``path``; renames it to ``path`` when the block succeeds.

  On any failure the temporary file is removed and ``path`` is untouched: an output is whole
  or absent. The temporary name keeps the file's suffixes (.nii.gz, .keras, ...) for writers
  that choose a format by suffix, and starts with a dot.

  Raises:
    InputError: the destination folder does not exist.
  """
  path, tmp = _atomic_target(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_volume(path, data: np.ndarray, reference_img) -> None:
  """Writes ``data`` as float32 NIfTI on the reference image's grid, affine and header.

  Written to a temporary file beside ``path`` and renamed: never half-written.
  """
  with atomic_output(path) as tmp:
    header = reference_img.header.copy()
    header.set_data_dtype(np.float32)
    data = np.asarray(data, dtype=np.float32)
    if len(header.get_data_shape()) == 4 and data.ndim == 3:
      header.set_data_shape(data.shape)
    img = type(reference_img)(data, reference_img.affine, header)
    # Reapply both transforms with their codes: the constructor may reset them.
    img.set_sform(reference_img.get_sform(), int(reference_img.header["sform_code"]))
    img.set_qform(reference_img.get_qform(), int(reference_img.header["qform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, tmp)


def write_text(path, text: str) -> None:
  """Writes a text file atomically (temporary file, then rename)."""
  with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_bytes(path, payload: bytes) -> None:
  """Writes bytes (e.g. a PNG) atomically (temporary file, then rename)."""
  with atomic_output(path) as tmp, open(tmp, "wb") as f:
    f.write(payload)


def write_json(path, payload: dict) -> None:
  """Writes JSON atomically, keys sorted, NaN as null-safe floats."""
  write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, pathlib.Path):
    return str(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sidecar_path(output_path) -> pathlib.Path:
  """BIDS sidecar path for an output map: ``X.nii.gz`` -> ``X.json``."""
  path = pathlib.Path(output_path)
  return path.with_name(nifti_stem(path) + ".json")
