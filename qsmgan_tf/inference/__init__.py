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

Modules (each imports only those above it; this package re-exports their public names):
  * `window`: tiling on the pooling grid and the NumPy sliding window (`sliding_window`,
    `importance_map`, `window_step`);
  * `contract`: what inference reads from the model contract (`network_geometry`, `model_voxel_sizes`,
    `model_b0_axis`, `tiling_params`, `tile_geometry`, `network_pass_plan`);
  * `graph`: the network and the refinement in TensorFlow graphs (`network_volume_tf`, the
    amplitude scale, the SavedModel's volume signatures; `run_refine_tf` is re-exported from
    `qsmgan_tf.refine`);
  * `frame`: resampling and rotation into the model's frame (`ModelFrame`);
  * `backends`: where the network runs (Keras, SavedModel, TF Serving gRPC or REST;
    `load_backend`, `default_model_path`);
  * `options`: `QsmganOptions`, how a reconstruction runs (typed, checked once);
  * `pipeline`: `reconstruct_qsmgan`.

Example:
  chi_ppm, info = inference.reconstruct_qsmgan(field_ppm, mask, (1, 1, 1), (0, 0, 1),
                                               model="saved_models/qsmgan/8")
"""

from qsmgan_tf.inference.backends import (PRECISIONS, GrpcBackend, KerasBackend, RestBackend,
                                          SavedModelBackend, cast_generator, configure_threads,
                                          default_model_path, load_backend)
from qsmgan_tf.inference.contract import (TILING_DEFAULTS, generator_config, model_b0_axis,
                                          model_b0_tolerance_deg, model_voxel_sizes,
                                          network_geometry, network_pass_plan, tile_geometry,
                                          tiling_params)
from qsmgan_tf.inference.frame import (ROTATE_MIN_DEG, VOXEL_RTOL, ModelFrame, extend_outside,
                                       resample)
from qsmgan_tf.inference.graph import (AMPLITUDE_SCALE_LIMIT, field_amplitude_scale,
                                       field_amplitude_scale_tf, make_network_volume_fn,
                                       make_predict_volume_fn, make_refine_fn, network_volume_tf,
                                       robust_std, run_refine_tf, traced_refine_tf,
                                       volume_pass_tf, volume_tiles_tf)
from qsmgan_tf.inference.options import INFERENCE_MODES, QsmganOptions
from qsmgan_tf.inference.pipeline import reconstruct_qsmgan
from qsmgan_tf.inference.window import (BLEND_MODES, DEFAULT_SIGMA_SCALE, IMPORTANCE_FLOOR,
                                        importance_map, single_pass_region, sliding_window,
                                        window_step)
