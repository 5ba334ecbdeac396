"""Clients for a TF Serving model server hosting an exported QSMGAN (see `export`).

Two protocols, the two TF Serving speaks:

* gRPC (`GrpcClient`): ``PredictionService/Predict`` with TensorProtos. A whole 176x208x176
  float32 volume is ~25 MiB, over gRPC's default 4 MiB message limit, so the channel raises
  ``grpc.max_send_message_length`` / ``grpc.max_receive_message_length`` (the server side
  accepts large messages by default). Used by ``predict --server=host:8500``, which sends the
  whole volume to the ``predict_volume`` signature.
* REST (`RestClient`): ``POST <url>:predict`` with the JSON body TF Serving documents
  (https://www.tensorflow.org/tfx/serving/api_rest): row format ``{"signature_name": ...,
  "instances": [...]}`` answered by ``{"predictions": [...]}``, or columnar format
  ``{"signature_name": ..., "inputs": ...}`` answered by ``{"outputs": ...}``. JSON is ~6x the
  float32 bytes (a 64^3 patch: 6.3 MB of JSON for 1.0 MB of float32), so ``predict
  --rest_url=...`` sends patches in small batches to ``serving_default`` and tiles on the client.

The gRPC stubs come from ``tensorflow-serving-api``, which depends on the full ``tensorflow``
wheel; on a ``tensorflow-cpu`` install it goes in with ``pip install --no-deps
tensorflow-serving-api==2.21.*`` (plus ``grpcio``). Both are imported only when a gRPC client is
made, with an error that says so when they are missing. The REST client needs only the standard
library.

Example:
  with serving.GrpcClient("localhost:8500", "qsmgan") as client:
    outputs, meta = serving.predict_volume_grpc(client, field_ppm, mask, (1, 1, 1), (0, 0, 1))
    chi_ppm = outputs["chi_ppm"]
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np

from qsmgan_tf.errors import InputError
from qsmgan_tf.model_contract import ModelContract

# Signature and tensor names: `export` writes them, these clients send them.
SERVING_DEFAULT = "serving_default"
PREDICT_VOLUME = "predict_volume"
PREDICT_VOLUME_MAGNITUDE = "predict_volume_magnitude"
NETWORK_VOLUME = "network_volume"
REFINE = "refine"
CONTRACT = "contract"
PATCH_INPUT = "field_ppm"
PATCH_OUTPUT = "chi_ppm"
CONTRACT_OUTPUT = "contract_json"

# 1 GiB: a 256^3 float32 volume plus mask is ~130 MiB; gRPC's own default is 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
_INSTALL_HINT = ("pip install grpcio && pip install --no-deps 'tensorflow-serving-api==2.21.*' "
                 "(it depends on the full tensorflow wheel, hence --no-deps next to "
                 "tensorflow-cpu)")


def _import_grpc_apis():
  """Imports grpc and the TF Serving stubs, with an install hint when they are missing."""
  # pylint: disable=import-outside-toplevel
  try:
    import grpc
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_service_pb2_grpc
  except ImportError as exc:
    raise ImportError(f"the gRPC client needs grpcio and tensorflow-serving-api ({exc.name} "
                      f"is missing): {_INSTALL_HINT}") from exc
  return grpc, predict_pb2, prediction_service_pb2_grpc


def to_tensor_proto(array) -> Any:
  """NumPy array -> TensorProto (raw little-endian bytes in ``tensor_content``)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.make_tensor_proto(np.asarray(array))


