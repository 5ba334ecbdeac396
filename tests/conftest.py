"""Test-session setup shared by every test file.

TensorFlow can split the CPU into logical devices only before it initialises its runtime, so the
split happens here, once, before any test imports a TF-based module: every test then sees
``/cpu:0`` and ``/cpu:1`` and distribution tests can build ``MirroredStrategy`` over both
(distribution is tested on CPU with two logical devices).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):  # pylint: disable=unused-argument
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  cpus = tf.config.list_physical_devices("CPU")
  if cpus:
    try:
      tf.config.set_logical_device_configuration(
          cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
      pass  # Runtime already initialised by a plugin: tests that need 2 devices check it.
