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
from qsmgan_tf.inference.graph import _residual_tf_fn, field_amplitude_scale, run_refine_tf
from qsmgan_tf.inference.window import BLEND_MODES, DEFAULT_SIGMA_SCALE, sliding_window

INFERENCE_MODES = ("single", "sliding_window")


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
      the volume exceeds the contract's memory budget, `graph.network_volume_tf`) or
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
      (docs/history/MODEL_CARD_log.md); the refinement always uses the true B0.

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
