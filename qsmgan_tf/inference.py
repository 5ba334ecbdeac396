"""Whole-volume QSMGAN inference: a trained generator -> a chi map for a NIfTI volume.

Pipeline of `reconstruct_qsmgan` (every step logged and recorded in the returned info dict):

  1. the model's frame: if the voxel size differs from the contract's trained voxel size, the
     field is resampled onto the model's grid (trilinear, centre-aligned); if B0 is oblique to
     the model's B0 axis, the field is rotated (in mm) so B0 lies along that axis. Both are
     undone on the network output. Nothing assumes an axial acquisition silently;
  2. the network, by default in the model's graph (`network_volume_tf`): ONE fully
     convolutional pass over the mask's bounding box (`volume_pass_tf`: same accuracy as
     overlapping tiles and several times faster, measured) while its input has at most
     ``contract['inference']['max_single_pass_voxels']`` voxels (`TILING_DEFAULTS`: ~12 GB
     in float32 for the paper preset), beyond that overlapping Gaussian-blended tiles of the
     same region in a `tf.while_loop` (`volume_tiles_tf`), chosen per input by `tf.cond`.
     ``inference='sliding_window'`` tiles on the client instead, patch by patch, the least
     memory (`sliding_window`, MONAI vocabulary: ``roi_size`` = output patch, ``overlap``,
     ``mode='gaussian'|'constant'``, ``sigma_scale``, ``sw_batch_size``, ``progress``). Both
     tilings step on the OUTPUT grid, blend only the output region and keep tiles on the
     single pass's pooling grid;
  3. data consistency on the ORIGINAL grid with the TRUE B0 direction (`refine`): a few CG
     iterations of ``min ||M(D chi - field)||^2 + mu ||chi - chi_net||^2`` started at the
     network output, with the defaults the model's contract records.

The same graph functions serve the SavedModel: `make_predict_volume_fn` (network pass +
refinement + residuals, the ``predict_volume`` signature) and `make_refine_fn` (the ``refine``
signature), so a local run on a SavedModel and TF Serving give the same numbers. The in-graph
``predict_volume`` does not resample or rotate: clients with oblique or anisotropic data use
`reconstruct_qsmgan`, which does those steps around the network call.

Example:
  chi_ppm, info = inference.reconstruct_qsmgan(field_ppm, mask, (1, 1, 1), (0, 0, 1),
                                               model="saved_models/qsmgan/7")
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np
import scipy.ndimage
import tensorflow as tf
from absl import logging

from qsmgan_tf import physics
from qsmgan_tf import physics_tf
from qsmgan_tf import refine as refine_lib
from qsmgan_tf import serving
from qsmgan_tf.errors import InputError

INFERENCE_MODES = ("single", "sliding_window")
BLEND_MODES = ("gaussian", "constant")
PRECISIONS = ("float32", "bfloat16")
DEFAULT_SIGMA_SCALE = 0.125
"""Gaussian blending: sigma = sigma_scale * roi_size per axis (MONAI's default)."""
ROTATE_MIN_DEG = 1.0
"""B0 closer than this to the model's axis is not rotated (the refinement uses the true B0)."""
VOXEL_RTOL = 0.01
"""Voxel sizes within 1 % of the model's are not resampled."""
IMPORTANCE_FLOOR = 1e-3
"""Smallest blending weight, relative to the peak (MONAI's guard against dividing by ~0)."""
# Peak memory of the paper preset's single pass (float32, BUILD.md "Speed and memory") grows
# ~linearly with the network's input voxels (the mask's box + 2 x 8 margin, rounded up to 16):
# 3.10 GB at 160x192x160 (4.92 M) and 5.22 GB at 240x240x160 (9.22 M), i.e. ~0.49 GB per
# million input voxels + ~0.68 GB. The budget, 23 M input voxels (0.68 + 0.49 x 23 = ~12 GB),
# keeps 256x256x160 whole (9.2 M for the benchmark's brain; 272x272x176 = 13.0 M, ~7 GB, if
# the mask filled the field of view) on a 24 GB machine and tiles anything that would need
# more than ~12 GB. A tile of 176 output voxels reads 192^3 = 7.1 M voxels (~4.2 GB); with
# overlap 0.25 the step is 128 (176 x 0.75 rounded down to 2**depth). Narrower models
# (cpu_small) and bfloat16 need less per voxel: for them the budget is conservative.
TILING_DEFAULTS = {"max_single_pass_voxels": 23_000_000, "tile_output_voxels": 176,
                   "tile_overlap": 0.25, "field_reference_std_ppm": 0.0}
"""The network pass (recorded in the model contract as ``contract['inference']``): the
network's input voxels above which `network_volume_tf` tiles, the tile's output edge, the
requested overlap between neighbouring tiles, and the field amplitude the network runs at
(`field_amplitude_scale`; 0 = the field as given, as in contracts written before the key)."""
# The amplitude scale is kept within [1/AMPLITUDE_SCALE_LIMIT, AMPLITUDE_SCALE_LIMIT]: a field
# far off the training amplitude is more likely a unit or masking error than anatomy, and an
# empty or constant field has no amplitude to match.
AMPLITUDE_SCALE_LIMIT = 4.0
# 1.4826 x the median absolute deviation is the standard deviation of a Gaussian; the median
# is not moved by the few veins, haemorrhages or edge voxels that dominate a field's plain std.
_STD_PER_MAD = 1.4826


# --------------------------------------------------------------------------------------
# Contract
# --------------------------------------------------------------------------------------
def generator_config(contract: dict[str, Any]) -> dict[str, Any]:
  """The GeneratorConfig dict inside a contract (``generator``/``generator_config``/top).

  Raises:
    InputError: the contract describes no generator (no ``depth`` and patch sizes).
  """
  for place in (contract.get("generator"), contract.get("generator_config"),
                contract.get("config"), contract):
    if isinstance(place, dict) and {"depth", "input_patch", "output_patch"} <= set(place):
      return place
  raise InputError("model contract has no generator config (depth, input_patch, output_patch)")


def network_geometry(contract: dict[str, Any]) -> dict[str, int]:
  """Crop margin, size multiple and patch sizes of the contract's generator, voxels."""
  config = generator_config(contract)
  size_in, size_out = int(config["input_patch"]), int(config["output_patch"])
  return {"margin": (size_in - size_out) // 2, "multiple": 2 ** int(config["depth"]),
          "input_patch": size_in, "output_patch": size_out}


def model_voxel_sizes(contract: dict[str, Any]) -> list[tuple[float, float, float]]:
  """Voxel sizes (mm) the model was trained on; [] when the contract does not say."""
  for key in ("voxel_sizes_mm", "trained_voxel_sizes_mm", "voxel_size_mm",
              "trained_voxel_size_mm"):
    value = contract.get(key)
    if value is None and isinstance(contract.get("training"), dict):
      value = contract["training"].get(key)
    if value is None:
      continue
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 3:
      return [tuple(float(v) for v in arr)]
    if arr.ndim == 2 and arr.shape[1] == 3:
      return [tuple(float(v) for v in row) for row in arr]
  return []


def model_b0_axis(contract: dict[str, Any]) -> np.ndarray:
  """The B0 direction (voxel frame) the model was trained with; default (0, 0, 1)."""
  value = contract.get("b0_dir", contract.get("trained_b0_dir", (0.0, 0.0, 1.0)))
  arr = np.asarray(value, dtype=np.float64)
  if arr.ndim == 2:  # several training directions: the first is the reference axis
    arr = arr[0]
  return physics.unit_vector(arr)


def model_b0_tolerance_deg(contract: dict[str, Any]) -> float:
  """Largest B0 tilt (degrees from `model_b0_axis`) among the directions the model was
  trained on (``b0_dirs_trained``); below it the field is not rotated. 0 when not stated."""
  trained = contract.get("b0_dirs_trained")
  if not trained:
    return 0.0
  axis = model_b0_axis(contract)
  dirs = np.asarray(trained, dtype=np.float64).reshape(-1, 3)
  dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
  return float(np.degrees(np.arccos(np.clip(np.abs(dirs @ axis), 0.0, 1.0))).max())


def tiling_params(contract: dict[str, Any] | None = None) -> dict[str, Any]:
  """In-graph tiling parameters: ``contract['inference']``, else `TILING_DEFAULTS`.

  Contracts written before the key existed get the defaults.

  Returns:
    dict with exactly the keys of `TILING_DEFAULTS`, typed like them.

  Raises:
    InputError: a value out of range.
  """
  out = dict(TILING_DEFAULTS)
  for key, value in ((contract or {}).get("inference") or {}).items():
    if key in out and value is not None:
      out[key] = type(TILING_DEFAULTS[key])(value)
  if out["field_reference_std_ppm"] < 0:
    raise InputError(f"contract inference: field_reference_std_ppm must be >= 0, got "
                     f"{out['field_reference_std_ppm']}")
  if out["max_single_pass_voxels"] < 1 or out["tile_output_voxels"] < 1:
    raise InputError(f"contract inference: max_single_pass_voxels and tile_output_voxels must "
                     f"be >= 1, got {out}")
  if not 0.0 <= out["tile_overlap"] < 1.0:
    raise InputError(f"contract inference: tile_overlap must be in [0, 1), got "
                     f"{out['tile_overlap']}")
  return out


def tile_geometry(contract: dict[str, Any]) -> dict[str, int]:
  """`tiling_params` fitted to the contract's network, voxels.

  The tile edge is rounded down so that tile + 2 x crop margin is divisible by 2**depth (at
  least one such size); the step is `window_step` of it.

  Returns:
    ``max_single_pass_voxels``, ``tile_output_voxels`` and ``tile_step_voxels``.
  """
  geo = network_geometry(contract)
  params = tiling_params(contract)
  margin, multiple = geo["margin"], geo["multiple"]
  tile = max((params["tile_output_voxels"] + 2 * margin) // multiple * multiple,
             _padded_size(1, margin, multiple)) - 2 * margin
  if tile != params["tile_output_voxels"]:
    logging.warning("tile of %d output voxels does not fit the network's %d-voxel pooling "
                    "grid: using %d", params["tile_output_voxels"], multiple, tile)
  return {"max_single_pass_voxels": params["max_single_pass_voxels"],
          "tile_output_voxels": tile,
          "tile_step_voxels": window_step(tile, params["tile_overlap"], multiple)}


def network_pass_plan(mask: np.ndarray, contract: dict[str, Any]) -> dict[str, Any]:
  """What `network_volume_tf` does with this mask: one pass, or how many in-graph tiles.

  Returns:
    ``{"pass": "single"|"tiles", "input_voxels": ...}`` plus ``tiles``, ``tile_output_voxels``
    and ``tile_step_voxels`` when it tiles.
  """
  geo = network_geometry(contract)
  tiles = tile_geometry(contract)
  n_in = [_padded_size(sl.stop - sl.start, geo["margin"], geo["multiple"])
          for sl in physics.bounding_box(mask)]
  voxels = math.prod(n_in)
  if voxels <= tiles["max_single_pass_voxels"]:
    return {"pass": "single", "input_voxels": voxels}
  counts = [_tile_count(n - 2 * geo["margin"],
                        min(n - 2 * geo["margin"], tiles["tile_output_voxels"]),
                        tiles["tile_step_voxels"]) for n in n_in]
  return {"pass": "tiles", "input_voxels": voxels, "tiles": math.prod(counts),
          "tile_output_voxels": tiles["tile_output_voxels"],
          "tile_step_voxels": tiles["tile_step_voxels"]}


# --------------------------------------------------------------------------------------
# Graph functions (dynamic shapes; used by the SavedModel signatures)
# --------------------------------------------------------------------------------------
def _padded_size(size, margin: int, multiple: int):
  """Network input edge for ``size`` output voxels: size + 2 margin rounded up to multiple.

  Plain integer arithmetic: the same formula for Python ints (plans) and int32 tensors.
  """
  return (size + 2 * margin + multiple - 1) // multiple * multiple


def _tile_count(region_out, tile_out, step):
  """Tiles along one axis: starts 0, step, 2 step, ... with the last one flush with the end."""
  return (region_out - tile_out + step - 1) // step + 1


def _network_region_tf(field_ppm, mask, margin: int, multiple: int):
  """The single pass's region: its input and where its output goes.

  The output region is the mask's bounding box grown so that output + 2 * ``margin`` is
  divisible by ``multiple``; the input is that region plus ``margin`` voxels a side of the
  (masked) field, zero-padded where it leaves the volume.

  Returns:
    ``(x [n_out + 2 margin], mask01, volume shape, out_begin [3], n_out [3])``.
  """
  field = tf.convert_to_tensor(field_ppm, tf.float32)
  m = tf.cast(tf.cast(tf.convert_to_tensor(mask), tf.float32) > 0.5, tf.float32)
  shape = tf.shape(field)
  begin, size = physics_tf.bounding_box(m)
  n_in = _padded_size(size, margin, multiple)
  n_out = n_in - 2 * margin
  out_begin = begin - (n_out - size) // 2
  in_begin = out_begin - margin
  pad_lo = tf.maximum(-in_begin, 0)
  pad_hi = tf.maximum(in_begin + n_in - shape, 0)
  padded = tf.pad(field * m, tf.stack([pad_lo, pad_hi], axis=1))
  return tf.slice(padded, in_begin + pad_lo, n_in), m, shape, out_begin, n_out


def _place_output_tf(y, m, shape, out_begin, n_out):
  """The region's output [n_out] put back into the volume, 0 outside the mask."""
  lo = tf.maximum(out_begin, 0)
  hi = tf.minimum(out_begin + n_out, shape)
  y = tf.slice(y, lo - out_begin, hi - lo)
  return tf.pad(y, tf.stack([lo, shape - hi], axis=1)) * m


def _run_generator_tf(generator, x):
  """``generator`` on one [X, Y, Z] input -> float32 [X-2c, Y-2c, Z-2c]."""
  return tf.cast(generator(x[tf.newaxis, ..., tf.newaxis], training=False)[0, ..., 0],
                 tf.float32)


def _importance_map_tf(profiles, size):
  """`importance_map` in the graph from its per-axis factors, each cropped centrally to
  ``size[axis]`` voxels (a tile clipped to a small region is that axis's only tile, so the
  crop only has to be positive). Three 1-D constants, not a tile-sized one, in the graph."""
  parts = []
  for axis, profile in enumerate(profiles):
    full = len(profile)
    parts.append(tf.slice(tf.constant(profile, tf.float32), [(full - size[axis]) // 2],
                          [size[axis]]))
  w = parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]
  return tf.maximum(w / tf.reduce_max(w), IMPORTANCE_FLOOR)


def _tiles_tf(generator, x, n_out, margin: int, tile_out: int, step: int, mode: str,
              sigma_scale: float):
  """Overlapping tiles over a region input ``x`` [n_out + 2 margin] -> blended [n_out].

  Tiles of ``tile_out`` output voxels (clipped to the region on small axes) start at
  multiples of ``step`` from the region's start, the last one flush with its end; every start
  is a multiple of the pooling size, so a tile sees the single pass's pooling grid.
  """
  profiles = _importance_profiles((tile_out,) * 3, mode, sigma_scale)
  tile = tf.minimum(n_out, tile_out)
  counts = _tile_count(n_out, tile, step)
  weights = _importance_map_tf(profiles, tile)  # built once, outside the loop

  def body(i, acc, wsum):
    start = tf.minimum(tf.unravel_index(i, counts) * step, n_out - tile)
    y = _run_generator_tf(generator, tf.slice(x, start, tile + 2 * margin))
    # Padding each weighted tile to the region costs two region-sized adds per tile: small
    # next to the tile's convolutions, and simpler than scatters.
    pads = tf.stack([start, n_out - start - tile], axis=1)
    return i + 1, acc + tf.pad(y * weights, pads), wsum + tf.pad(weights, pads)

  zeros = tf.zeros(n_out, tf.float32)
  # parallel_iterations=1: tiles do not depend on each other, and the executor would
  # otherwise run several at once, multiplying the peak memory tiling exists to bound.
  _, acc, wsum = tf.while_loop(lambda i, acc, wsum: i < tf.reduce_prod(counts), body,
                               (tf.constant(0, tf.int32), zeros, zeros),
                               parallel_iterations=1)
  return acc / tf.maximum(wsum, 1e-12)


def volume_pass_tf(generator, field_ppm, mask, margin: int, multiple: int):
  """One fully convolutional pass of ``generator`` over the mask's bounding box.

  The output region is the mask's bounding box grown so that output + 2 * ``margin`` is
  divisible by ``multiple``; the input is that region plus ``margin`` voxels a side of the
  (masked) field, zero-padded where it leaves the volume.

  Args:
    generator: Keras model ``[B, X, Y, Z, 1]`` field ppm -> ``[B, X-2c, Y-2c, Z-2c, 1]`` chi ppm.
    field_ppm: local field, ppm of B0, float32 [X, Y, Z] (dynamic shape).
    mask: brain mask [X, Y, Z] (> 0.5 inside; must not be empty).
    margin: the generator's crop margin c, voxels (Python int).
    multiple: the generator's input size multiple, 2**depth (Python int).

  Returns:
    chi_ppm float32 [X, Y, Z], 0 outside the mask.
  """
  x, m, shape, out_begin, n_out = _network_region_tf(field_ppm, mask, margin, multiple)
  return _place_output_tf(_run_generator_tf(generator, x), m, shape, out_begin, n_out)


def volume_tiles_tf(generator, field_ppm, mask, margin: int, multiple: int, tile_out: int,
                    step: int, mode: str = "gaussian",
                    sigma_scale: float = DEFAULT_SIGMA_SCALE):
  """`volume_pass_tf`'s output region covered by overlapping tiles, in one graph.

  A `tf.while_loop` runs ``generator`` on one tile at a time (the tile count depends on the
  input) and blends the tiles' outputs with `importance_map`'s weights: the bounded-memory
  twin of the single pass, as `sliding_window` is on the client. Tiles read the single pass's
  input and sit on its pooling grid, so a translation-equivariant network gives the single
  pass's result away from tile borders.

  Args:
    generator, field_ppm, mask, margin, multiple: as in `volume_pass_tf`.
    tile_out: output tile edge, voxels (Python int; ``tile_out + 2 * margin`` divisible by
      ``multiple``).
    step: distance between tile starts, voxels (Python int, a multiple of ``multiple``, at
      most ``tile_out``).
    mode: 'gaussian' or 'constant' blending.
    sigma_scale: Gaussian sigma as a fraction of ``tile_out``.

  Returns:
    chi_ppm float32 [X, Y, Z], 0 outside the mask.

  Raises:
    InputError: a tile or step off the pooling grid (at trace time).
  """
  _check_tiles(margin, multiple, tile_out, step)
  x, m, shape, out_begin, n_out = _network_region_tf(field_ppm, mask, margin, multiple)
  y = _tiles_tf(generator, x, n_out, margin, tile_out, step, mode, sigma_scale)
  return _place_output_tf(y, m, shape, out_begin, n_out)


def robust_std(values: np.ndarray) -> float:
  """1.4826 x the median absolute deviation from the median (the std of a Gaussian)."""
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    return 0.0
  return float(_STD_PER_MAD * np.median(np.abs(values - np.median(values))))


def field_amplitude_scale(field_ppm: np.ndarray, mask: np.ndarray,
                          reference_std_ppm: float) -> float:
  """The factor that brings a field to the amplitude the network was trained at.

  The dipole inversion is linear, a trained network is not: ours under-estimates contrast more
  the stronger the field (BUILD.md, "The network at its training amplitude"). Running it on ``field * s`` and
  dividing its output by ``s`` makes the network pass exactly scale-equivariant, with ``s``
  the reference over the field's `robust_std` inside the mask, kept within
  [1 / `AMPLITUDE_SCALE_LIMIT`, `AMPLITUDE_SCALE_LIMIT`]. `field_amplitude_scale_tf` is the
  in-graph twin.

  Args:
    field_ppm: local field, ppm of B0.
    mask: where the amplitude is measured (> 0.5 inside).
    reference_std_ppm: the training fields' typical robust std, ppm (the contract's
      ``inference.field_reference_std_ppm``); 0 = no scaling.

  Returns:
    ``s`` (1.0 when ``reference_std_ppm`` is 0 or the field has no spread in the mask).
  """
  if reference_std_ppm <= 0:
    return 1.0
  std = robust_std(np.asarray(field_ppm)[np.asarray(mask) > 0.5])
  if not std > 0:
    return 1.0
  return float(np.clip(reference_std_ppm / std, 1.0 / AMPLITUDE_SCALE_LIMIT,
                       AMPLITUDE_SCALE_LIMIT))


def _median_tf(values):
  """Median of a non-empty 1-D tensor (the mean of the two middle values for an even count)."""
  ordered = tf.sort(values)
  n = tf.size(ordered)
  return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])


