"""Subject specs: what each subject of a dataset is, its seed and its train/validation split.

Every subject spec carries its own seed derived from the dataset seed and the subject's name, so a
subject's pairs do not depend on how many subjects there are or in which order they run; the
train/validation split is drawn per subject (stratified by kind), never per patch. The specs are
the input of the Beam pipeline (`data_prep.pipeline`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from data_prep import model_errors as model_errors_lib
from data_prep import phantoms as phantoms_lib
from qsmgan_tf.errors import InputError

SPLITS = ("train", "val")
SYNTHETIC_KINDS = ("brain", "shapes")


@dataclasses.dataclass(frozen=True)
class SubjectSpec:
  """What a worker needs to make one subject (picklable, small).

  Attributes:
    subject_id: unique name, e.g. 'brain-00003' or a real subject's folder name.
    split: 'train' or 'val'.
    kind: 'brain', 'shapes' (simulated) or 'real'.
    seed: the subject's own seed (phantom, noise, patch choice, augmentation).
    snr: simulated SNR (None: noise-free).
    voxel_size_mm: simulated voxel size, mm.
    b0_dir: simulated B0 direction (voxel frame).
    lesions: simulate microbleeds/calcification.
    shape: simulation grid; None = the phantom's natural grid.
    target: 'chi' or 'cosmos'.
    background_order: residual background polynomial degree (0 = none).
    model_errors: 'none', or 'realistic': departures from the dipole model drawn from the
      subject's seed (`data_prep.model_errors.realistic_model_errors`, as ``make_phantom``).
    detail: brains' fine anatomy, 'none' or 'fine' (`data_prep.phantoms.brain_phantom`).
    path: a real subject's folder.
  """
  subject_id: str
  split: str
  kind: str
  seed: int
  snr: float | None = 100.0
  voxel_size_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
  b0_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)
  lesions: bool = False
  shape: tuple[int, int, int] | None = None
  target: str = "chi"
  background_order: int = 0
  model_errors: str = "none"
  detail: str = "none"
  path: str | None = None


def derive_seed(seed: int, *names: Any) -> int:
  """A 63-bit seed from the dataset seed and names (stable across runs and platforms)."""
  text = json.dumps([int(seed), *[str(n) for n in names]])
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def assign_splits(subject_ids: Sequence[str], seed: int, val_fraction: float,
                  stratum: str = "") -> dict[str, str]:
  """Draws the validation subjects: ``round(n * val_fraction)`` of them, at least 1 (when
  ``val_fraction > 0`` and n >= 2) and at most n - 1; deterministic in the seed and the ids.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise InputError(f"--val_fraction must be in [0, 1), got {val_fraction}")
  ids = sorted(subject_ids)
  n = len(ids)
  n_val = int(round(n * val_fraction))
  if val_fraction > 0 and n >= 2:
    n_val = min(max(n_val, 1), n - 1)
  elif n < 2:
    n_val = 0
  order = np.random.default_rng(derive_seed(seed, "split", stratum)).permutation(n)
  val = {ids[i] for i in order[:n_val]}
  return {sid: ("val" if sid in val else "train") for sid in ids}


def tilted_b0(tilt_deg: float, rng: np.random.Generator) -> tuple[float, float, float]:
  """B0 tilted from z by ``tilt_deg`` towards a random azimuth (voxel frame)."""
  t = math.radians(float(tilt_deg))
  phi = float(rng.uniform(0.0, 2.0 * math.pi))
  return (math.sin(t) * math.cos(phi), math.sin(t) * math.sin(phi), math.cos(t))


