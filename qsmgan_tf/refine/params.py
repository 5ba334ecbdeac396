"""Refinement parameters: the library defaults, their resolution from a contract and
overrides, the method names, and the checks of the inputs."""

from __future__ import annotations

import numpy as np

from qsmgan_tf.classical import operators

DEFAULTS = {"mu": 0.003, "iterations": 15, "margin": operators.DEFAULT_MARGIN,
            "tv_weight": 0.0, "edge_fraction": 0.3, "reweights": 1, "tv_eps": 1e-4,
            "magnitude_edge_fraction": 0.0, "magnitude_weighting": 0, "edge_refresh": 0,
            "residual_margin": 0, "fit_offset": 0, "noise_reference_ppm": 0.0,
            "smv_radius_mm": 0.0, "data_erosion_mm": 0.0, "lcurve_stages": 0,
            "lcurve_factor": 4.0, "lcurve_slope": 0.5, "lcurve_reweights": 2,
            "fine_shrinkage": 0, "fit_level": 0, "robust_data": 0.0}
"""Refinement defaults of the library (a model's contract overrides them as
``contract['refine']``): the quadratic solve (``tv_weight`` 0) chosen on simulated validation
phantoms with a degraded-truth prior by ``python benchmarks/inference.py --study=refine``
(BUILD.md). A contract that sets ``tv_weight > 0`` adds the L1 edge prior;
``magnitude_edge_fraction`` and ``magnitude_weighting`` act only when a magnitude is given;
``noise_reference_ppm > 0`` scales ``mu`` and ``tv_weight`` by the scan's own noise
(`statistics.regularisation_scale`); ``smv_radius_mm > 0`` compares fields after the SMV high-pass
(background remnants ignored); ``data_erosion_mm > 0`` leaves the voxels that close to the mask's
edge out of the data term; ``lcurve_stages > 0`` raises the L1 weight per scan while the
L-curve is steep; ``fine_shrinkage = 1`` weighs the solve's correction per band of k by the
field's own signal-to-noise (`fine_shrinkage`); ``fit_level`` 1 or 2 leaves chi's uniform
level to the network (the data term does not see it; with 2, nor the L1 term);
``robust_data > 0`` solves again with Huber weights on the first solve's data residual."""

MAX_FIT_OFFSET = 4
"""Largest ``fit_offset``: a polynomial background up to degree 3 (20 terms)."""


def uses_magnitude(params: dict) -> bool:
  """Whether refinement parameters (`resolve_params`) would use a magnitude image."""
  return ((params["tv_weight"] > 0 and params["magnitude_edge_fraction"] > 0)
          or bool(params["magnitude_weighting"]))


def without_magnitude(params: dict) -> dict:
  """``params`` with the magnitude's uses off: what runs when no magnitude is given."""
  return {**params, "magnitude_edge_fraction": 0.0, "magnitude_weighting": 0}

CLOSED_FORM_DEFAULTS = {"lam": 0.01, "margin": operators.DEFAULT_MARGIN}
"""Closed-form k-space variant: Tikhonov weight towards chi_net, padding margin (voxels)."""

METHODS = ("cg", "closed", "none")


def resolve_params(contract: dict | None = None, **overrides) -> dict:
  """CG parameters: explicit overrides, else ``contract['refine']``, else `DEFAULTS`.

  Args:
    contract: model contract or None.
    **overrides: mu / iterations / margin; None values are ignored.

  Returns:
    dict with exactly the keys of `DEFAULTS`, typed like them.

  Raises:
    ValueError: a value that is not of its parameter's type (e.g. an evaluate spec's
      ``refine_reweights=x``), named in the message.
  """
  out = dict(DEFAULTS)
  for source in (((contract or {}).get("refine") or {}), overrides):
    for key, value in source.items():
      if key in out and value is not None:
        try:
          out[key] = type(DEFAULTS[key])(value)
        except (TypeError, ValueError):
          raise ValueError(f"refinement parameter {key}: bad value {value!r}") from None
  if out["fit_level"] not in (0, 1, 2):
    raise ValueError(f"refinement parameter fit_level: {out['fit_level']} is not 0, 1 or 2")
  if not 0 <= out["fit_offset"] <= MAX_FIT_OFFSET:
    raise ValueError(f"refinement parameter fit_offset: {out['fit_offset']} is not in "
                     f"0..{MAX_FIT_OFFSET}")
  for key, ok, rule in (("data_erosion_mm", out["data_erosion_mm"] >= 0, ">= 0"),
                        ("robust_data", out["robust_data"] >= 0, ">= 0"),
                        ("lcurve_stages", out["lcurve_stages"] >= 0, ">= 0"),
                        ("lcurve_factor", out["lcurve_factor"] > 1, "> 1"),
                        ("lcurve_reweights", out["lcurve_reweights"] >= 1, ">= 1")):
    if not ok:
      raise ValueError(f"refinement parameter {key}: {out[key]} must be {rule}")
  return out


def resolve_method(method) -> str:
  """'cg' | 'closed' | 'none' (None and False mean 'none'); ValueError otherwise."""
  method = "none" if method in (None, False) else str(method).lower()
  if method not in METHODS:
    raise ValueError(f"unknown refinement {method!r}; expected one of {', '.join(METHODS)}")
  return method


# --------------------------------------------------------------------------------------


def _check_inputs(chi_net, field_ppm, mask):
  chi_net = np.asarray(chi_net, dtype=np.float32)
  field_ppm = np.asarray(field_ppm, dtype=np.float32)
  mask = np.asarray(mask) > 0.5
  if not chi_net.shape == field_ppm.shape == mask.shape or chi_net.ndim != 3:
    raise ValueError(f"chi_net {chi_net.shape}, field {field_ppm.shape} and mask {mask.shape} "
                     "must be 3D volumes of one shape")
  if not mask.any():
    raise ValueError("mask is empty")
  return chi_net, field_ppm, mask


def check_magnitude(magnitude, mask: np.ndarray) -> np.ndarray | None:
  """|magnitude| as float32, or None; ValueError if its shape (the boolean ``mask``'s) or its
  in-mask values (finite, positive mean) are wrong."""
  if magnitude is None:
    return None
  magnitude = np.abs(np.asarray(magnitude, dtype=np.float32))
  if magnitude.shape != mask.shape:
    raise ValueError(f"magnitude {magnitude.shape} must have the mask's shape {mask.shape}")
  if not np.all(np.isfinite(magnitude[mask])) or not magnitude[mask].mean() > 0:
    raise ValueError("magnitude must be finite with a positive mean inside the mask")
  return magnitude