def field_amplitude_scale_tf(field_ppm, mask, reference_std_ppm: float):
  """`field_amplitude_scale` in the graph (``reference_std_ppm`` a Python float > 0)."""
  values = tf.boolean_mask(tf.convert_to_tensor(field_ppm, tf.float32),
                           tf.cast(tf.convert_to_tensor(mask), tf.float32) > 0.5)
  std = tf.cond(tf.size(values) > 0,
                lambda: _STD_PER_MAD * _median_tf(tf.abs(values - _median_tf(values))),
                lambda: tf.constant(0.0, tf.float32))
  limit = tf.constant(AMPLITUDE_SCALE_LIMIT, tf.float32)
  return tf.where(std > 0,
                  tf.clip_by_value(reference_std_ppm / tf.maximum(std, 1e-30), 1.0 / limit,
                                   limit),
                  tf.constant(1.0, tf.float32))


def network_volume_tf(generator, field_ppm, mask, margin: int, multiple: int,
                      max_single_pass_voxels: int, tile_out: int, step: int,
                      field_reference_std_ppm: float = 0.0):
  """The network over a whole volume: `volume_pass_tf` when its input region has at most
  ``max_single_pass_voxels`` voxels, else `volume_tiles_tf` (Gaussian blending); chosen in
  the graph per input (`tf.cond`), so one signature serves any volume size.

  Args:
    generator, field_ppm, mask, margin, multiple: as in `volume_pass_tf`.
    max_single_pass_voxels: largest input region (voxels, margins included) run in one pass.
    tile_out, step: as in `volume_tiles_tf` (`tile_geometry` of the model's contract).
    field_reference_std_ppm: > 0: the network runs on the field brought to this amplitude
      and its output is scaled back (`field_amplitude_scale_tf`); 0: on the field as given.

  Returns:
    chi_ppm float32 [X, Y, Z], 0 outside the mask.

  Raises:
    InputError: a tile or step off the pooling grid (at trace time).
  """
  _check_tiles(margin, multiple, tile_out, step)
  scale = None
  if field_reference_std_ppm > 0:
    scale = field_amplitude_scale_tf(field_ppm, mask, float(field_reference_std_ppm))
    field_ppm = tf.convert_to_tensor(field_ppm, tf.float32) * scale
  x, m, shape, out_begin, n_out = _network_region_tf(field_ppm, mask, margin, multiple)
  # int64: a large volume's voxel count overflows int32.
  voxels = tf.reduce_prod(tf.cast(tf.shape(x), tf.int64))
  y = tf.cond(voxels <= max_single_pass_voxels,
              lambda: _run_generator_tf(generator, x),
              lambda: _tiles_tf(generator, x, n_out, margin, tile_out, step, "gaussian",
                                DEFAULT_SIGMA_SCALE))
  chi = _place_output_tf(y, m, shape, out_begin, n_out)
  return chi if scale is None else chi / scale


