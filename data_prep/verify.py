r"""Checks a TFRecord dataset folder against its manifest; exit 0 when whole, 2 otherwise.

  python -m data_prep.verify /data/qsm_train [--level=full]

Levels (each includes the previous): ``exists`` (listed shards present, none unlisted, sizes and
fingerprints), ``records`` (record counts), ``sha256`` (file hashes), ``full`` (default: every
record's CRC, its features' dtypes and shapes against the manifest, and the example-set digest).
The first problem is printed as one line naming the shard (and record), e.g.

  error: train-00003-of-00016.tfrecord: record 41: corrupted record data (CRC mismatch)

The framing, CRCs (google-crc32c) and hashes are read without TensorFlow; only ``full`` parses
every record with ``tf.train.Example`` (`qsmgan_tf.records.codec`), so it also loads TensorFlow
(seconds, once).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from qsmgan_tf import cli
from qsmgan_tf import records
from qsmgan_tf.errors import InputError

_LEVEL = flags.DEFINE_enum("level", "full", list(records.CHECK_LEVELS), "How deep to check.")


def verify_dataset(data_dir, level: str = "full") -> dict:
  """Checks every split of a dataset; returns ``{split: number of examples}``.

  Raises:
    InputError: the first problem, one line naming the file (a `records.ShardError` for shards).
  """
  manifest = records.load_manifest(data_dir)
  counts = {}
  for split in sorted(manifest.get("splits", {})):
    entry = manifest["splits"][split]
    records.check_split(data_dir, manifest, split, "exists")
    hashes = []
    for shard in entry["shards"]:
      got = records.check_shard(data_dir, shard, level, manifest.get("features"))
      if got is not None:
        hashes.extend(got)
    if level == "full":
      if len(hashes) != entry["num_examples"]:
        raise InputError(f"{data_dir}: split {split} holds {len(hashes)} examples, the manifest "
                         f"says {entry['num_examples']}")
      if records.example_set_digest(hashes) != entry["example_digest"]:
        raise InputError(f"{data_dir}: split {split}: example digest differs from the manifest")
    counts[split] = entry["num_examples"]
  return counts


@cli.one_line_errors
def main(argv):
  if len(argv) != 2:
    raise InputError("usage: python -m data_prep.verify DATASET_DIR [--level=...]")
  # Level full loads TensorFlow for tf.train.Example alone and runs no TensorFlow op. Without
  # its INFO lines (CPU features) and oneDNN (whose notice no log level hides), TensorFlow
  # prints nothing as it loads, so a problem stays one line on stderr.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  counts = verify_dataset(argv[1], _LEVEL.value)
  print(f"ok: {argv[1]}: " + ", ".join(f"{s} {n} examples" for s, n in counts.items())
        + f" (level {_LEVEL.value})")
  return 0


if __name__ == "__main__":
  app.run(main)
