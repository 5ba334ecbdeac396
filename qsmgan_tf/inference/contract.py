"""What inference reads from the model contract (`qsmgan_tf.model_contract.ModelContract`,
which parses it): the generator's geometry, the trained voxel sizes and B0 axis, and the
network pass's memory budget and tiles (``contract['inference']``). Every function takes a
`ModelContract` or a contract dict."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from absl import logging

from qsmgan_tf import physics
from qsmgan_tf.errors import InputError
from qsmgan_tf.model_contract import ModelContract
from qsmgan_tf.inference.window import _padded_size, _tile_count, window_step

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
network's input voxels above which `graph.network_volume_tf` tiles, the tile's output edge, the
requested overlap between neighbouring tiles, and the field amplitude the network runs at
(`graph.field_amplitude_scale`; 0 = the field as given, as in contracts written before the key)."""


def generator_config(contract) -> dict[str, Any]:
  """The GeneratorConfig dict of a contract (`ModelContract.generator`).

  Raises:
    InputError: the contract describes no generator (no ``depth`` and patch sizes).
  """
  return ModelContract.of(contract).generator


def network_geometry(contract) -> dict[str, int]:
  """Crop margin, size multiple and patch sizes of the contract's generator, voxels."""
  contract = ModelContract.of(contract)
  return {"margin": contract.crop_margin, "multiple": contract.size_multiple,
          "input_patch": contract.input_patch, "output_patch": contract.output_patch}


def model_voxel_sizes(contract) -> list[tuple[float, float, float]]:
  """Voxel sizes (mm) the model was trained on; [] when the contract does not say."""
  return list(ModelContract.of(contract).voxel_sizes_mm)


def model_b0_axis(contract) -> np.ndarray:
  """The B0 direction (voxel frame) the model was trained with; default (0, 0, 1)."""
  return np.asarray(ModelContract.of(contract).b0_dir, dtype=np.float64)


def model_b0_tolerance_deg(contract) -> float:
  """Largest B0 tilt (degrees from `model_b0_axis`) among the directions the model was
  trained on (``b0_dirs_trained``); below it the field is not rotated. 0 when not stated."""
  contract = ModelContract.of(contract)
  if not contract.b0_dirs_trained:
    return 0.0
  axis = np.asarray(contract.b0_dir, dtype=np.float64)
  dirs = np.asarray(contract.b0_dirs_trained, dtype=np.float64).reshape(-1, 3)
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
  for key, value in ModelContract.of(contract).inference.items():
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
  least one such size); the step is `window.window_step` of it.

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
  """What `graph.network_volume_tf` does with this mask: one pass, or how many in-graph tiles.

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