def from_tensor_proto(proto) -> np.ndarray:
  """TensorProto -> NumPy array (any encoding TF Serving answers with)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.make_ndarray(proto)


class GrpcClient:
  """A PredictionService client for one model on a TF Serving gRPC endpoint.

  Args:
    host_port: ``host:port`` of the model server's gRPC port (TF Serving's default is 8500).
    model_name: the ``--model_name`` the server was started with.
    version: integer model version to pin; None = whatever the server serves as latest.
    timeout_s: deadline per call, s; a whole volume on CPU takes tens of seconds.
    max_message_bytes: gRPC send/receive message limit for this channel, bytes.

  Raises:
    ImportError: grpcio or tensorflow-serving-api is not installed (with the install command).
  """

  def __init__(self, host_port: str, model_name: str = "qsmgan", version: int | None = None,
               timeout_s: float = 600.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
    grpc, self._predict_pb2, service = _import_grpc_apis()
    self._grpc = grpc
    self.host_port = str(host_port)
    self.model_name = str(model_name)
    self.version = None if version is None else int(version)
    self.timeout_s = float(timeout_s)
    options = [("grpc.max_send_message_length", int(max_message_bytes)),
               ("grpc.max_receive_message_length", int(max_message_bytes))]
    self._channel = grpc.insecure_channel(self.host_port, options=options)
    self._stub = service.PredictionServiceStub(self._channel)

  def __enter__(self) -> "GrpcClient":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    self._channel.close()

  def make_request(self, signature_name: str, inputs: Mapping[str, Any]):
    """Builds the PredictRequest (exposed for tests and for logging request sizes)."""
    request = self._predict_pb2.PredictRequest()
    request.model_spec.name = self.model_name
    request.model_spec.signature_name = signature_name
    if self.version is not None:
      request.model_spec.version.value = self.version
    for key, value in inputs.items():
      request.inputs[key].CopyFrom(to_tensor_proto(value))
    return request

  def predict(self, signature_name: str, inputs: Mapping[str, Any]
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Calls Predict on one signature.

    Args:
      signature_name: e.g. 'serving_default', 'predict_volume', 'refine', 'contract'.
      inputs: tensor name -> array (or Python number/sequence).

    Returns:
      ``(outputs, meta)``: output name -> NumPy array, and ``meta`` with the serving model's
      name, version and signature as the server reported them.

    Raises:
      InputError: the server is unreachable, refused the request or timed out (one line).
    """
    request = self.make_request(signature_name, inputs)
    try:
      response = self._stub.Predict(request, timeout=self.timeout_s)
    except self._grpc.RpcError as exc:
      code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
      details = exc.details() if hasattr(exc, "details") else str(exc)
      raise InputError(f"TF Serving gRPC {self.host_port} model {self.model_name!r} signature "
                       f"{signature_name!r}: {code}: {details}") from None
    outputs = {key: from_tensor_proto(value) for key, value in response.outputs.items()}
    meta = {"server": self.host_port, "model_name": response.model_spec.name or self.model_name,
            "model_version": int(response.model_spec.version.value) or self.version,
            "signature_name": response.model_spec.signature_name or signature_name}
    return outputs, meta

  def contract(self) -> ModelContract:
    """The served model's contract (patch sizes, normalisation, dipole sign, ...)."""
    outputs, _ = self.predict(CONTRACT, {})
    return parse_contract(outputs[CONTRACT_OUTPUT])


def parse_contract(value) -> ModelContract:
  """The ``contract`` signature's string tensor (bytes or str) -> its `ModelContract`."""
  if isinstance(value, np.ndarray):
    value = value.reshape(-1)[0] if value.size else b""
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  return ModelContract.parse(value)


def predict_volume_grpc(client: GrpcClient | str, field_ppm, mask, voxel_size_mm: Sequence[float],
                        b0_dir: Sequence[float], **options
                        ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Sends a whole volume to the ``predict_volume`` signature of a served model.

  Args:
    client: a GrpcClient, or ``host:port`` to make one (then closed on return).
    field_ppm: local field, ppm of B0, ``[X, Y, Z]``.
    mask: brain mask ``[X, Y, Z]`` (bool or 0/1).
    voxel_size_mm: voxel size, mm.
    b0_dir: unit B0 direction in the voxel frame.
    **options: GrpcClient arguments (model_name, version, timeout_s) when ``client`` is an
      address.

  Returns:
    ``(outputs, meta)``: the signature's outputs as NumPy arrays (``chi_ppm`` refined,
    ``chi_net_ppm``, ``residual_before``, ``residual_after``; models from version 5 on also
    ``tv_weight_used``) and the server, model name and version that answered.
  """
  own = isinstance(client, str)
  if own:
    client = GrpcClient(client, **options)
  try:
    return client.predict(PREDICT_VOLUME, volume_inputs(field_ppm, mask, voxel_size_mm, b0_dir))
  finally:
    if own:
      client.close()


def volume_signature(with_magnitude: bool) -> str:
  """The whole-volume signature to call: with a magnitude input or without."""
  return PREDICT_VOLUME_MAGNITUDE if with_magnitude else PREDICT_VOLUME


def volume_inputs(field_ppm, mask, voxel_size_mm, b0_dir,
                  magnitude=None) -> dict[str, np.ndarray]:
  """The ``predict_volume`` signature's inputs, typed as `inference` declares them (with
  ``magnitude``: the ``predict_volume_magnitude`` signature's)."""
  out = {
      "field_ppm": np.asarray(field_ppm, np.float32),
      "mask": np.asarray(mask, np.float32),
      "voxel_size_mm": np.asarray(voxel_size_mm, np.float32).reshape(3),
      "b0_dir": np.asarray(b0_dir, np.float32).reshape(3),
  }
  if magnitude is not None:
    out["magnitude"] = np.asarray(magnitude, np.float32)
  return out