def _check_tiles(margin: int, multiple: int, tile_out: int, step: int) -> None:
  if tile_out < 1 or (tile_out + 2 * margin) % multiple:
    raise InputError(f"tile of {tile_out} output voxels: tile + 2 x crop margin {margin} must "
                     f"be divisible by {multiple}")
  if step < 1 or step % multiple or step > tile_out:
    raise InputError(f"tile step {step} must be a positive multiple of {multiple}, at most "
                     f"the tile ({tile_out})")


def _network_args(contract: dict[str, Any]) -> dict[str, int]:
  """`network_volume_tf`'s keyword arguments for a contract's model."""
  geo = network_geometry(contract)
  tiles = tile_geometry(contract)
  return {"margin": geo["margin"], "multiple": geo["multiple"],
          "max_single_pass_voxels": tiles["max_single_pass_voxels"],
          "tile_out": tiles["tile_output_voxels"], "step": tiles["tile_step_voxels"],
          "field_reference_std_ppm": tiling_params(contract)["field_reference_std_ppm"]}


def _volume_specs():
  return [tf.TensorSpec([None, None, None], tf.float32, name="field_ppm"),
          tf.TensorSpec([None, None, None], tf.float32, name="mask"),
          tf.TensorSpec([3], tf.float32, name="b0_dir"),
          tf.TensorSpec([3], tf.float32, name="voxel_size_mm")]


