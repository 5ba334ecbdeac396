"""Package-wide invariants: libraries define no absl flags; binaries answer --help quickly.

absl flags live in one global registry, so a library module that defined flags would collide
with every binary that imports it (this happened with evaluate/make_phantom and export/train).
"""

import pkgutil
import subprocess
import sys

import data_prep
import qsmgan_tf

BINARIES = {"qsmgan_tf.predict", "qsmgan_tf.train", "qsmgan_tf.export", "qsmgan_tf.evaluate",
            "qsmgan_tf.quickstart", "data_prep.make_tfrecords", "data_prep.make_phantom",
            "data_prep.verify"}


def _modules():
  names = []
  for package in (qsmgan_tf, data_prep):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
      names.append(info.name)
  return sorted(names)


def test_library_modules_define_no_flags():
  libraries = [m for m in _modules() if m not in BINARIES]
  assert "qsmgan_tf.exporting" in libraries and "qsmgan_tf.evaluation" in libraries
  # Baseline: what absl, TensorFlow and Keras define themselves.
  code = ("import importlib, sys\nfrom absl import app, flags, logging\n"
          "import tensorflow, keras, apache_beam\n"
          "before = set(flags.FLAGS)\n"
          f"for name in {libraries!r}:\n  importlib.import_module(name)\n"
          "print(sorted(set(flags.FLAGS) - before))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_every_binary_answers_help_without_tensorflow():
  # No TF import before --help is answered (it takes seconds to load).
  for name in sorted(BINARIES):
    code = (f"import runpy, sys\nsys.argv = ['{name}', '--help']\n"
            "try:\n"
            f"  runpy.run_module('{name}', run_name='__main__')\n"
            "except SystemExit:\n  pass\n"
            "print('TF', 'tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "TF False", (name, proc.stdout[-500:],
                                                                proc.stderr[-500:])
