"""The record format: tf.train.Example bytes as the datasets' digests pin them, and the framing
reader against TensorFlow's writer."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from qsmgan_tf import records
from qsmgan_tf.records import codec

_DTYPES = {"field": "float16", "chi": "float16", "mask": "uint8"}


def _meta():
  return dict(subject_id="brain-00007", kind="brain", voxel_size_mm=(1.0, 1.0, 1.5),
              b0_dir=(0.0, 0.2588, 0.9659), centre=(-3, 40, 50), background=0,
              transform=np.diag([1, -1, 1]), chi_scale=1.1, snr=100.0)


def _pair(rng, p=16, q=8):
  arrays = {
      "field": (rng.normal(size=(p, p, p)) * 0.05).astype(np.float32),
      "chi": (rng.normal(size=(q, q, q)) * 0.1).astype(np.float32),
      "mask": (rng.random((q, q, q)) > 0.5).astype(np.uint8),
  }
  return arrays, _meta()


def _as_tf_example(features):
  """Builds the same example with TensorFlow's own proto classes."""
  ex = tf.train.Example()
  for key, (kind, values) in features.items():
    feature = ex.features.feature[key]
    {"bytes": feature.bytes_list, "float": feature.float_list,
     "int64": feature.int64_list}[kind].value.extend(values)
  return ex


def test_encode_is_byte_identical_to_tf_train_example():
  arrays, meta = _pair(np.random.default_rng(0))
  data = codec.encode(arrays, meta, _DTYPES)
  # Every feature comes back from parse_features: rebuilt independently, the bytes are the same.
  expected = _as_tf_example(codec.parse_features(data)).SerializeToString(deterministic=True)
  assert data == expected
  parsed = tf.train.Example.FromString(data).features.feature
  assert list(parsed["meta/centre"].int64_list.value) == [-3, 40, 50]
  assert parsed["field/dtype"].bytes_list.value[0] == b"float16"
  assert list(parsed["chi/shape"].int64_list.value) == [8, 8, 8]


def _fixed_pair():
  """A pair without random numbers, so that its bytes can be pinned."""
  field = (np.arange(16**3, dtype=np.float32).reshape(16, 16, 16) % 97 - 48) * 0.01
  chi = (np.arange(8**3, dtype=np.float32).reshape(8, 8, 8) % 13 - 6) * 0.02
  mask = (np.arange(8**3).reshape(8, 8, 8) % 3 > 0).astype(np.uint8)
  return {"field": field, "chi": chi, "mask": mask}, _meta()


@pytest.mark.parametrize("dtype, size, sha256", [
    ("float16", 10232, "fbe1535a6195714ad5493c017455cf9c56d108c56f5fa938aec707118d68a4f3"),
    ("float32", 19453, "cdda11961f409f13be4c8d248f14968d8e23b96b3644f7142f90ea34817f61cc"),
])
def test_encode_gives_the_bytes_existing_datasets_hold(dtype, size, sha256):
  # Pinned with the hand-written encoder used before issue 17: manifests written with it list
  # per-record SHA-256s and example digests that must still verify.
  arrays, meta = _fixed_pair()
  data = codec.encode(arrays, meta, {"field": dtype, "chi": dtype, "mask": "uint8"})
  assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha256)


def test_encode_is_deterministic_and_decode_round_trips():
  arrays, meta = _pair(np.random.default_rng(1))
  first = codec.encode(arrays, meta, _DTYPES)
  assert first == codec.encode(dict(arrays), dict(meta), _DTYPES)
  got, got_meta = codec.decode(first)
  np.testing.assert_array_equal(got["field"], arrays["field"].astype(np.float16))
  np.testing.assert_array_equal(got["mask"], arrays["mask"])
  assert got["chi"].dtype == np.float16
  assert got_meta["meta/subject_id"] == "brain-00007"
  np.testing.assert_array_equal(got_meta["meta/transform"], np.diag([1, -1, 1]).ravel())
  np.testing.assert_allclose(got_meta["meta/b0_dir"], meta["b0_dir"], rtol=1e-6)


