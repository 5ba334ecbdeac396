"""Classical single-orientation QSM dipole inversions, as plain NumPy functions.

Each method is ``fn(field_ppm, mask, voxel_size_mm=(1, 1, 1), b0_dir=(0, 0, 1),
magnitude=None, **params) -> chi_ppm`` (float32, the field's shape, zero outside the mask, not
de-meaned) and works on the mask's bounding box padded by a margin to a fast FFT size
(`operators.Grid`):

  tkd    truncated k-space division            (Shmueli 2009; Wharton 2010)
  cfl2   closed-form gradient-regularised L2   (Bilgic 2014)
  ilsqr  LSQR + streaking-artifact removal     (Li 2015)
  medi   nonlinear MEDI-L1, Gauss-Newton + CG  (Liu 2011, 2013)
  tv     TV by ADMM, closed-form k-space steps (Bilgic 2014)

Each method is one module that names its ``METHOD`` and ``TABLE_RANK`` (found by `_registry`:
a new method touches only its own module). `DEFAULTS` holds each method's documented
literature/measured defaults; `reconstruct` is the by-name entry point (chi as the method
produced it; referencing is `qsmgan_tf.reconstruct.apply_reference`'s).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping, Sequence

import numpy as np

from qsmgan_tf import nifti_io
from qsmgan_tf.errors import InputError


def _registry() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """Every module of this package that names a ``METHOD`` (its function has that name, its
  parameters are its ``DEFAULTS``), in ``TABLE_RANK`` order: adding a method is adding a
  module."""
  found = []
  for info in pkgutil.iter_modules(__path__):
    module = importlib.import_module(f"{__name__}.{info.name}")
    if hasattr(module, "METHOD"):
      found.append(module)
  found.sort(key=lambda m: (m.TABLE_RANK, m.METHOD))
  return ({m.METHOD: getattr(m, m.METHOD) for m in found},
          {m.METHOD: dict(m.DEFAULTS) for m in found})


METHODS, DEFAULTS = _registry()
"""``METHODS``: name -> function; ``DEFAULTS``: name -> its documented parameters."""


def reconstruct(name: str, field_ppm: np.ndarray, mask: np.ndarray,
                voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                b0_dir: Sequence[float] = (0.0, 0.0, 1.0), magnitude: np.ndarray | None = None,
                params: Mapping[str, Any] | None = None) -> np.ndarray:
  """Runs classical method ``name`` with its documented defaults (overridable).

  chi is returned as the method produced it: referencing (e.g. removing the mean over the mask)
  is the caller's choice, made in one place (`qsmgan_tf.reconstruct.apply_reference`).

  Args:
    name: a key of METHODS.
    field_ppm: local field, ppm of B0.
    mask: region of interest (bool).
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame.
    magnitude: optional magnitude (used by MEDI).
    params: overrides of DEFAULTS[name].

  Returns:
    chi, ppm, float32, zero outside the mask, not referenced.

  Raises:
    InputError: unknown method or parameter, or bad inputs.
  """
  if name not in METHODS:
    raise InputError(f"unknown classical method {name!r}; "
                              f"expected one of {', '.join(METHODS)}")
  params = dict(params or {})
  unknown = set(params) - set(DEFAULTS[name])
  if unknown:
    raise InputError(f"unknown parameter(s) for {name}: {', '.join(sorted(unknown))}")
  return METHODS[name](field_ppm, mask, voxel_size_mm, b0_dir, magnitude=magnitude, **params)
