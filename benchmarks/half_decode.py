r"""Decoding float16 patch bytes to float32: TensorFlow's half cast against our integer decode.

  python benchmarks/half_decode.py [--patches=8] [--repeats=20]

`codec.parse_batch` decodes float16 arrays with `codec.half_bits_to_float32` (integer ops;
why: its docstring) instead of ``decode_raw(float16)`` + ``cast``. Both run here side by side on
random 64^3 patches, twice, in one process; one JSON line per round with milliseconds per
patch and the ratio, plus whether the two agree exactly.
"""
import json
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from qsmgan_tf.records import codec

_PATCHES = flags.DEFINE_integer("patches", 8, "64^3 patches per call.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per decoder and round.")


def main(argv):
  del argv
  x = np.random.default_rng(0).normal(scale=0.05, size=(_PATCHES.value, 64**3))
  raw = tf.constant([row.astype(np.float16).tobytes() for row in x])
  cast = tf.function(lambda r: tf.cast(tf.io.decode_raw(r, tf.float16), tf.float32))
  ours = tf.function(lambda r: codec.half_bits_to_float32(tf.io.decode_raw(r, tf.uint16)))
  same = bool(np.array_equal(cast(raw).numpy(), ours(raw).numpy()))
  for round_index in range(2):
    ms = {}
    for name, fn in (("cast_ms", cast), ("integer_ms", ours)):
      t0 = time.perf_counter()
      for _ in range(_REPEATS.value):
        fn(raw).numpy()
      ms[name] = (time.perf_counter() - t0) / _REPEATS.value / _PATCHES.value * 1e3
    print(json.dumps({"round": round_index, **{k: round(v, 3) for k, v in ms.items()},
                      "ratio": round(ms["integer_ms"] / ms["cast_ms"], 2),
                      "identical": same}), flush=True)


if __name__ == "__main__":
  app.run(main)
