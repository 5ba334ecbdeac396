"""The model contract: what a trained or exported generator promises its users, typed.

A contract travels with every model: ``contract.json`` in a training folder (written by
`training_folder.build_contract`) and ``assets/contract.json`` in a SavedModel (completed by
`exporting.serving_contract`, also served by the ``contract`` signature). docs/design.md,
"Contract 2", lists its keys. `ModelContract` is the one reader of that JSON:

* `ModelContract.from_dict` migrates the spellings older contracts used (the generator config
  under ``generator``, ``generator_config``, ``config`` or at the top; trained voxel sizes under
  four names, also inside ``training``; ``trained_b0_dir``) to the canonical keys, once;
* typed properties answer what consumers ask (`generator`, `input_patch`, `output_patch`,
  `crop_margin`, `size_multiple`, `voxel_sizes_mm`, `b0_dir`, `b0_dirs_trained`, `refine`,
  `inference`, `export`);
* it is frozen: `replace` returns a new contract; it is also a read-only ``Mapping`` of its
  canonical JSON (``contract["refine"]``, ``dict(contract, refine=...)``), which is how the
  signature factories and the sidecars read it;
* `read` takes a ``contract.json`` file, a folder holding one, or a SavedModel version folder;
  `write` writes it atomically.

Keys the class does not know are kept verbatim (data digests, training facts, export facts).
Importing this module loads no TensorFlow.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import types
from typing import Any, Iterator, Mapping

import numpy as np

from qsmgan_tf.errors import InputError

CONTRACT_FILE = "contract.json"
"""Name of the contract in a training folder and in a SavedModel's ``assets/``."""

DEFAULT_B0_DIR = (0.0, 0.0, 1.0)
"""The B0 direction of a contract that states none (voxel frame)."""

_GENERATOR_PLACES = ("generator", "generator_config", "config")
_VOXEL_KEYS = ("voxel_sizes_mm", "trained_voxel_sizes_mm", "voxel_size_mm",
               "trained_voxel_size_mm")
_GENERATOR_KEYS = {"depth", "input_patch", "output_patch"}


