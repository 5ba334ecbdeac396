"""`reconstruct_qsmgan`: a local field -> a chi map, through the model's frame, the network and
the data-consistency refinement (the package docstring describes the steps)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from absl import logging

from qsmgan_tf import refine as refine_lib
from qsmgan_tf.classical import operators
from qsmgan_tf.errors import InputError
from qsmgan_tf.inference.backends import _Backend, configure_threads, load_backend
from qsmgan_tf.inference.contract import (model_b0_axis, model_b0_tolerance_deg,
                                          model_voxel_sizes, network_geometry,
                                          network_pass_plan, tiling_params)
from qsmgan_tf.inference.frame import ROTATE_MIN_DEG, ModelFrame
from qsmgan_tf.inference.graph import field_amplitude_scale
from qsmgan_tf.inference.options import QsmganOptions
from qsmgan_tf.inference.window import sliding_window


def _validate(field_ppm, mask, voxel_size_mm, b0_dir):
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
                       options: QsmganOptions | None = None, *,
                       backend: _Backend | None = None, magnitude=None,
                       **option_kwargs) -> tuple[np.ndarray, dict[str, Any]]:
  """QSMGAN susceptibility map of a local field, with data-consistency refinement.

  Args:
    field_ppm: local field, ppm of B0, [X, Y, Z].
    mask: brain mask [X, Y, Z] (non-empty).
    voxel_size_mm: voxel size, mm (resampled to the model's when it differs).
    b0_dir: B0 direction in the voxel frame (rotated onto the model's axis when oblique; the
      refinement always uses it as given, on the original grid).
    options: a `QsmganOptions`; ``option_kwargs`` (its fields, and ``refine_<name>`` for any
      `refine.RefineParams` field) build one or change the one given:
      ``model`` (see `load_backend`; default: newest ``<repo>/saved_models/qsmgan/<version>``),
      ``server`` (TF Serving gRPC ``host:port``), ``rest_url`` (TF Serving REST model URL:
      tiles only, JSON volumes are too big), ``precision`` ('float32' or 'bfloat16', Keras
      generators only);
      ``inference``: 'single' (the model's graph: one pass, or overlapping tiles in the graph
      when the volume exceeds the contract's memory budget, `graph.network_volume_tf`) or
      'sliding_window' (patches tiled on the client: the least memory), with ``overlap``,
      ``mode``, ``sw_batch_size``, ``roi_size`` (default: the contract's output patch) and
      ``sigma_scale`` (MONAI's names);
      ``refine``: 'cg' (default), 'closed' (one-shot k-space, weight ``refine_lam``) or
      'none'/None; ``refine_mu=...``, ``refine_tv_weight=0`` (the quadratic solve), ...
      override ``contract['refine']``;
      ``rotate_above_deg``: B0 tilts (from the model's axis) above this are rotated onto the
      axis for the network and back; None = the largest tilt the model was trained on (its
      contract). The network alone can do better on a rotated field even within its training
      range (docs/history/MODEL_CARD_log.md); the refinement always uses the true B0;
      ``threads`` (TF intra-op threads, before TF initialises only), ``progress`` (a bar over
      windows).
    backend: an already loaded back-end (reused across calls; overrides model/server/rest_url).
    magnitude: optional magnitude image [X, Y, Z] (any scale): the refinement uses it as the
      contract's ``refine`` says (magnitude edges, noise weighting; `refine` module), else
      it is ignored.

  Returns:
    ``(chi_ppm float32 [X, Y, Z] zero outside the mask, info)``; info holds the model and its
    version, geometry steps (resampling, rotation), the inference mode and windows (or
    ``network_pass``: single pass or in-graph tiles, `network_pass_plan`), the refinement
    and its parameters, the relative field residual before and after, timings.

  Raises:
    InputError: bad inputs or options, or no model.
  """
  t_start = time.perf_counter()
  options = (QsmganOptions.from_kwargs(**option_kwargs) if options is None
             else options.replace(**option_kwargs))
  field, mask, voxel, b0 = _validate(field_ppm, mask, voxel_size_mm, b0_dir)
  inference, method, precision = options.inference, options.refine, options.precision
  configure_threads(options.threads)
  own_backend = backend is None
  if own_backend:
    backend = load_backend(options.model, options.server, options.rest_url, precision)
  try:
    contract = backend.contract
    geo = network_geometry(contract)
    contract_params = refine_lib.RefineParams.resolve(contract)
    try:
      params = options.refine_params(contract)
      magnitude = refine_lib.check_magnitude(magnitude, mask)
    except ValueError as exc:
      raise InputError(str(exc)) from None
    if magnitude is None or not params.uses_magnitude:
      magnitude = None  # nothing would use it: the graphs without a magnitude input serve
      params = params.without_magnitude()
      contract_params = contract_params.without_magnitude()
    if (backend.kind != "keras" and options.roi_size is not None
        and int(options.roi_size) != geo["output_patch"]):
      raise InputError(f"roi_size {options.roi_size}: an exported model serves fixed "
                       f"{geo['input_patch']}^3 -> {geo['output_patch']}^3 patches")
    if backend.kind != "keras" and precision != "float32":
      logging.warning("precision=%s applies to Keras generators only; the %s model runs as "
                      "exported", precision, backend.kind)
    if backend.kind == "rest" and inference == "single":
      logging.info("REST serving sends patches: using the sliding window")
      inference = "sliding_window"

    tolerance = (model_b0_tolerance_deg(contract) if options.rotate_above_deg is None
                 else float(options.rotate_above_deg))
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
      outputs = backend.predict_volume(field, mask.astype(np.float32),
                                       np.asarray(voxel, np.float32), b0.astype(np.float32),
                                       magnitude)
    uses_magnitude = {"magnitude": magnitude is not None}
    if outputs is not None:
      chi = outputs["chi_ppm"]
      timings["network_and_refine_s"] = time.perf_counter() - t0
      info["refine"] = {**refine_lib.cg_record(field, mask, voxel, b0, params.as_dict()),
                        **uses_magnitude, "in_graph": True}
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
            field_m * scale, mask_m, backend.patch_fn,
            roi_size=options.roi_size or geo["output_patch"], margin=geo["margin"],
            multiple=geo["multiple"], overlap=options.overlap, mode=options.mode,
            sigma_scale=options.sigma_scale, sw_batch_size=options.sw_batch_size,
            progress=options.progress)
        chi_m = chi_m / scale
      chi_net = frame.backward(chi_m, mask_m)
      timings["network_s"] = time.perf_counter() - t0
      t1 = time.perf_counter()
      chi, refined = refine_lib.refine(chi_net, field, mask, voxel, b0, params, method=method,
                                       magnitude=magnitude, lam=options.refine_lam, engine="tf")
      timings["refine_s"] = time.perf_counter() - t1
      info["residual_before"] = refined.pop("residual_before")
      info["residual_after"] = refined.pop("residual_after")
      if method == "cg":
        refined.update(uses_magnitude, in_graph=False)
      info["refine"] = refined
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
