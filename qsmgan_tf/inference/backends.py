"""Where the network runs: a Keras generator, an exported SavedModel, or a TF Serving server
(gRPC or REST), behind one interface (`load_backend`)."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from qsmgan_tf import exporting
from qsmgan_tf import model_location
from qsmgan_tf import networks
from qsmgan_tf import serving
from qsmgan_tf.errors import InputError
from qsmgan_tf.inference.contract import generator_config
from qsmgan_tf.inference.graph import make_network_volume_fn, make_predict_volume_fn
from qsmgan_tf.inference.options import PRECISIONS
from qsmgan_tf.model_contract import ModelContract


def default_model_path() -> pathlib.Path:
  """Newest version under ``<repo>/saved_models/qsmgan/`` (`model_location.resolve_model`).

  Raises:
    InputError: none exported yet.
  """
  return model_location.resolve_model(None).path


def cast_generator(generator, config: dict[str, Any], precision: str):
  """The generator rebuilt under a mixed-precision policy with the same weights.

  Args:
    generator: a float32 Keras generator.
    config: its GeneratorConfig dict.
    precision: 'float32' (returned as is) or 'bfloat16' (mixed_bfloat16: bf16 convolutions,
      float32 variables and output; the fastest policy on CPUs with AMX/AVX512-BF16).
  """
  if precision not in PRECISIONS:
    raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
  if precision == "float32":
    return generator
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("mixed_bfloat16")
  try:
    cast = networks.build_generator(networks.GeneratorConfig.from_dict(config))
  finally:
    keras.config.set_dtype_policy(previous)
  cast.set_weights(generator.get_weights())
  return cast


class _Backend:
  """A model: network over a volume, network over patches, optional whole-graph prediction."""

  kind = "?"
  path = None
  precision = "as exported"
  contract: dict[str, Any] = {}

  def network_volume(self, field_ppm, mask) -> np.ndarray:
    raise NotImplementedError

  def patch_fn(self, patches):
    raise NotImplementedError

  def predict_volume(self, field_ppm, mask, voxel_size_mm, b0_dir,
                     magnitude=None) -> dict[str, Any] | None:
    """Network + refinement with the contract's defaults in one call (with ``magnitude``:
    the ``predict_volume_magnitude`` signature), or None when the model has no such graph."""
    return None

  def close(self) -> None:
    """Releases connections (servers); a no-op for local models."""

  def describe(self) -> dict[str, Any]:
    out = {"backend": self.kind, "model": str(self.path) if self.path else None}
    export_info = self.contract.get("export") or {}
    if "version" in export_info:
      out["model_version"] = export_info["version"]
    return out


def _np_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
  return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in outputs.items()}


class KerasBackend(_Backend):
  """A Keras generator (``.keras`` file or object) with its contract."""

  kind = "keras"

  def __init__(self, generator, contract: dict[str, Any], path=None, precision="float32"):
    self.contract = contract
    self.path = path
    self.precision = precision
    self.generator = cast_generator(generator, generator_config(contract), precision)
    self._predict = make_predict_volume_fn(self.generator, contract)
    self._predict_magnitude = None  # traced on first use
    self._network = make_network_volume_fn(self.generator, contract)
    self._patch = tf.function(lambda x: self.generator(x, training=False),
                              input_signature=[tf.TensorSpec([None] * 4 + [1], tf.float32)])

  def network_volume(self, field_ppm, mask):
    return self._network(np.asarray(field_ppm, np.float32),
                         np.asarray(mask, np.float32))["chi_ppm"].numpy()

  def patch_fn(self, patches):
    return self._patch(tf.constant(patches, tf.float32)).numpy()

  def predict_volume(self, field_ppm, mask, voxel_size_mm, b0_dir, magnitude=None):
    args = [np.asarray(field_ppm, np.float32), np.asarray(mask, np.float32),
            np.asarray(voxel_size_mm, np.float32), np.asarray(b0_dir, np.float32)]
    if magnitude is None:
      return _np_outputs(self._predict(*args))
    if self._predict_magnitude is None:
      self._predict_magnitude = make_predict_volume_fn(self.generator, self.contract, True)
    return _np_outputs(self._predict_magnitude(*args, np.asarray(magnitude, np.float32)))


class SavedModelBackend(_Backend):
  """An exported SavedModel version (`exporting` layout): calls its signatures."""

  kind = "saved_model"

  def __init__(self, path):
    self.path = model_location.resolve_saved_model(path)
    self.loaded, self.contract = exporting.load(self.path)
    self.signatures = self.loaded.signatures
    for name in (serving.SERVING_DEFAULT, serving.PREDICT_VOLUME):
      if name not in self.signatures:
        raise InputError(f"SavedModel has no '{name}' signature: {self.path}")

  def network_volume(self, field_ppm, mask):
    field = tf.constant(field_ppm, tf.float32)
    mask = tf.constant(mask, tf.float32)
    if "network_volume" in self.signatures:
      return self.signatures["network_volume"](field_ppm=field, mask=mask)["chi_ppm"].numpy()
    # Older exports: predict_volume's chi_net_ppm (its refinement is wasted work here).
    out = self.signatures[serving.PREDICT_VOLUME](
        field_ppm=field, mask=mask, b0_dir=tf.constant([0.0, 0.0, 1.0]),
        voxel_size_mm=tf.constant([1.0, 1.0, 1.0]))
    return out["chi_net_ppm"].numpy()

  def patch_fn(self, patches):
    out = self.signatures[serving.SERVING_DEFAULT](
        **{serving.PATCH_INPUT: tf.constant(patches, tf.float32)})
    return out[serving.PATCH_OUTPUT].numpy()

  def predict_volume(self, field_ppm, mask, voxel_size_mm, b0_dir, magnitude=None):
    name = serving.volume_signature(magnitude is not None)
    if name not in self.signatures:
      return None  # exported before the magnitude signature existed
    inputs = serving.volume_inputs(field_ppm, mask, voxel_size_mm, b0_dir, magnitude)
    return _np_outputs(self.signatures[name](
        **{k: tf.constant(v, tf.float32) for k, v in inputs.items()}))


class GrpcBackend(_Backend):
  """A TF Serving model server over gRPC (``host:port``): whole volumes to predict_volume."""

  kind = "grpc"

  def __init__(self, server: str):
    self.client = serving.GrpcClient(server)
    self.path = server
    self.contract = self.client.contract()

  def _call(self, field_ppm, mask, voxel_size_mm, b0_dir, magnitude=None):
    inputs = serving.volume_inputs(field_ppm, mask, voxel_size_mm, b0_dir, magnitude)
    outputs, self.meta = self.client.predict(serving.volume_signature(magnitude is not None),
                                             inputs)
    return {k: np.asarray(v) for k, v in outputs.items()}

  def describe(self):
    out = super().describe()
    if (getattr(self, "meta", None) or {}).get("model_version"):
      out["model_version"] = self.meta["model_version"]
    return out

  def network_volume(self, field_ppm, mask):
    return self._call(field_ppm, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0))["chi_net_ppm"]

  def patch_fn(self, patches):
    outputs, _ = self.client.predict(serving.SERVING_DEFAULT,
                                     {serving.PATCH_INPUT: np.asarray(patches, np.float32)})
    return np.asarray(outputs[serving.PATCH_OUTPUT], np.float32)

  def close(self):
    if hasattr(self.client, "close"):
      self.client.close()

  def predict_volume(self, field_ppm, mask, voxel_size_mm, b0_dir, magnitude=None):
    if magnitude is not None and serving.PREDICT_VOLUME_MAGNITUDE not in (
        (self.contract.get("export") or {}).get("signatures") or []):
      return None  # the served model predates the magnitude signature
    return self._call(field_ppm, mask, voxel_size_mm, b0_dir, magnitude)


class RestBackend(_Backend):
  """A TF Serving model server over REST: patches to serving_default, tiled on the client."""

  kind = "rest"

  def __init__(self, url: str):
    self.client = serving.RestClient(url)
    self.path = url
    self.contract = self.client.contract()

  def patch_fn(self, patches):
    return self.client.predict_patches(np.asarray(patches, np.float32))


def load_backend(model=None, server: str | None = None, rest_url: str | None = None,
                 precision: str = "float32") -> _Backend:
  """Resolves where the network runs.

  Args:
    model: a SavedModel version folder or model base path, a ``.keras`` generator file (with
      ``contract.json`` beside it), a training folder (``contract.json`` and
      ``generator_best.keras``), a ``(keras.Model, contract)`` pair, or None for the newest
      version under ``<repo>/saved_models/qsmgan/``.
    server: TF Serving gRPC ``host:port`` (instead of a local model).
    rest_url: TF Serving REST model URL (instead of a local model).
    precision: for Keras generators, 'float32' or 'bfloat16'.

  Raises:
    InputError: nothing usable at ``model``, or several sources given.
  """
  given = [x is not None for x in (model, server, rest_url)]
  if sum(given) > 1:
    raise InputError("give only one of model, server and rest_url")
  if server is not None:
    return GrpcBackend(server)
  if rest_url is not None:
    return RestBackend(rest_url)
  if isinstance(model, (tuple, list)) and len(model) == 2:
    return KerasBackend(model[0], ModelContract.of(model[1]), None, precision)
  location = model_location.resolve_model(model)
  if location.kind == "keras":
    location.contract()  # fails now, with the file's name, if it has none
  path = location.path
  # Cached: evaluating many subjects loads and traces a model once (the file's mtime is part
  # of the key, so a re-exported or retrained file is loaded afresh).
  return _local_backend(str(path.resolve()), path.stat().st_mtime_ns, precision)


@functools.lru_cache(maxsize=2)
def _local_backend(path: str, mtime_ns: int, precision: str) -> _Backend:
  del mtime_ns  # only part of the cache key
  path = pathlib.Path(path)
  if path.suffix == ".keras":
    # The generator's custom layers load because `networks` (imported above) registers them.
    generator = keras.saving.load_model(str(path), compile=False)
    return KerasBackend(generator, ModelContract.read(path.parent), path, precision)
  return SavedModelBackend(path)


def configure_threads(threads: int | None) -> None:
  """Sets TF's intra- and inter-op thread pools (only possible before TF starts working)."""
  if not threads:
    return
  threads = int(threads)
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
  except RuntimeError:
    if tf.config.threading.get_intra_op_parallelism_threads() != threads:
      logging.warning("threads=%d ignored: TensorFlow's runtime is already initialised "
                      "(set it before any TF op)", threads)
