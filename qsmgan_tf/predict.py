r"""Susceptibility map (ppm) from a local field map: a classical method or the QSMGAN network.

Writes chi in ppm on the field's grid, with its affine and header, as float32
(``..._Chimap.nii.gz``), and a JSON sidecar beside it (``..._Chimap.json``) that records the
method and its parameters, units, reference, B0 direction and where it came from, voxel size,
field units and conversion, input file names, code version and timing. Both files appear whole
or not at all. Bad input prints one ``error: ...`` line and exits with status 2.

Classical methods (NumPy only; TensorFlow is not imported):

  python -m qsmgan_tf.predict --method=tkd \
      --field=sub-01_localfield.nii.gz --mask=sub-01_mask.nii.gz \
      --output=out/sub-01_Chimap.nii.gz

  # A field in Hz at 3 T, B0 given explicitly (voxel frame), MEDI with its magnitude:
  python -m qsmgan_tf.predict --method=medi --field=sub-01_fieldmap.nii.gz --field_units=hz \
      --b0_tesla=3 --te_seconds=0.02 --magnitude=sub-01_mag.nii.gz --b0_dir=0,0.342,0.940 \
      --mask=sub-01_mask.nii.gz --output=out/sub-01_desc-medi_Chimap.nii.gz

  # An unwrapped, background-removed phase in rad at TE 20 ms:
  python -m qsmgan_tf.predict --method=ilsqr --field=phase_local.nii --field_units=rad \
      --b0_tesla=3 --te_seconds=0.020 --mask=mask.nii --output=out/Chimap.nii.gz

The network, from a trained model or a TF Serving endpoint (flags passed to
`qsmgan_tf.inference.reconstruct_qsmgan`):

  python -m qsmgan_tf.predict --method=qsmgan --model=runs/paper/generator_best.keras \
      --field=sub-01_localfield.nii.gz --mask=sub-01_mask.nii.gz \
      --output=out/sub-01_desc-qsmgan_Chimap.nii.gz --refine=cg --inference=single

  qsmgan-predict --method=qsmgan --rest_url=http://localhost:8501/v1/models/qsmgan:predict \
      --field=f.nii.gz --mask=m.nii.gz --output=out/Chimap.nii.gz --inference=tiled --overlap=0.5

The B0 direction comes from the field's affine (scanner z in the voxel frame) unless
``--b0_dir=x,y,z`` is given; an image registered to a template gets a warning asking for it.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging

import qsmgan_tf
from qsmgan_tf import cli
from qsmgan_tf import nifti_io
from qsmgan_tf import reconstruct
from qsmgan_tf.errors import InputError

_METHOD = flags.DEFINE_enum(
    "method", None, list(reconstruct.METHOD_NAMES),
    "Reconstruction method.")
_FIELD = flags.DEFINE_string("field", None, "Local (tissue) field NIfTI, in --field_units.")
_MASK = flags.DEFINE_string("mask", None, "Mask NIfTI (field's shape; non-zero = inside).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Output chi map NIfTI (ppm), e.g. out/sub-01_Chimap.nii.gz; its folder must "
    "exist. The JSON sidecar is written beside it.")
_FIELD_UNITS = flags.DEFINE_enum(
    "field_units", "ppm", ["ppm", "hz", "rad"],
    "Units of --field: ppm of B0, Hz (needs --b0_tesla), or phase in rad (needs --b0_tesla "
    "and --te_seconds).")
_B0_TESLA = flags.DEFINE_float("b0_tesla", None, "Main field strength, T.")
_TE_SECONDS = flags.DEFINE_float("te_seconds", None, "Echo time of a phase in rad, s.")
_REFERENCE = flags.DEFINE_enum(
    "reference", "mask_mean", ["mask_mean", "none"],
    "mask_mean: subtract chi's mean over the mask; none: keep the method's level.")
_B0_DIR = flags.DEFINE_string(
    "b0_dir", None, "B0 direction x,y,z in the voxel frame; default: from the field's affine.")
_MAGNITUDE = flags.DEFINE_string("magnitude", None, "Magnitude NIfTI: MEDI's weights and edges; "
                                 "qsmgan's refinement uses it as its model's contract says.")
_MODEL = flags.DEFINE_string("model", None, "qsmgan: .keras model file or SavedModel folder.")
_SERVER = flags.DEFINE_string("server", None, "qsmgan: TF Serving gRPC host:port.")
_REST_URL = flags.DEFINE_string("rest_url", None, "qsmgan: TF Serving REST predict URL.")
_REFINE = flags.DEFINE_enum(
    "refine", "cg", ["cg", "none"],
    "qsmgan: refine the network output against the measured field (cg) or not.")
_INFERENCE = flags.DEFINE_enum(
    "inference", "single", ["single", "tiled"],
    "qsmgan: single = the model's graph (one fully convolutional pass; overlapping tiles in "
    "the graph when the volume exceeds the model's memory budget); tiled = overlapping "
    "patches on the client (least memory).")
_OVERLAP = flags.DEFINE_float("overlap", 0.25, "qsmgan tiled: tile overlap fraction.",
                              lower_bound=0.0, upper_bound=0.95)
_MODE = flags.DEFINE_enum("mode", "gaussian", ["gaussian", "constant"],
                          "qsmgan tiled: blending weights.")
_SW_BATCH_SIZE = flags.DEFINE_integer("sw_batch_size", 1, "qsmgan tiled: tiles per batch.",
                                      lower_bound=1)
_THREADS = flags.DEFINE_integer("threads", None, "qsmgan: TensorFlow CPU threads.",
                                lower_bound=1)
_QUIET = flags.DEFINE_bool("quiet", False, "Log warnings and errors only; no progress bar.")

_REQUIRED = ("method", "field", "mask", "output")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _check_output(output: str, inputs) -> None:
  """Bad output paths fail before any work is done."""
  if not output.endswith(_NIFTI_SUFFIXES):
    raise InputError(f"--output must end in .nii or .nii.gz, got {os.path.basename(output)}")
  folder = os.path.dirname(output) or "."
  if not os.path.isdir(folder):
    raise InputError(f"output folder does not exist: {folder}")
  for path in inputs:
    if path and os.path.exists(path) and os.path.exists(output) and os.path.samefile(path, output):
      raise InputError(f"--output would overwrite an input: {os.path.basename(output)}")


def _display_path(path: str) -> str:
  """A model path without its directories (``name/<version>`` for a versioned SavedModel)."""
  parts = os.path.normpath(str(path)).split(os.sep)
  if len(parts) >= 2 and parts[-1].isdigit():
    return "/".join(parts[-2:])
  return parts[-1]


def predict(method: str, field: str, mask: str, output: str, field_units: str = "ppm",
            b0_tesla: float | None = None, te_seconds: float | None = None,
            reference: str = "mask_mean", b0_dir: str | None = None,
            magnitude: str | None = None, **qsmgan_options) -> dict:
  """Reconstructs chi from NIfTI files and writes the map and its sidecar.

  Args:
    method: one of `reconstruct.METHOD_NAMES`.
    field: field NIfTI path, in ``field_units``.
    mask: mask NIfTI path.
    output: output NIfTI path (.nii or .nii.gz); the sidecar goes beside it.
    field_units: 'ppm', 'hz' or 'rad'.
    b0_tesla: B0, T (hz and rad; also given to MEDI).
    te_seconds: TE, s (rad; also given to MEDI).
    reference: 'mask_mean' or 'none'.
    b0_dir: 'x,y,z' in the voxel frame, or None for the affine's.
    magnitude: optional magnitude NIfTI path.
    **qsmgan_options: passed to `inference.reconstruct_qsmgan` when method is 'qsmgan'.

  Returns:
    The sidecar dict.

  Raises:
    InputError: bad input (nothing is written).
  """
  _check_output(output, (field, mask, magnitude))
  t0 = time.perf_counter()
  inputs = reconstruct.load_inputs(field, mask, field_units, b0_tesla, te_seconds, b0_dir,
                                   magnitude)
  t_load = time.perf_counter() - t0
  logging.info("field %s, voxel %s mm, B0 direction %s (%s), %d voxels in the mask",
               inputs.field_ppm.shape, inputs.voxel_size_mm, inputs.b0_dir.round(4).tolist(),
               inputs.b0_dir_source, int(inputs.mask.sum()))
  params = reconstruct.acquisition_params(method, b0_tesla, te_seconds) or None
  options = qsmgan_options if method == "qsmgan" else {}
  t1 = time.perf_counter()
  chi, info = reconstruct.run_method(
      method, inputs.field_ppm, inputs.mask, inputs.voxel_size_mm, inputs.b0_dir,
      magnitude=inputs.magnitude, reference=reference, params=params, **options)
  t_method = time.perf_counter() - t1
  parameters = dict(info.get("parameters", {}))
  if parameters.get("model"):
    parameters["model"] = _display_path(parameters["model"])  # no directories in the sidecar
  sidecar = {
      "method": method,
      "parameters": parameters,
      "units": "ppm",
      "reference": reference,
      "reference_offset_ppm": info.get("reference_offset_ppm"),
      "b0_dir": inputs.b0_dir.tolist(),
      "b0_dir_frame": "voxel",
      "b0_dir_source": inputs.b0_dir_source,
      "b0_dir_warning": inputs.b0_dir_warning,
      "voxel_size_mm": list(inputs.voxel_size_mm),
      "shape": list(inputs.field_ppm.shape),
      "field_units": inputs.field_units,
      "field_conversion": {
          "ppm_per_field_unit": inputs.ppm_per_unit,
          "b0_tesla": inputs.b0_tesla,
          "te_seconds": inputs.te_seconds,
          "gamma_bar_hz_per_t": reconstruct.physics.GAMMA_BAR_HZ_PER_T,
      },
      "inputs": {k: v for k, v in inputs.files.items() if v},
      "code_version": qsmgan_tf.__version__,
      "seconds": {"load": round(t_load, 3), "reconstruct": round(t_method, 3)},
      "method_info": info.get("method_info", {}),
  }
  if info.get("ignored_options"):
    sidecar["ignored_options"] = info["ignored_options"]
  nifti_io.write_volume(output, chi, inputs.image)
  try:
    nifti_io.write_json(nifti_io.sidecar_path(output), sidecar)
  except BaseException:
    os.unlink(output)  # the pair appears whole or not at all
    raise
  logging.info("wrote %s (%.1f s)", output, time.perf_counter() - t0)
  return sidecar


def main(argv):

  @cli.one_line_errors
  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _QUIET.value:
      logging.set_verbosity(logging.WARNING)
    qsmgan_options = dict(
        model=_MODEL.value, server=_SERVER.value, rest_url=_REST_URL.value,
        refine=_REFINE.value, inference=_INFERENCE.value, overlap=_OVERLAP.value,
        mode=_MODE.value, sw_batch_size=_SW_BATCH_SIZE.value, threads=_THREADS.value,
        progress=not _QUIET.value)
    predict(_METHOD.value, _FIELD.value, _MASK.value, _OUTPUT.value,
            field_units=_FIELD_UNITS.value, b0_tesla=_B0_TESLA.value,
            te_seconds=_TE_SECONDS.value, reference=_REFERENCE.value, b0_dir=_B0_DIR.value,
            magnitude=_MAGNITUDE.value, **qsmgan_options)
    return 0

  return _main(argv)


def run():
  """Console-script entry point (``qsmgan-predict``)."""
  flags.mark_flags_as_required(list(_REQUIRED))
  app.run(main)


if __name__ == "__main__":
  run()