def test_parse_batch_matches_numpy_and_rejects_wrong_dtype_or_shape():
  arrays, meta = _pair(np.random.default_rng(2))
  data = codec.encode(arrays, meta, _DTYPES)
  spec = {"field": {"shape": [16] * 3, "dtype": "float16"},
          "chi": {"shape": [8] * 3, "dtype": "float16"}, "mask": {"shape": [8] * 3, "dtype": "uint8"}}
  field, chi, mask = codec.parse_batch(tf.constant([data, data]), spec, ("field", "chi", "mask"))
  assert field.shape == (2, 16, 16, 16, 1) and field.dtype == tf.float32
  np.testing.assert_array_equal(field[1, ..., 0], arrays["field"].astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(mask[0, ..., 0], arrays["mask"])
  assert chi.shape == (2, 8, 8, 8, 1)
  # float16 bytes read as float32 would silently give half the values: must fail instead.
  wrong = {**spec, "field": {"shape": [16] * 3, "dtype": "float32"}}
  with pytest.raises(tf.errors.InvalidArgumentError, match="dtype"):
    codec.parse_batch(tf.constant([data]), wrong)
  wrong = {**spec, "chi": {"shape": [4, 16, 8], "dtype": "float16"}}
  with pytest.raises(tf.errors.InvalidArgumentError, match="shape"):
    codec.parse_batch(tf.constant([data]), wrong)


def test_half_bits_decode_exactly_like_numpy_for_every_pattern():
  """All 65,536 float16 bit patterns: zeros of both signs, subnormals, normals, infinities."""
  bits = np.arange(1 << 16, dtype=np.uint16)
  want = bits.view(np.float16).astype(np.float32)
  got = codec.half_bits_to_float32(tf.constant(bits)).numpy()
  assert got.dtype == np.float32
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  finite = ~np.isnan(want)
  np.testing.assert_array_equal(got[finite], want[finite])
  np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(want[finite]))


@pytest.mark.parametrize("arrays_update, meta_update, message", [
    ({"field": np.full((4, 4, 4), 7e4, np.float32)}, {}, "float16 range"),   # overflow
    ({"chi": np.full((2, 2, 2), np.nan, np.float32)}, {}, "non-finite"),   # NaN
    ({}, {"b0_dir": (0.0, 1.0)}, "3 value"),                               # wrong meta length
    ({}, {"snr": None}, "missing meta"),                                   # missing meta
])
def test_encode_refuses_bad_values(arrays_update, meta_update, message):
  arrays, meta = _pair(np.random.default_rng(3))
  arrays.update(arrays_update)
  meta.update(meta_update)
  with pytest.raises(ValueError, match=message):
    codec.encode(arrays, meta, _DTYPES)


def test_framing_reads_tf_record_writer(tmp_path):
  payloads = [b"", b"a", hashlib.sha256(b"x").digest() * 1000]
  path = tmp_path / "tf_writer.tfrecord"
  codec.write_records(path, payloads)  # tf.io.TFRecordWriter
  assert [(o, n) for o, n, _ in records.iter_spans(path)] == [(0, 16), (16, 17), (33, 32016)]
  assert records.count_records(path) == 3
  assert [d for _, d in records.iter_records(path)] == payloads
  scan = records.scan_shard(path, check_crc=True)
  assert scan.num_records == 3 and scan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
  assert scan.record_sha256 == [hashlib.sha256(p).hexdigest() for p in payloads]


def test_framing_errors_name_file_and_record(tmp_path):
  path = tmp_path / "s-00000-of-00001.tfrecord"
  codec.write_records(path, [bytes([i]) * 100 for i in range(3)])
  blob = path.read_bytes()
  path.write_bytes(blob[:-10])  # cut into the last record
  with pytest.raises(records.ShardError, match=r"s-00000-of-00001.tfrecord: record 2: truncated"):
    records.count_records(path)
  flipped = bytearray(blob)
  flipped[116 + 12 + 5] ^= 1  # data byte of record 1 (a framed 100-byte record takes 116)
  path.write_bytes(bytes(flipped))
  assert records.count_records(path) == 3  # lengths intact: only the data CRC can tell
  with pytest.raises(records.ShardError, match="record 1: corrupted record data"):
    list(records.iter_records(path, check_crc=True))


def test_example_set_digest_ignores_order_but_not_content():
  hashes = [hashlib.sha256(bytes([i])).hexdigest() for i in range(5)]
  assert records.example_set_digest(hashes) == records.example_set_digest(hashes[::-1])
  assert records.example_set_digest(hashes) != records.example_set_digest(hashes[:4])


def test_crc_is_compiled():
  # google-crc32c's pure-Python fallback is ~100x slower: verification would crawl.
  assert records.crc_implementation() == "google-crc32c (c)"
  assert records.masked_crc32c(b"123456789") == (
      (((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xA282EAD8) & 0xFFFFFFFF)
