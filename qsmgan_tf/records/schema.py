"""The feature spec of a patch-pair example and the dataset's names: what writer and reader share.

An example is one patch pair whose features sit under namespaced keys (`ARRAYS`, `META`); every
array is stored as its raw little-endian bytes beside its shape and dtype, so a reader can refuse
bytes it would misread (float16 bytes decoded as float32 silently give half as many values).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

FORMAT = "qsmgan_tf.patch_pairs"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tfrecord"
# Beam's shard_name_template for `<prefix>-%05d-of-%05d`.
BEAM_SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
SHARD_PATTERN = re.compile(
    r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord(\.gz)?$")

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


def check_example(arrays: Mapping[str, np.ndarray], spec: Mapping[str, Mapping]) -> None:
  """Raises ValueError unless every array has the shape and dtype the manifest's spec says."""
  for name, want in spec.items():
    got = arrays[name]
    if got.dtype.name != want["dtype"]:
      raise ValueError(f"{name} stored as {got.dtype.name}, manifest says {want['dtype']}")
    if list(got.shape) != list(want["shape"]):
      raise ValueError(f"{name} has shape {list(got.shape)}, manifest says {want['shape']}")
