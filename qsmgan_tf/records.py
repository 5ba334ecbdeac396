"""The TFRecord dataset format: one feature spec for the writer (data_prep) and the reader (data).

An example is one patch pair, a ``tf.train.Example`` whose features sit under namespaced keys:

  ``field/data``, ``field/shape``, ``field/dtype``  input patch of the local field, ppm of B0
  ``chi/data``, ``chi/shape``, ``chi/dtype``        centred target patch (chi or COSMOS), ppm
  ``mask/data``, ``mask/shape``, ``mask/dtype``     brain mask on the target patch, uint8 0/1
  ``meta/...``                                      subject id, voxel size, B0 direction, ...

Every array stores its shape and dtype beside its raw little-endian bytes, so a reader can refuse
bytes it would misread (float16 bytes decoded as float32 silently give half as many values).

The writer runs in Beam workers that should not pay for importing TensorFlow, so `encode` writes
the protobuf wire format of ``tf.train.Example`` directly (map keys sorted, as
``SerializeToString(deterministic=True)`` does: the same example always gives the same bytes);
tests check it against ``tf.train.Example``. `decode` is the matching pure-Python parser (for
verification and tests); `parse_batch` is the TensorFlow parser used by `qsmgan_tf.data`.

The module also owns the on-disk layout of a dataset: shard names
``<split>-%05d-of-%05d.tfrecord``, the TFRecord framing (``uint64 length, uint32 masked CRC of the
length, data, uint32 masked CRC of the data``) and the checks of shards against ``manifest.json``
shared by the reader's start-up check and ``python -m data_prep.verify``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from qsmgan_tf.errors import InputError

FORMAT = "qsmgan_tf.patch_pairs"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tfrecord"
# Beam's shard_name_template for `<prefix>-%05d-of-%05d`.
BEAM_SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
SHARD_PATTERN = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord(\.gz)?$")

ARRAYS = ("field", "chi", "mask")
ARRAY_DTYPES = ("float16", "float32", "uint8")
ARRAY_UNITS = {"field": "ppm of B0", "chi": "ppm", "mask": "0/1"}

# meta/ features: key -> (kind, length). Fixed lengths, so the TF parser needs no ragged types.
META = {
    "meta/subject_id": ("bytes", 1),
    "meta/kind": ("bytes", 1),           # 'brain', 'shapes' or 'real'
    "meta/voxel_size_mm": ("float", 3),  # after augmentation (a permutation permutes it)
    "meta/b0_dir": ("float", 3),         # unit vector, voxel frame, after augmentation
    "meta/centre": ("int64", 3),         # patch centre, voxel index in the subject volume
    "meta/background": ("int64", 1),     # 1 when the centre lies outside the mask
    "meta/transform": ("int64", 9),      # signed permutation applied (row-major 3x3)
    "meta/chi_scale": ("float", 1),      # factor applied to chi and field
    "meta/snr": ("float", 1),            # simulated SNR (0 when unknown)
}

# TFRecord framing: masked CRC-32C as in TensorFlow's record writer.
_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
# Bytes hashed at each end of a shard for its cheap fingerprint.
_FINGERPRINT_BYTES = 1 << 16


# --------------------------------------------------------------------------------------
# Example encoding (protobuf wire format of tf.train.Example)
# --------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


class _Chunks:
  """A message being serialized: pieces joined once at the end (large payloads copied once)."""

  __slots__ = ("parts", "size")

  def __init__(self):
    self.parts = []
    self.size = 0

  def raw(self, data) -> "_Chunks":
    self.parts.append(data)
    self.size += len(data)
    return self

  def delimited(self, field_number: int, payload) -> "_Chunks":
    """Appends a length-delimited field (wire type 2); payload is bytes or `_Chunks`."""
    head = _varint((field_number << 3) | 2) + _varint(len(payload) if not isinstance(
        payload, _Chunks) else payload.size)
    self.raw(head)
    if isinstance(payload, _Chunks):
      self.parts.extend(payload.parts)
      self.size += payload.size
    else:
      self.raw(payload)
    return self


def _feature(kind: str, values) -> _Chunks:
  """A tensorflow.Feature: bytes_list=1, float_list=2, int64_list=3, each with values=1 (packed)."""
  if kind == "bytes":
    inner = _Chunks()
    for v in values:
      inner.delimited(1, v)
    return _Chunks().delimited(1, inner)
  if kind == "float":
    packed = np.asarray(values, dtype="<f4").tobytes()
    return _Chunks().delimited(2, _Chunks().delimited(1, packed))
  if kind == "int64":
    packed = b"".join(_varint(int(v)) for v in values)
    return _Chunks().delimited(3, _Chunks().delimited(1, packed))
  raise ValueError(f"unknown feature kind {kind!r}")


def serialize_features(features: Mapping[str, tuple[str, Sequence]]) -> bytes:
  """Serializes ``{key: (kind, values)}`` as a tf.train.Example, keys sorted (deterministic)."""
  entries = _Chunks()
  for key in sorted(features):
    kind, values = features[key]
    entry = _Chunks().delimited(1, key.encode("utf-8")).delimited(2, _feature(kind, values))
    entries.delimited(1, entry)
  return b"".join(_Chunks().delimited(1, entries).parts)


def _array_features(name: str, array: np.ndarray, dtype: str) -> dict:
  if dtype not in ARRAY_DTYPES:
    raise ValueError(f"{name}: unsupported storage dtype {dtype!r}; expected one of {ARRAY_DTYPES}")
  array = np.asarray(array)
  storage = np.dtype(dtype).newbyteorder("<")
  if array.dtype != storage:
    # Converting each patch is slow (float16: ~7 ns a value); callers that cut many patches from
    # one volume convert the volume once with `to_storage` and pass views.
    array = to_storage(array, dtype, name)
  data = np.ascontiguousarray(array)
  return {
      f"{name}/data": ("bytes", [memoryview(data).cast("B")]),
      f"{name}/shape": ("int64", list(array.shape)),
      f"{name}/dtype": ("bytes", [dtype.encode()]),
  }


def to_storage(array: np.ndarray, dtype: str, name: str = "array") -> np.ndarray:
  """Converts an array to a storage dtype, refusing values the dtype cannot hold.

  Raises:
    ValueError: non-finite values, or values beyond the float16 range.
  """
  array = np.asarray(array)
  if array.dtype.kind == "f" and not np.isfinite(array).all():
    raise ValueError(f"{name}: non-finite values cannot be stored")
  if dtype == "float16" and array.size and np.abs(array).max() > 6.0e4:
    raise ValueError(f"{name}: values beyond the float16 range; use --dtype=float32")
  return np.asarray(array, dtype=np.dtype(dtype).newbyteorder("<"))


def encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
           dtypes: Mapping[str, str]) -> bytes:
  """Serializes one patch pair as a tf.train.Example (no TensorFlow needed).

  Args:
    arrays: ``{'field': input patch (ppm), 'chi': target patch (ppm), 'mask': target-patch
      mask}``; every name in `ARRAYS` is required.
    meta: values for every key of `META` (with or without the ``meta/`` prefix).
    dtypes: storage dtype per array name, e.g. ``{'field': 'float16', 'chi': 'float16',
      'mask': 'uint8'}``.

  Returns:
    The serialized example; the same inputs always give the same bytes.

  Raises:
    ValueError: a missing array or meta value, a wrong meta length, an unsupported dtype, or
      values that do not fit the storage dtype.
  """
  features = {}
  for name in ARRAYS:
    if name not in arrays:
      raise ValueError(f"missing array {name!r}")
    features.update(_array_features(name, arrays[name], dtypes[name]))
  for key, (kind, length) in META.items():
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
    features[key] = (kind, values)
  return serialize_features(features)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated varint")
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of a serialized message; length-delimited as memoryview."""
  pos = 0
  while pos < len(buf):
    tag, pos = _read_varint(buf, pos)
    number, wire = tag >> 3, tag & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 2:
      length, pos = _read_varint(buf, pos)
      if pos + length > len(buf):
        raise ValueError("truncated field")
      value, pos = buf[pos:pos + length], pos + length
    elif wire == 5:
      value, pos = bytes(buf[pos:pos + 4]), pos + 4
    elif wire == 1:
      value, pos = bytes(buf[pos:pos + 8]), pos + 8
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield number, wire, value


