"""Smoke test of the README's main command: dataset -> training -> export -> evaluation.

The same pipeline as ``python -m qsmgan_tf.quickstart`` with the ``test_tiny`` preset and a
tiny dataset (about a minute on 2 cores): it proves the stages fit together, not that the
network learns (benchmarks and the model card measure that).
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np


def test_quickstart_runs_the_whole_pipeline(tmp_path):
  work = tmp_path / "qs"
  cmd = [sys.executable, "-m", "qsmgan_tf.quickstart", f"--work_dir={work}",
         "--preset=test_tiny", "--synthetic_brains=2", "--synthetic_shapes=1",
         "--max_patches_per_subject=8", "--methods=qsmgan,qsmgan:refine=none,tkd",
         "--val_shape=48,56,48", "--quiet"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # No alarming line from any stage: no C++ error-level log (grappler's remapper, oneDNN's
  # DT_HALF), no Beam worker chatter, no traceback.
  for alarming in ("E0000", "remapper", "DT_HALF", "sdk_worker", "Traceback"):
    assert alarming not in proc.stderr, (alarming, proc.stderr[-3000:])
  # Every stage left its product where the summary says.
  assert (work / "data" / "manifest.json").exists()
  assert (work / "model" / "generator_final.keras").exists()
  assert (work / "saved_models" / "qsmgan" / "1" / "saved_model.pb").exists()
  report = work / "report"
  for name in ("results.md", "results.json", "figure.png"):
    assert (report / name).exists(), name
  assert "tensorboard --logdir=" in proc.stdout
  # The table on stdout has one row per method.
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
  assert len(rows) == 1 + 3, rows  # header + one row per method (the |---| rule is excluded)
  results = json.loads((report / "results.json").read_text())
  text = json.dumps(results)
  assert "tkd" in text and "qsmgan" in text
  # Refinement makes the (barely trained) network's map consistent with the measured field.
  chimaps = sorted(p for p in os.listdir(report) if p.endswith("_Chimap.nii.gz"))
  assert len(chimaps) == 3, chimaps
  for name in chimaps:
    data = np.asarray(nib.load(str(report / name)).dataobj)
    assert data.shape == (48, 56, 48) and np.isfinite(data).all()


def test_quickstart_does_not_mistake_a_partial_dataset_for_a_whole_one(tmp_path):
  """Only a dataset with its manifest counts as finished; anything else stops the run cleanly."""
  work = tmp_path / "qs"
  work.mkdir()
  (work / "data").mkdir()
  # A folder without manifest.json is not taken as complete: the dataset step runs and refuses
  # to overwrite it (one line, non-zero exit) instead of training on it.
  cmd = [sys.executable, "-m", "qsmgan_tf.quickstart", f"--work_dir={work}",
         "--preset=test_tiny", "--synthetic_brains=1", "--synthetic_shapes=1", "--quiet"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "already exists" in proc.stderr and "step 'dataset' failed" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (work / "model").exists()  # nothing trained on the partial folder
