"""Helpers shared by the shard-integrity tests (test_data.py, test_verify.py)."""

from qsmgan_tf import records


def record_past_fingerprint(path):
  """(index, offset) of a record whose data lies outside the fingerprinted first/last 64 KiB."""
  size = path.stat().st_size
  for index, (offset, length, _) in enumerate(records.iter_spans(path)):
    if offset > 1 << 16 and offset + length < size - (1 << 16):
      return index, offset
  raise AssertionError(f"{path.name} is too small for this test ({size} bytes)")
