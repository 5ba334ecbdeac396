"""benchmarks/prior_level.py: bad flags are one line and exit 2, before TensorFlow loads.

The script defines absl flags, so it runs in a subprocess (see test_package.py). Its numbers
need a model and phantoms (minutes): docs/history/BUILD_log.md "The prior's level" quotes them.
"""

import pathlib
import subprocess
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "prior_level.py"


@pytest.mark.parametrize("args, message", [
    (["--shifts_ppm=0,x"], "--shifts_ppm must be numbers"),
    (["--cases=nope"], "unknown cases ['nope']"),
    (["stray"], "unexpected arguments: stray"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
  proc = subprocess.run([sys.executable, str(_SCRIPT), f"--work_dir={tmp_path}", *args],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
