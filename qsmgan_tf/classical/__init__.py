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

`DEFAULTS` holds each method's documented literature/measured defaults; `reconstruct` is
the by-name entry point, which also removes the mean over the mask (chi is relative).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from qsmgan_tf import nifti_io
from qsmgan_tf.classical import cfl2 as _cfl2
from qsmgan_tf.classical import ilsqr as _ilsqr
from qsmgan_tf.classical import medi as _medi
from qsmgan_tf.classical import tkd as _tkd
from qsmgan_tf.classical import tv as _tv

METHODS = {
    "tkd": _tkd.tkd,
    "cfl2": _cfl2.cfl2,
    "ilsqr": _ilsqr.ilsqr,
    "medi": _medi.medi,
    "tv": _tv.tv,
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "tkd": dict(_tkd.DEFAULTS),
    "cfl2": dict(_cfl2.DEFAULTS),
    "ilsqr": dict(_ilsqr.DEFAULTS),
    "medi": dict(_medi.DEFAULTS),
    "tv": dict(_tv.DEFAULTS),
}


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
    nifti_io.InputError: unknown method or parameter, or bad inputs.
  """
  if name not in METHODS:
    raise nifti_io.InputError(f"unknown classical method {name!r}; "
                              f"expected one of {', '.join(METHODS)}")
  params = dict(params or {})
  unknown = set(params) - set(DEFAULTS[name])
  if unknown:
    raise nifti_io.InputError(f"unknown parameter(s) for {name}: {', '.join(sorted(unknown))}")
  return METHODS[name](field_ppm, mask, voxel_size_mm, b0_dir, magnitude=magnitude, **params)