# --------------------------------------------------------------------------------------
# REST
# --------------------------------------------------------------------------------------
def rest_predict_url(url: str, model_name: str | None = None, version: int | None = None) -> str:
  """The ``:predict`` URL for TF Serving's REST API.

  Args:
    url: either a model URL ``http://host:8501/v1/models/<name>[/versions/<n>]`` or a server
      root ``http://host:8501`` (then ``model_name`` is needed).
    model_name: model name when ``url`` is a server root.
    version: pins ``/versions/<n>`` when the URL has none.

  Raises:
    InputError: not an http(s) URL, or a server root without a model name.
  """
  url = str(url).rstrip("/")
  if not url.startswith(("http://", "https://")):
    raise InputError(f"--rest_url must start with http:// or https://, got {url!r}")
  if url.endswith(":predict"):
    return url
  if "/v1/models/" not in url:
    if not model_name:
      raise InputError(f"--rest_url {url!r} names no model: use http://host:8501/v1/models/<name>")
    url = f"{url}/v1/models/{model_name}"
  if version is not None and "/versions/" not in url:
    url = f"{url}/versions/{int(version)}"
  return url + ":predict"


def build_rest_body(inputs: Mapping[str, Any] | np.ndarray, signature_name: str = SERVING_DEFAULT,
                    row_format: bool = True) -> dict[str, Any]:
  """TF Serving's documented predict request body.

  Row format lists one entry per batch element: with a single named input each instance is that
  input's value (``{"instances": [patch0, patch1]}``); with several inputs each instance is an
  object keyed by input name, and all inputs must share the batch size. Columnar format sends
  ``{"inputs": {name: value}}`` (or the bare value for a single input) without splitting the
  batch.

  Args:
    inputs: input name -> array with a leading batch axis, or one array for the single
      ``field_ppm`` input.
    signature_name: signature to call.
    row_format: True for ``instances``, False for columnar ``inputs``.

  Returns:
    The JSON-ready dict.
  """
  if not isinstance(inputs, Mapping):
    inputs = {PATCH_INPUT: inputs}
  arrays = {k: np.asarray(v) for k, v in inputs.items()}
  body: dict[str, Any] = {"signature_name": signature_name}
  if not row_format:
    if len(arrays) == 1:
      body["inputs"] = next(iter(arrays.values())).tolist()
    else:
      body["inputs"] = {k: v.tolist() for k, v in arrays.items()}
    return body
  sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
  if None in sizes.values() or len(set(sizes.values())) != 1:
    raise ValueError(f"row format needs inputs with one shared batch size, got {sizes}")
  if len(arrays) == 1:
    body["instances"] = next(iter(arrays.values())).tolist()
  else:
    (batch,) = set(sizes.values())
    body["instances"] = [{k: v[i].tolist() for k, v in arrays.items()} for i in range(batch)]
  return body


