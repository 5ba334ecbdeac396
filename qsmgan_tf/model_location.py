"""Where a model is: the one resolver behind ``--model``, ``--from_model`` and ``--init_from``.

`resolve_model` turns what a user points at into a `ModelLocation`:

* a SavedModel version folder (``saved_model.pb``), or a model base path such as
  ``saved_models/qsmgan`` (its newest integer version, the folder TF Serving polls);
* a training folder (``contract.json`` with ``generator_best.keras`` or
  ``generator_final.keras``: best first, everywhere, `GENERATOR_FILES`);
* a ``.keras`` generator file (its contract is the ``contract.json`` beside it, if any);
* nothing: the newest version under the repository's ``saved_models/qsmgan``.

Loading is the caller's business (`inference.load_backend`, `exporting`, `training_folder`):
this module imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from qsmgan_tf.errors import InputError
from qsmgan_tf.model_contract import CONTRACT_FILE, ModelContract

GENERATOR_FILES = ("generator_best.keras", "generator_final.keras")
"""A training folder's generators in the order every consumer prefers them: the lowest
validation NRMSE first, the last step's if no validation ran."""

CRITIC_FILE = "critic_final.keras"
"""The critic at the end of a training folder's last WGAN-GP stage (``--init_from`` continues
with it, so a WGAN-GP run can go on across sessions from a folder that holds no checkpoint)."""

_VERSION_RE = re.compile(r"^[0-9]+$")


@dataclasses.dataclass(frozen=True)
class ModelLocation:
  """A resolved model.

  Attributes:
    kind: ``"saved_model"`` (``path`` is the version folder) or ``"keras"`` (``path`` is the
      ``.keras`` file).
    path: what to load.
    contract_path: its ``contract.json``, or None (a bare ``.keras`` file).
  """

  kind: str
  path: pathlib.Path
  contract_path: pathlib.Path | None

  def contract(self) -> ModelContract:
    """The model's contract.

    Raises:
      InputError: the model has none (a ``.keras`` file without ``contract.json`` beside it).
    """
    if self.contract_path is None:
      raise InputError(f"no {CONTRACT_FILE} beside {self.path.name} in {self.path.parent}")
    return ModelContract.read(self.contract_path)


def list_versions(export_base) -> list[int]:
  """Integer version folders under ``export_base`` (what TF Serving would see), sorted."""
  base = pathlib.Path(export_base)
  if not base.is_dir():
    return []
  return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def default_model_base() -> pathlib.Path:
  """``<repo>/saved_models/qsmgan``: where the shipped model versions live."""
  return pathlib.Path(__file__).resolve().parents[1] / "saved_models" / "qsmgan"


def resolve_saved_model(path) -> pathlib.Path:
  """A version folder, or a model base path (then its newest version).

  Raises:
    InputError: no SavedModel there.
  """
  path = pathlib.Path(path)
  if (path / "saved_model.pb").is_file():
    return path
  versions = list_versions(path)
  if versions and (path / str(versions[-1]) / "saved_model.pb").is_file():
    return path / str(versions[-1])
  raise InputError(f"no SavedModel in {path} (expected saved_model.pb or integer version "
                   f"folders holding one)")


def resolve_model(model=None, default_base=None) -> ModelLocation:
  """What ``model`` points at (module docstring); None: the newest version of
  ``default_base`` (default `default_model_base`).

  Raises:
    InputError: nothing usable there, named in the message.
  """
  if model is None:
    base = pathlib.Path(default_base) if default_base is not None else default_model_base()
    if not list_versions(base):
      raise InputError(f"no QSMGAN model found in {base}: train one (python -m qsmgan_tf.train "
                       "...) and export it (python -m qsmgan_tf.export --model_dir=<run> "
                       f"--export_base={base}), or pass --model=<SavedModel or .keras file>")
    model = base
  path = pathlib.Path(model)
  if not path.exists():
    raise InputError(f"model not found: {path}")
  if path.is_dir() and not (path / "saved_model.pb").is_file() and (
      path / CONTRACT_FILE).is_file():
    keras_file = next((path / name for name in GENERATOR_FILES if (path / name).is_file()), None)
    if keras_file is None:
      raise InputError(f"training folder has no {' or '.join(GENERATOR_FILES)}: {path}")
    path = keras_file
  if path.is_file() and path.suffix == ".keras":
    beside = path.parent / CONTRACT_FILE
    return ModelLocation("keras", path, beside if beside.is_file() else None)
  version = resolve_saved_model(path)
  return ModelLocation("saved_model", version, version / "assets" / CONTRACT_FILE)