def _plain(obj: Any) -> Any:
  if isinstance(obj, (np.generic, np.ndarray)):
    return obj.tolist()
  if isinstance(obj, (pathlib.PurePath, Mapping)):
    return str(obj) if isinstance(obj, pathlib.PurePath) else dict(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_ready(value: Any) -> Any:
  """A deep copy holding only JSON types (tuples become lists, NumPy values Python ones)."""
  try:
    return json.loads(json.dumps(value, sort_keys=True, default=_plain))
  except (TypeError, ValueError) as exc:
    raise InputError(f"model contract is not JSON: {exc}") from None


def _find_generator(raw: Mapping[str, Any]) -> dict[str, Any] | None:
  for place in [raw.get(k) for k in _GENERATOR_PLACES] + [raw]:
    if isinstance(place, Mapping) and _GENERATOR_KEYS <= set(place):
      return dict(place)
  return None


def _voxel_rows(value: Any, where: str) -> list[list[float]]:
  """One voxel size ``[x, y, z]`` or a list of them -> a list of rows (mm)."""
  rows = value if value and isinstance(value[0], (list, tuple)) else [value]
  try:
    out = [[float(v) for v in row] for row in rows if row]
  except (TypeError, ValueError):
    raise InputError(f"model contract {where}: not voxel sizes in mm: {value!r}") from None
  if any(len(row) != 3 or min(row) <= 0 for row in out):
    raise InputError(f"model contract {where}: voxel sizes must be 3 positive numbers (mm), "
                     f"got {value!r}")
  return out


def _migrate(raw: Mapping[str, Any]) -> dict[str, Any]:
  """The canonical JSON of a contract written by any version of this package."""
  out = json_ready(dict(raw))
  generator = _find_generator(out)
  for key in ("generator_config", "config"):
    out.pop(key, None)
  if generator is not None:
    out["generator"] = generator
    size_in, size_out = int(generator["input_patch"]), int(generator["output_patch"])
    out.setdefault("input_patch", size_in)
    out.setdefault("output_patch", size_out)
    out.setdefault("crop_margin", (size_in - size_out) // 2)
    out.setdefault("size_multiple", 2 ** int(generator["depth"]))
  training = out.get("training") if isinstance(out.get("training"), dict) else {}
  voxels: list[list[float]] = []
  for key in _VOXEL_KEYS:
    value = out.pop(key, None) if key != "voxel_sizes_mm" else out.get(key)
    if value is None:
      value = training.get(key)
    if value is not None and not voxels:
      voxels = _voxel_rows(value, key)
  out["voxel_sizes_mm"] = voxels
  b0 = out.pop("trained_b0_dir", None)
  b0 = out.get("b0_dir", b0)
  if b0 is None:
    b0 = list(DEFAULT_B0_DIR)
  if b0 and isinstance(b0[0], (list, tuple)):  # several: the first is the reference axis
    b0 = b0[0]
  try:
    b0 = [float(v) for v in b0]
  except (TypeError, ValueError):
    raise InputError(f"model contract b0_dir: not a direction: {b0!r}") from None
  norm = sum(v * v for v in b0) ** 0.5
  if len(b0) != 3 or not norm > 0:
    raise InputError(f"model contract b0_dir: need 3 numbers, not all zero, got {b0!r}")
  out["b0_dir"] = [v / norm for v in b0]
  out["b0_dirs_trained"] = [[float(v) for v in d] for d in (out.get("b0_dirs_trained") or [])]
  for key in ("refine", "inference", "export"):
    if out.get(key) is not None and not isinstance(out[key], dict):
      raise InputError(f"model contract {key}: expected an object, got {out[key]!r}")
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class ModelContract(Mapping[str, Any]):
  """A model's contract in canonical form; build it with `from_dict` or `read`."""

  _data: Mapping[str, Any]

  # ---------------------------------------------------------------- construction
  @classmethod
  def from_dict(cls, raw: Mapping[str, Any]) -> ModelContract:
    """Migrates and checks a contract dict (any version's spelling).

    Raises:
      InputError: a value that cannot be what its key says (voxel sizes, B0 direction).
    """
    if isinstance(raw, ModelContract):
      return raw
    if not isinstance(raw, Mapping):
      raise InputError(f"model contract must be a JSON object, got {type(raw).__name__}")
    return cls(types.MappingProxyType(_migrate(raw)))

  @classmethod
  def of(cls, contract: Mapping[str, Any] | None) -> ModelContract:
    """``contract`` as a ModelContract (None: an empty contract, every default)."""
    return cls.from_dict(contract if contract is not None else {})

  @classmethod
  def read(cls, path) -> ModelContract:
    """From a ``contract.json`` file, a folder holding one, or a SavedModel version folder.

    Raises:
      InputError: no contract there, or one that is not valid JSON.
    """
    path = pathlib.Path(path)
    for candidate in (path, path / CONTRACT_FILE, path / "assets" / CONTRACT_FILE):
      if candidate.is_file():
        break
    else:
      raise InputError(f"no {CONTRACT_FILE} at {path}")
    try:
      raw = json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
      raise InputError(f"cannot read model contract {candidate}: {exc}") from None
    return cls.from_dict(raw)

  @classmethod
  def parse(cls, text: str | bytes) -> ModelContract:
    """From the JSON text the ``contract`` signature serves."""
    try:
      return cls.from_dict(json.loads(text))
    except ValueError as exc:
      raise InputError(f"model contract is not valid JSON: {exc}") from None

  def replace(self, **changes: Any) -> ModelContract:
    """A new contract with top-level keys replaced (None removes a key)."""
    data = self.to_dict()
    for key, value in changes.items():
      if value is None:
        data.pop(key, None)
      else:
        data[key] = value
    return ModelContract.from_dict(data)

  # ---------------------------------------------------------------- output
  def to_dict(self) -> dict[str, Any]:
    """The canonical JSON as a new, mutable dict."""
    return copy.deepcopy(dict(self._data))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

  def write(self, path) -> None:
    """Writes the canonical JSON to ``path`` (a file) atomically."""
    # Here, not at the top: reading a contract needs neither nibabel nor SciPy.
    from qsmgan_tf import nifti_io  # pylint: disable=import-outside-toplevel
    nifti_io.write_text(path, self.to_json())

  # ---------------------------------------------------------------- Mapping
  def __getitem__(self, key: str) -> Any:
    return copy.deepcopy(self._data[key])

  def __iter__(self) -> Iterator[str]:
    return iter(self._data)

  def __len__(self) -> int:
    return len(self._data)

  def __eq__(self, other: object) -> bool:
    if isinstance(other, Mapping):
      return dict(self._data) == dict(other)
    return NotImplemented

  __hash__ = None  # a Mapping of mutable JSON: not hashable

  def __repr__(self) -> str:
    return f"ModelContract({dict(self._data)!r})"

  # ---------------------------------------------------------------- typed views
  @property
  def has_generator(self) -> bool:
    return "generator" in self._data

  @property
  def generator(self) -> dict[str, Any]:
    """The generator's config (`networks.GeneratorConfig.to_dict()`).

    Raises:
      InputError: the contract describes no generator.
    """
    if "generator" not in self._data:
      raise InputError("model contract has no generator config (depth, input_patch, "
                       "output_patch)")
    return copy.deepcopy(dict(self._data["generator"]))

  @property
  def input_patch(self) -> int:
    return int(self.generator["input_patch"])

  @property
  def output_patch(self) -> int:
    return int(self.generator["output_patch"])

  @property
  def crop_margin(self) -> int:
    """Voxels the generator crops on each side: (input - output) / 2."""
    return (self.input_patch - self.output_patch) // 2

  @property
  def size_multiple(self) -> int:
    """The pooling grid: network inputs are multiples of 2**depth voxels."""
    return 2 ** int(self.generator["depth"])

  @property
  def voxel_sizes_mm(self) -> tuple[tuple[float, float, float], ...]:
    """Voxel sizes the model was trained on; () when the contract does not say (any)."""
    return tuple(tuple(row) for row in self._data["voxel_sizes_mm"])

  @property
  def b0_dir(self) -> tuple[float, float, float]:
    """The B0 direction the model was trained with (unit, voxel frame); the reference axis."""
    return tuple(self._data["b0_dir"])

  @property
  def b0_dirs_trained(self) -> tuple[tuple[float, float, float], ...]:
    """Every B0 direction of the training data (not normalised); () when not stated."""
    return tuple(tuple(row) for row in self._data["b0_dirs_trained"])

  @property
  def refine(self) -> dict[str, Any]:
    """The refinement entry as recorded ({} when none; `refine.resolve_params` completes it)."""
    return copy.deepcopy(dict(self._data.get("refine") or {}))

  @property
  def inference(self) -> dict[str, Any]:
    """The network pass's budget as recorded ({}; `inference.tiling_params` completes it)."""
    return copy.deepcopy(dict(self._data.get("inference") or {}))

  @property
  def export(self) -> dict[str, Any]:
    """Export facts (version, source, versions of the code; {} for a training folder)."""
    return copy.deepcopy(dict(self._data.get("export") or {}))