def parse_rest_response(payload: Mapping[str, Any], output_name: str = PATCH_OUTPUT
                        ) -> np.ndarray:
  """Reads one named output from a TF Serving predict response (row or columnar).

  TF Serving omits the output name when the signature has a single output: ``predictions`` is
  then the list of per-instance values (``outputs`` the value); with several outputs it is a list
  of objects (``outputs`` an object).

  Raises:
    InputError: the response is an error (``{"error": ...}``) or lacks the output.
  """
  if "error" in payload:
    raise InputError(f"TF Serving REST error: {' '.join(str(payload['error']).split())}")
  if "predictions" in payload:
    rows = payload["predictions"]
    if rows and isinstance(rows[0], Mapping):
      if output_name not in rows[0]:
        raise InputError(f"TF Serving REST response has no output {output_name!r}: "
                         f"{sorted(rows[0])}")
      rows = [row[output_name] for row in rows]
    return np.asarray(rows, np.float32)
  if "outputs" in payload:
    outputs = payload["outputs"]
    if isinstance(outputs, Mapping):
      if output_name not in outputs:
        raise InputError(f"TF Serving REST response has no output {output_name!r}: "
                         f"{sorted(outputs)}")
      outputs = outputs[output_name]
    return np.asarray(outputs, np.float32)
  raise InputError(f"TF Serving REST response has neither 'predictions' nor 'outputs': "
                   f"{sorted(payload)}")


class RestClient:
  """A TF Serving REST predict client (standard library only).

  Args:
    url: model URL ``http://host:8501/v1/models/<name>[/versions/<n>]`` or server root.
    model_name: model name when ``url`` is a server root.
    version: integer version to pin.
    timeout_s: socket timeout per request, s.
  """

  def __init__(self, url: str, model_name: str | None = "qsmgan", version: int | None = None,
               timeout_s: float = 600.0):
    self.predict_url = rest_predict_url(url, model_name, version)
    self.timeout_s = float(timeout_s)

  def post(self, body: Mapping[str, Any]) -> dict[str, Any]:
    """POSTs a JSON body to ``:predict``; returns the decoded JSON answer.

    Raises:
      InputError: connection failure, HTTP error (with the server's error message) or a
        non-JSON answer.
    """
    data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    request = urllib.request.Request(self.predict_url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        text = response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
      detail = exc.read().decode("utf-8", "replace")
      try:
        detail = json.loads(detail).get("error", detail)
      except ValueError:
        pass
      raise InputError(f"TF Serving REST {self.predict_url}: HTTP {exc.code}: "
                       f"{' '.join(str(detail).split())[:300]}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
      reason = getattr(exc, "reason", exc)
      raise InputError(f"TF Serving REST {self.predict_url} unreachable: {reason}") from None
    try:
      return json.loads(text)
    except ValueError:
      raise InputError(f"TF Serving REST {self.predict_url} answered non-JSON: "
                       f"{text[:80]!r}") from None

  def predict_patches(self, patches_ppm, signature_name: str = SERVING_DEFAULT,
                      row_format: bool = True) -> np.ndarray:
    """Field patches ``[N, in, in, in, 1]`` ppm -> chi patches ``[N, out, out, out, 1]`` ppm."""
    body = build_rest_body({PATCH_INPUT: np.asarray(patches_ppm, np.float32)}, signature_name,
                           row_format)
    return parse_rest_response(self.post(body), PATCH_OUTPUT)

  def contract(self) -> ModelContract:
    """The served model's contract, from its zero-input ``contract`` signature."""
    payload = self.post({"signature_name": CONTRACT, "inputs": {}})
    if "error" in payload:
      raise InputError(f"TF Serving REST error: {payload['error']}")
    outputs = payload.get("outputs", payload.get("predictions"))
    if isinstance(outputs, Mapping):
      outputs = outputs[CONTRACT_OUTPUT]
    return parse_contract(outputs)


def predict_patches_rest(client: RestClient | str, patches_ppm, batch_size: int = 1,
                         **client_options) -> np.ndarray:
  """Runs field patches through a served ``serving_default`` over REST, in small batches.

  Args:
    client: a RestClient or a URL (see `rest_predict_url`) to make one.
    patches_ppm: ``[N, in, in, in, 1]`` field patches, ppm.
    batch_size: patches per request (JSON is ~6x the float32 size: keep requests small).
    **client_options: RestClient arguments when ``client`` is a URL.

  Returns:
    ``[N, out, out, out, 1]`` chi patches, ppm, float32.
  """
  if isinstance(client, str):
    client = RestClient(client, **client_options)
  patches = np.asarray(patches_ppm, np.float32)
  batch_size = max(1, int(batch_size))
  out = [client.predict_patches(patches[i:i + batch_size])
         for i in range(0, patches.shape[0], batch_size)]
  return np.concatenate(out, axis=0)
