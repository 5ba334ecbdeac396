"""The test session exposes two logical CPUs, which the distribution tests rely on."""

import tensorflow as tf


def test_two_logical_cpus():
  # conftest.py splits the CPU before TF initialises; without it MirroredStrategy tests would
  # silently run on one replica.
  assert len(tf.config.list_logical_devices("CPU")) >= 2
