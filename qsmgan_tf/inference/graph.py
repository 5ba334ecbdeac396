"""The network and the refinement in TensorFlow graphs (dynamic shapes).

`network_volume_tf` runs the generator over a whole volume: one pass over the mask's bounding
box (`volume_pass_tf`) or overlapping tiles of it (`volume_tiles_tf`), at the field amplitude
the contract records (`field_amplitude_scale`, with its in-graph twin
`field_amplitude_scale_tf`). The SavedModel's volume signatures are built here
(`make_network_volume_fn`, `make_predict_volume_fn`, `make_refine_fn`); the traced refinement
that local runs use is `refine.graph.run_refine_tf` (re-exported here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from qsmgan_tf import physics_tf
from qsmgan_tf import refine as refine_lib
from qsmgan_tf.errors import InputError
from qsmgan_tf.inference.contract import network_geometry, tile_geometry, tiling_params
from qsmgan_tf.inference.window import (DEFAULT_SIGMA_SCALE, IMPORTANCE_FLOOR,
                                        _importance_profiles, _padded_size, _tile_count)
# Re-exported: local runs' traced refinement (it lived here before the refine package had it).
from qsmgan_tf.refine.graph import run_refine_tf, traced_refine_tf  # pylint: disable=unused-import

# The amplitude scale is kept within [1/AMPLITUDE_SCALE_LIMIT, AMPLITUDE_SCALE_LIMIT]: a field
# far off the training amplitude is more likely a unit or masking error than anatomy, and an
# empty or constant field has no amplitude to match.
AMPLITUDE_SCALE_LIMIT = 4.0
# 1.4826 x the median absolute deviation is the standard deviation of a Gaussian; the median
# is not moved by the few veins, haemorrhages or edge voxels that dominate a field's plain std.
_STD_PER_MAD = 1.4826


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
  """`window.importance_map` in the graph from its per-axis factors, each cropped centrally to
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
  input) and blends the tiles' outputs with `window.importance_map`'s weights: the bounded-memory
  twin of the single pass, as `window.sliding_window` is on the client. Tiles read the single pass's
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
  the stronger the field (BUILD.md, "The network at its training amplitude"). Running it on
  ``field * s`` and dividing its output by ``s`` makes the network pass exactly
  scale-equivariant, with ``s`` the reference over the field's `robust_std` inside the mask,
  kept within [1 / `AMPLITUDE_SCALE_LIMIT`, `AMPLITUDE_SCALE_LIMIT`].
  `field_amplitude_scale_tf` is the in-graph twin.

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
          tf.TensorSpec([3], tf.float32, name="voxel_size_mm"),
          tf.TensorSpec([3], tf.float32, name="b0_dir")]


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
    ``voxel_size_mm [3]``, ``b0_dir [3]`` (voxel frame) and outputs ``chi_ppm`` (refined),
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

  def predict(field_ppm, mask, voxel_size_mm, b0_dir, magnitude=None):
    chi_net = network_volume_tf(generator, field_ppm, mask, **args)
    chi, tv_weight = refine_lib.refine_tf(chi_net, field_ppm, mask, voxel_size_mm, b0_dir,
                                          **params, magnitude=magnitude, return_weight=True)
    return {
        "chi_ppm": chi,
        "chi_net_ppm": chi_net,
        "tv_weight_used": tv_weight,
        "residual_before": refine_lib.field_residual_tf(chi_net, field_ppm, mask, voxel_size_mm,
                                                        b0_dir),
        "residual_after": refine_lib.field_residual_tf(chi, field_ppm, mask, voxel_size_mm,
                                                       b0_dir),
    }

  def predict_volume(field_ppm, mask, voxel_size_mm, b0_dir):
    return predict(field_ppm, mask, voxel_size_mm, b0_dir)

  def predict_volume_magnitude(field_ppm, mask, voxel_size_mm, b0_dir, magnitude):
    return predict(field_ppm, mask, voxel_size_mm, b0_dir, magnitude)

  if with_magnitude:
    return tf.function(predict_volume_magnitude, input_signature=_volume_specs() + [
        tf.TensorSpec([None, None, None], tf.float32, name="magnitude")])
  return tf.function(predict_volume, input_signature=_volume_specs())


def make_refine_fn(contract: dict[str, Any]):
  """The ``refine`` signature: CG refinement with the contract's defaults.

  Returns:
    tf.function with inputs ``chi_net_ppm [X,Y,Z]``, ``field_ppm``, ``mask``,
    ``voxel_size_mm [3]``, ``b0_dir [3]`` and outputs ``chi_ppm``, ``tv_weight_used`` (as
    ``predict_volume``), ``residual_before``, ``residual_after``.
  """
  params = refine_lib.without_magnitude(refine_lib.resolve_params(contract))

  @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32,
                                              name="chi_net_ppm")] + _volume_specs())
  def refine(chi_net_ppm, field_ppm, mask, voxel_size_mm, b0_dir):
    chi, tv_weight = refine_lib.refine_tf(chi_net_ppm, field_ppm, mask, voxel_size_mm, b0_dir,
                                          **params, return_weight=True)
    return {
        "chi_ppm": chi,
        "tv_weight_used": tv_weight,
        "residual_before": refine_lib.field_residual_tf(chi_net_ppm * mask, field_ppm, mask,
                                                        voxel_size_mm, b0_dir),
        "residual_after": refine_lib.field_residual_tf(chi, field_ppm, mask, voxel_size_mm,
                                                       b0_dir),
    }

  return refine
