"""Reading the TFRecord framing of a shard, record by record, and saying where it breaks.

A TFRecord file is a sequence of ``uint64 length, uint32 masked CRC-32C of the length, data,
uint32 masked CRC-32C of the data`` (little-endian), as ``tf.io.TFRecordWriter`` and Beam's
TFRecord sinks write it. The CRC-32C itself is ``google_crc32c.value`` (hardware CRC, the
library Beam's sink uses here too); the mask is TFRecord's.

Why read the framing here rather than with a library reader: TensorFlow's ``TFRecordDataset``
raises ``DataLossError`` without naming the file or the record, and Beam's
``tfrecordio._TFRecordUtil.read_record`` (a private name) raises ``ValueError`` with a hex dump
of the whole record and no index. The checks of `qsmgan_tf.records.shards`, ``python -m
data_prep.verify`` and the reader's `shard_errors_named` must name the shard and the record, and
`count_records` must count by seeking over the data, which neither reader can. So this module
keeps the ~100 lines that walk the framing; it writes nothing (writers: Beam's sinks,
``tf.io.TFRecordWriter``). No TensorFlow is imported.
"""

from __future__ import annotations

import os
import struct
from typing import Iterator

import google_crc32c

from qsmgan_tf.errors import InputError

_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


def crc_implementation() -> str:
  """Which CRC-32C `masked_crc32c` uses: 'google-crc32c (c)' or 'google-crc32c (python)'."""
  return f"google-crc32c ({google_crc32c.implementation})"


def masked_crc32c(data) -> int:
  """TFRecord's masked CRC-32C of ``data``."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class ShardError(InputError):
  """A shard that does not match its manifest entry or breaks the TFRecord framing."""

  def __init__(self, path, reason: str, record: int | None = None):
    where = os.path.basename(str(path)) + (f": record {record}" if record is not None else "")
    super().__init__(f"{where}: {reason}")
    self.path = str(path)
    self.record = record
    self.reason = reason


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
