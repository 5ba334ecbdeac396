r"""Exporting a trained generator as a versioned SavedModel for TF Serving.

The binary `python -m qsmgan_tf.export` is a thin wrapper over `export_model`.

  python -m qsmgan_tf.export --model_dir=runs/cpu_small --export_base=saved_models/qsmgan \
      [--version=3] [--which=best|final]

Layout: ``<export_base>/<integer version>/`` (saved_model.pb, variables/, assets/contract.json),
the folder TF Serving polls (``--model_base_path=<export_base>``). The version is written into
a hidden sibling ``<export_base>/.tmp-<version>-XXXX`` (TF Serving ignores names that are not
integers) and renamed into place, so a watching server never loads a half-written version and
a failed export leaves no version folder.

Signatures (all in ppm; normalisation and output transform are inside the graph):
  * ``serving_default``: ``field_ppm [N, in, in, in, 1]`` -> ``chi_ppm [N, out, out, out, 1]``
    with the patch sizes of the model's contract (64 -> 48 for the paper preset);
  * ``predict_volume``: a whole volume with mask, voxel size and B0 direction -> refined chi,
    the network's chi and the field residuals: one fully convolutional pass over the mask's
    bounding box, or overlapping Gaussian-blended tiles of it in a `tf.while_loop` when the
    pass would exceed the contract's memory budget (``inference.max_single_pass_voxels``,
    chosen in the graph per request), then CG refinement, in one graph
    (`inference.make_predict_volume_fn`); the refinement's magnitude uses are off here;
  * ``predict_volume_magnitude``: the same with one more input, ``magnitude [X,Y,Z]``, which
    the refinement uses as the contract's ``refine`` says (magnitude edges, noise weighting);
  * ``network_volume``: the network alone over a whole volume, same pass or tiles
    (`inference.make_network_volume_fn`);
  * ``refine``: data-consistency refinement of a given chi (`inference.make_refine_fn`);
  * ``contract``: no input -> ``contract_json``, the model's contract (patch sizes, trained voxel
    sizes, dipole sign, normalisation, training-data manifest hash, code version, refinement
    defaults, in-graph tiling budget and tile size) read from ``assets/contract.json``.

The contract is visible without running anything: the asset file, and ``saved_model_cli show
--dir <version> --all``, which lists the ``contract`` function's traced argument, the contract
itself, under "Concrete Functions" (a constant folded into the function, not a tensor input).

Written by `tf.saved_model.save` from `SavedModelArchive`: each signature is a concrete function
traced once (why not ``keras.export.ExportArchive``: see that class).

`load` is the inverse used by inference: ``(loaded SavedModel, model_contract.ModelContract)``;
versions and where a model is: `qsmgan_tf.model_location` (re-exported: `list_versions`,
`resolve_saved_model`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

from absl import logging

from qsmgan_tf.model_contract import CONTRACT_FILE, ModelContract, json_ready
from qsmgan_tf.model_location import list_versions, resolve_model, resolve_saved_model
from qsmgan_tf.serving import (CONTRACT, CONTRACT_OUTPUT, NETWORK_VOLUME, PATCH_INPUT,
                               PATCH_OUTPUT, PREDICT_VOLUME, PREDICT_VOLUME_MAGNITUDE, REFINE,
                               SERVING_DEFAULT)
from qsmgan_tf.errors import InputError

CONTRACT_ASSET = CONTRACT_FILE
VOLUME_SIGNATURES = [SERVING_DEFAULT, PREDICT_VOLUME, PREDICT_VOLUME_MAGNITUDE, NETWORK_VOLUME,
                     REFINE, CONTRACT]
PATCH_SIGNATURES = [SERVING_DEFAULT, CONTRACT]
TEMP_PREFIX = ".tmp-"


# --------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------
def next_version(export_base) -> int:
  """Newest existing version + 1, or 1 for an empty or missing base."""
  versions = list_versions(export_base)
  return versions[-1] + 1 if versions else 1


def check_version(export_base, version: int | None) -> int:
  """The version to write: ``version``, or `next_version` when None.

  Raises:
    InputError: not a positive integer, or that version folder exists (versions are immutable).
  """
  version = next_version(export_base) if version is None else int(version)
  if version < 1:
    raise InputError(f"--version must be a positive integer, got {version}")
  final = pathlib.Path(export_base) / str(version)
  if final.exists():
    raise InputError(f"version {version} exists already: {final} (versions are immutable; "
                     f"omit --version for the next one)")
  return version


# --------------------------------------------------------------------------------------
# Contract
# --------------------------------------------------------------------------------------
def patch_sizes(contract) -> tuple[int, int]:
  """``(input_patch, output_patch)`` voxels of the contract's generator.

  Raises:
    InputError: the contract describes no generator.
  """
  contract = ModelContract.of(contract)
  return contract.input_patch, contract.output_patch


def read_contract(model_dir) -> ModelContract:
  """Reads ``<model_dir>/contract.json`` (a training folder's).

  Raises:
    InputError: missing or not valid JSON.
  """
  path = pathlib.Path(model_dir) / CONTRACT_FILE
  if not path.is_file():
    raise InputError(f"model_dir has no {CONTRACT_FILE}: {model_dir}")
  return ModelContract.read(path)


def serving_contract(contract, **export_info) -> dict[str, Any]:
  """The contract that ships with an export: training's contract plus export facts.

  Adds ``refine`` defaults when training did not record them, the ``inference`` tiling
  parameters (`inference.tiling_params`: the contract's values, completed with
  `inference.TILING_DEFAULTS`), and an ``export`` entry (code, TensorFlow and Keras versions,
  signature names, plus ``export_info``).

  Raises:
    InputError: tiling parameters out of range.
  """
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  import qsmgan_tf  # pylint: disable=import-outside-toplevel
  # Not at the top: inference loads TensorFlow and imports this module.
  from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel

  out = ModelContract.of(contract).to_dict()
  out.setdefault("refine", dict(refine.DEFAULTS))
  out["inference"] = inference.tiling_params(out)
  out.setdefault("units", {"field": "ppm of B0", "chi": "ppm"})
  out["export"] = json_ready({
      "code_version": qsmgan_tf.__version__,
      "tensorflow_version": tf.__version__,
      "keras_version": keras.__version__,
      "signatures": VOLUME_SIGNATURES,
      **export_info,
  })
  return out


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
class SavedModelArchive:
  """The signatures' traced functions and the resources they use, written by `write_out`.

  Not ``keras.export.ExportArchive``: it keeps each endpoint as a ``tf.function`` attribute, and
  ``tf.saved_model.save`` traces every such attribute again inside its save context (the
  tracing cache key holds the save options' variable policy), so the refinement graph was
  traced twice and stored twice (measured on a ``test_tiny`` export: three extra traces of
  ``refine_tf``, about half the export's time). Here the signatures are saved as the concrete
  functions traced once; only the cheap ``contract`` function stays an attribute, for
  ``saved_model_cli``.
  """

  def __init__(self, root, signatures: dict[str, Any]):
    self.root, self.signatures = root, signatures

  def write_out(self, filepath):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.saved_model.save(self.root, str(filepath), signatures=self.signatures)


def build_archive(generator, contract: dict[str, Any], asset_dir,
                  volume_signatures: bool = True) -> SavedModelArchive:
  """Builds the archive: the signatures over ``generator`` (module docstring).

  Args:
    generator: the Keras generator (field ppm -> chi ppm).
    contract: the serving contract (see `serving_contract`); written to
      ``<asset_dir>/contract.json``, which the SavedModel then carries as an asset.
    asset_dir: folder for the asset file before it is copied into ``assets/``.
    volume_signatures: add ``predict_volume``, ``network_volume`` and ``refine`` (from
      `qsmgan_tf.inference`); False exports only ``serving_default`` and ``contract``.

  Returns:
    A `SavedModelArchive` ready for ``write_out``.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  size_in, size_out = patch_sizes(contract)
  produced = tuple(generator.compute_output_shape((None, size_in, size_in, size_in, 1)))
  if tuple(produced[1:4]) != (size_out,) * 3:
    raise InputError(f"generator maps a {size_in}^3 patch to {produced[1:4]}, but the contract "
                     f"says {size_out}^3")
  asset_path = pathlib.Path(asset_dir) / CONTRACT_ASSET
  contract = ModelContract.of(contract).to_dict()  # plain JSON: it is traced into `contract_fn`
  asset_path.write_text(json.dumps(contract, indent=2, sort_keys=True) + "\n", encoding="utf-8")

  @tf.function(input_signature=[tf.TensorSpec([None, size_in, size_in, size_in, 1], tf.float32,
                                              name=PATCH_INPUT)])
  def serving_default(field_ppm):
    return {PATCH_OUTPUT: generator(field_ppm, training=False)}

  functions = {SERVING_DEFAULT: serving_default}
  if volume_signatures:
    # Not at the top: inference loads TensorFlow and imports this module.
    from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel
    functions.update({
        PREDICT_VOLUME: inference.make_predict_volume_fn(generator, contract),
        PREDICT_VOLUME_MAGNITUDE: inference.make_predict_volume_fn(generator, contract,
                                                                   with_magnitude=True),
        NETWORK_VOLUME: inference.make_network_volume_fn(generator, contract),
        REFINE: inference.make_refine_fn(contract)})
  signatures = {name: fn.get_concrete_function() for name, fn in functions.items()}

  # One line of contract.json per table entry, keyed by line number: the table's initializer
  # makes the file a SavedModel asset (assets/contract.json), read back at load time.
  table = tf.lookup.StaticHashTable(
      tf.lookup.TextFileInitializer(str(asset_path), tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                                    tf.string, tf.lookup.TextFileIndex.WHOLE_LINE),
      default_value="")

  @tf.function(autograph=False)
  def contract_fn(summary):  # pylint: disable=unused-argument
    # ``summary`` is the contract as a Python dict: baked into the trace (no tensor input), it is
    # what `saved_model_cli show --all` prints under the function; the output is the asset.
    lines = table.lookup(tf.range(table.size()))
    return {CONTRACT_OUTPUT: tf.strings.reduce_join(lines, separator="\n")}

  signatures[CONTRACT] = contract_fn.get_concrete_function(contract)

  root = tf.Module()
  # Each captured variable once, under the name `load` reads (weights are stored once: the
  # generator itself is not tracked, its variables are, as the functions use them).
  used = {}
  for function in signatures.values():
    for variable in function.variables:
      used.setdefault(id(variable), variable)
  root._all_variables = list(used.values())  # pylint: disable=protected-access
  root.contract_table = table
  root.contract = contract_fn  # an attribute, so `saved_model_cli show --all` lists its argument
  return SavedModelArchive(root, signatures)


def export_generator(generator, contract: dict[str, Any], export_base, version: int | None = None,
                     volume_signatures: bool = True, **export_info) -> pathlib.Path:
  """Writes ``generator`` as ``<export_base>/<version>/``, atomically.

  Args:
    generator: the Keras generator.
    contract: the model's contract (training's contract.json); completed by `serving_contract`.
    export_base: model base path; created if missing.
    version: integer >= 1; None = `next_version`.
    volume_signatures: add the whole-volume signatures (see `build_archive`).
    **export_info: extra facts for the contract's ``export`` entry (e.g. the source file).

  Returns:
    The version folder.

  Raises:
    InputError: the version exists already or is not a positive integer.
  """
  base = pathlib.Path(export_base)
  base.mkdir(parents=True, exist_ok=True)
  version = check_version(base, version)
  final = base / str(version)
  stale = sorted(p.name for p in base.glob(TEMP_PREFIX + "*"))
  if stale:
    logging.warning("stale partial exports (safe to delete, TF Serving ignores them): %s",
                    ", ".join(stale))
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{version}-", dir=base))
  try:
    with tempfile.TemporaryDirectory() as asset_dir:
      signatures = VOLUME_SIGNATURES if volume_signatures else PATCH_SIGNATURES
      contract = serving_contract(contract, version=version, signatures=signatures,
                                  **export_info)
      archive = build_archive(generator, contract, asset_dir, volume_signatures)
      archive.write_out(tmp / "model")
    # rename(2) is atomic on one file system: the version appears whole or not at all.
    os.rename(tmp / "model", final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("exported version %d to %s", version, final)
  return final


def load_generator(model_dir, which: str = "best"):
  """Loads ``generator_<which>.keras`` from a training folder (custom layers registered)."""
  path = pathlib.Path(model_dir) / f"generator_{which}.keras"
  if not path.is_file():
    raise InputError(f"model_dir has no generator_{which}.keras: {model_dir}")
  import keras  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel,unused-import
  return keras.saving.load_model(str(path), compile=False)


def float32_generator(generator, contract: dict[str, Any]):
  """``generator`` computing in float32: itself if it already does, else rebuilt from the
  contract's config under the float32 policy with its weights copied (matched by Keras path).

  A generator trained under mixed precision keeps that policy in its ``.keras`` file, and a
  SavedModel traced from it runs bfloat16 (or float16) convolutions: slow or unsupported on
  CPUs and GPUs without those units, and ~1 % of the output's peak off float32 (measured on
  version 6, exported before this rule). What a served model computes must not depend on how it
  was trained.

  Raises:
    InputError: the rebuilt generator has a weight the given one lacks.
  """
  if all(layer.dtype_policy.compute_dtype == "float32" for layer in generator.layers):
    return generator
  return _float32_generator_with({w.path: w for w in generator.weights}, contract, "generator")


def _float32_generator_with(weights: dict[str, Any], contract: dict[str, Any], source: str):
  """The contract's generator built under the float32 policy, its weights taken from
  ``weights`` (Keras path -> array or variable).

  Raises:
    InputError: ``source`` lacks one of the architecture's weights (or has another shape).
  """
  import keras  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    generator = networks.build_generator(
        networks.GeneratorConfig.from_dict(ModelContract.of(contract).generator))
  finally:
    keras.config.set_dtype_policy(previous)
  missing = [w.path for w in generator.weights if w.path not in weights
             or tuple(weights[w.path].shape) != tuple(w.shape)]
  if missing:
    raise InputError(f"{source} lacks generator weights of its contract's architecture "
                     f"({len(missing)} of {len(generator.weights)}, e.g. {missing[0]})")
  for w in generator.weights:
    w.assign(keras.ops.cast(weights[w.path], "float32"))
  return generator


def generator_from(path) -> tuple[Any, ModelContract | None]:
  """(Keras generator, contract or None) from what ``path`` names (`resolve_model`): a .keras
  file, a training folder (its generator, best first) or an exported SavedModel.

  Raises:
    InputError: nothing usable there, or a .keras file that does not load.
  """
  import keras  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel,unused-import
  location = resolve_model(path)
  if location.kind == "saved_model":
    return generator_from_saved_model(location.path)
  contract = location.contract() if location.contract_path else None
  try:
    model = keras.models.load_model(location.path, compile=False)
  except Exception as exc:  # pylint: disable=broad-except
    raise InputError(f"is not a loadable .keras generator: {path} ({exc})") from None
  logging.info("generator %s", location.path)
  return model, contract


def generator_from_saved_model(path) -> tuple[Any, ModelContract]:
  """(Keras generator, contract) rebuilt from an exported SavedModel: the architecture from
  its contract (float32), the weights from its variables, matched by their Keras paths.

  Args:
    path: a version folder or a model base path (newest version).

  Raises:
    InputError: no SavedModel there, or one that lacks some of the generator's weights.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  version = resolve_saved_model(path)
  contract = ModelContract.read(version)
  loaded = tf.saved_model.load(str(version))
  # `_all_variables`: every export since the first; `variables` only as a fallback (this
  # package's exports no longer carry that attribute).
  stored = getattr(loaded, "_all_variables", None)
  saved = {v.name.split(":")[0]: v for v in (loaded.variables if stored is None else stored)}
  return _float32_generator_with(saved, contract, f"SavedModel {version}"), contract


def parse_refine(text: str | None) -> dict[str, Any]:
  """``'mu=0.001,tv_weight=3e-4'`` -> refinement parameters typed like `refine.DEFAULTS`.

  Raises:
    InputError: an unknown key or a value of the wrong type.
  """
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel
  out: dict[str, Any] = {}
  for item in filter(None, (part.strip() for part in (text or "").split(","))):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in refine.DEFAULTS:
      raise InputError(f"unknown refinement parameter {key!r}; expected some of "
                       f"{', '.join(refine.DEFAULTS)}")
    try:
      out[key] = type(refine.DEFAULTS[key])(value.strip())
    except ValueError:
      raise InputError(f"refinement parameter {key}: bad value {value!r}") from None
  return out


def _with_inference(contract: ModelContract, inference_params: dict[str, Any] | None
                    ) -> ModelContract:
  """``contract`` with ``inference_params`` over its ``inference`` entry (checked).

  Raises:
    InputError: a value out of range (`inference.tiling_params`).
  """
  # Not at the top: inference loads TensorFlow and imports this module.
  from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel
  if inference_params:
    contract = contract.replace(inference={**contract.inference, **inference_params})
    inference.tiling_params(contract)
  return contract


def export_model(model_dir, export_base, version: int | None = None, which: str = "best",
                 refine_params: dict[str, Any] | None = None,
                 inference_params: dict[str, Any] | None = None) -> pathlib.Path:
  """Exports a training folder's generator; see `export_generator`.

  ``refine_params`` (e.g. chosen by ``benchmarks/tune_refine.py``) override the refinement
  defaults the contract records; parameters not given keep `refine.DEFAULTS`.
  ``inference_params`` override ``contract['inference']`` (`inference.TILING_DEFAULTS` keys,
  e.g. ``field_reference_std_ppm`` from ``benchmarks/field_amplitude.py``).
  """
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel
  contract = _with_inference(read_contract(model_dir), inference_params)
  if refine_params:
    contract = contract.replace(refine={**refine.resolve_params(contract), **refine_params})
  check_version(export_base, version)  # fail before the slow part
  generator = float32_generator(load_generator(model_dir, which), contract)
  return export_generator(generator, contract, export_base, version,
                          source=f"generator_{which}.keras")


def reexport_model(source, export_base, version: int | None = None,
                   refine_params: dict[str, Any] | None = None,
                   inference_params: dict[str, Any] | None = None) -> pathlib.Path:
  """Exports an exported model's generator again, with new refinement parameters: the same
  network, a new contract ``refine`` entry (e.g. re-tuned by ``benchmarks/tune_refine.py``
  without retraining); the rest of the contract (data, training facts) is kept.

  Args:
    source: a version folder or a model base path (newest version).
    export_base, version: as `export_generator`.
    refine_params: override the source contract's ``refine`` (unset keys keep it, then
      `refine.DEFAULTS`).
    inference_params: override the source contract's ``inference`` (as `export_model`).
  """
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel
  source_version = resolve_saved_model(source)
  check_version(export_base, version)  # fail before the slow part
  _with_inference(ModelContract.of(None), inference_params)  # likewise
  generator, contract = generator_from_saved_model(source_version)
  contract = _with_inference(contract, inference_params)
  previous = contract.export
  contract = contract.replace(
      refine={**refine.resolve_params(contract), **(refine_params or {})}, export=None)
  return export_generator(generator, contract, export_base, version,
                          source=f"re-export of {source_version} (version "
                                 f"{previous.get('version', '?')}, "
                                 f"{previous.get('source', 'its generator')})")


def load(path) -> tuple[Any, ModelContract]:
  """Loads an exported model: ``(tf.saved_model.load object, its contract)``.

  Args:
    path: a version folder or a model base path (newest version).

  Raises:
    InputError: no SavedModel there, or one without the ``contract`` signature.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  path = resolve_saved_model(path)
  loaded = tf.saved_model.load(str(path))
  if CONTRACT not in loaded.signatures:
    raise InputError(f"SavedModel has no '{CONTRACT}' signature (not exported by "
                     f"qsmgan_tf.export?): {path}")
  text = loaded.signatures[CONTRACT]()[CONTRACT_OUTPUT].numpy().decode("utf-8")
  return loaded, ModelContract.parse(text)