def _parse_feature(buf: memoryview) -> tuple[str, list]:
  for number, _, inner in _fields(buf):
    values = []
    if number == 1:
      for _, _, v in _fields(inner):
        values.append(bytes(v))
      return "bytes", values
    if number == 2:
      for _, wire, v in _fields(inner):
        values.extend(np.frombuffer(v, "<f4").tolist() if wire == 2 else
                      [struct.unpack("<f", v)[0]])
      return "float", values
    if number == 3:
      for _, wire, v in _fields(inner):
        if wire == 2:
          pos = 0
          while pos < len(v):
            x, pos = _read_varint(v, pos)
            values.append(x - (1 << 64) if x >= 1 << 63 else x)
        else:
          values.append(v - (1 << 64) if v >= 1 << 63 else v)
      return "int64", values
  return "empty", []


def parse_features(serialized: bytes) -> dict[str, tuple[str, list]]:
  """Parses a serialized tf.train.Example into ``{key: (kind, values)}`` (pure Python).

  Raises:
    ValueError: the bytes are not a tf.train.Example.
  """
  out = {}
  buf = memoryview(serialized)
  for number, wire, features in _fields(buf):
    if number != 1 or wire != 2:
      raise ValueError("not a tf.train.Example (unexpected top-level field)")
    for _, _, entry in _fields(features):
      key = value = None
      for n, _, v in _fields(entry):
        if n == 1:
          key = bytes(v).decode("utf-8")
        elif n == 2:
          value = _parse_feature(v)
      if key is None or value is None:
        raise ValueError("not a tf.train.Example (feature map entry without key or value)")
      out[key] = value
  return out


