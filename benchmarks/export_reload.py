r"""A SavedModel against its re-export by the current code: size, load time, identical outputs.

  python benchmarks/export_reload.py [--model=saved_models/qsmgan/8] [--shape=48,52,44]

Re-exports ``--model``'s generator and contract with `exporting.reexport_model` into a
temporary folder (timed), then loads both SavedModels in this one process, calls their
``predict_volume`` on a small spherical test volume (first call of each load) and prints one JSON line: ``saved_model.pb`` sizes, load
and first-call seconds, their ratios (re-export / given), and the largest difference of
every output. An export by older code that traced the refinement twice shows a ratio near
0.5 on size and load time; identical outputs show 0.0 differences.
"""
import json
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_MODEL = flags.DEFINE_string("model", "saved_models/qsmgan", "Version folder or model base path.")
_SHAPE = flags.DEFINE_list("shape", ["48", "52", "44"], "Test volume shape X,Y,Z (voxels).")


def _sphere(shape):
  idx = np.indices(shape)
  centre = np.reshape([(n - 1) / 2 for n in shape], (3, 1, 1, 1))
  mask = ((((idx - centre) / (0.4 * min(shape))) ** 2).sum(0) < 1).astype(np.float32)
  field = (np.random.default_rng(0).normal(size=shape) * 0.02 * mask).astype(np.float32)
  return field, mask


def _measure(path, field, mask):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  loaded = tf.saved_model.load(str(path))
  load_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = loaded.signatures["predict_volume"](field_ppm=field, mask=mask,
                                            b0_dir=np.float32([0, 0, 1]),
                                            voxel_size_mm=np.float32([1, 1, 1]))
  call_s = time.perf_counter() - t0
  return {"pb_bytes": (pathlib.Path(path) / "saved_model.pb").stat().st_size,
          "load_s": round(load_s, 2), "first_call_s": round(call_s, 2)}, {
              k: v.numpy() for k, v in out.items()}


def main(argv):
  del argv
  from qsmgan_tf import exporting  # pylint: disable=import-outside-toplevel
  given = exporting.resolve_saved_model(_MODEL.value)
  field, mask = _sphere(tuple(int(n) for n in _SHAPE.value))
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    again = exporting.reexport_model(given, pathlib.Path(tmp) / "qsmgan", 1, {})
    export_s = time.perf_counter() - t0
    # Twice each, alternating, keeping the faster: the first load in a process also pays
    # TensorFlow's own start-up.
    runs = [_measure(path, field, mask) for path in (given, again, given, again)]
  old, new = ({k: min(a[0][k], b[0][k]) for k in a[0]} for a, b in (runs[0::2], runs[1::2]))
  old_out, new_out = runs[0][1], runs[1][1]
  result = {"model": str(given), "export_s": round(export_s, 2), "given": old,
            "reexport": new,
            "ratio": {k: round(new[k] / old[k], 3) for k in old},
            "max_abs_diff": {k: float(np.abs(old_out[k] - new_out[k]).max()) for k in old_out}}
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
