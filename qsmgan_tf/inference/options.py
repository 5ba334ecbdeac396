"""`QsmganOptions`: how `pipeline.reconstruct_qsmgan` runs, typed and checked once.

Where the network runs (``model``, ``server``, ``rest_url``, ``precision``), how it covers the
volume (``inference`` and the sliding window's MONAI-named options), the refinement (``refine``,
``refine_overrides``: any `refine.RefineParams` field, ``refine_lam``), the B0 rotation
threshold, threads and the progress bar. The keyword form the binaries and evaluate's method
specs use, ``refine_mu=0.01``, ``refine_fit_level=2``, ..., becomes ``refine_overrides`` in
`QsmganOptions.from_kwargs`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from qsmgan_tf import refine as refine_lib
from qsmgan_tf.errors import InputError
from qsmgan_tf.inference.window import BLEND_MODES, DEFAULT_SIGMA_SCALE

INFERENCE_MODES = ("single", "sliding_window")
_INFERENCE_ALIASES = {"tiled": "sliding_window", "sliding": "sliding_window"}
PRECISIONS = ("float32", "bfloat16")
_REFINE_PREFIX = "refine_"


@dataclasses.dataclass(frozen=True)
class QsmganOptions:
  """Options of `pipeline.reconstruct_qsmgan` (its docstring says what each does)."""

  model: Any = None
  """A SavedModel folder or base path, a ``.keras`` file, a training folder, a
  ``(keras.Model, contract)`` pair, or None (`model_location.resolve_model`)."""
  server: str | None = None
  """TF Serving gRPC ``host:port``."""
  rest_url: str | None = None
  """TF Serving REST model URL (patches only)."""
  precision: str = "float32"
  """'float32' or 'bfloat16' (Keras generators only)."""
  inference: str = "single"
  """'single' (the model's graph: one pass or in-graph tiles) or 'sliding_window'."""
  overlap: float = 0.25
  mode: str = "gaussian"
  sw_batch_size: int = 1
  roi_size: int | None = None
  sigma_scale: float = DEFAULT_SIGMA_SCALE
  refine: str = "cg"
  """'cg', 'closed' or 'none'."""
  refine_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  """`refine.RefineParams` fields that override the contract's ``refine`` entry."""
  refine_lam: float | None = None
  """The closed form's weight."""
  rotate_above_deg: float | None = None
  threads: int | None = None
  progress: bool = True

  def __post_init__(self):
    inference = _INFERENCE_ALIASES.get(self.inference, self.inference)
    if inference not in INFERENCE_MODES:
      raise InputError(f"inference must be one of {', '.join(INFERENCE_MODES)}, got "
                       f"{self.inference!r}")
    try:
      method = refine_lib.resolve_method(self.refine)
      overrides = {k: v for k, v in dict(self.refine_overrides).items() if v is not None}
      refine_lib.RefineParams.resolve(None, **overrides)  # types and ranges, once
    except ValueError as exc:
      raise InputError(str(exc)) from None
    unknown = sorted(set(overrides) - set(refine_lib.DEFAULTS))
    if unknown:
      raise InputError(f"unknown refinement parameter(s) {', '.join(unknown)}; expected some "
                       f"of {', '.join(refine_lib.DEFAULTS)}")
    if self.mode not in BLEND_MODES:
      raise InputError(f"mode must be one of {', '.join(BLEND_MODES)}, got {self.mode!r}")
    if self.precision not in PRECISIONS:
      raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                       f"{self.precision!r}")
    object.__setattr__(self, "inference", inference)
    object.__setattr__(self, "refine", method)
    object.__setattr__(self, "refine_overrides", types.MappingProxyType(overrides))

  @classmethod
  def from_kwargs(cls, **kwargs) -> QsmganOptions:
    """From keyword options, ``refine_<field>=value`` collected into ``refine_overrides``.

    Raises:
      TypeError: a keyword that is no option (as a function call would).
      InputError: a value out of range.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    overrides = dict(kwargs.pop("refine_overrides", None) or {})
    for key in [k for k in kwargs if k.startswith(_REFINE_PREFIX) and k not in fields]:
      overrides[key[len(_REFINE_PREFIX):]] = kwargs.pop(key)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
      raise TypeError(f"unexpected qsmgan option(s): {', '.join(unknown)}")
    return cls(**kwargs, refine_overrides=overrides)

  def replace(self, **kwargs) -> QsmganOptions:
    """A copy with keyword options (as `from_kwargs`) changed; refinement overrides merge."""
    current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    overrides = {**current.pop("refine_overrides"), **(kwargs.pop("refine_overrides", None) or {})}
    return QsmganOptions.from_kwargs(**{**current, **kwargs}, refine_overrides=overrides)

  def refine_params(self, contract) -> refine_lib.RefineParams:
    """The refinement's parameters for a model: its contract's, with the overrides."""
    return refine_lib.RefineParams.resolve(contract, **self.refine_overrides)
