"""Strategy and mixed-precision selection for training.

Order matters: make the strategy first (MultiWorkerMirroredStrategy must exist before other TF
ops), then set the precision policy, then build models inside ``strategy.scope()``: a layer takes
the global policy when it is constructed.

  strategy = distribute.make_strategy('auto')
  policy = distribute.set_precision('auto')

Measured on this project's 2-core CPU machine: mixed_bfloat16 is the fastest CPU policy where
the CPU has AVX512-BF16/AMX; mixed_float16 on CPU is ~1000x slower in conv backprop, so 'auto'
picks float16 only on GPUs.
"""

from __future__ import annotations

import json
import os

from absl import logging
import keras
import tensorflow as tf

from qsmgan_tf.errors import InputError

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

# One strategy object per kind and device set for the whole process: a second
# MirroredStrategy over the same devices reuses collective instance keys and the replicas' all-
# reduces get mismatched ("Shape mismatch in the collective instance"), measured here.
_STRATEGY_CACHE: dict[tuple, tf.distribute.Strategy] = {}


def cpu_supports_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
  """True when the CPU flags list AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo)."""
  try:
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          return any(flag in flags for flag in _BF16_CPU_FLAGS)
  except OSError:
    pass
  return False


def resolve_precision(precision: str, has_gpu: bool | None = None,
                      cpuinfo_path: str = "/proc/cpuinfo") -> str:
  """Turns 'auto' into a concrete Keras policy name.

  Args:
    precision: one of PRECISIONS.
    has_gpu: override GPU detection (None = ask TensorFlow).
    cpuinfo_path: where CPU flags are read from.

  Returns:
    'float32', 'mixed_bfloat16' or 'mixed_float16'.

  Raises:
    InputError: unknown precision.
  """
  if precision not in PRECISIONS:
    raise InputError(f"unknown --precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
  if precision != "auto":
    return precision
  if has_gpu is None:
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
  if has_gpu:
    return "mixed_float16"
  return "mixed_bfloat16" if cpu_supports_bf16(cpuinfo_path) else "float32"


def set_precision(precision: str = "auto") -> str:
  """Sets the global Keras dtype policy; call before any layer exists. Returns its name."""
  name = resolve_precision(precision)
  keras.mixed_precision.set_global_policy(name)
  logging.info("precision policy: %s", name)
  return name


def _tf_config() -> dict:
  text = os.environ.get("TF_CONFIG", "")
  if not text:
    return {}
  try:
    return json.loads(text)
  except json.JSONDecodeError as exc:
    raise InputError(f"TF_CONFIG is not valid JSON: {exc}") from exc


def _num_workers(tf_config: dict) -> int:
  cluster = tf_config.get("cluster", {})
  return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
  """Builds (or reuses) a distribution strategy.

  'auto': multi_worker when TF_CONFIG names more than one worker, mirrored over the GPUs when
  there are several, else one_device (GPU 0 or CPU 0). 'mirrored' without GPUs mirrors over the
  logical CPU devices (useful for tests; on a real CPU box one device is as fast).

  Args:
    name: one of STRATEGIES.

  Returns:
    A tf.distribute.Strategy.

  Raises:
    InputError: unknown name, or 'multi_worker' without a usable TF_CONFIG.
  """
  if name not in STRATEGIES:
    raise InputError(f"unknown --strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
  tf_config = _tf_config()
  if name == "auto" and _num_workers(tf_config) > 1:
    name = "multi_worker"
  if name == "multi_worker":
    if not tf_config.get("cluster"):
      raise InputError("--strategy=multi_worker needs TF_CONFIG with a 'cluster' and a 'task'")
    key = ("multi_worker",)
  else:
    # Physical devices: listing logical ones would start the runtime, after which a
    # MultiWorkerMirroredStrategy can no longer configure its collectives.
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
      name = "mirrored" if len(gpus) > 1 else "one_device"
    if name == "mirrored":
      devices = ([d.name for d in tf.config.list_logical_devices("GPU")] or
                 [d.name for d in tf.config.list_logical_devices("CPU")])
      key = ("mirrored", tuple(devices))
    else:
      key = ("one_device", "/gpu:0" if gpus else "/cpu:0")
  if key not in _STRATEGY_CACHE:
    if key[0] == "multi_worker":
      strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif key[0] == "mirrored":
      strategy = tf.distribute.MirroredStrategy(list(key[1]))
    else:
      strategy = tf.distribute.OneDeviceStrategy(key[1])
    _STRATEGY_CACHE[key] = strategy
  strategy = _STRATEGY_CACHE[key]
  logging.info("strategy: %s, %d replica(s)", key[0], strategy.num_replicas_in_sync)
  return strategy


def task_info(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
  """(task_type, task_id) of this process; (None, 0) outside multi-worker training."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not getattr(resolver, "task_type", None):
    return None, 0
  return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the process that writes logs, best models and progress bars."""
  task_type, task_id = task_info(strategy)
  if task_type is None:
    return True
  if task_type == "chief":
    return True
  # Without a 'chief' entry, worker 0 plays the chief (the TF convention).
  cluster = _tf_config().get("cluster", {})
  return task_type == "worker" and task_id == 0 and "chief" not in cluster
