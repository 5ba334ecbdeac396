r"""Whole-volume inference benchmark: QSMGAN (single pass / in-graph tiles / sliding window,
float32 / bfloat16, with / without refinement) next to TKD, in one run, on real volume sizes.

  python benchmarks/inference.py                      # speed + memory, ~5 min on 2 cores
  python benchmarks/inference.py --study=refine       # choose mu / iterations / margin
  python benchmarks/inference.py --shapes=160x192x160 --only=qsmgan_single_f32_cg

Each measurement runs in its own subprocess, so its peak memory (``ru_maxrss`` from
``os.wait4``) is its own; ``seconds`` is the wall time of the reconstruction call alone
(first call, tracing included: what a CLI user waits; single passes also report
``seconds_warm``, a second call on the traced graph), ``process_s`` the whole child. The
generator is the ``paper`` preset with random weights (speed does not depend on training).
The volume is an ellipsoidal "brain" filling 85 % of each axis (a larger bounding box than a
real head in that field of view: a conservative size) with a smooth random chi and its field.
One JSON line per measurement; ``ratio_to_tkd`` compares with TKD of the same run. The
in-graph tiles (``qsmgan_graph_tiles_f32_cg``: the default single-pass path with a contract
budget of one voxel, so `inference.network_volume_tf` tiles with the contract's default tile)
also report ``ratio_to_single`` and ``memory_ratio_to_single`` against
``qsmgan_single_f32_cg`` of the same run.

The refinement study (``--study=refine``) simulates brain and shape phantoms
(`data_prep.simulate`), makes priors of known quality (zero, TKD, and the truth degraded the
way an imperfect network is: blurred, scaled, plus a smooth error) and prints the NRMSE after
CG refinement for a grid of mu, iterations and margins, and after the closed-form variant
for a few lambdas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

_SHAPES = flags.DEFINE_list("shapes", ["160x192x160", "256x256x160"], "Volume shapes, IxJxK.")
_ONLY = flags.DEFINE_list("only", None, "Run only these measurement names.")
_STUDY = flags.DEFINE_enum("study", "speed", ["speed", "refine"], "What to measure.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one measurement (JSON config).")
_THREADS = flags.DEFINE_integer("threads", None, "TF intra-op threads in the children.")

# name -> reconstruct options; 'tkd' is the classical baseline.
MEASUREMENTS = {
    "tkd": {"method": "tkd"},
    "qsmgan_single_f32_none": {"inference": "single", "refine": "none", "precision": "float32"},
    "qsmgan_single_f32_cg": {"inference": "single", "refine": "cg", "precision": "float32"},
    "qsmgan_single_bf16_none": {"inference": "single", "refine": "none", "precision": "bfloat16"},
    "qsmgan_single_bf16_cg": {"inference": "single", "refine": "cg", "precision": "bfloat16"},
    # The SavedModel's path beyond its memory budget: forced here by a one-voxel budget.
    "qsmgan_graph_tiles_f32_cg": {"inference": "single", "refine": "cg", "precision": "float32",
                                  "contract_inference": {"max_single_pass_voxels": 1}},
    "qsmgan_tiled_f32_cg": {"inference": "sliding_window", "refine": "cg",
                            "precision": "float32", "sw_batch_size": 2},
    "qsmgan_tiled_bf16_cg": {"inference": "sliding_window", "refine": "cg",
                             "precision": "bfloat16", "sw_batch_size": 2},
}


def _volume(shape, seed=0):
  """Ellipsoidal mask over 85 % of each axis, smooth random chi (ppm), its field (ppm)."""
  import scipy.ndimage  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
  g = np.meshgrid(*axes, indexing="ij", sparse=True)
  mask = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) < 0.85 ** 2
  chi = scipy.ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3) * 0.5
  chi = (chi * mask).astype(np.float32)
  field = (physics.forward_field(chi, (1, 1, 1), (0, 0, 1)) * mask).astype(np.float32)
  return field, mask


def _child(config: dict) -> dict:
  """One measurement in this process (TKD without TensorFlow, as a user would run it)."""
  if "make_volume" in config:
    from qsmgan_tf import physics  # pylint: disable=import-outside-toplevel
    field, mask = _volume(tuple(config["shape"]))
    np.savez(config["make_volume"], field=field, mask=mask)
    return {"mask_box": [s.stop - s.start for s in physics.bounding_box(mask)]}
  data = np.load(config["volume"])
  field, mask = data["field"], data["mask"]
  options = dict(config["options"])
  contract_inference = options.pop("contract_inference", None)
  t0 = time.perf_counter()
  if options.pop("method", None) == "tkd":
    from qsmgan_tf import classical  # pylint: disable=import-outside-toplevel
    chi = classical.reconstruct("tkd", field, mask)
    info = {}
  else:
    import keras  # pylint: disable=import-outside-toplevel
    from qsmgan_tf import inference  # pylint: disable=import-outside-toplevel
    from qsmgan_tf import networks  # pylint: disable=import-outside-toplevel
    inference.configure_threads(config.get("threads"))
    keras.utils.set_random_seed(0)
    config_g = networks.PRESETS["paper"]
    generator = networks.build_generator(config_g)
    contract = {"generator": config_g.to_dict(), "voxel_size_mm": [1.0, 1.0, 1.0]}
    if contract_inference:
      contract["inference"] = contract_inference
    t0 = time.perf_counter()
    backend = inference.load_backend((generator, contract), precision=options["precision"])
    chi, info = inference.reconstruct_qsmgan(field, mask, (1, 1, 1), (0, 0, 1),
                                             backend=backend, progress=False, **options)
  seconds = time.perf_counter() - t0
  out = {"seconds": round(seconds, 2), "finite": bool(np.isfinite(chi).all())}
  if options.get("inference") == "single":
    # A second call: the graph is traced, as in a server or a batch of subjects.
    t0 = time.perf_counter()
    inference.reconstruct_qsmgan(field, mask, (1, 1, 1), (0, 0, 1), backend=backend,
                                 progress=False, **options)
    out["seconds_warm"] = round(time.perf_counter() - t0, 2)
  for key in ("residual_before", "residual_after", "seconds", "sliding_window", "network_pass"):
    if key in info:
      out["info_" + key if key == "seconds" else key] = info[key]
  return out


def _run_child(config: dict) -> dict:
  """Runs `_child` in a subprocess; adds its peak RSS (GB) and process wall time."""
  t0 = time.perf_counter()
  command = [sys.executable, os.path.abspath(__file__), f"--child={json.dumps(config)}"]
  proc = subprocess.Popen(command,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all children).
  _, status, usage = os.wait4(proc.pid, 0)
  stdout, stderr = proc.stdout.read(), proc.stderr.read()
  proc.returncode = os.waitstatus_to_exitcode(status)
  result = {"process_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}  # ru_maxrss is KiB on Linux
  if proc.returncode != 0:
    result["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
    return result
  result.update(json.loads(stdout.strip().splitlines()[-1]))
  return result


def _speed(shapes):
  with tempfile.TemporaryDirectory() as tmp:
    for text in shapes:
      shape = tuple(int(v) for v in text.lower().split("x"))
      path = os.path.join(tmp, f"vol_{text}.npz")
      # Made in a child: the parent stays small, so a child's ru_maxrss (which on Linux starts
      # from the parent's RSS at fork) measures the child.
      box = _run_child({"make_volume": path, "shape": list(shape)})["mask_box"]
      tkd_s = single = None
      for name, options in MEASUREMENTS.items():
        if _ONLY.value and name not in _ONLY.value and name != "tkd":
          continue
        if name == "qsmgan_tiled_bf16_cg" and shape[0] > 200:
          continue  # keeps the run under 10 min; bf16 tiling is measured on the smaller size
        load = os.getloadavg()[0]  # other jobs on the machine show up here, not in ratios
        result = _run_child({"volume": path, "options": options, "threads": _THREADS.value})
        result["load_avg_1m"] = round(load, 2)
        if name == "tkd":
          tkd_s = result.get("seconds")
        elif tkd_s and "seconds" in result:
          result["ratio_to_tkd"] = round(result["seconds"] / tkd_s, 1)
        if name == "qsmgan_single_f32_cg":
          single = result
        elif (name == "qsmgan_graph_tiles_f32_cg" and single and "seconds" in single
              and "seconds" in result):
          result["ratio_to_single"] = round(result["seconds"] / single["seconds"], 2)
          result["memory_ratio_to_single"] = round(result["peak_rss_gb"] / single["peak_rss_gb"],
                                                   2)
        print(json.dumps({"benchmark": "inference", "name": name, "shape": list(shape),
                          "mask_box": box, **result}), flush=True)


# --------------------------------------------------------------------------------------
# Refinement study
# --------------------------------------------------------------------------------------
def _nrmse(x, y, mask):
  x = x[mask] - x[mask].mean()
  y = y[mask] - y[mask].mean()
  return round(100.0 * float(np.linalg.norm(x - y) / np.linalg.norm(y)), 2)


def _degraded(chi, mask, seed):
  """A stand-in for an imperfect network: blurred, under-scaled, plus a smooth error."""
  import scipy.ndimage  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  blur = scipy.ndimage.gaussian_filter(chi, 1.2) * 0.8
  err = scipy.ndimage.gaussian_filter(rng.standard_normal(chi.shape).astype(np.float32), 4)
  err *= 0.25 * np.std(chi[mask]) / max(np.std(err[mask]), 1e-12)
  return ((blur + err) * mask).astype(np.float32)


def _study():
  from data_prep import simulate  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import classical  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import physics  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import refine  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  specs = [tf.TensorSpec([None, None, None], tf.float32)] * 3 + [
      tf.TensorSpec([3], tf.float32)] * 2 + [tf.TensorSpec([], tf.float32),
                                             tf.TensorSpec([], tf.int32),
                                             tf.TensorSpec([], tf.int32)]
  refine_fn = tf.function(refine.refine_tf, input_signature=specs)
  subjects = [("brain", 101, (0, 0, 1)), ("brain", 102, physics.unit_vector((0.26, 0, 0.97))),
              ("shapes", 103, (0, 0, 1))]
  for kind, seed, b0 in subjects:
    shape = (160, 192, 160) if kind == "brain" else (128, 128, 128)
    sub = simulate.simulate_subject(kind, seed, shape=shape, b0_dir=b0, snr=100.0)
    chi, field, mask = sub.chi_ppm, sub.field_ppm, sub.mask
    b0 = np.float32(sub.b0_dir)
    voxel = np.float32(sub.voxel_size_mm)
    priors = {"zero": np.zeros_like(chi), "tkd": classical.reconstruct("tkd", field, mask,
                                                                       b0_dir=b0),
              "degraded": _degraded(chi, mask, seed)}
    for prior_name, prior in priors.items():
      base = {"study": "refine", "subject": f"{kind}-{seed}", "b0_dir": [round(float(v), 3)
                                                                         for v in b0],
              "prior": prior_name, "prior_nrmse": _nrmse(prior, chi, mask)}
      for mu in (0.001, 0.003, 0.01, 0.03):
        for iterations in (5, 15, 30):
          t0 = time.perf_counter()
          out = refine_fn(prior, field, mask.astype(np.float32), voxel, b0, np.float32(mu),
                          np.int32(iterations), np.int32(refine.DEFAULTS["margin"])).numpy()
          print(json.dumps({**base, "mu": mu, "iterations": iterations,
                            "margin": refine.DEFAULTS["margin"], "nrmse": _nrmse(out, chi, mask),
                            "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
      for lam in (0.005, 0.01, 0.02, 0.05):
        out = refine.refine_closed_form(prior, field, mask, voxel, b0, lam=lam)
        print(json.dumps({**base, "method": "closed", "lam": lam,
                          "nrmse": _nrmse(out, chi, mask)}), flush=True)
      if prior_name != "degraded":
        continue
      for margin in (0, 4, 8, 12, 16, 24, 48):
        params = dict(refine.DEFAULTS, margin=margin)
        t0 = time.perf_counter()
        out = refine_fn(prior, field, mask.astype(np.float32), voxel, b0,
                        np.float32(params["mu"]), np.int32(params["iterations"]),
                        np.int32(margin)).numpy()
        seconds = time.perf_counter() - t0
        print(json.dumps({**base, **params, "nrmse": _nrmse(out, chi, mask),
                          "residual": round(refine.field_residual(out, field, mask, voxel, b0), 4),
                          "seconds": round(seconds, 2)}), flush=True)


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_child(json.loads(_CHILD.value))), flush=True)
    return
  if _STUDY.value == "refine":
    _study()
  else:
    _speed(_SHAPES.value)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