def decode(serialized: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Inverse of `encode` (pure Python): ``(arrays in their stored dtype, meta)``.

  Raises:
    ValueError: not an example of this format, or an array whose byte count disagrees with its
      shape and dtype.
  """
  features = parse_features(serialized)
  arrays = {}
  for name in ARRAYS:
    try:
      data = features[f"{name}/data"][1][0]
      shape = tuple(features[f"{name}/shape"][1])
      dtype = features[f"{name}/dtype"][1][0].decode()
    except (KeyError, IndexError):
      raise ValueError(f"example has no complete '{name}/' feature") from None
    if dtype not in ARRAY_DTYPES:
      raise ValueError(f"{name}: unknown dtype {dtype!r}")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
      raise ValueError(f"{name}: {len(data)} bytes, but shape {shape} of {dtype} needs {expected}")
    arrays[name] = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(shape)
  meta = {}
  for key, (kind, length) in META.items():
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


def check_example(arrays: Mapping[str, np.ndarray], spec: Mapping[str, Mapping]) -> None:
  """Raises ValueError unless every array has the shape and dtype the manifest's spec says."""
  for name, want in spec.items():
    got = arrays[name]
    if got.dtype.name != want["dtype"]:
      raise ValueError(f"{name} stored as {got.dtype.name}, manifest says {want['dtype']}")
    if list(got.shape) != list(want["shape"]):
      raise ValueError(f"{name} has shape {list(got.shape)}, manifest says {want['shape']}")


# --------------------------------------------------------------------------------------
# TensorFlow parsing (reader side)
# --------------------------------------------------------------------------------------
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
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

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
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

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


# --------------------------------------------------------------------------------------
# TFRecord framing
# --------------------------------------------------------------------------------------
_crc_fn = None


def _crc32c(data) -> int:
  global _crc_fn  # pylint: disable=global-statement
  if _crc_fn is None:
    try:
      # Hardware CRC (~0.1 ms per 64^3/48^3 pair); Beam's TFRecord sink picks it up too.
      import google_crc32c  # pylint: disable=import-outside-toplevel
      _crc_fn = google_crc32c.value
    except ImportError:
      import crcmod.predefined  # pylint: disable=import-outside-toplevel
      _crc_fn = crcmod.predefined.mkPredefinedCrcFun("crc-32c")
  return _crc_fn(data)


def crc_implementation() -> str:
  """Which CRC-32C `iter_records` uses: 'google-crc32c (c)', 'crcmod C extension', ..."""
  try:
    import google_crc32c  # pylint: disable=import-outside-toplevel
    return f"google-crc32c ({google_crc32c.implementation})"
  except ImportError:
    pass
  import crcmod.predefined  # pylint: disable=import-outside-toplevel,unused-import
  ext = getattr(sys.modules.get("crcmod.crcmod"), "_usingExtension", False)
  return "crcmod C extension" if ext else "crcmod pure Python"


def masked_crc32c(data) -> int:
  """TFRecord's masked CRC-32C of ``data``."""
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
  """One record in TFRecord framing (used by tests to build shards by hand)."""
  length = struct.pack("<Q", len(data))
  return (length + _CRC.pack(masked_crc32c(length)) + data + _CRC.pack(masked_crc32c(data)))


class ShardError(InputError):
  """A shard that does not match its manifest entry or breaks the TFRecord framing."""

  def __init__(self, path, reason: str, record: int | None = None):
    where = os.path.basename(str(path)) + (f": record {record}" if record is not None else "")
    super().__init__(f"{where}: {reason}")
    self.path = str(path)
    self.record = record
    self.reason = reason


@dataclasses.dataclass
class ShardScan:
  """What `scan_shard` found in one shard."""
  path: str
  num_records: int
  size_bytes: int
  sha256: str | None = None
  record_sha256: list[str] | None = None


def iter_records(path, check_crc: bool = True, file_hash=None) -> Iterator[tuple[int, bytes]]:
  """Yields ``(index, data)`` of each record of a TFRecord file, checking the framing.

  Args:
    path: the TFRecord file.
    check_crc: also check each record's data CRC (the length CRC is always checked).
    file_hash: optional hashlib object fed every byte of the file, in order.

  Raises:
    ShardError: a truncated record, or a CRC mismatch, naming the file and the record index.
  """
  update = file_hash.update if file_hash is not None else (lambda _: None)
  with open(path, "rb") as f:
    index = 0
    while True:
      header = f.read(_HEADER.size)
      update(header)
      if not header:
        return
      if len(header) < _HEADER.size:
        raise ShardError(path, "truncated record header (file cut short)", index)
      length, length_crc = _HEADER.unpack(header)
      if masked_crc32c(header[:8]) != length_crc:
        raise ShardError(path, "corrupted record length (CRC mismatch)", index)
      data = f.read(length)
      footer = f.read(_CRC.size)
      update(data)
      update(footer)
      if len(data) < length or len(footer) < _CRC.size:
        raise ShardError(path, "truncated record (file cut short)", index)
      if check_crc and masked_crc32c(data) != _CRC.unpack(footer)[0]:
        raise ShardError(path, "corrupted record data (CRC mismatch)", index)
      yield index, data
      index += 1


def iter_spans(path) -> Iterator[tuple[int, int, bytes]]:
  """Yields ``(offset, framed length, data)`` per record (length CRC checked, data CRC not)."""
  offset = 0
  for _, data in iter_records(path, check_crc=False):
    framed = _HEADER.size + len(data) + _CRC.size
    yield offset, framed, data
    offset += framed


def count_records(path) -> int:
  """Counts records by walking the length headers only (seeks over the data: fast).

  Raises:
    ShardError: a truncated record or a corrupted length field.
  """
  size = os.path.getsize(path)
  index = 0
  with open(path, "rb") as f:
    pos = 0
    while pos < size:
      header = f.read(_HEADER.size)
      if len(header) < _HEADER.size:
        raise ShardError(path, "truncated record header (file cut short)", index)
      length, length_crc = _HEADER.unpack(header)
      if masked_crc32c(header[:8]) != length_crc:
        raise ShardError(path, "corrupted record length (CRC mismatch)", index)
      pos += _HEADER.size + length + _CRC.size
      if pos > size:
        raise ShardError(path, "truncated record (file cut short)", index)
      f.seek(pos)
      index += 1
  return index


def fingerprint(path) -> str:
  """SHA-256 of a shard's size and its first and last 64 KiB: cheap, tells shards apart."""
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(_FINGERPRINT_BYTES))
    if size > _FINGERPRINT_BYTES:
      f.seek(max(size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
      h.update(f.read())
  return h.hexdigest()


def file_sha256(path, chunk: int = 1 << 22) -> str:
  """SHA-256 of a whole file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def scan_shard(path, check_crc: bool = False) -> ShardScan:
  """Reads one shard once: record count, size, file SHA-256 and each record's SHA-256.

  Raises:
    ShardError: broken framing (see `iter_records`).
  """
  file_hash = hashlib.sha256()
  hashes = [hashlib.sha256(data).hexdigest()
            for _, data in iter_records(path, check_crc=check_crc, file_hash=file_hash)]
  return ShardScan(path=str(path), num_records=len(hashes), size_bytes=os.path.getsize(path),
                   sha256=file_hash.hexdigest(), record_sha256=hashes)


def example_set_digest(record_sha256: Sequence[str]) -> str:
  """Order-independent digest of a set of examples: SHA-256 over their sorted SHA-256s."""
  h = hashlib.sha256()
  for digest in sorted(record_sha256):
    h.update(digest.encode("ascii") + b"\n")
  return h.hexdigest()


# --------------------------------------------------------------------------------------
# Manifest reading and shard checks
# --------------------------------------------------------------------------------------
def load_manifest(data_dir) -> dict:
  """Reads and sanity-checks ``DIR/manifest.json``.

  Raises:
    InputError: no dataset there, an unreadable manifest, or another format/schema version.
  """
  path = os.path.join(str(data_dir), MANIFEST_NAME)
  if not os.path.isdir(str(data_dir)):
    raise InputError(f"dataset folder not found: {data_dir}")
  if not os.path.exists(path):
    raise InputError(f"{data_dir} has no {MANIFEST_NAME}: not a finished dataset")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as exc:
    raise InputError(f"{MANIFEST_NAME} in {data_dir} is unreadable: {exc}") from None
  if manifest.get("format") != FORMAT:
    raise InputError(f"{MANIFEST_NAME} in {data_dir} is not a {FORMAT} dataset")
  if manifest.get("schema_version") != SCHEMA_VERSION:
    raise InputError(f"{data_dir}: schema version {manifest.get('schema_version')}, this code "
                     f"reads version {SCHEMA_VERSION}")
  return manifest


def split_entry(manifest: Mapping, split: str, data_dir="") -> Mapping:
  """The manifest's entry for ``split``; InputError naming the available splits otherwise."""
  splits = manifest.get("splits", {})
  if split not in splits:
    raise InputError(f"dataset {data_dir} has no split {split!r} (has: "
                     f"{', '.join(sorted(splits)) or 'none'})")
  return splits[split]


def unlisted_shards(data_dir, manifest: Mapping) -> list[str]:
  """Record files in the folder that the manifest does not list (e.g. from another dataset)."""
  listed = {s["name"] for entry in manifest.get("splits", {}).values() for s in entry["shards"]}
  extra = []
  for name in sorted(os.listdir(str(data_dir))):
    if name in listed:
      continue
    if SHARD_PATTERN.match(name) or ".tfrecord" in name:
      extra.append(name)
  return extra


CHECK_LEVELS = ("exists", "records", "sha256", "full")


def check_shard(data_dir, shard: Mapping, level: str = "records",
                spec: Mapping | None = None) -> list[str] | None:
  """Compares one shard with its manifest entry; raises ShardError on the first difference.

  Levels (each includes the previous ones):
    'exists': the file is there, with the listed size and fingerprint (first/last 64 KiB);
    'records': its record count matches, walking the length headers;
    'sha256': its SHA-256 matches (reads the whole file);
    'full': every record's CRC, feature dtypes and shapes (against ``spec``) are checked.

  Returns:
    With 'full', the SHA-256 of each record (for the example-set digest); else None.
  """
  if level not in CHECK_LEVELS:
    raise ValueError(f"unknown check level {level!r}; expected one of {CHECK_LEVELS}")
  path = os.path.join(str(data_dir), shard["name"])
  if not os.path.isfile(path):
    raise ShardError(path, "missing shard listed in the manifest")
  size = os.path.getsize(path)
  if size != shard["size_bytes"]:
    raise ShardError(path, f"size {size} bytes, manifest says {shard['size_bytes']} "
                     "(truncated or replaced)")
  if fingerprint(path) != shard["fingerprint"]:
    raise ShardError(path, "content differs from the manifest's fingerprint (a shard from "
                     "another dataset, or corrupted)")
  rank = CHECK_LEVELS.index(level)
  if rank >= 1:
    count = count_records(path)
    if count != shard["num_records"]:
      raise ShardError(path, f"{count} records, manifest says {shard['num_records']}")
  hashes = None
  if rank >= 3:
    # Records first: a CRC mismatch names the record, the file hash only the file.
    hashes = []
    for index, data in iter_records(path, check_crc=True):
      try:
        arrays, _ = decode(data)
        if spec is not None:
          check_example(arrays, spec)
      except ValueError as exc:
        raise ShardError(path, f"bad example: {exc}", index) from None
      hashes.append(hashlib.sha256(data).hexdigest())
  if rank >= 2 and file_sha256(path) != shard["sha256"]:
    raise ShardError(path, "SHA-256 differs from the manifest (corrupted or replaced)")
  return hashes


def check_split(data_dir, manifest: Mapping, split: str, level: str = "records") -> list[str]:
  """Checks every shard of a split (and that no unlisted shard lies beside them).

  Returns:
    The shard paths, in manifest order.

  Raises:
    ShardError: the first shard that differs from the manifest (one line naming it).
    InputError: no such split.
  """
  entry = split_entry(manifest, split, data_dir)
  extra = unlisted_shards(data_dir, manifest)
  if extra:
    raise ShardError(os.path.join(str(data_dir), extra[0]),
                     "record file not listed in the manifest (foreign or stale shard)")
  paths = []
  for shard in entry["shards"]:
    check_shard(data_dir, shard, level, manifest.get("features"))
    paths.append(os.path.join(str(data_dir), shard["name"]))
  return paths


def locate_data_loss(data_dir, split: str | None = None) -> ShardError | None:
  """Finds the first shard/record whose framing or CRC is broken (after a DataLossError)."""
  try:
    manifest = load_manifest(data_dir)
  except InputError:
    return None
  splits = [split] if split else sorted(manifest.get("splits", {}))
  for name in splits:
    for shard in manifest["splits"].get(name, {}).get("shards", []):
      path = os.path.join(str(data_dir), shard["name"])
      if not os.path.isfile(path):
        return ShardError(path, "missing shard listed in the manifest")
      try:
        for _ in iter_records(path, check_crc=True):
          pass
      except ShardError as exc:
        return exc
  return None
