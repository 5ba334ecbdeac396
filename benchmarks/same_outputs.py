r"""Do `predict` and `evaluate` give the same outputs at another commit? (issue 17's check)

  python benchmarks/same_outputs.py [--before=c9e8bbb] [--model=<folder in the before tree>] \
      [--voxel_size_mm=1,1,2] [--b0_dir=0.2,0,1]

Extracts ``--before`` (default c9e8bbb, the last commit before issue 17 split inference.py,
records.py, refine.py and the data_prep and training modules) into a temporary folder with
``git archive``, writes one small shape phantom with this tree's `data_prep.make_phantom`, then
runs in BOTH trees, each as its own processes (``PYTHONPATH`` = that tree):

  * ``predict --method=qsmgan`` (refined), ``--method=qsmgan --refine=none`` and ``--method=tkd``;
  * ``evaluate --methods=qsmgan,tkd`` against the phantom's truth.

The model is the same for both: ``--model``, by default the newest SavedModel of the before tree
(a model the older code fully understands: a newer contract may hold refinement keys the older
code ignores). Prints one JSON line per output (largest absolute difference of each map, ppm;
each metric of results.json that differs; the sidecar values that differ once timings and
paths are set aside, and the sidecar keys only one side has, e.g. a refinement parameter added
since, at its default) and a last line ``{"identical": true|false}``. Needs git and the
repository's history.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
from absl import app
from absl import flags

_BEFORE = flags.DEFINE_string("before", "c9e8bbb", "Commit to compare this tree with.")
_MODEL = flags.DEFINE_string("model", None, "SavedModel folder (default: the before tree's "
                             "newest saved_models/qsmgan/<version>).")
_SEED = flags.DEFINE_integer("seed", 4242, "Phantom seed.")
_SHAPE = flags.DEFINE_string("shape", "56,60,52", "Phantom grid i,j,k.")
_VOXEL = flags.DEFINE_string("voxel_size_mm", "1,1,1", "Phantom voxel size, mm: one the model "
                             "was not trained on (e.g. 1,1,2) sends predict through the model's "
                             "frame and the refinement outside the SavedModel's graph.")
_B0 = flags.DEFINE_string("b0_dir", "0,0,1", "Phantom B0 direction (voxel frame).")

_REPO = pathlib.Path(__file__).resolve().parents[1]
# Sidecar and results.json keys that differ between runs for reasons other than the outputs.
_VOLATILE = {"seconds", "time_s", "created_utc", "date", "elapsed_s", "code_version", "command",
             "model", "output", "field", "mask", "truth", "out_dir", "path", "host", "python",
             "argv", "timings", "duration_s"}


def _extract(rev: str, into: pathlib.Path) -> pathlib.Path:
  archive = into / "before.tar"
  with open(archive, "wb") as out:
    subprocess.run(["git", "-C", str(_REPO), "archive", rev], stdout=out, check=True)
  tree = into / "before"
  with tarfile.open(archive) as tar:
    tar.extractall(tree, filter="data")
  return tree


def _run(tree: pathlib.Path, *args: str) -> None:
  env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "2"}
  done = subprocess.run([sys.executable, "-m", *args], cwd=tree, env=env, capture_output=True,
                        text=True)
  if done.returncode:
    raise RuntimeError(f"{args[0]} failed in {tree}: {done.stderr.strip().splitlines()[-1:]}")


def _stable(value):
  """A JSON value without the keys that vary from run to run."""
  if isinstance(value, dict):
    return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
  if isinstance(value, list):
    return [_stable(v) for v in value]
  return value


def _flat(value, prefix=""):
  """{'a.b': leaf} for nested dicts (lists are leaves)."""
  if not isinstance(value, dict):
    return {prefix: value}
  out = {}
  for key, item in value.items():
    out.update(_flat(item, f"{prefix}.{key}" if prefix else key))
  return out


def _outputs(tree, phantom, model, out):
  out.mkdir()
  inputs = [f"--field={phantom / 'field.nii.gz'}", f"--mask={phantom / 'mask.nii.gz'}"]
  for name, extra in (("qsmgan", ["--method=qsmgan", f"--model={model}"]),
                      ("network", ["--method=qsmgan", f"--model={model}", "--refine=none"]),
                      ("tkd", ["--method=tkd"])):
    _run(tree, "qsmgan_tf.predict", *inputs, *extra, f"--output={out / name}_Chimap.nii.gz",
         "--quiet")
  _run(tree, "qsmgan_tf.evaluate", *inputs, f"--truth={phantom / 'chi.nii.gz'}",
       "--methods=qsmgan,tkd", f"--model={model}", f"--out_dir={out / 'evaluate'}", "--quiet")


def main(argv):
  del argv
  import nibabel  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    before = _extract(_BEFORE.value, tmp)
    model = pathlib.Path(_MODEL.value) if _MODEL.value else max(
        (p for p in (before / "saved_models" / "qsmgan").iterdir() if p.name.isdigit()),
        key=lambda p: int(p.name))
    _run(_REPO, "data_prep.make_phantom", "--kind=shapes", f"--seed={_SEED.value}",
         f"--shape={_SHAPE.value}", f"--voxel_size_mm={_VOXEL.value}", f"--b0_dir={_B0.value}",
         f"--out_dir={tmp}", "--subject_id=phantom")
    phantom = tmp / "phantom"
    trees = {"before": before, "after": _REPO}
    outs = {label: tmp / f"out-{label}" for label in trees}
    for label, tree in trees.items():
      _outputs(tree, phantom, model.resolve(), outs[label])
    identical = True
    for name in ("qsmgan", "network", "tkd"):
      maps = [np.asarray(nibabel.load(outs[label] / f"{name}_Chimap.nii.gz").dataobj)
              for label in trees]
      sidecars = [_flat(_stable(json.loads((outs[label] / f"{name}_Chimap.json").read_text())))
                  for label in trees]
      shared = sidecars[0].keys() & sidecars[1].keys()
      differing = sorted(k for k in shared if sidecars[0][k] != sidecars[1][k])
      diff = float(np.max(np.abs(maps[0] - maps[1])))
      identical &= diff == 0.0 and not differing
      # Keys only one side has are new or retired options (e.g. a new refinement parameter at
      # its default): listed, not counted as a difference of the outputs.
      print(json.dumps({"output": f"predict {name}", "max_abs_diff_ppm": diff,
                        "sidecar_values_differing": differing,
                        "sidecar_keys_only_before": sorted(sidecars[0].keys() - shared),
                        "sidecar_keys_only_after": sorted(sidecars[1].keys() - shared)}),
            flush=True)
    results = [json.loads((outs[label] / "evaluate" / "results.json").read_text())
               for label in trees]
    for row_before, row_after in zip(results[0]["methods"], results[1]["methods"]):
      metrics = [_stable(row["metrics"]) for row in (row_before, row_after)]
      differing = {k: (v, metrics[1].get(k)) for k, v in metrics[0].items()
                   if v != metrics[1].get(k)}
      identical &= not differing
      print(json.dumps({"output": f"evaluate {row_before.get('label')}",
                        "metrics_differing": differing}), flush=True)
    print(json.dumps({"before": _BEFORE.value, "model": model.name, "identical": identical}))


if __name__ == "__main__":
  app.run(main)