def make_network_volume_fn(generator, contract: dict[str, Any]):
  """tf.function ``(field_ppm [X,Y,Z], mask [X,Y,Z]) -> {'chi_ppm'}``: the network alone
  (`network_volume_tf`: one pass, or in-graph tiles beyond the contract's memory budget)."""
  args = _network_args(contract)

  @tf.function(input_signature=_volume_specs()[:2])
  def network_volume(field_ppm, mask):
    return {"chi_ppm": network_volume_tf(generator, field_ppm, mask, **args)}

  return network_volume


def make_predict_volume_fn(generator, contract: dict[str, Any], with_magnitude: bool = False):
  """The ``predict_volume`` signature: network pass, refinement and residuals in one graph.

  Args:
    generator: the Keras generator.
    contract: the model contract (generator config; ``refine`` and ``inference`` defaults).
    with_magnitude: the ``predict_volume_magnitude`` variant: one more input, ``magnitude
      [X,Y,Z]``, used by the refinement as ``contract['refine']`` says (`refine` module);
      without it the contract's magnitude uses are off.

  Returns:
    tf.function with inputs ``field_ppm [X,Y,Z]`` (ppm of B0), ``mask [X,Y,Z]`` (0/1),
    ``b0_dir [3]`` (voxel frame), ``voxel_size_mm [3]`` and outputs ``chi_ppm`` (refined),
    ``chi_net_ppm`` (network alone: `network_volume_tf`), ``tv_weight_used`` (the L1 weight
    after the noise scale and the L-curve, `refine.refine_tf`), ``residual_before`` /
    ``residual_after`` (relative, mask-demeaned field residuals of chi_net and chi). The
    field must already be on the model's grid and orientation for the network part; the
    refinement uses ``b0_dir``.
  """
  args = _network_args(contract)
  params = refine_lib.resolve_params(contract)
  if not with_magnitude:
    params = refine_lib.without_magnitude(params)

  def predict(field_ppm, mask, b0_dir, voxel_size_mm, magnitude=None):
    chi_net = network_volume_tf(generator, field_ppm, mask, **args)
    chi, tv_weight = refine_lib.refine_tf(chi_net, field_ppm, mask, b0_dir, voxel_size_mm,
                                          **params, magnitude=magnitude, return_weight=True)
    return {
        "chi_ppm": chi,
        "chi_net_ppm": chi_net,
        "tv_weight_used": tv_weight,
        "residual_before": refine_lib.field_residual_tf(chi_net, field_ppm, mask, b0_dir,
                                                        voxel_size_mm),
        "residual_after": refine_lib.field_residual_tf(chi, field_ppm, mask, b0_dir,
                                                       voxel_size_mm),
    }

  def predict_volume(field_ppm, mask, b0_dir, voxel_size_mm):
    return predict(field_ppm, mask, b0_dir, voxel_size_mm)

  def predict_volume_magnitude(field_ppm, mask, b0_dir, voxel_size_mm, magnitude):
    return predict(field_ppm, mask, b0_dir, voxel_size_mm, magnitude)

  if with_magnitude:
    return tf.function(predict_volume_magnitude, input_signature=_volume_specs() + [
        tf.TensorSpec([None, None, None], tf.float32, name="magnitude")])
  return tf.function(predict_volume, input_signature=_volume_specs())


def make_refine_fn(contract: dict[str, Any]):
  """The ``refine`` signature: CG refinement with the contract's defaults.

  Returns:
    tf.function with inputs ``chi_net_ppm [X,Y,Z]``, ``field_ppm``, ``mask``, ``b0_dir [3]``,
    ``voxel_size_mm [3]`` and outputs ``chi_ppm``, ``tv_weight_used`` (as ``predict_volume``),
    ``residual_before``, ``residual_after``.
  """
  params = refine_lib.without_magnitude(refine_lib.resolve_params(contract))

  @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32,
                                              name="chi_net_ppm")] + _volume_specs())
  def refine(chi_net_ppm, field_ppm, mask, b0_dir, voxel_size_mm):
    chi, tv_weight = refine_lib.refine_tf(chi_net_ppm, field_ppm, mask, b0_dir, voxel_size_mm,
                                          **params, return_weight=True)
    return {
        "chi_ppm": chi,
        "tv_weight_used": tv_weight,
        "residual_before": refine_lib.field_residual_tf(chi_net_ppm * mask, field_ppm, mask,
                                                        b0_dir, voxel_size_mm),
        "residual_after": refine_lib.field_residual_tf(chi, field_ppm, mask, b0_dir,
                                                       voxel_size_mm),
    }

  return refine


# Unnamed specs for the local (non-exported) traced helpers: chi, field, mask, b0, voxel.
_LOCAL_SPECS = [tf.TensorSpec([None, None, None], tf.float32)] * 3 + [
    tf.TensorSpec([3], tf.float32)] * 2


@functools.cache
def traced_refine_tf():
  """`refine_lib.refine_tf` traced once, its parameters and magnitude as tensors (no retrace
  per value); returns ``(chi_ppm, tv_weight_used)``."""
  scalars = [tf.TensorSpec([], tf.float32 if isinstance(v, float) else tf.int32)
             for v in refine_lib.DEFAULTS.values()]
  return tf.function(functools.partial(refine_lib.refine_tf, return_weight=True),
                     input_signature=_LOCAL_SPECS + scalars + [
                         tf.TensorSpec([None, None, None], tf.float32)])


def run_refine_tf(chi_net, field_ppm, mask, b0_dir, voxel_size_mm,
                  params: dict[str, Any], magnitude=None, return_weight: bool = False):
  """`traced_refine_tf` on NumPy inputs with a `refine.resolve_params` dict and an optional
  magnitude (without one, the parameters' magnitude uses are switched off); chi_ppm, or
  ``(chi_ppm, tv_weight_used)`` with ``return_weight``."""
  if magnitude is None:
    params = refine_lib.without_magnitude(params)
    magnitude = mask
  scalars = {k: np.asarray(v, np.float32 if isinstance(refine_lib.DEFAULTS[k], float) else
                           np.int32) for k, v in params.items()}
  chi, weight = traced_refine_tf()(
      np.asarray(chi_net, np.float32), np.asarray(field_ppm, np.float32),
      np.asarray(mask, np.float32), np.asarray(b0_dir, np.float32),
      np.asarray(voxel_size_mm, np.float32), **scalars,
      magnitude=np.asarray(magnitude, np.float32))
  return (chi.numpy(), float(weight)) if return_weight else chi.numpy()


@functools.cache
def _residual_tf_fn():
  """`refine_lib.field_residual_tf` traced once (faster than the SciPy version)."""
  return tf.function(refine_lib.field_residual_tf, input_signature=_LOCAL_SPECS)