def synthetic_specs(n_brains: int, n_shapes: int, seed: int, *, val_fraction: float = 0.1,
                    lesion_fraction: float = 0.5, snrs: Sequence[float | None] = (100.0,),
                    voxel_sizes: Sequence[Sequence[float]] = ((1.0, 1.0, 1.0),),
                    b0_tilts_deg: Sequence[float] = (0.0,),
                    shape: Sequence[int] | None = None, target: str = "chi",
                    background_order: int = 0,
                    model_errors: str = "none",
                    model_error_fraction: float = 1.0,
                    detail: str = "none", detail_fraction: float = 1.0) -> list[SubjectSpec]:
  """Specs of the simulated subjects: per subject, SNR, voxel size and B0 tilt are drawn from
  the given lists and lesions with probability ``lesion_fraction`` (brains only), all from the
  subject's own seed; with ``model_errors='realistic'`` a share ``model_error_fraction`` of the
  subjects (drawn per subject) also gets the model errors its seed draws
  (`data_prep.model_errors.realistic_model_errors`); with ``detail='fine'`` a share
  ``detail_fraction`` of the brains (drawn per subject) has the fine anatomy
  (`data_prep.phantoms.brain_phantom`).
  """
  if n_brains < 0 or n_shapes < 0:
    raise InputError("numbers of synthetic subjects must be >= 0")
  if not 0.0 <= lesion_fraction <= 1.0:
    raise InputError(f"--lesion_fraction must be in [0, 1], got {lesion_fraction}")
  if not snrs or not voxel_sizes or not b0_tilts_deg:
    raise InputError("--snr, --voxel_sizes and --b0_tilt_deg need at least one value")
  if model_errors not in model_errors_lib.MODEL_ERROR_MODES:
    raise InputError(f"--model_errors must be one of {', '.join(model_errors_lib.MODEL_ERROR_MODES)}"
                     f", got {model_errors!r}")
  if not 0.0 <= model_error_fraction <= 1.0:
    raise InputError(f"--model_error_fraction must be in [0, 1], got {model_error_fraction}")
  if detail not in phantoms_lib.DETAIL_MODES:
    raise InputError(f"--detail must be one of {', '.join(phantoms_lib.DETAIL_MODES)}, "
                     f"got {detail!r}")
  if not 0.0 <= detail_fraction <= 1.0:
    raise InputError(f"--detail_fraction must be in [0, 1], got {detail_fraction}")
  specs = []
  for kind, count in zip(SYNTHETIC_KINDS, (n_brains, n_shapes)):
    ids = [f"{kind}-{i:05d}" for i in range(count)]
    splits = assign_splits(ids, seed, val_fraction, stratum=kind)
    for sid in ids:
      subject_seed = derive_seed(seed, sid)
      rng = np.random.default_rng(derive_seed(subject_seed, "geometry"))
      snr = snrs[int(rng.integers(len(snrs)))]
      voxel = tuple(float(v) for v in voxel_sizes[int(rng.integers(len(voxel_sizes)))])
      b0 = tilted_b0(b0_tilts_deg[int(rng.integers(len(b0_tilts_deg)))], rng)
      lesions = kind == "brain" and bool(rng.random() < lesion_fraction)
      # Drawn last and only when asked, so that datasets without errors keep their subjects.
      errors = model_errors
      if model_errors != "none" and model_error_fraction < 1.0:
        errors = model_errors if rng.random() < model_error_fraction else "none"
      fine = detail if kind == "brain" else "none"
      if fine != "none" and detail_fraction < 1.0:
        fine = detail if rng.random() < detail_fraction else "none"
      specs.append(SubjectSpec(
          subject_id=sid, split=splits[sid], kind=kind, seed=subject_seed, snr=snr,
          voxel_size_mm=voxel, b0_dir=b0, lesions=lesions,
          shape=tuple(int(n) for n in shape) if shape else None, target=target,
          background_order=int(background_order), model_errors=errors, detail=fine))
  return specs


def real_specs(subjects_dir, seed: int, val_fraction: float, target: str) -> list[SubjectSpec]:
  """Specs of real subjects found under ``subjects_dir`` (see `data_prep.subjects`)."""
  from data_prep import subjects as subjects_lib  # pylint: disable=import-outside-toplevel

  paths = [str(p) for p in subjects_lib.list_subjects(subjects_dir)]
  if not paths:
    raise InputError(f"no subjects found under {subjects_dir}")
  ids = {os.path.basename(os.path.normpath(p)): p for p in paths}
  if len(ids) != len(paths):
    raise InputError(f"subject folder names under {subjects_dir} are not unique")
  splits = assign_splits(list(ids), seed, val_fraction, stratum="real")
  return [SubjectSpec(subject_id=sid, split=splits[sid], kind="real",
                      seed=derive_seed(seed, "real", sid), snr=None, target=target,
                      path=path) for sid, path in sorted(ids.items())]
