"""Tests for qsmgan_tf.serving: the TF Serving gRPC and REST clients.

No TF Serving model server can be installed here (not on PyPI or Debian), so the servers below
are STAND-INS FOR THE PROTOCOL, NOT TF SERVING: a loopback gRPC server implementing
``tensorflow.serving.PredictionService/Predict`` with the stubs from ``tensorflow-serving-api``,
and a loopback ``http.server`` answering ``POST /v1/models/<name>[/versions/<n>]:predict`` as
TF Serving's REST API documents it. Both run the exported SavedModel's signatures with
``tf.saved_model.load``. They check what our clients put on the wire (names, dtypes, shapes,
message sizes, JSON layout); how the real server batches, warms up or versions is out of scope.
"""

import concurrent.futures
import http.server
import json
import socket
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

from qsmgan_tf import exporting as export  # the library behind the binary
from qsmgan_tf import networks
from qsmgan_tf import serving
from qsmgan_tf.errors import InputError

grpc = pytest.importorskip("grpc")
prediction_service_pb2_grpc = pytest.importorskip(
    "tensorflow_serving.apis.prediction_service_pb2_grpc")
predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")

MODEL_NAME = "qsmgan"
VERSION = 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """An exported test_tiny generator (random weights): (path, generator, loaded, contract)."""
  keras = pytest.importorskip("keras")
  keras.utils.set_random_seed(3)
  config = networks.PRESETS["test_tiny"]
  generator = networks.build_generator(config)
  base = tmp_path_factory.mktemp("saved_models") / MODEL_NAME
  path = export.export_generator(generator, {"generator": config.to_dict()}, base, VERSION)
  loaded, contract = export.load(path)
  return path, generator, loaded, contract


def _run_signature(loaded, name, inputs):
  fn = loaded.signatures[name]
  return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


class _StandInPredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
  """Stand-in for the protocol (NOT TF Serving): Predict over one loaded SavedModel."""

  def __init__(self, loaded):
    self.loaded = loaded
    self.requests = []

  def Predict(self, request, context):  # pylint: disable=invalid-name
    self.requests.append(request)
    if request.model_spec.name != MODEL_NAME:
      context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found: {request.model_spec.name}")
    if request.model_spec.HasField("version") and request.model_spec.version.value != VERSION:
      context.abort(grpc.StatusCode.NOT_FOUND, "Servable version not found")
    name = request.model_spec.signature_name or "serving_default"
    if name not in self.loaded.signatures:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f"Serving signature name: \"{name}\" not found in signature def")
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    outputs = _run_signature(self.loaded, name, inputs)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = MODEL_NAME
    response.model_spec.version.value = VERSION
    response.model_spec.signature_name = name
    for key, value in outputs.items():
      response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response


@pytest.fixture(scope="module")
def grpc_server(exported):
  """Loopback stand-in gRPC server on a free port; yields (host:port, servicer)."""
  _, _, loaded, _ = exported
  servicer = _StandInPredictionService(loaded)
  # TF Serving's server accepts messages up to INT_MAX by default; so does the stand-in.
  limit = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2), options=limit)
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  try:
    yield f"127.0.0.1:{port}", servicer
  finally:
    server.stop(grace=None).wait(10)


def _patches(n, size, seed=0):
  return (np.random.default_rng(seed).normal(size=(n, size, size, size, 1)) * 0.05).astype(
      np.float32)


# --------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------
def test_grpc_patches_round_trip_over_4_mib(exported, grpc_server):
  path, generator, loaded, contract = exported
  address, servicer = grpc_server
  size_in, size_out = export.patch_sizes(contract)
  # 80 float32 patches of 24^3 = 4.4 MB: over gRPC's default 4 MiB message limit.
  patches = _patches(80, size_in)
  assert patches.nbytes > 4 * 1024 * 1024
  with serving.GrpcClient(address, MODEL_NAME, version=VERSION, timeout_s=60) as client:
    outputs, meta = client.predict("serving_default", {"field_ppm": patches})
  assert meta == {"server": address, "model_name": MODEL_NAME, "model_version": VERSION,
                  "signature_name": "serving_default"}
  request = servicer.requests[-1]
  assert request.model_spec.version.value == VERSION
  assert request.inputs["field_ppm"].dtype == tf.float32.as_datatype_enum
  chi = outputs["chi_ppm"]
  assert chi.shape == (80, size_out, size_out, size_out, 1)
  np.testing.assert_allclose(chi, generator(patches, training=False).numpy(), atol=1e-6)


