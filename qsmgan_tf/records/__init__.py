"""The TFRecord dataset format: one feature spec for the writer (data_prep) and the reader (data).

An example is one patch pair, a ``tf.train.Example`` whose features sit under namespaced keys:

  ``field/data``, ``field/shape``, ``field/dtype``  input patch of the local field, ppm of B0
  ``chi/data``, ``chi/shape``, ``chi/dtype``        centred target patch (chi or COSMOS), ppm
  ``mask/data``, ``mask/shape``, ``mask/dtype``     brain mask on the target patch, uint8 0/1
  ``meta/...``                                      subject id, voxel size, B0 direction, ...

Every array stores its shape and dtype beside its raw little-endian bytes, so a reader can refuse
bytes it would misread. A dataset folder holds shards ``<split>-%05d-of-%05d.tfrecord`` and a
``manifest.json`` that lists them with their digests.

Modules (each imports only those above it):
  * `schema`: the feature spec and the names (`FORMAT`, `ARRAYS`, `META`, shard names,
    `to_storage`, `check_example`);
  * `framing`: reading the TFRecord framing record by record, with CRC-32C checks that name the
    shard and record (`iter_records`, `count_records`, `ShardError`);
  * `shards`: shards against the manifest (`load_manifest`, `check_shard` levels,
    `check_split`, `locate_data_loss`, fingerprints and digests);
  * `codec`: encoding and decoding with ``tf.train.Example``, TensorFlow's ``parse_batch`` for
    ``tf.data``, ``tf.io.TFRecordWriter`` for hand-built shards. It imports TensorFlow, so this
    package does not re-export it: ``from qsmgan_tf.records import codec``. Importing
    ``qsmgan_tf.records`` loads no TensorFlow (``python -m data_prep.verify --help``, the
    training binary's check of ``--data_dir`` before TensorFlow loads).

What the libraries do and what is kept (issue 17): the protobuf wire format, once written and
parsed by hand, is now ``tf.train.Example`` (same bytes: deterministic serialization sorts the
feature map as the hand-written encoder did); shards are written by Beam's TFRecord sinks and
``tf.io.TFRecordWriter``; the CRC-32C is ``google_crc32c``. Kept: the ~100 lines that read the
framing (`framing` says why: no library reader names the record where data is lost).
"""

from qsmgan_tf.records.framing import (ShardError, count_records, crc_implementation,
                                       iter_records, iter_spans, masked_crc32c)
from qsmgan_tf.records.schema import (ARRAY_DTYPES, ARRAY_UNITS, ARRAYS, BEAM_SHARD_TEMPLATE,
                                      FORMAT, MANIFEST_NAME, META, SCHEMA_VERSION, SHARD_PATTERN,
                                      SHARD_SUFFIX, check_example, to_storage)
from qsmgan_tf.records.shards import (CHECK_LEVELS, ShardScan, check_shard, check_split,
                                      example_set_digest, file_sha256, fingerprint,
                                      load_manifest, locate_data_loss, scan_shard, split_entry,
                                      unlisted_shards)
