"""The sharding stages of the Beam pipeline (`data_prep.sharding`); tests/test_pipeline.py runs
them end to end."""

import pytest

from data_prep import sharding


def test_a_shard_split_over_several_files_is_refused():
  # Beam's file sink names the files of a destination; a shard must be exactly one file.
  name = "train-00000-of-00003.tfrecord"
  assert sharding.shard_file_name(None, None, 0, 1, "", name) == name
  with pytest.raises(RuntimeError, match="2 files for train-00000-of-00003"):
    sharding.shard_file_name(None, None, 1, 2, "", name)
