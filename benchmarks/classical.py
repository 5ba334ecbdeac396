"""Benchmark of the classical dipole inversions: time, peak memory, accuracy, padding trade-off.

Builds one simulated brain (``data_prep.simulate.simulate_subject('brain', ...)``, 1 mm,
SNR 100, B0 along z), runs every method of `qsmgan_tf.classical` at its defaults, each in a
fresh subprocess so that its peak resident memory (the process's VmHWM after the inversion
minus the same right before it, inputs already loaded) is its own, and prints one JSON line per method:
wall time (s), time relative to TKD in the same run, extra peak memory (MiB), and the QSM-CI
metrics (`qsmgan_tf.metrics.evaluate`: NRMSE, HFEN, XSIM, ...). Then it measures the padding
trade-off (margins around the mask's bounding box vs the classic 2x grid) for the closed-form
L2 and TV-ADMM, one JSON line per setting.

Usage:
  python benchmarks/classical.py                       # everything, 160x192x160
  python benchmarks/classical.py --methods=tkd,cfl2 --padding=false
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SHAPE = flags.DEFINE_list("shape", ["160", "192", "160"], "Grid (i, j, k) of the phantom.")
_SEED = flags.DEFINE_integer("seed", 0, "Phantom and noise seed.")
_SNR = flags.DEFINE_float("snr", 100.0, "Simulated SNR.")
_METHODS = flags.DEFINE_list("methods", ["tkd", "cfl2", "ilsqr", "medi", "tv"],
                             "Methods to run (TKD always runs first, for the time ratio).")
_PADDING = flags.DEFINE_boolean("padding", True, "Also measure the margin/2x padding trade-off.")
_MARGINS = flags.DEFINE_list("margins", ["0", "6", "12", "24"], "Margins for the padding sweep.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: JSON job for a worker subprocess.")


def _peak_rss_mib() -> float:
  """This process's resident-memory high-water mark, MiB.

  /proc's VmHWM belongs to the process image and restarts at exec; ``ru_maxrss`` does not (a
  child started by a big parent inherits the parent's peak), so it is only the fallback.
  """
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _worker(job: dict) -> None:
  """Runs one inversion in this (fresh) process; prints its time and memory as JSON."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import classical  # pylint: disable=import-outside-toplevel

  data = np.load(job["data"])
  field, mask, magnitude = data["field"], data["mask"].astype(bool), data["magnitude"]
  before = _peak_rss_mib()
  start = time.perf_counter()
  chi = classical.METHODS[job["method"]](field, mask, magnitude=magnitude, **job["params"])
  seconds = time.perf_counter() - start
  peak = _peak_rss_mib()
  np.save(job["out"], chi)
  print(json.dumps({"seconds": seconds, "peak_mib": peak - before}))


def _run(method: str, params: dict, data: str, out: str) -> dict:
  job = json.dumps({"method": method, "params": params, "data": data, "out": out})
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--worker={job}"],
                        check=True, capture_output=True, text=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _WORKER.value:
    _worker(json.loads(_WORKER.value))
    return
  import numpy as np  # pylint: disable=import-outside-toplevel

  from data_prep import simulate  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import classical  # pylint: disable=import-outside-toplevel
  from qsmgan_tf import metrics  # pylint: disable=import-outside-toplevel

  shape = tuple(int(v) for v in _SHAPE.value)
  subject = simulate.simulate_subject("brain", seed=_SEED.value, shape=shape, snr=_SNR.value)
  mask = subject.mask.astype(bool)
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "subject.npz")
    np.savez(data, field=subject.field_ppm, mask=mask, magnitude=subject.magnitude)

    def score(method, params):
      out = os.path.join(tmp, "chi.npy")
      res = _run(method, params, data, out)
      chi = np.load(out)
      m = metrics.evaluate(chi, subject.chi_ppm, mask, seg=subject.seg)
      return res, m

    methods = ["tkd"] + [m for m in _METHODS.value if m != "tkd"]
    tkd_seconds = None
    for method in methods:
      res, m = score(method, {})
      if method == "tkd":
        tkd_seconds = res["seconds"]
      print(json.dumps({
          "benchmark": "classical", "method": method, "shape": shape, "voxels_in_mask":
          int(mask.sum()), "seconds": round(res["seconds"], 3),
          "time_vs_tkd": round(res["seconds"] / tkd_seconds, 2),
          "peak_extra_mib": round(res["peak_mib"], 1),
          "load_avg_1min": round(os.getloadavg()[0], 1),
          **{k: round(m[k], 4) for k in ("nrmse", "nrmse_detrend", "hfen", "xsim",
                                         "correlation", "dgm_linearity") if k in m},
          "params": classical.DEFAULTS[method]}), flush=True)

    if _PADDING.value:
      settings = ([{"margin": int(v), "pad_factor": 1.0} for v in _MARGINS.value]
                  + [{"margin": 0, "pad_factor": 2.0}])
      for method in ("cfl2", "tv"):
        base = None
        for params in settings:
          res, m = score(method, params)
          base = base or res["seconds"]
          print(json.dumps({
              "benchmark": "classical_padding", "method": method, **params,
              "seconds": round(res["seconds"], 3), "time_vs_first": round(res["seconds"] / base, 2),
              "peak_extra_mib": round(res["peak_mib"], 1), "nrmse": round(m["nrmse"], 3),
              "xsim": round(m["xsim"], 4)}), flush=True)


if __name__ == "__main__":
  app.run(main)
