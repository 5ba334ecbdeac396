"""Real (or written synthetic) subjects on disk: folder layout, loading and validation.

Layout: one folder per subject under a root, named by its subject id::

  <root>/<subject_id>/
    field.nii.gz       local field (background removed) or tissue phase, in `field_units`
    mask.nii.gz        brain mask (non-zero = inside), the field's grid
    chi.nii.gz         target susceptibility (COSMOS or chi), ppm, the field's grid
    chi_truth.nii.gz   optional: true chi when it differs from the target (simulations)
    magnitude.nii.gz   optional: magnitude image (a.u.)
    seg.nii.gz         optional: integer labels (qsm-ci: 1-6 deep grey nuclei, 7 thalamus, 8 WM,
                       9 GM, 10 CSF, 11 vessels, 16 calcification, 17 microbleed)
    subject.json       {"field_units": "ppm"|"hz"|"rad", "b0_tesla": 3.0, "te_seconds": 0.02,
                        "b0_dir": [x, y, z] (optional, voxel frame; default from the affine)}

Every NIfTI shares the field's grid; the voxel size comes from the field's header and B0 from
``b0_dir`` or else the field's affine (`physics.b0_dir_from_affine`, with a warning when the
sform/qform code is not scanner space). Validation uses the predict CLI's rules and one-line
messages (`qsmgan_tf.reconstruct.load_inputs`), so a folder that loads here also predicts there.
`data_prep.simulate.write_subject` writes this layout. Folders whose names start with '.' are
skipped (they are subjects being written).

Example:
  for folder in list_subjects("/data/qsm_subjects"):
    subject = load_subject(folder)
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import numpy as np

from data_prep import simulate
from qsmgan_tf import nifti_io
from qsmgan_tf import physics
from qsmgan_tf import reconstruct
from qsmgan_tf.errors import InputError

_log = logging.getLogger(__name__)


def read_sidecar(folder) -> dict:
  """Reads and checks ``subject.json``; InputError on a missing, unreadable or invalid file."""
  path = pathlib.Path(folder) / simulate.JSON_FILE
  if not path.is_file():
    raise InputError(f"{simulate.JSON_FILE} not found in {folder} (it must state "
                              "field_units, and b0_tesla/te_seconds for hz or rad fields)")
  try:
    payload = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
    raise InputError(f"{path} is not valid JSON ({type(exc).__name__})") from None
  if not isinstance(payload, dict):
    raise InputError(f"{path} must hold a JSON object")
  if not isinstance(payload.get("field_units"), str):
    raise InputError(f"{path} must state field_units (ppm, hz or rad)")
  for key in ("b0_tesla", "te_seconds"):
    value = payload.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise InputError(f"{path}: {key} must be a number, got {value!r}")
  if payload.get("b0_dir") is not None:
    try:
      payload["b0_dir"] = physics.unit_vector(payload["b0_dir"]).tolist()
    except (TypeError, ValueError) as exc:
      raise InputError(f"{path}: b0_dir must be three numbers x,y,z ({exc})") from None
  return payload


def load_subject(folder, target: str | None = None) -> simulate.Subject:
  """Loads and validates one subject folder (see the module docstring for the layout).

  Args:
    folder: the subject folder.
    target: which map becomes ``target_ppm``. None: chi.nii.gz as it is. 'chi': the true chi,
      i.e. chi_truth.nii.gz when the folder has one, else chi.nii.gz. 'cosmos': chi.nii.gz, which
      must not be declared a plain chi map (``"target": "chi"`` in subject.json).

  Returns:
    A `simulate.Subject` with the field in ppm; field, chi and target are 0 outside the mask.
    ``chi_ppm`` is chi_truth.nii.gz when present, else chi.nii.gz.

  Raises:
    InputError: one line naming the folder or file (missing files, shapes that differ,
      an empty mask, NaN/Inf, units without B0/TE, a bad B0 direction, non-integer labels).
  """
  folder = pathlib.Path(folder)
  if target not in (None,) + simulate.TARGETS:
    raise InputError(f"unknown target {target!r}; expected one of "
                              f"{', '.join(simulate.TARGETS)}")
  if not folder.is_dir():
    raise InputError(f"subject folder not found: {folder}")
  sidecar = read_sidecar(folder)
  if target == "cosmos" and sidecar.get("target") == "chi":
    raise InputError(f"a COSMOS target was asked for but {folder / simulate.JSON_FILE} "
                              "says chi.nii.gz is the true chi (target: chi)")
  magnitude_path = folder / simulate.MAGNITUDE_FILE
  inputs = reconstruct.load_inputs(
      folder / simulate.FIELD_FILE, folder / simulate.MASK_FILE,
      field_units=sidecar["field_units"], b0_tesla=sidecar.get("b0_tesla"),
      te_seconds=sidecar.get("te_seconds"), b0_dir=sidecar.get("b0_dir"),
      magnitude_path=magnitude_path if magnitude_path.exists() else None, logger=_log)
  shape = inputs.field_ppm.shape
  mask = inputs.mask
  chi_map = nifti_io.load_matching(folder / simulate.CHI_FILE, shape, "chi")
  truth_path = folder / simulate.TRUTH_FILE
  truth = (nifti_io.load_matching(truth_path, shape, "chi truth") if truth_path.exists()
           else chi_map)
  target_map = truth if target == "chi" else chi_map
  declared = sidecar.get("target", (sidecar.get("meta") or {}).get("target", "chi"))
  target_name = "chi" if target == "chi" and truth_path.exists() else declared
  seg = None
  seg_path = folder / simulate.SEG_FILE
  if seg_path.exists():
    labels = nifti_io.load_matching(seg_path, shape, "seg")
    seg = np.rint(labels)
    if not np.array_equal(seg, labels) or seg.min() < 0 or seg.max() > np.iinfo(np.int16).max:
      raise InputError(f"seg must hold non-negative integer labels: {seg_path.name}")
    seg = seg.astype(np.int16)
  snr = sidecar.get("snr")
  snr = float(snr) if isinstance(snr, (int, float)) and math.isfinite(snr) else None
  meta = dict(sidecar.get("meta") or {})
  meta.update({
      "folder": str(folder), "field_units": inputs.field_units, "b0_tesla": inputs.b0_tesla,
      "te_seconds": inputs.te_seconds, "b0_dir_source": "subject.json" if sidecar.get("b0_dir")
      is not None else inputs.b0_dir_source, "b0_dir_warning": inputs.b0_dir_warning,
      "target": target_name})

  def inside(volume):
    return np.where(mask, volume, 0.0).astype(np.float32)

  return simulate.Subject(
      subject_id=str(sidecar.get("subject_id") or folder.name), chi_ppm=inside(truth),
      target_ppm=inside(target_map), field_ppm=inside(inputs.field_ppm), mask=mask,
      magnitude=inputs.magnitude, seg=seg, voxel_size_mm=tuple(inputs.voxel_size_mm),
      b0_dir=np.asarray(inputs.b0_dir, dtype=np.float64), snr=snr, meta=meta)


def list_subjects(root) -> list[pathlib.Path]:
  """Subject folders (holding subject.json) directly under ``root``, sorted by name.

  Raises:
    InputError: ``root`` is not a folder or holds no subject folder.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise InputError(f"subjects folder not found: {root}")
  found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                 and (p / simulate.JSON_FILE).is_file())
  if not found:
    raise InputError(f"no subject folders (with {simulate.JSON_FILE}) in {root}")
  return found
