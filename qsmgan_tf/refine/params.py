"""Refinement parameters: `RefineParams` (typed, frozen, the library defaults; `DEFAULTS` is
the same as a dict), their resolution from a contract and overrides, the method names, and the
checks of the inputs."""

from __future__ import annotations

import dataclasses

import numpy as np

from qsmgan_tf.classical import operators

MAX_FIT_OFFSET = 4
"""Largest ``fit_offset``: a polynomial background up to degree 3 (20 terms)."""

_MAGNITUDE_OFF = {"magnitude_edge_fraction": 0.0, "magnitude_weighting": 0}
"""The parameters' magnitude uses switched off: what runs when no magnitude is given."""


@dataclasses.dataclass(frozen=True)
class RefineParams:
  """The refinement's parameters, typed; the defaults are the library's (a model's contract
  overrides them as ``contract['refine']``; `resolve` reads it). The package docstring has the
  maths of each term.

  The quadratic solve (``tv_weight`` 0) was chosen on simulated validation phantoms with a
  degraded-truth prior by ``python benchmarks/inference.py --study=refine`` (BUILD.md).
  """

  mu: float = 0.003
  """Weight of the quadratic pull towards the network's map."""
  iterations: int = 15
  """CG iterations per solve."""
  margin: int = operators.DEFAULT_MARGIN
  """Zero padding of the mask's box for the solve's FFTs, voxels."""
  tv_weight: float = 0.0
  """Weight of the L1 edge prior (0: the quadratic solve)."""
  edge_fraction: float = 0.3
  """Share of the largest gradients of the map counted as edges (not penalised)."""
  reweights: int = 1
  """IRLS steps of the L1 term."""
  tv_eps: float = 1e-4
  """Smoothing of |grad chi| in the IRLS weights, ppm/mm."""
  magnitude_edge_fraction: float = 0.0
  """Share of edges taken from the magnitude image (only with one)."""
  magnitude_weighting: int = 0
  """1: the data term weighted by the magnitude (only with one)."""
  edge_refresh: int = 0
  """Recompute the edges from the refined map this many times."""
  residual_margin: int = 0
  """Margin of the large grid on which the residual is computed (defect correction), voxels."""
  fit_offset: int = 0
  """Polynomial background fitted beside chi: 1 constant ... `MAX_FIT_OFFSET` degree 3."""
  noise_reference_ppm: float = 0.0
  """> 0: ``mu`` and ``tv_weight`` scale with the scan's own noise over this reference."""
  smv_radius_mm: float = 0.0
  """> 0: fields compared after an SMV high-pass (background remnants ignored)."""
  data_erosion_mm: float = 0.0
  """> 0: voxels this close to the mask's edge left out of the data term."""
  lcurve_stages: int = 0
  """> 0: the L1 weight raised per scan while its L-curve is steep, at most this many times."""
  lcurve_factor: float = 4.0
  """The L1 weight's factor per L-curve stage (> 1)."""
  lcurve_slope: float = 0.5
  """The L-curve slope below which a stage counts as flat."""
  lcurve_reweights: int = 2
  """IRLS steps per L-curve stage."""
  fine_shrinkage: int = 0
  """1: the correction weighed per band of k by the field's own signal-to-noise."""
  fit_level: int = 0
  """1 or 2: chi's uniform level left to the network (2: the L1 term does not see it either)."""
  robust_data: float = 0.0
  """> 0: a second solve with Huber weights at this many robust deviations of the residual."""
  bregman: int = 0
  """Bregman passes after the others: the last residual added back to the field (L1 only)."""

  @classmethod
  def resolve(cls, contract=None, **overrides) -> RefineParams:
    """Explicit overrides, else ``contract['refine']``, else the defaults; None values are
    ignored, unknown keys too (a contract may carry keys of a later version).

    Raises:
      ValueError: a value that is not of its parameter's type (e.g. an evaluate spec's
        ``refine_reweights=x``) or out of its range, named in the message.
    """
    if isinstance(contract, RefineParams):
      return contract.replace(**overrides)
    values = {}
    for source in ((contract or {}).get("refine") or {}, overrides):
      for key, value in source.items():
        if key in _FIELD_TYPES and value is not None:
          try:
            values[key] = _FIELD_TYPES[key](value)
          except (TypeError, ValueError):
            raise ValueError(f"refinement parameter {key}: bad value {value!r}") from None
    return cls(**values)

  def __post_init__(self):
    for key, ok, rule in (
        ("fit_level", self.fit_level in (0, 1, 2), "0, 1 or 2"),
        ("fit_offset", 0 <= self.fit_offset <= MAX_FIT_OFFSET, f"in 0..{MAX_FIT_OFFSET}"),
        ("data_erosion_mm", self.data_erosion_mm >= 0, ">= 0"),
        ("robust_data", self.robust_data >= 0, ">= 0"),
        ("bregman", self.bregman >= 0, ">= 0"),
        ("lcurve_stages", self.lcurve_stages >= 0, ">= 0"),
        ("lcurve_factor", self.lcurve_factor > 1, "> 1"),
        ("lcurve_reweights", self.lcurve_reweights >= 1, ">= 1")):
      if not ok:
        raise ValueError(f"refinement parameter {key}: {getattr(self, key)} must be {rule}")

  def replace(self, **changes) -> RefineParams:
    """A copy with ``changes`` (None values ignored), typed and checked as in `resolve`."""
    return RefineParams.resolve({"refine": self.as_dict()}, **changes)

  def as_dict(self) -> dict:
    """``{name: value}`` in field order: the keyword arguments of `refine_cg`/`refine_tf`."""
    return dataclasses.asdict(self)

  @property
  def uses_magnitude(self) -> bool:
    """Whether these parameters would use a magnitude image."""
    return ((self.tv_weight > 0 and self.magnitude_edge_fraction > 0)
            or bool(self.magnitude_weighting))

  def without_magnitude(self) -> RefineParams:
    """These parameters with the magnitude's uses off: what runs when no magnitude is given."""
    return dataclasses.replace(self, **_MAGNITUDE_OFF)


_FIELD_TYPES = {f.name: type(f.default) for f in dataclasses.fields(RefineParams)}

DEFAULTS = RefineParams().as_dict()
"""`RefineParams`' defaults as a dict (the keys a contract's ``refine`` entry holds)."""


def uses_magnitude(params) -> bool:
  """Whether refinement parameters (a `resolve_params` dict or `RefineParams`) would use a
  magnitude image."""
  return _as_params(params).uses_magnitude


def without_magnitude(params: dict) -> dict:
  """``params`` (a dict) with the magnitude's uses off: what runs when no magnitude is given."""
  return {**params, **_MAGNITUDE_OFF}


def _as_params(params) -> RefineParams:
  return params if isinstance(params, RefineParams) else RefineParams.resolve({"refine": params})


CLOSED_FORM_DEFAULTS = {"lam": 0.01, "margin": operators.DEFAULT_MARGIN}
"""Closed-form k-space variant: Tikhonov weight towards chi_net, padding margin (voxels)."""

METHODS = ("cg", "closed", "none")


def resolve_params(contract=None, **overrides) -> dict:
  """`RefineParams.resolve` as a dict with exactly the keys of `DEFAULTS`, typed like them
  (the form the solves' keyword arguments and the sidecars take).

  Raises:
    ValueError: a bad value, named in the message.
  """
  return RefineParams.resolve(contract, **overrides).as_dict()


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