# --------------------------------------------------------------------------------------
# Sliding window (bounded memory)
# --------------------------------------------------------------------------------------
def _importance_profiles(roi_size: Sequence[int], mode: str,
                         sigma_scale: float) -> list[np.ndarray]:
  """The per-axis factors of `importance_map` (float64, not normalised)."""
  if mode not in BLEND_MODES:
    raise InputError(f"blend mode must be one of {', '.join(BLEND_MODES)}, got {mode!r}")
  profiles = []
  for n in (int(r) for r in roi_size):
    x = np.arange(n) - (n - 1) / 2.0
    sigma = max(sigma_scale * n, 1e-6)
    profiles.append(np.ones(n) if mode == "constant" else np.exp(-0.5 * (x / sigma) ** 2))
  return profiles


def importance_map(roi_size: Sequence[int], mode: str = "gaussian",
                   sigma_scale: float = DEFAULT_SIGMA_SCALE) -> np.ndarray:
  """Blending weights of one output window: separable Gaussian (max 1) or constant 1.

  The Gaussian's smallest weight is floored at `IMPORTANCE_FLOOR` of its peak (MONAI's guard
  against dividing by ~0 where only window edges overlap). `volume_tiles_tf` builds the same
  weights in the graph from the same factors.
  """
  px, py, pz = _importance_profiles(roi_size, mode, sigma_scale)
  w = px[:, None, None] * py[None, :, None] * pz[None, None, :]
  return np.maximum(w / w.max(), IMPORTANCE_FLOOR).astype(np.float32)