def test_grpc_predict_volume_round_trip_equals_local_call(exported, grpc_server):
  _, _, loaded, _ = exported
  rng = np.random.default_rng(5)
  shape = (28, 30, 26)
  idx = np.indices(shape)
  mask = (((idx - np.reshape([13.5, 14.5, 12.5], (3, 1, 1, 1))) / 10.0) ** 2).sum(0) < 1
  field = (rng.normal(size=shape) * 0.02 * mask).astype(np.float32)
  voxel, b0 = (1.0, 1.0, 1.5), (0.0, 0.6, 0.8)
  outputs, meta = serving.predict_volume_grpc(grpc_server[0], field, mask, voxel, b0,
                                              model_name=MODEL_NAME, timeout_s=120)
  local = _run_signature(loaded, "predict_volume", serving.volume_inputs(field, mask, voxel, b0))
  assert meta["model_version"] == VERSION
  assert set(outputs) == set(local) >= {"chi_ppm", "chi_net_ppm"}
  for key in local:
    np.testing.assert_array_equal(outputs[key], local[key])
  assert outputs["chi_ppm"].shape == shape and np.abs(outputs["chi_ppm"]).max() > 0


def test_grpc_default_4_mib_limit_is_what_the_client_raises(grpc_server):
  address, _ = grpc_server
  patches = _patches(80, 24)
  with serving.GrpcClient(address, MODEL_NAME, timeout_s=60,
                          max_message_bytes=4 * 1024 * 1024) as client:
    with pytest.raises(InputError, match="RESOURCE_EXHAUSTED"):
      client.predict("serving_default", {"field_ppm": patches})


def test_grpc_contract_signature(exported, grpc_server):
  _, _, _, contract = exported
  with serving.GrpcClient(grpc_server[0], MODEL_NAME) as client:
    assert client.contract() == contract


@pytest.mark.parametrize("model_name, version, signature, message", [
    # unknown signature: the server's status code and text in one line
    (MODEL_NAME, None, "nope", "INVALID_ARGUMENT"),
    # wrong model name
    ("other", None, "serving_default", "NOT_FOUND"),
    # version not served
    (MODEL_NAME, 9, "serving_default", "NOT_FOUND"),
])
def test_grpc_errors_are_one_line_input_errors(grpc_server, model_name, version, signature,
                                               message):
  with serving.GrpcClient(grpc_server[0], model_name, version=version, timeout_s=30) as client:
    with pytest.raises(InputError, match=message) as info:
      client.predict(signature, {"field_ppm": _patches(1, 24)})
  assert "\n" not in str(info.value)


def test_grpc_unreachable_server_is_an_input_error():
  with socket.socket() as sock:  # a port nobody listens on
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  with serving.GrpcClient(f"127.0.0.1:{port}", MODEL_NAME, timeout_s=2) as client:
    with pytest.raises(InputError, match="UNAVAILABLE|DEADLINE_EXCEEDED"):
      client.predict("serving_default", {"field_ppm": _patches(1, 24)})


def test_missing_serving_api_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
  monkeypatch.setitem(sys.modules, "tensorflow_serving.apis.predict_pb2", None)
  with pytest.raises(ImportError, match="--no-deps"):
    serving.GrpcClient("127.0.0.1:1", MODEL_NAME)


# --------------------------------------------------------------------------------------
# REST
# --------------------------------------------------------------------------------------
def test_rest_body_row_format_is_tf_servings():
  patches = _patches(2, 8)
  body = json.loads(json.dumps(serving.build_rest_body({"field_ppm": patches})))
  # Row format with one named input: "instances" is the list of per-example values.
  assert sorted(body) == ["instances", "signature_name"]
  assert body["signature_name"] == "serving_default"
  np.testing.assert_array_equal(np.asarray(body["instances"], np.float32), patches)


def test_rest_body_row_format_several_inputs_is_a_list_of_objects():
  body = serving.build_rest_body({"a": np.zeros((3, 2)), "b": np.arange(3)}, "sig")
  assert body["signature_name"] == "sig"
  assert body["instances"] == [{"a": [0.0, 0.0], "b": i} for i in range(3)]
  with pytest.raises(ValueError, match="batch size"):
    serving.build_rest_body({"a": np.zeros((3, 2)), "b": np.arange(2)})


