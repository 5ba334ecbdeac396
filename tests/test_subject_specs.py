"""Subject specs: seeds and splits per subject, independent of the count and order."""

import dataclasses

import numpy as np
import pytest

from data_prep import subject_specs
from qsmgan_tf.errors import InputError

# As tests/test_pipeline.py's subjects, at one SNR.
_SPEC_ARGS = dict(val_fraction=0.25, snrs=[100.0], b0_tilts_deg=[0.0, 15.0], shape=(32, 32, 32))


def test_subject_seeds_and_splits_do_not_depend_on_count_or_order():
  few = subject_specs.synthetic_specs(3, 0, 7, val_fraction=0.0)
  many = subject_specs.synthetic_specs(6, 0, 7, val_fraction=0.0)
  assert [(s.subject_id, s.seed, s.snr, s.b0_dir) for s in few] == [
      (s.subject_id, s.seed, s.snr, s.b0_dir) for s in many[:3]]
  ids = [f"s{i}" for i in range(10)]
  splits = subject_specs.assign_splits(ids, 3, 0.3)
  assert splits == subject_specs.assign_splits(ids[::-1], 3, 0.3)
  assert sorted(splits.values()).count("val") == 3
  assert splits != subject_specs.assign_splits(ids, 4, 0.3)
  with pytest.raises(InputError):
    subject_specs.assign_splits(ids, 3, 1.0)


def test_b0_tilt_draws_have_the_requested_angle():
  specs = subject_specs.synthetic_specs(0, 6, 5, b0_tilts_deg=[20.0], val_fraction=0.0)
  for spec in specs:
    assert np.degrees(np.arccos(spec.b0_dir[2])) == pytest.approx(20.0)
  assert len({s.b0_dir for s in specs}) == 6  # random azimuths


def test_model_error_fraction_draws_per_subject_and_keeps_the_rest():
  clean = subject_specs.synthetic_specs(40, 0, 3, **_SPEC_ARGS)
  half = subject_specs.synthetic_specs(40, 0, 3, **_SPEC_ARGS, model_errors="realistic",
                                       model_error_fraction=0.5)
  with_errors = sum(s.model_errors == "realistic" for s in half)
  assert 10 <= with_errors <= 30
  # Everything else about each subject is as without errors.
  assert [dataclasses.replace(s, model_errors="none") for s in half] == clean
