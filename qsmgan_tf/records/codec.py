"""A patch pair as a ``tf.train.Example``: `encode`, `decode`, and `parse_batch` for ``tf.data``.

`encode` fills a ``tf.train.Example`` (TensorFlow's protobuf class) and serializes it with
``SerializeToString(deterministic=True)``: feature-map keys sorted, so the same example always
gives the same bytes, which the manifest's per-record SHA-256 and example-set digest rely on (a
test pins the bytes of a fixed example). Until issue 17 the writer wrote this wire format by
hand so that Beam workers need not import TensorFlow; the bytes are the same, so the digests of
datasets written before still verify. `decode` parses with the same class (verification, tests);
`parse_batch` is the TensorFlow graph parser the reader (`qsmgan_tf.data`) maps over batches.
`write_records` writes serialized examples with ``tf.io.TFRecordWriter`` (tests, benchmarks);
the pipeline's shards are written by Beam's TFRecord sinks.

Importing this module loads TensorFlow: the TF-free parts of `qsmgan_tf.records` (schema,
framing, shard checks) do not import it. The price, measured on 2026-12-07 (BUILD.md, data_prep):
every Beam worker process loads TensorFlow once (about 5 s and 0.55 GB each, 2 shared cores), so
the benchmark's Beam write of 1,716 pairs took 8 s more per run (throughput 0.73x, a loss of 27 %);
per pair nothing is lost (encode 0.54 vs 0.53 ms, decode 0.13 vs 0.16 ms). Accepted over the 20 %
bound because the cost is fixed per worker, not per pair: on a dataset of the 28 subjects BUILD.md
builds (about 12,800 pairs) it is 5-12 % of the run, and about 150 lines of hand-written protobuf
wire code are gone.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from google.protobuf import message as protobuf_message
import numpy as np
import tensorflow as tf

from qsmgan_tf.records import schema

# tf.train.Feature's oneof `kind` -> our feature kind (as in `schema.META`).
_KINDS = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}


def _add_array(features, name: str, array: np.ndarray, dtype: str) -> None:
  """Fills ``name/data``, ``name/shape`` and ``name/dtype`` of a feature map."""
  if dtype not in schema.ARRAY_DTYPES:
    raise ValueError(f"{name}: unsupported storage dtype {dtype!r}; expected one of "
                     f"{schema.ARRAY_DTYPES}")
  array = np.asarray(array)
  storage = np.dtype(dtype).newbyteorder("<")
  if array.dtype != storage:
    # Converting each patch is slow (float16: ~7 ns a value); callers that cut many patches from
    # one volume convert the volume once with `to_storage` and pass views.
    array = schema.to_storage(array, dtype, name)
  features[f"{name}/data"].bytes_list.value.append(array.tobytes(order="C"))
  features[f"{name}/shape"].int64_list.value.extend(array.shape)
  features[f"{name}/dtype"].bytes_list.value.append(dtype.encode())


def encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
           dtypes: Mapping[str, str]) -> bytes:
  """Serializes one patch pair as a tf.train.Example.

  Args:
    arrays: ``{'field': input patch (ppm), 'chi': target patch (ppm), 'mask': target-patch
      mask}``; every name in `schema.ARRAYS` is required.
    meta: values for every key of `schema.META` (with or without the ``meta/`` prefix).
    dtypes: storage dtype per array name, e.g. ``{'field': 'float16', 'chi': 'float16',
      'mask': 'uint8'}``.

  Returns:
    The serialized example; the same inputs always give the same bytes.

  Raises:
    ValueError: a missing array or meta value, a wrong meta length, an unsupported dtype, or
      values that do not fit the storage dtype.
  """
  example = tf.train.Example()
  features = example.features.feature
  for name in schema.ARRAYS:
    if name not in arrays:
      raise ValueError(f"missing array {name!r}")
    _add_array(features, name, arrays[name], dtypes[name])
  for key, (kind, length) in schema.META.items():
    short = key.split("/", 1)[1]
    value = meta.get(key, meta.get(short))
    if value is None:
      raise ValueError(f"missing meta value {key!r}")
    if kind == "bytes":
      values = [value.encode("utf-8") if isinstance(value, str) else bytes(value)]
    else:
      values = np.asarray(value).reshape(-1).tolist()
    if len(values) != length:
      raise ValueError(f"{key} needs {length} value(s), got {len(values)}")
    getattr(features[key], f"{kind}_list").value.extend(values)
  return example.SerializeToString(deterministic=True)


def _example(serialized: bytes) -> tf.train.Example:
  try:
    return tf.train.Example.FromString(serialized)
  except protobuf_message.DecodeError as exc:
    raise ValueError(f"not a tf.train.Example ({exc})") from None


def parse_features(serialized: bytes) -> dict[str, tuple[str, list]]:
  """Parses a serialized tf.train.Example into ``{key: (kind, values)}``.

  ``kind`` is 'bytes', 'float', 'int64', or 'empty' for a feature without a list.

  Raises:
    ValueError: the bytes are not a tf.train.Example.
  """
  out = {}
  for key, feature in _example(serialized).features.feature.items():
    kind = feature.WhichOneof("kind")
    out[key] = (_KINDS[kind], list(getattr(feature, kind).value)) if kind else ("empty", [])
  return out


def origin(serialized: bytes) -> tuple[str, int]:
  """``(subject id, background flag)`` of a serialized example (what the manifest counts).

  Raises:
    ValueError: not a tf.train.Example, or one without these meta features.
  """
  features = _example(serialized).features.feature
  try:
    subject = features["meta/subject_id"].bytes_list.value[0].decode("utf-8")
    background = int(features["meta/background"].int64_list.value[0])
  except IndexError:
    raise ValueError("example has no 'meta/subject_id' or 'meta/background'") from None
  return subject, background


def decode(serialized: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Inverse of `encode`: ``(arrays in their stored dtype, meta)``.

  Raises:
    ValueError: not an example of this format, or an array whose byte count disagrees with its
      shape and dtype.
  """
  features = parse_features(serialized)
  arrays = {}
  for name in schema.ARRAYS:
    try:
      data = features[f"{name}/data"][1][0]
      shape = tuple(features[f"{name}/shape"][1])
      dtype = features[f"{name}/dtype"][1][0].decode()
    except (KeyError, IndexError):
      raise ValueError(f"example has no complete '{name}/' feature") from None
    if dtype not in schema.ARRAY_DTYPES:
      raise ValueError(f"{name}: unknown dtype {dtype!r}")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
      raise ValueError(f"{name}: {len(data)} bytes, but shape {shape} of {dtype} needs {expected}")
    arrays[name] = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(shape)
  meta = {}
  for key, (kind, length) in schema.META.items():
    if key not in features:
      raise ValueError(f"example has no {key!r}")
    values = features[key][1]
    if len(values) != length:
      raise ValueError(f"{key}: {len(values)} values, expected {length}")
    if kind == "bytes":
      meta[key] = values[0].decode("utf-8")
    elif length == 1:
      meta[key] = values[0]
    else:
      meta[key] = np.asarray(values, dtype=np.float32 if kind == "float" else np.int64)
  return arrays, meta