def test_rest_body_columnar_format():
  patches = _patches(2, 8)
  body = json.loads(json.dumps(serving.build_rest_body(patches, row_format=False)))
  assert sorted(body) == ["inputs", "signature_name"]
  assert np.asarray(body["inputs"]).shape == patches.shape
  several = serving.build_rest_body({"a": np.zeros((1, 2)), "b": np.ones(3)}, row_format=False)
  assert several["inputs"] == {"a": [[0.0, 0.0]], "b": [1.0, 1.0, 1.0]}


@pytest.mark.parametrize("payload, expected", [
    # row format, single output: the output name is omitted
    ({"predictions": [[1.0, 2.0], [3.0, 4.0]]}, [[1, 2], [3, 4]]),
    # row format, several outputs: a list of objects
    ({"predictions": [{"chi_ppm": [1.0], "x": 0}, {"chi_ppm": [2.0], "x": 1}]}, [[1], [2]]),
    # columnar, single output
    ({"outputs": [[5.0]]}, [[5]]),
    # columnar, several outputs
    ({"outputs": {"chi_ppm": [[6.0]], "x": [0]}}, [[6]]),
])
def test_parse_rest_response_formats(payload, expected):
  np.testing.assert_array_equal(serving.parse_rest_response(payload), expected)


def test_parse_rest_response_error():
  with pytest.raises(InputError, match="REST error: bad\\s+input"):
    serving.parse_rest_response({"error": "bad\ninput"})


@pytest.mark.parametrize("url, model, version, expected", [
    ("http://h:8501/v1/models/qsmgan", None, None, "http://h:8501/v1/models/qsmgan:predict"),
    ("http://h:8501/", "qsmgan", 3, "http://h:8501/v1/models/qsmgan/versions/3:predict"),
    ("http://h:8501/v1/models/m/versions/2", "x", 5,
     "http://h:8501/v1/models/m/versions/2:predict"),
])
def test_rest_predict_url(url, model, version, expected):
  assert serving.rest_predict_url(url, model, version) == expected


@pytest.mark.parametrize("url, model", [("h:8501", "qsmgan"), ("http://h:8501", None)])
def test_rest_predict_url_rejects(url, model):
  with pytest.raises(InputError):
    serving.rest_predict_url(url, model)


@pytest.fixture(scope="module")
def rest_server(exported):
  """Loopback stand-in for TF Serving's REST predict API (NOT TF Serving); yields the URL."""
  _, _, loaded, _ = exported
  seen = []

  class Handler(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args):  # keep pytest output clean
      pass

    def _reply(self, code, payload):
      data = json.dumps(payload).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path not in (f"/v1/models/{MODEL_NAME}:predict",
                           f"/v1/models/{MODEL_NAME}/versions/{VERSION}:predict"):
        return self._reply(404, {"error": f"Servable not found for request: {self.path}"})
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      seen.append(body)
      name = body.get("signature_name", "serving_default")
      if name not in loaded.signatures:
        return self._reply(400, {"error": f"Serving signature name: \"{name}\" not found"})
      if "instances" in body:
        inputs = {"field_ppm": np.asarray(body["instances"], np.float32)}
        outputs = _run_signature(loaded, name, inputs)
        return self._reply(200, {"predictions": outputs["chi_ppm"].tolist()})
      inputs = body["inputs"]
      if not isinstance(inputs, dict):
        inputs = {"field_ppm": inputs}
      outputs = _run_signature(loaded, name, {k: np.asarray(v, np.float32)
                                              for k, v in inputs.items()})
      outputs = {k: (v.decode() if isinstance(v, bytes) else v.tolist())
                 for k, v in outputs.items()}
      return self._reply(200, {"outputs": outputs if len(outputs) > 1 else
                               next(iter(outputs.values()))})

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/models/{MODEL_NAME}", seen
  finally:
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_rest_predict_patches_round_trip(exported, rest_server):
  _, generator, _, contract = exported
  url, seen = rest_server
  patches = _patches(3, export.patch_sizes(contract)[0], seed=1)
  chi = serving.predict_patches_rest(url, patches, batch_size=2, version=VERSION)
  assert [len(b["instances"]) for b in seen[-2:]] == [2, 1]  # batched requests
  np.testing.assert_allclose(chi, generator(patches, training=False).numpy(), atol=1e-5)


def test_rest_contract_and_errors(exported, rest_server):
  url, _ = rest_server
  assert serving.RestClient(url).contract() == exported[3]
  with pytest.raises(InputError, match="HTTP 404: Servable not found"):
    serving.RestClient(url + "x").predict_patches(_patches(1, 24))
  with pytest.raises(InputError, match="HTTP 400"):
    serving.RestClient(url).predict_patches(_patches(1, 24), signature_name="nope")
