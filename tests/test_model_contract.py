"""Tests for qsmgan_tf.model_contract (the typed contract) and qsmgan_tf.model_location (the one
resolver of ``--model``, ``--from_model`` and ``--init_from``)."""

import json

import numpy as np
import pytest

from qsmgan_tf import model_location
from qsmgan_tf.errors import InputError
from qsmgan_tf.model_contract import ModelContract

_GEN = {"depth": 2, "input_patch": 24, "output_patch": 16, "base_filters": 4}


def test_old_spellings_migrate_to_the_canonical_keys():
  old = {"generator_config": _GEN, "training": {"trained_voxel_size_mm": [1, 1, 2]},
         "trained_b0_dir": [[0.0, 0.0, 2.0], [0.0, 0.6, 0.8]], "refine": {"mu": 0.01}}
  contract = ModelContract.from_dict(old)
  assert contract.generator == _GEN and "generator_config" not in contract
  assert (contract.input_patch, contract.output_patch, contract.crop_margin,
          contract.size_multiple) == (24, 16, 4, 4)
  assert contract.voxel_sizes_mm == ((1.0, 1.0, 2.0),)
  assert contract.b0_dir == (0.0, 0.0, 1.0)  # the first of several, normalised
  assert contract.refine == {"mu": 0.01} and contract.inference == {} and contract.export == {}
  # The generator at the top level (the oldest contracts), and nothing stated at all.
  assert ModelContract.from_dict(dict(_GEN)).generator["depth"] == 2
  empty = ModelContract.of(None)
  assert empty.voxel_sizes_mm == () and empty.b0_dir == (0.0, 0.0, 1.0)
  assert not empty.has_generator
  with pytest.raises(InputError, match="no generator config"):
    empty.input_patch  # pylint: disable=pointless-statement
  # Migrating is idempotent: the canonical form is its own migration.
  assert ModelContract.from_dict(contract.to_dict()) == contract


def test_a_contract_is_frozen_and_replace_makes_a_new_one():
  contract = ModelContract.from_dict({"generator": _GEN, "refine": {"mu": 0.01}})
  with pytest.raises(TypeError):
    contract["refine"] = {}  # pylint: disable=unsupported-assignment-operation
  contract["refine"]["mu"] = 1.0  # a copy: the contract does not change
  contract.refine["mu"] = 1.0
  assert contract.refine == {"mu": 0.01}
  other = contract.replace(refine={"mu": 0.02}, inference={"tile_overlap": 0.5})
  assert other.refine == {"mu": 0.02} and other.inference == {"tile_overlap": 0.5}
  assert contract.refine == {"mu": 0.01}
  assert "refine" not in contract.replace(refine=None)
  assert dict(contract, refine={"mu": 3})["refine"] == {"mu": 3}  # a read-only Mapping


def test_write_and_read_round_trip_in_each_place_a_contract_lives(tmp_path):
  contract = ModelContract.from_dict({"generator": _GEN, "voxel_sizes_mm": np.ones((2, 3)),
                                      "b0_dirs_trained": [[0, 0, 1]]})
  contract.write(tmp_path / "contract.json")
  (tmp_path / "1" / "assets").mkdir(parents=True)
  contract.write(tmp_path / "1" / "assets" / "contract.json")
  for where in (tmp_path / "contract.json", tmp_path, tmp_path / "1"):
    assert ModelContract.read(where) == contract
  assert json.loads((tmp_path / "contract.json").read_text())["voxel_sizes_mm"] == [[1.0] * 3] * 2
  assert ModelContract.parse(contract.to_json()) == contract


@pytest.mark.parametrize("raw,message", [
    ({"voxel_sizes_mm": [1.0, -1.0, 1.0]}, "voxel_sizes_mm: voxel sizes must be 3 positive"),
    ({"voxel_size_mm": "big"}, "voxel_size_mm"),
    ({"b0_dir": [0, 0, 0]}, "b0_dir: need 3 numbers, not all zero"),
    ({"refine": [1, 2]}, "refine: expected an object"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_contracts_are_one_line_input_errors(raw, message):
  with pytest.raises(InputError, match=message):
    ModelContract.from_dict(raw)


def test_unreadable_contracts_name_the_file(tmp_path):
  with pytest.raises(InputError, match="no contract.json at"):
    ModelContract.read(tmp_path)
  (tmp_path / "contract.json").write_text("{not json")
  with pytest.raises(InputError, match="cannot read model contract .*contract.json"):
    ModelContract.read(tmp_path)


def _training_folder(path, *names):
  path.mkdir(parents=True)
  ModelContract.from_dict({"generator": _GEN}).write(path / "contract.json")
  for name in names:
    (path / name).write_bytes(b"")
  return path


def test_the_resolver_prefers_best_then_final_and_finds_newest_versions(tmp_path):
  both = _training_folder(tmp_path / "both", *model_location.GENERATOR_FILES)
  where = model_location.resolve_model(both)
  assert (where.kind, where.path.name) == ("keras", "generator_best.keras")
  assert where.contract().input_patch == 24
  final = _training_folder(tmp_path / "final", "generator_final.keras")
  assert model_location.resolve_model(final).path.name == "generator_final.keras"
  with pytest.raises(InputError, match="training folder has no generator_best.keras or "
                                       "generator_final.keras"):
    model_location.resolve_model(_training_folder(tmp_path / "none"))
  bare = tmp_path / "bare.keras"
  bare.write_bytes(b"")
  where = model_location.resolve_model(bare)
  assert where.contract_path is None
  with pytest.raises(InputError, match="no contract.json beside bare.keras"):
    where.contract()
  base = tmp_path / "saved_models" / "qsmgan"
  for version in ("2", "10", "notes"):
    (base / version).mkdir(parents=True)
    (base / version / "saved_model.pb").write_bytes(b"")
  assert model_location.list_versions(base) == [2, 10]
  where = model_location.resolve_model(base)
  assert (where.kind, where.path) == ("saved_model", base / "10")
  assert where.contract_path == base / "10" / "assets" / "contract.json"
  assert model_location.resolve_model(None, default_base=base).path == base / "10"
  with pytest.raises(InputError, match="model not found"):
    model_location.resolve_model(tmp_path / "missing")
  with pytest.raises(InputError, match="no QSMGAN model found in"):
    model_location.resolve_model(None, default_base=tmp_path / "empty")
  with pytest.raises(InputError, match="no SavedModel in"):
    model_location.resolve_model(tmp_path / "saved_models")
