"""`refine`: the one entry to the refinement, by name, with the record a sidecar keeps.

One argument order everywhere, ``(chi_net, field_ppm, mask, voxel_size_mm, b0_dir)``, and one
parameter type, `params.RefineParams`. Two engines compute the same thing: ``"tf"``, the traced
TensorFlow graph (`graph.run_refine_tf`, float32; what `inference.reconstruct_qsmgan` runs and
what the SavedModel's signatures hold) and ``"numpy"``, the float64 NumPy/SciPy reference
(`reference.refine_cg`; the oracle tests compare the graph with). The closed form has one
implementation (NumPy) for both. TensorFlow is imported by the 'tf' engine only: this package
imports without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qsmgan_tf.refine.params import (CLOSED_FORM_DEFAULTS, RefineParams, _check_inputs,
                                     resolve_method)
from qsmgan_tf.refine.reference import field_residual, refine_cg, refine_closed_form
from qsmgan_tf.refine.statistics import noise_info, shrinkage_info

ENGINES = ("tf", "numpy")


def cg_record(field_ppm, mask, voxel_size_mm, b0_dir, params: dict) -> dict[str, Any]:
  """What a sidecar keeps of a CG refinement, besides the L1 weight it used: its parameters,
  the noise scale (`statistics.noise_info`) and the shrinkage gains (`shrinkage_info`)."""
  return {"method": "cg", **params, **noise_info(field_ppm, mask, params),
          **shrinkage_info(field_ppm, mask, voxel_size_mm, b0_dir, params)}


def _residual(engine: str, chi, field_ppm, mask, voxel_size_mm, b0_dir) -> float:
  """The relative field residual (`reference.field_residual`) with the engine's arithmetic."""
  if engine == "numpy":
    return field_residual(chi, field_ppm, mask, voxel_size_mm, b0_dir)
  from qsmgan_tf.refine.graph import traced_field_residual_tf  # pylint: disable=import-outside-toplevel
  return float(traced_field_residual_tf()(
      np.asarray(chi, np.float32), np.asarray(field_ppm, np.float32),
      mask.astype(np.float32), np.asarray(voxel_size_mm, np.float32),
      np.asarray(b0_dir, np.float32)))


def refine(chi_net, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
           params: RefineParams | None = None, *, method: str = "cg", magnitude=None,
           lam: float | None = None, engine: str = "numpy", contract=None,
           **overrides) -> tuple[np.ndarray, dict[str, Any]]:
  """Refines the network's map ``chi_net`` against the measured field.

  Args:
    chi_net: the network's chi, ppm, [X, Y, Z] (used inside the mask only).
    field_ppm: the local field, ppm of B0, same shape.
    mask: region of interest (> 0.5 inside).
    voxel_size_mm: voxel size, mm.
    b0_dir: B0 direction in the voxel frame.
    params: the CG parameters; None resolves them from ``contract`` and ``overrides``
      (`RefineParams.resolve`); with ``params`` given, ``overrides`` replace its fields.
    method: 'cg', 'closed' or 'none'.
    magnitude: optional magnitude image, used as ``params`` say; without one the parameters'
      magnitude uses are off.
    lam: the closed form's weight; None takes `CLOSED_FORM_DEFAULTS`.
    engine: 'tf' (the traced graph, production) or 'numpy' (the reference).
    contract: a model contract whose ``refine`` entry gives the defaults (``params`` None).
    **overrides: `RefineParams` fields (None values ignored), e.g. ``mu=0.01``.

  Returns:
    ``(chi_ppm, info)``: chi float32 (zero outside the mask); info with the method, its
    parameters, for cg the noise scale and shrinkage record (`statistics.noise_info`,
    `shrinkage_info`) and the L1 weight the solve used (``tv_weight_used``), and the relative
    field residual before and after (``residual_before``, ``residual_after``).

  Raises:
    ValueError: unknown method or engine, a bad parameter, bad shapes or an empty mask.
  """
  method = resolve_method(method)
  if engine not in ENGINES:
    raise ValueError(f"unknown refinement engine {engine!r}; expected one of "
                     f"{', '.join(ENGINES)}")
  params = (RefineParams.resolve(contract, **overrides) if params is None
            else params.replace(**overrides))
  if magnitude is None:
    params = params.without_magnitude()
  chi_net, field_ppm, mask = _check_inputs(chi_net, field_ppm, mask)
  chi_net = chi_net * mask
  before = _residual(engine, chi_net, field_ppm, mask, voxel_size_mm, b0_dir)
  if method == "none":
    return chi_net, {"method": "none", "residual_before": before, "residual_after": before}
  values = params.as_dict()
  if method == "closed":
    lam = CLOSED_FORM_DEFAULTS["lam"] if lam is None else float(lam)
    chi = refine_closed_form(chi_net, field_ppm, mask, voxel_size_mm, b0_dir, lam,
                             params.margin)
    info = {"method": "closed", "lam": lam, "margin": params.margin}
  else:
    if engine == "numpy":
      chi, tv_used = refine_cg(chi_net, field_ppm, mask, voxel_size_mm, b0_dir, **values,
                               magnitude=magnitude, return_weight=True)
    else:
      from qsmgan_tf.refine.graph import run_refine_tf  # pylint: disable=import-outside-toplevel
      chi, tv_used = run_refine_tf(chi_net, field_ppm, mask, voxel_size_mm, b0_dir, values,
                                   magnitude, return_weight=True)
    info = {**cg_record(field_ppm, mask, voxel_size_mm, b0_dir, values),
            "tv_weight_used": tv_used}
  info["residual_before"] = before
  info["residual_after"] = _residual(engine, chi, field_ppm, mask, voxel_size_mm, b0_dir)
  return chi, info
