"""benchmarks/train_on_device.sh, the GPU lease's script (issue 16), at tiny size on the CPU."""

import json
import os
import pathlib
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_on_device.sh"


def _run(tmp_path, **env):
  return subprocess.run(["bash", str(SCRIPT)], cwd=SCRIPT.parents[1], capture_output=True,
                        text=True, check=False, timeout=900,
                        env={**os.environ, "OUT": str(tmp_path / "out"),
                             "WORK": str(tmp_path / "work"), "INSTALL": "0", **env})


def test_tiny_run_leaves_model_logs_and_timings(tmp_path):
  proc = _run(tmp_path, SIZE="tiny")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "out"
  summary = json.loads((out / "summary.json").read_text())
  assert summary["train_status"] == 0 and summary["steps_done_at_least"] == 4
  assert summary["saved_models"] == ["saved_models/1"]
  assert (out / "saved_models" / "1" / "saved_model.pb").is_file()
  assert summary["train_pairs_per_second"] > 0
  steps = {row["step"]: row for row in map(json.loads, (out / "timeline.jsonl").open())}
  assert set(steps) == {"data", "step_times", "train", "export"}
  assert all(row["status"] == 0 and row["seconds"] > 0 for row in steps.values())
  timed = {row["stage"] for row in summary["step_times"] if row.get("s_per_step", 0) > 0}
  assert timed == {"pretrain", "wgan_gp"}, summary["step_times"]
  assert list((out / "run" / "logs" / "train").glob("events.out.tfevents.*"))
  assert summary["best"]["val_nrmse"] > 0


@pytest.mark.parametrize("env,message", [({"SIZE": "huge"}, "SIZE must be gpu or tiny"),
                                         ({"SIZE": "tiny", "STEPS": "4x"}, "STEPS must be")])
def test_bad_settings_are_one_line_errors(tmp_path, env, message):
  proc = _run(tmp_path, **env)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert proc.stderr.startswith("error:") and message in proc.stderr
  assert not (tmp_path / "out").exists()