def window_step(roi: int, overlap: float, multiple: int) -> int:
  """Step between windows: ``roi * (1 - overlap)`` rounded down to a multiple of ``multiple``
  (so windows stay on the pooling grid), at least ``multiple``, at most ``roi``."""
  return min(max(multiple, int(roi * (1.0 - overlap)) // multiple * multiple), roi)


def _window_layout(begin: int, size: int, roi: int, step: int, anchor: int, multiple: int):
  """Window starts on one axis: cover [begin, begin + size), starts = anchor + k * multiple."""
  count = max(int(math.ceil(max(size - roi, 0) / step)) + 1, 1)
  extent = (count - 1) * step + roi
  start = begin - (extent - size) // 2
  start = anchor + ((start - anchor) // multiple) * multiple  # round down onto the grid
  while start + (count - 1) * step + roi < begin + size:
    count += 1
  return [start + k * step for k in range(count)]


def single_pass_region(mask: np.ndarray, margin: int, multiple: int):
  """Output-region start (per axis) `volume_pass_tf` uses: the pooling-grid anchor."""
  box = physics.bounding_box(mask)
  out = []
  for sl in box:
    size = sl.stop - sl.start
    n_in = _padded_size(size, margin, multiple)
    out.append(sl.start - (n_in - 2 * margin - size) // 2)
  return out


def sliding_window(field_ppm: np.ndarray, mask: np.ndarray,
                   patch_fn: Callable[[np.ndarray], np.ndarray], *, roi_size: int, margin: int,
                   multiple: int = 1, overlap: float = 0.25, mode: str = "gaussian",
                   sigma_scale: float = DEFAULT_SIGMA_SCALE, sw_batch_size: int = 1,
                   progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
  """Overlapping-window inference on the OUTPUT grid, blending only the output region.

  Windows of ``roi_size`` output voxels cover the mask's bounding box; each reads
  ``roi_size + 2 * margin`` input voxels (the masked field, zero outside the volume). The step
  is ``roi_size * (1 - overlap)`` rounded DOWN to a multiple of ``multiple`` (2**depth), and
  windows sit on the single pass's pooling grid, so a translation-equivariant network gives
  the single-pass result away from window borders.

  Args:
    field_ppm: local field, ppm of B0, [X, Y, Z].
    mask: brain mask [X, Y, Z].
    patch_fn: ``[B, in, in, in, 1]`` float32 field ppm -> ``[B, roi, roi, roi, 1]`` chi ppm.
    roi_size: output window edge, voxels (``roi_size + 2 * margin`` divisible by multiple).
    margin: the network's crop margin, voxels.
    multiple: the network's size multiple (2**depth).
    overlap: requested fraction of overlap between neighbouring windows, in [0, 1).
    mode: 'gaussian' or 'constant' blending.
    sigma_scale: Gaussian sigma as a fraction of roi_size.
    sw_batch_size: windows per patch_fn call.
    progress: show a tqdm progress bar.

  Returns:
    ``(chi_ppm [X, Y, Z] float32 zero outside the mask, info)`` with the window count, step
    and effective overlap.

  Raises:
    InputError: bad roi_size, overlap, mode or batch size.
  """
  roi = int(roi_size)
  if roi < 1 or (roi + 2 * margin) % multiple:
    raise InputError(f"roi_size {roi} + 2 x crop margin {margin} must be divisible by "
                     f"{multiple}")
  if not 0.0 <= overlap < 1.0:
    raise InputError(f"overlap must be in [0, 1), got {overlap}")
  if int(sw_batch_size) < 1:
    raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
  weights = importance_map((roi,) * 3, mode, sigma_scale)
  mask = np.asarray(mask) > 0.5
  field = np.where(mask, np.asarray(field_ppm, np.float32), np.float32(0.0))
  step = window_step(roi, overlap, multiple)
  box = physics.bounding_box(mask)
  anchors = single_pass_region(mask, margin, multiple)
  starts = [_window_layout(sl.start, sl.stop - sl.start, roi, step, a, multiple)
            for sl, a in zip(box, anchors)]
  lo = [s[0] for s in starts]
  hi = [s[-1] + roi for s in starts]
  ext = [h - l for l, h in zip(lo, hi)]
  # The canvas holds the input for every window: region [lo - margin, hi + margin).
  canvas = np.zeros([e + 2 * margin for e in ext], np.float32)
  src = tuple(slice(max(l - margin, 0), min(h + margin, n))
              for l, h, n in zip(lo, hi, field.shape))
  dst = tuple(slice(s.start - (l - margin), s.stop - (l - margin)) for s, l in zip(src, lo))
  canvas[dst] = field[src]
  acc = np.zeros(ext, np.float32)
  wsum = np.zeros(ext, np.float32)
  corners = [(i - lo[0], j - lo[1], k - lo[2])
             for i in starts[0] for j in starts[1] for k in starts[2]]
  size_in = roi + 2 * margin
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(corners), desc="qsmgan windows", unit="win", leave=False)
  try:
    for b in range(0, len(corners), int(sw_batch_size)):
      batch = corners[b:b + int(sw_batch_size)]
      x = np.stack([canvas[i:i + size_in, j:j + size_in, k:k + size_in] for i, j, k in batch])
      y = np.asarray(patch_fn(x[..., None]), np.float32)
      if y.shape != (len(batch), roi, roi, roi, 1):
        raise InputError(f"the model maps a {size_in}^3 window to {y.shape[1:]}, expected "
                         f"{roi}^3: roi_size does not match the model's crop margin")
      for (i, j, k), yy in zip(batch, y[..., 0]):
        acc[i:i + roi, j:j + roi, k:k + roi] += yy * weights
        wsum[i:i + roi, j:j + roi, k:k + roi] += weights
      if bar is not None:
        bar.update(len(batch))
  finally:
    if bar is not None:
      bar.close()
  blended = acc / np.maximum(wsum, 1e-12)
  out = np.zeros(field.shape, np.float32)
  src = tuple(slice(max(l, 0), min(h, n)) for l, h, n in zip(lo, hi, field.shape))
  out[src] = blended[tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))]
  out *= mask
  info = {"windows": len(corners), "roi_size": roi, "step": step,
          "overlap_effective": round(1.0 - step / roi, 4), "mode": mode,
          "sigma_scale": sigma_scale, "sw_batch_size": int(sw_batch_size)}
  return out, info


# --------------------------------------------------------------------------------------
# Geometry: resampling and rotation into the model's frame
# --------------------------------------------------------------------------------------
def resample(volume: np.ndarray, voxel_size_mm: Sequence[float],
             new_voxel_size_mm: Sequence[float], shape: Sequence[int] | None = None,
             order: int = 1) -> np.ndarray:
  """Resamples a volume onto a grid of another voxel size, centres aligned (in mm).

  Args:
    volume: 3D array on a grid of ``voxel_size_mm``.
    voxel_size_mm: its voxel size, mm.
    new_voxel_size_mm: the target voxel size, mm.
    shape: target shape; default ``round(n * voxel / new_voxel)`` per axis.
    order: spline order (1 trilinear; 0 nearest for labels).

  Returns:
    float32 volume of ``shape`` (edges extended by the nearest value).
  """
  old = np.asarray(voxel_size_mm, np.float64)
  new = np.asarray(new_voxel_size_mm, np.float64)
  n = np.asarray(volume.shape, np.float64)
  if shape is None:
    shape = tuple(int(max(round(v), 1)) for v in n * old / new)
  scale = new / old
  offset = (n - 1) / 2.0 - scale * (np.asarray(shape, np.float64) - 1) / 2.0
  return scipy.ndimage.affine_transform(np.asarray(volume, np.float32), scale, offset=offset,
                                        output_shape=tuple(shape), order=order,
                                        mode="nearest", prefilter=False)


def extend_outside(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Fills voxels outside ``mask`` with the nearest inside value.

  Interpolation across the mask's edge then mixes tissue with tissue, not with zeros, so the
  edge of a resampled or rotated map keeps its values.
  """
  mask = np.asarray(mask) > 0.5
  if mask.all():
    return np.asarray(volume, np.float32)
  idx = scipy.ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
  return np.asarray(volume, np.float32)[tuple(idx)]


class ModelFrame:
  """Maps a volume onto the model's grid and B0 axis and back.

  Forward: crop to the mask's box (+2 voxels), resample to the model's voxel size, pad so the
  brain fits any rotation, rotate B0 onto the model's axis. Backward undoes each step on the
  network's output. Identity (no copy) when nothing is needed.

  Args:
    mask: brain mask, original grid.
    voxel_size_mm: original voxel size, mm.
    b0_dir: true B0 direction, original voxel frame.
    model_voxel_sizes: voxel sizes the model knows (mm); [] means any.
    model_axis: the model's B0 direction.
    tolerance_deg: B0 tilt the model was trained to handle.
    rotate_min_deg: tilts below this are not rotated.
  """

  def __init__(self, mask, voxel_size_mm, b0_dir, model_voxel_sizes, model_axis,
               tolerance_deg: float = 0.0, rotate_min_deg: float = ROTATE_MIN_DEG):
    self.mask = np.asarray(mask) > 0.5
    self.voxel_size_mm = tuple(float(v) for v in voxel_size_mm)
    b0 = physics.unit_vector(b0_dir)
    axis = physics.unit_vector(model_axis)
    self.angle_deg = float(np.degrees(np.arccos(np.clip(abs(np.dot(b0, axis)), -1.0, 1.0))))
    # B0 and -B0 give the same field; rotate onto whichever end is nearer.
    self.target_axis = axis if np.dot(b0, axis) >= 0 else -axis
    self.model_voxel_known = bool(model_voxel_sizes)
    self.model_voxel_mm = self.voxel_size_mm
    if model_voxel_sizes and not any(
        np.allclose(self.voxel_size_mm, v, rtol=VOXEL_RTOL) for v in model_voxel_sizes):
      self.model_voxel_mm = tuple(float(x) for x in model_voxel_sizes[0])
    self.resampled = self.model_voxel_mm != self.voxel_size_mm
    self.tolerance_deg = float(tolerance_deg)
    self.rotated = self.angle_deg > max(rotate_min_deg, tolerance_deg)
    self.rotation = physics.rotation_between(b0, self.target_axis) if self.rotated else np.eye(3)
    self.identity = not (self.resampled or self.rotated)
    self.model_b0 = self.rotation @ b0
    if not self.identity:
      self.box = physics.bounding_box(self.mask, margin=2)
      self.sub_mask = self.mask[self.box]

  def info(self) -> dict[str, Any]:
    return {"resampled": self.resampled,
            "model_voxel_size_mm": (list(self.model_voxel_mm) if self.model_voxel_known
                                    else None),
            "b0_angle_to_model_deg": round(self.angle_deg, 3),
            "b0_tilt_trained_deg": round(self.tolerance_deg, 3), "rotated": self.rotated}

  def forward(self, field_ppm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Field on the original grid -> (field, mask) on the model's grid and orientation."""
    if self.identity:
      return field_ppm, self.mask
    field = extend_outside(field_ppm[self.box], self.sub_mask)
    mask = self.sub_mask.astype(np.float32)
    if self.resampled:
      field = resample(field, self.voxel_size_mm, self.model_voxel_mm)
      mask = resample(mask, self.voxel_size_mm, self.model_voxel_mm)
    self._model_shape = field.shape
    if self.rotated:
      # Pad so the rotated box stays inside: its corners span |R| @ half-extent (mm).
      vox = np.asarray(self.model_voxel_mm)
      half_mm = (np.asarray(field.shape) - 1) / 2.0 * vox
      need = np.abs(self.rotation) @ half_mm
      target = [max(int(math.ceil(2 * h / v)) + 3, n)
                for h, v, n in zip(need, vox, field.shape)]
      field = physics.pad_to(field, target)
      mask = physics.pad_to(mask, target)
      field = physics.rotate_volume(field, self.rotation, self.model_voxel_mm, order=1)
      mask = physics.rotate_volume(mask, self.rotation, self.model_voxel_mm, order=1)
    mask = mask > 0.5
    return np.where(mask, field, np.float32(0.0)).astype(np.float32), mask

  def backward(self, chi_model: np.ndarray, mask_model: np.ndarray) -> np.ndarray:
    """Network output on the model's grid -> chi on the original grid (0 outside the mask)."""
    if self.identity:
      return np.asarray(chi_model, np.float32) * self.mask
    chi = extend_outside(chi_model, mask_model)
    if self.rotated:
      chi = physics.rotate_volume(chi, self.rotation.T, self.model_voxel_mm, order=1)
      chi = physics.crop_from(chi, self._model_shape)
    if self.resampled:
      chi = resample(chi, self.model_voxel_mm, self.voxel_size_mm, shape=self.sub_mask.shape)
    out = np.zeros(self.mask.shape, np.float32)
    out[self.box] = chi
    return out * self.mask


# --------------------------------------------------------------------------------------
# Model back-ends
# --------------------------------------------------------------------------------------
def _repo_root() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parents[1]


def default_model_path() -> pathlib.Path:
  """Newest version under ``<repo>/saved_models/qsmgan/``.

  Raises:
    InputError: none exported yet.
  """
  from qsmgan_tf import exporting as export  # pylint: disable=import-outside-toplevel
  base = _repo_root() / "saved_models" / "qsmgan"
  versions = export.list_versions(base)
  if not versions:
    raise InputError(f"no QSMGAN model found in {base}: train one (python -m qsmgan_tf.train "
                     "...) and export it (python -m qsmgan_tf.export --model_dir=<run> "
                     f"--export_base={base}), or pass --model=<SavedModel or .keras file>")
  return base / str(versions[-1])


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
  import keras  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel
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

  def predict_volume(self, field_ppm, mask, b0_dir, voxel_size_mm,
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

  def predict_volume(self, field_ppm, mask, b0_dir, voxel_size_mm, magnitude=None):
    args = [np.asarray(field_ppm, np.float32), np.asarray(mask, np.float32),
            np.asarray(b0_dir, np.float32), np.asarray(voxel_size_mm, np.float32)]
    if magnitude is None:
      return _np_outputs(self._predict(*args))
    if self._predict_magnitude is None:
      self._predict_magnitude = make_predict_volume_fn(self.generator, self.contract, True)
    return _np_outputs(self._predict_magnitude(*args, np.asarray(magnitude, np.float32)))


class SavedModelBackend(_Backend):
  """An exported SavedModel version (`export` layout): calls its signatures."""

  kind = "saved_model"

  def __init__(self, path):
    from qsmgan_tf import exporting as export  # pylint: disable=import-outside-toplevel
    self.path = export.resolve_saved_model(path)
    self.loaded, self.contract = export.load(self.path)
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

  def predict_volume(self, field_ppm, mask, b0_dir, voxel_size_mm, magnitude=None):
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

  def _call(self, field_ppm, mask, b0_dir, voxel_size_mm, magnitude=None):
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
    return self._call(field_ppm, mask, (0.0, 0.0, 1.0), (1.0, 1.0, 1.0))["chi_net_ppm"]

  def patch_fn(self, patches):
    outputs, _ = self.client.predict(serving.SERVING_DEFAULT,
                                     {serving.PATCH_INPUT: np.asarray(patches, np.float32)})
    return np.asarray(outputs[serving.PATCH_OUTPUT], np.float32)

  def close(self):
    if hasattr(self.client, "close"):
      self.client.close()

  def predict_volume(self, field_ppm, mask, b0_dir, voxel_size_mm, magnitude=None):
    if magnitude is not None and serving.PREDICT_VOLUME_MAGNITUDE not in (
        (self.contract.get("export") or {}).get("signatures") or []):
      return None  # the served model predates the magnitude signature
    return self._call(field_ppm, mask, b0_dir, voxel_size_mm, magnitude)


class RestBackend(_Backend):
  """A TF Serving model server over REST: patches to serving_default, tiled on the client."""

  kind = "rest"

  def __init__(self, url: str):
    self.client = serving.RestClient(url)
    self.path = url
    self.contract = self.client.contract()

  def patch_fn(self, patches):
    return self.client.predict_patches(np.asarray(patches, np.float32))


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as exc:
    raise InputError(f"cannot read model contract {path}: {exc}") from None


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
    return KerasBackend(model[0], dict(model[1]), None, precision)
  path = pathlib.Path(model) if model is not None else default_model_path()
  if not path.exists():
    raise InputError(f"model not found: {path}")
  if path.is_dir() and not (path / "saved_model.pb").is_file() and (
      path / "contract.json").is_file():
    candidates = [path / "generator_best.keras", path / "generator_final.keras"]
    keras_file = next((c for c in candidates if c.is_file()), None)
    if keras_file is None:
      raise InputError(f"training folder has no generator_best.keras or "
                       f"generator_final.keras: {path}")
    path = keras_file
  if path.is_file() and path.suffix == ".keras":
    if not (path.parent / "contract.json").is_file():
      raise InputError(f"no contract.json beside {path.name} in {path.parent}")
  else:
    from qsmgan_tf import exporting as export  # pylint: disable=import-outside-toplevel
    path = export.resolve_saved_model(path)
  # Cached: evaluating many subjects loads and traces a model once (the file's mtime is part
  # of the key, so a re-exported or retrained file is loaded afresh).
  return _local_backend(str(path.resolve()), path.stat().st_mtime_ns, precision)


@functools.lru_cache(maxsize=2)
def _local_backend(path: str, mtime_ns: int, precision: str) -> _Backend:
  del mtime_ns  # only part of the cache key
  path = pathlib.Path(path)
  if path.suffix == ".keras":
    import keras  # pylint: disable=import-outside-toplevel
    from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel,unused-import
    generator = keras.saving.load_model(str(path), compile=False)
    return KerasBackend(generator, _read_json(path.parent / "contract.json"), path, precision)
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


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
def _validate(field_ppm, mask, voxel_size_mm, b0_dir):
  from qsmgan_tf.classical import operators  # pylint: disable=import-outside-toplevel
  return operators.check_inputs(field_ppm, mask, voxel_size_mm, b0_dir)


def _network_plan(backend: _Backend, mask: np.ndarray) -> dict[str, Any]:
  """`network_pass_plan` for the back-end's model, logged when it tiles."""
  if backend.kind != "keras" and "inference" not in backend.contract:
    return {"pass": "single"}  # exported before in-graph tiling existed: always one pass
  plan = network_pass_plan(mask, backend.contract)
  if plan["pass"] == "tiles":
    logging.info("the network's input (%d voxels) exceeds the model's single-pass budget: "
                 "%d overlapping tiles of %d^3 output voxels in the graph",
                 plan["input_voxels"], plan["tiles"], plan["tile_output_voxels"])
  return plan


def reconstruct_qsmgan(field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                       *, model=None, server: str | None = None, rest_url: str | None = None,
                       refine: str | None = "cg", inference: str = "single",
                       overlap: float = 0.25, mode: str = "gaussian", sw_batch_size: int = 1,
                       threads: int | None = None, progress: bool = True,
                       roi_size: int | None = None, sigma_scale: float = DEFAULT_SIGMA_SCALE,
                       refine_mu: float | None = None, refine_iterations: int | None = None,
                       refine_margin: int | None = None, refine_lam: float | None = None,
                       refine_tv_weight: float | None = None,
                       refine_reweights: int | None = None,
                       refine_edge_fraction: float | None = None,
                       refine_edge_refresh: int | None = None,
                       refine_residual_margin: int | None = None,
                       refine_fit_offset: int | None = None,
                       refine_noise_reference_ppm: float | None = None,
                       refine_smv_radius_mm: float | None = None,
                       refine_data_erosion_mm: float | None = None,
                       refine_fit_level: int | None = None,
                       precision: str = "float32", backend: _Backend | None = None,
                       magnitude=None, rotate_above_deg: float | None = None
                       ) -> tuple[np.ndarray, dict[str, Any]]:
  """QSMGAN susceptibility map of a local field, with data-consistency refinement.

  Args:
    field_ppm: local field, ppm of B0, [X, Y, Z].
    mask: brain mask [X, Y, Z] (non-empty).
    voxel_size_mm: voxel size, mm (resampled to the model's when it differs).
    b0_dir: B0 direction in the voxel frame (rotated onto the model's axis when oblique; the
      refinement always uses it as given, on the original grid).
    model: see `load_backend` (default: newest ``<repo>/saved_models/qsmgan/<version>``).
    server: TF Serving gRPC ``host:port``.
    rest_url: TF Serving REST model URL (tiles only: JSON volumes are too big).
    refine: 'cg' (default), 'closed' (one-shot k-space) or 'none'/None.
    inference: 'single' (the model's graph: one pass, or overlapping tiles in the graph when
      the volume exceeds the contract's memory budget, `network_volume_tf`) or
      'sliding_window' (patches tiled on the client: the least memory).
    overlap, mode, sw_batch_size, roi_size, sigma_scale: sliding-window options (MONAI's
      names); roi_size defaults to the contract's output patch.
    threads: TF intra-op threads (before TF initialises only).
    progress: progress bar over windows.
    refine_mu, refine_iterations, refine_margin, refine_tv_weight, refine_reweights,
      refine_edge_fraction, refine_edge_refresh, refine_residual_margin, refine_fit_offset,
      refine_noise_reference_ppm, refine_smv_radius_mm, refine_data_erosion_mm,
      refine_fit_level:
      override ``contract['refine']`` (``refine_tv_weight=0`` is the quadratic solve;
      `refine.DEFAULTS` names them).
    refine_lam: weight of the 'closed' variant.
    precision: 'float32' or 'bfloat16' (Keras generators only).
    backend: an already loaded back-end (reused across calls; overrides model/server/rest_url).
    magnitude: optional magnitude image [X, Y, Z] (any scale): the refinement uses it as the
      contract's ``refine`` says (magnitude edges, noise weighting; `refine` module), else
      it is ignored.
    rotate_above_deg: B0 tilts (from the model's axis) above this are rotated onto the axis for
      the network and back; None = the largest tilt the model was trained on (its contract).
      The network alone can do better on a rotated field even within its training range
      (MODEL_CARD.md); the refinement always uses the true B0.

  Returns:
    ``(chi_ppm float32 [X, Y, Z] zero outside the mask, info)``; info holds the model and its
    version, geometry steps (resampling, rotation), the inference mode and windows (or
    ``network_pass``: single pass or in-graph tiles, `network_pass_plan`), the refinement
    and its parameters, the relative field residual before and after, timings.

  Raises:
    InputError: bad inputs or options, or no model.
  """
  t_start = time.perf_counter()
  field, mask, voxel, b0 = _validate(field_ppm, mask, voxel_size_mm, b0_dir)
  inference = {"tiled": "sliding_window", "sliding": "sliding_window"}.get(inference, inference)
  if inference not in INFERENCE_MODES:
    raise InputError(f"inference must be one of {', '.join(INFERENCE_MODES)}, got {inference!r}")
  try:
    method = refine_lib.resolve_method(refine)
  except ValueError as exc:
    raise InputError(str(exc)) from None
  if mode not in BLEND_MODES:
    raise InputError(f"mode must be one of {', '.join(BLEND_MODES)}, got {mode!r}")
  configure_threads(threads)
  own_backend = backend is None
  if own_backend:
    backend = load_backend(model, server, rest_url, precision)
  try:
    contract = backend.contract
    geo = network_geometry(contract)
    contract_params = refine_lib.resolve_params(contract)
    try:
      params = refine_lib.resolve_params(contract, mu=refine_mu, iterations=refine_iterations,
                                         margin=refine_margin, tv_weight=refine_tv_weight,
                                         reweights=refine_reweights,
                                         edge_fraction=refine_edge_fraction,
                                         edge_refresh=refine_edge_refresh,
                                         residual_margin=refine_residual_margin,
                                         fit_offset=refine_fit_offset,
                                         noise_reference_ppm=refine_noise_reference_ppm,
                                         smv_radius_mm=refine_smv_radius_mm,
                                         data_erosion_mm=refine_data_erosion_mm,
                                         fit_level=refine_fit_level)
      magnitude = refine_lib.check_magnitude(magnitude, mask)
    except ValueError as exc:
      raise InputError(str(exc)) from None
    if magnitude is None or not refine_lib.uses_magnitude(params):
      magnitude = None  # nothing would use it: the graphs without a magnitude input serve
      params = refine_lib.without_magnitude(params)
      contract_params = refine_lib.without_magnitude(contract_params)
    if (backend.kind != "keras" and roi_size is not None
        and int(roi_size) != geo["output_patch"]):
      raise InputError(f"roi_size {roi_size}: an exported model serves fixed "
                       f"{geo['input_patch']}^3 -> {geo['output_patch']}^3 patches")
    if backend.kind != "keras" and precision != "float32":
      logging.warning("precision=%s applies to Keras generators only; the %s model runs as "
                      "exported", precision, backend.kind)
    if backend.kind == "rest" and inference == "single":
      logging.info("REST serving sends patches: using the sliding window")
      inference = "sliding_window"

    tolerance = (model_b0_tolerance_deg(contract) if rotate_above_deg is None
                 else float(rotate_above_deg))
    frame = ModelFrame(mask, voxel, b0, model_voxel_sizes(contract), model_b0_axis(contract),
                       tolerance)
    if not frame.model_voxel_known:
      logging.warning("the model's contract states no trained voxel size: running at %s mm "
                      "without resampling", voxel)
    if frame.resampled:
      logging.info("voxel size %s mm differs from the model's %s mm: resampling to the model's "
                   "grid and back", voxel, frame.model_voxel_mm)
    if frame.rotated:
      logging.info("B0 is %.1f deg from the model's axis: rotating the field onto it and the "
                   "network output back; the refinement uses the true B0", frame.angle_deg)
    elif frame.angle_deg > 0.01:
      logging.info("B0 is %.2f deg from the model's axis (not rotated: below %.1f deg or within "
                   "training); the refinement uses the true B0", frame.angle_deg,
                   max(ROTATE_MIN_DEG, tolerance))
    info: dict[str, Any] = {"method": "qsmgan", **frame.info(),
                            "inference": inference, "voxel_size_mm": list(voxel),
                            "b0_dir": [float(v) for v in b0],
                            "precision": backend.precision}
    timings = {}
    t0 = time.perf_counter()
    whole_graph = (inference == "single" and frame.identity and method == "cg"
                   and params == contract_params)
    outputs = None
    # The model's own passes scale the field in the graph; the same statistic here records the
    # scale (and applies it to the client's sliding window).
    reference_std = tiling_params(contract)["field_reference_std_ppm"]
    if whole_graph:
      if reference_std > 0:
        info["network_field_scale"] = field_amplitude_scale(field, mask, reference_std)
      info["network_pass"] = _network_plan(backend, mask)
      outputs = backend.predict_volume(field, mask.astype(np.float32), b0.astype(np.float32),
                                       np.asarray(voxel, np.float32), magnitude)
    uses_magnitude = {"magnitude": magnitude is not None}
    if outputs is not None:
      chi = outputs["chi_ppm"]
      timings["network_and_refine_s"] = time.perf_counter() - t0
      info["refine"] = {"method": "cg", **params, **uses_magnitude, "in_graph": True,
                        **refine_lib.noise_info(field, mask, params),
                        **refine_lib.shrinkage_info(field, mask, voxel, b0, params)}
      if "tv_weight_used" in outputs:  # models exported before it was an output lack it
        info["refine"]["tv_weight_used"] = float(outputs["tv_weight_used"])
      info["residual_before"] = float(outputs["residual_before"])
      info["residual_after"] = float(outputs["residual_after"])
    else:
      field_m, mask_m = frame.forward(field)
      if reference_std > 0:
        info["network_field_scale"] = field_amplitude_scale(field_m, mask_m, reference_std)
      if inference == "single":
        info["network_pass"] = _network_plan(backend, mask_m)
        chi_m = backend.network_volume(field_m, mask_m)
      else:
        scale = np.float32(info.get("network_field_scale", 1.0))
        chi_m, info["sliding_window"] = sliding_window(
            field_m * scale, mask_m, backend.patch_fn, roi_size=roi_size or geo["output_patch"],
            margin=geo["margin"], multiple=geo["multiple"], overlap=overlap, mode=mode,
            sigma_scale=sigma_scale, sw_batch_size=sw_batch_size, progress=progress)
        chi_m = chi_m / scale
      chi_net = frame.backward(chi_m, mask_m)
      timings["network_s"] = time.perf_counter() - t0
      t1 = time.perf_counter()
      if method == "cg":
        chi, tv_used = run_refine_tf(chi_net, field, mask, b0, voxel, params, magnitude,
                                     return_weight=True)
        info["refine"] = {"method": "cg", **params, **uses_magnitude, "in_graph": False,
                          **refine_lib.noise_info(field, mask, params),
                          **refine_lib.shrinkage_info(field, mask, voxel, b0, params),
                          "tv_weight_used": tv_used}
      elif method == "closed":
        lam = refine_lib.CLOSED_FORM_DEFAULTS["lam"] if refine_lam is None else float(refine_lam)
        chi = refine_lib.refine_closed_form(chi_net, field, mask, voxel, b0, lam,
                                            params["margin"])
        info["refine"] = {"method": "closed", "lam": lam, "margin": params["margin"]}
      else:
        chi = chi_net
        info["refine"] = {"method": "none"}
      timings["refine_s"] = time.perf_counter() - t1
      residual = _residual_tf_fn()
      geometry = (mask.astype(np.float32), b0.astype(np.float32), np.asarray(voxel, np.float32))
      info["residual_before"] = float(residual(chi_net, field, *geometry))
      info["residual_after"] = (info["residual_before"] if method == "none" else
                                float(residual(np.asarray(chi, np.float32), field, *geometry)))
    timings["total_s"] = time.perf_counter() - t_start
    info.update(backend.describe())
    info["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    logging.info("qsmgan: field residual %.4f -> %.4f (%s refinement), %.1f s",
                 info["residual_before"], info["residual_after"], info["refine"]["method"],
                 timings["total_s"])
    chi = np.where(mask, np.asarray(chi, np.float32), np.float32(0.0))
    return chi, info
  finally:
    if own_backend:
      backend.close()