def write_records(path, serialized: Iterable[bytes]) -> None:
  """Writes serialized records into one TFRecord file with ``tf.io.TFRecordWriter``."""
  with tf.io.TFRecordWriter(str(path)) as writer:
    for data in serialized:
      writer.write(data)


def parse_batch(serialized, spec: Mapping[str, Mapping], names: Sequence[str] = ("field", "chi")):
  """Parses a batch of serialized examples into float32 tensors ``[B, *shape, 1]``.

  Every record's stored dtype and shape are checked against ``spec`` (the manifest's
  ``features``): a mismatch raises ``InvalidArgumentError`` naming the feature, instead of
  reinterpreting the bytes.

  Args:
    serialized: string tensor ``[B]``.
    spec: ``{name: {'shape': [...], 'dtype': '...'}}`` for at least ``names``.
    names: arrays to return, in order.

  Returns:
    A tuple of float32 tensors, one per name.
  """
  serialized = tf.convert_to_tensor(serialized)
  tf_spec = {}
  for name in names:
    ndim = len(spec[name]["shape"])
    tf_spec[f"{name}/data"] = tf.io.FixedLenFeature([], tf.string)
    tf_spec[f"{name}/shape"] = tf.io.FixedLenFeature([ndim], tf.int64)
    tf_spec[f"{name}/dtype"] = tf.io.FixedLenFeature([], tf.string)
  parsed = tf.io.parse_example(serialized, tf_spec)
  out = []
  for name in names:
    shape = [int(n) for n in spec[name]["shape"]]
    dtype = spec[name]["dtype"]
    got_dtype, got_shape = parsed[f"{name}/dtype"], parsed[f"{name}/shape"]
    checks = [
        tf.debugging.Assert(
            tf.reduce_all(tf.equal(got_dtype, dtype)),
            [f"{name} stored with another dtype than the manifest's {dtype}:", got_dtype]),
        tf.debugging.Assert(
            tf.reduce_all(tf.equal(got_shape, tf.constant(shape, tf.int64)[tf.newaxis])),
            [f"{name} stored with another shape than the manifest's {shape}:", got_shape]),
    ]
    with tf.control_dependencies(checks):
      values = tf.io.decode_raw(parsed[f"{name}/data"],
                                tf.uint16 if dtype == "float16" else tf.dtypes.as_dtype(dtype),
                                little_endian=True)
    values = half_bits_to_float32(values) if dtype == "float16" else tf.cast(values, tf.float32)
    values = tf.reshape(values, [-1, *shape, 1])
    values.set_shape([serialized.shape[0], *shape, 1])  # keeps a static batch (drop_remainder)
    out.append(values)
  return tuple(out)


def half_bits_to_float32(bits):
  """IEEE binary16 bit patterns (uint16 tensor) -> their exact float32 values, in integer ops.

  Why not ``decode_raw(float16)`` and a cast: a half-precision op in the input pipeline makes
  oneDNN print ``E0000 ... oneDNN supports DT_HALF only on platforms with AVX-512`` at the start
  of every training run on CPUs without AVX-512 FP16, an alarming line for a harmless fallback.
  """
  bits = tf.cast(bits, tf.int32)
  exponent = tf.bitwise.bitwise_and(bits, 0x7C00)
  # Normal numbers: sign to bit 31, exponent and mantissa shifted up 13 bits and the exponent
  # rebiased by 127 - 15 = 112; infinities and NaNs (exponent 31) need 112 more (to 255).
  rebias = tf.where(exponent == 0x7C00, 224 << 23, 112 << 23)
  widened = tf.bitwise.left_shift(tf.bitwise.bitwise_and(bits, 0x7FFF), 13) + rebias
  normal = tf.bitcast(tf.bitwise.bitwise_or(
      widened, tf.bitwise.left_shift(tf.bitwise.bitwise_and(bits, 0x8000), 16)), tf.float32)
  # Subnormals and zeros (exponent 0): mantissa * 2^-24, exact in float32 (<= 10 bits).
  subnormal = tf.cast(tf.bitwise.bitwise_and(bits, 0x3FF), tf.float32) * 2.0**-24
  return tf.where(exponent == 0, tf.where(bits >= 0x8000, -subnormal, subnormal), normal)
