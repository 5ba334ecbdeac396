"""Tests for qsmgan_tf.export: the TF Serving SavedModel layout, signatures and contract."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from qsmgan_tf import exporting as export  # the library behind the binary
from qsmgan_tf import inference
from qsmgan_tf import networks
from qsmgan_tf import refine
from qsmgan_tf import training_folder
from qsmgan_tf.errors import InputError

keras = pytest.importorskip("keras")

_REPO = pathlib.Path(__file__).resolve().parents[1]
_MANIFEST_SHA = "5b1f0c9e" * 8


def _contract(config):
  """A contract shaped like training_folder.build_contract's."""
  return {
      "generator": config.to_dict(),
      "input_patch": config.input_patch,
      "output_patch": config.output_patch,
      "voxel_sizes_mm": [[1.0, 1.0, 1.0]],
      "b0_dir": [0.0, 0.0, 1.0],
      "dipole_convention": "D(k) = 1/3 - (k.b0)^2/|k|^2, D(0) = 0",
      "normalisation": {"input": "field_ppm * 10.0", "output": "linear, chi_scale 10.0"},
      "data_manifest_sha256": _MANIFEST_SHA,
      "code_version": "0.1.0",
  }


def _run_export(*args):
  return subprocess.run([sys.executable, "-m", "qsmgan_tf.export", *map(str, args)], cwd=_REPO,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A test_tiny training folder, exported: (version dir, generator, contract)."""
  keras.utils.set_random_seed(11)
  config = networks.PRESETS["test_tiny"]
  generator = networks.build_generator(config)
  # Non-trivial BatchNorm statistics: inference must use them (training=False), not batch stats.
  rng = np.random.default_rng(0)
  for layer in generator.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape) * 0.1)
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=layer.moving_variance.shape))
  model_dir = tmp_path_factory.mktemp("run")
  (model_dir / "contract.json").write_text(json.dumps(_contract(config)))
  generator.save(model_dir / "generator_best.keras")
  base = model_dir.parent / "saved_models" / "qsmgan"
  (base / "notes").mkdir(parents=True)  # not a version: TF Serving and export ignore it
  # In-process (the binary's main is this call plus flags; its error paths are tested below).
  traces = []
  with pytest.MonkeyPatch.context() as patch:  # counts the refinement's traces
    patch.setattr(refine, "refine_tf", lambda *a, _f=refine.refine_tf, **k: traces.append(1)
                  or _f(*a, **k))
    path = export.export_model(model_dir, base)
  assert path == base / "1"
  _TRACES.append(len(traces))
  return path, generator, _contract(config)


_TRACES = []


def test_the_refinement_is_traced_once_per_signature(exported):
  """predict_volume, predict_volume_magnitude and refine: three traces, none again at save
  time (keras.export.ExportArchive's tf.function attributes were traced again in the save
  context and stored twice: twice the export time and saved_model.pb)."""
  del exported
  assert _TRACES == [3]


@pytest.fixture(scope="module")
def loaded(exported):
  return export.load(exported[0])


def test_serving_default_matches_keras_model(exported, loaded):
  _, generator, contract = exported
  model, _ = loaded
  signature = model.signatures["serving_default"]
  spec = signature.structured_input_signature[1]["field_ppm"]
  assert spec.shape.as_list() == [None, contract["input_patch"], contract["input_patch"],
                                  contract["input_patch"], 1]
  x = (np.random.default_rng(1).normal(size=(3, 24, 24, 24, 1)) * 0.05).astype(np.float32)
  out = signature(field_ppm=tf.constant(x))
  assert list(out) == ["chi_ppm"]
  assert out["chi_ppm"].shape == (3, 16, 16, 16, 1)
  np.testing.assert_allclose(out["chi_ppm"].numpy(), generator(x, training=False).numpy(),
                             atol=1e-6)
  # The exported BatchNorm statistics are the trained ones: with default statistics (a copy of
  # the weights with moving mean 0 / variance 1) the answer differs. (Not training=True here:
  # that would update the shared generator's statistics.)
  fresh = networks.build_generator(networks.PRESETS["test_tiny"])
  fresh.set_weights(generator.get_weights())
  for layer in fresh.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.moving_mean.assign(np.zeros(layer.moving_mean.shape))
      layer.moving_variance.assign(np.ones(layer.moving_variance.shape))
  assert np.abs(fresh(x, training=False).numpy() - out["chi_ppm"].numpy()).max() > 1e-3


def test_predict_volume_equals_inference_local_path(exported, loaded):
  _, generator, contract = exported
  model, served_contract = loaded
  shape = (30, 28, 26)
  idx = np.indices(shape)
  mask = ((((idx - np.reshape([14.5, 13.5, 12.5], (3, 1, 1, 1))) / 11.0) ** 2).sum(0) < 1
          ).astype(np.float32)
  field = (np.random.default_rng(2).normal(size=shape) * 0.02 * mask).astype(np.float32)
  b0, voxel = np.float32([0.0, 0.6, 0.8]), np.float32([1.0, 1.0, 1.2])
  served = model.signatures["predict_volume"](field_ppm=field, mask=mask, b0_dir=b0,
                                              voxel_size_mm=voxel)
  local = inference.make_predict_volume_fn(generator, served_contract)(field, mask, voxel, b0)
  assert set(served) == set(local)
  for key in local:
    np.testing.assert_allclose(served[key].numpy(), local[key].numpy(), atol=1e-5, err_msg=key)
  net = model.signatures["network_volume"](field_ppm=field, mask=mask)["chi_ppm"].numpy()
  np.testing.assert_allclose(net, served["chi_net_ppm"].numpy(), atol=1e-6)
  # The refinement ran and lowered the field residual.
  assert served["residual_after"].numpy() < served["residual_before"].numpy()
  chi_net = served["chi_net_ppm"].numpy()
  refined = model.signatures["refine"](chi_net_ppm=chi_net, field_ppm=field, mask=mask,
                                       b0_dir=b0, voxel_size_mm=voxel)
  np.testing.assert_allclose(refined["chi_ppm"].numpy(), served["chi_ppm"].numpy(), atol=1e-5)


def test_predict_volume_tiles_in_graph_with_a_small_budget(exported, tmp_path):
  """A contract whose budget no volume fits: the served network pass is the in-graph tiles
  (== `volume_tiles_tf`, != the single pass), shapes unchanged, and the contract says so."""
  _, generator, contract = exported
  budget = {"max_single_pass_voxels": 1, "tile_output_voxels": 16, "tile_overlap": 0.25}
  path = export.export_generator(generator, dict(contract, inference=budget), tmp_path / "q")
  model, served_contract = export.load(path)
  assert served_contract["inference"] == {**budget, "field_reference_std_ppm": 0.0}
  shape = (29, 34, 23)  # odd: the mask's box is no multiple of the tile or its step
  idx = np.indices(shape)
  mask = ((((idx - np.reshape([14.0, 16.5, 11.0], (3, 1, 1, 1))) / [[[[12.0]]], [[[15.0]]],
                                                                     [[[10.0]]]]) ** 2).sum(0)
          < 1).astype(np.float32)
  field = (np.random.default_rng(3).normal(size=shape) * 0.02 * mask).astype(np.float32)
  served = model.signatures["predict_volume"](field_ppm=field, mask=mask,
                                              b0_dir=np.float32([0, 0, 1]),
                                              voxel_size_mm=np.float32([1, 1, 1]))
  assert {k: tuple(v.shape) for k, v in served.items()} == {
      "chi_ppm": shape, "chi_net_ppm": shape, "tv_weight_used": (), "residual_before": (),
      "residual_after": ()}
  chi_net = served["chi_net_ppm"].numpy()
  inside = mask > 0
  assert not chi_net[~inside].any() and (chi_net[inside] != 0).all()  # no holes
  tiles = inference.volume_tiles_tf(generator, field, mask, 4, 4, 16, 12).numpy()
  single = inference.volume_pass_tf(generator, field, mask, 4, 4).numpy()
  scale = np.abs(single).max()
  np.testing.assert_allclose(chi_net, tiles, atol=1e-5 * scale)
  assert np.abs(chi_net - single).max() > 1e-3 * scale  # it did tile
  assert np.corrcoef(chi_net[inside], single[inside])[0, 1] >= 0.995
  network = model.signatures["network_volume"](field_ppm=field, mask=mask)["chi_ppm"].numpy()
  np.testing.assert_allclose(network, chi_net, atol=1e-6 * scale)


def test_magnitude_signature_refines_with_the_contracts_magnitude_uses(exported, tmp_path):
  """A contract with magnitude edges and weighting: ``predict_volume_magnitude`` == the NumPy
  refinement of the network's map with that magnitude, != ``predict_volume`` (which ignores
  them), and `reconstruct_qsmgan` takes the whole-graph path with or without a magnitude."""
  _, generator, contract = exported
  uses = {"tv_weight": 3e-4, "reweights": 2, "magnitude_edge_fraction": 0.3,
          "magnitude_weighting": 1}
  path = export.export_generator(generator, dict(contract, refine=uses), tmp_path / "m")
  model, served_contract = export.load(path)
  params = refine.resolve_params(served_contract)
  assert params == {**refine.DEFAULTS, **uses}
  shape = (26, 28, 24)
  idx = np.indices(shape)
  mask = ((((idx - np.reshape([12.5, 13.5, 11.5], (3, 1, 1, 1))) / 10.0) ** 2).sum(0) < 1)
  rng = np.random.default_rng(4)
  field = (rng.normal(size=shape) * 0.02 * mask).astype(np.float32)
  mag = (mask * rng.uniform(0.2, 1.0, size=shape)).astype(np.float32)
  # On the model's grid and axis (no resampling or rotation), so the whole graph can serve.
  b0, voxel = np.float32([0.0, 0.0, 1.0]), np.float32([1.0, 1.0, 1.0])
  args = dict(field_ppm=field, mask=mask.astype(np.float32), b0_dir=b0, voxel_size_mm=voxel)
  with_mag = model.signatures["predict_volume_magnitude"](**args, magnitude=mag)
  plain = model.signatures["predict_volume"](**args)
  chi_net = with_mag["chi_net_ppm"].numpy()
  want = refine.refine_cg(chi_net, field, mask, voxel, b0, **params, magnitude=mag)
  scale = np.abs(want).max()
  np.testing.assert_allclose(with_mag["chi_ppm"].numpy(), want, atol=1e-4 * scale)
  assert np.abs(plain["chi_ppm"].numpy() - want).max() > 1e-2 * scale
  for magnitude, served in ((mag, with_mag), (None, plain)):
    chi, info = inference.reconstruct_qsmgan(field, mask, voxel, b0, model=str(path),
                                             magnitude=magnitude, progress=False)
    assert info["refine"]["in_graph"] and info["refine"]["magnitude"] == (magnitude is not None)
    np.testing.assert_allclose(chi, served["chi_ppm"].numpy(), atol=1e-6 * scale)
  # Off the whole-graph path (an override), the local refinement uses the magnitude the same way.
  chi, info = inference.reconstruct_qsmgan(field, mask, voxel, b0, model=str(path),
                                           magnitude=mag, refine_iterations=15, refine_mu=0.003,
                                           refine_reweights=3, progress=False)
  assert not info["refine"]["in_graph"] and info["refine"]["magnitude"]
  np.testing.assert_allclose(chi, refine.refine_cg(
      chi_net, field, mask, voxel, b0, **{**params, "reweights": 3},
      magnitude=mag), atol=1e-4 * scale)
  with pytest.raises(InputError, match="magnitude"):
    inference.reconstruct_qsmgan(field, mask, voxel, b0, model=str(path),
                                 magnitude=np.zeros_like(mag), progress=False)


def test_weights_are_stored_once(exported):
  path, generator, _ = exported
  stored = tf.train.list_variables(str(path / "variables" / "variables"))
  values = sum(int(np.prod(shape)) for name, shape in stored if "OBJECT_GRAPH" not in name)
  assert values == networks.count_parameters(generator)


def test_contract_travels_in_assets_and_signature(exported, loaded):
  path, _, contract = exported
  _, served = loaded
  on_disk = json.loads((path / "assets" / "contract.json").read_text())
  assert on_disk == served
  for key, value in contract.items():
    assert served[key] == value, key
  assert served["refine"] == refine.DEFAULTS
  assert served["inference"] == inference.TILING_DEFAULTS  # training wrote none: defaults
  assert served["export"]["version"] == 1
  assert served["export"]["source"] == "generator_best.keras"
  assert served["export"]["signatures"] == ["serving_default", "predict_volume",
                                            "predict_volume_magnitude", "network_volume",
                                            "refine", "contract"]


def test_contract_visible_in_saved_model_cli(exported):
  path, _, _ = exported
  cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
  command = [str(cli)] if cli.exists() else [sys.executable, "-m",
                                              "tensorflow.python.tools.saved_model_cli"]
  proc = subprocess.run(command + ["show", "--dir", str(path), "--all"], capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = proc.stdout
  for signature in ("serving_default", "predict_volume", "network_volume", "refine", "contract"):
    assert f"signature_def['{signature}']" in text
  assert "shape: (-1, 24, 24, 24, 1)" in text and "shape: (-1, 16, 16, 16, 1)" in text
  contract_section = text[text.index("Function Name: 'contract'"):]
  for needle in (_MANIFEST_SHA, "'input_patch': 24", "'output_patch': 16", "dipole_convention",
                 "'mu': 0.003", "voxel_sizes_mm", "'max_single_pass_voxels': 23000000"):
    assert needle in contract_section, needle


def test_contract_patch_sizes_must_match_the_generator(tmp_path):
  config = networks.PRESETS["test_tiny"]
  generator = networks.build_generator(config)
  contract = _contract(config)
  contract["generator"] = dict(contract["generator"], output_patch=12)
  with pytest.raises(InputError, match="says 12"):
    export.export_generator(generator, contract, tmp_path / "base", volume_signatures=False)
  assert export.list_versions(tmp_path / "base") == []
  assert os.listdir(tmp_path / "base") == []


# --------------------------------------------------------------------------------------
# Version folders (the archive is faked: these test the folder logic, not TF)
# --------------------------------------------------------------------------------------
class _FakeArchive:
  """Stands in for `export.SavedModelArchive`: writes a marker file; optionally dies half-way."""

  def __init__(self, base, fail=False):
    self.base, self.fail, self.written = base, fail, None

  def write_out(self, filepath):
    filepath = pathlib.Path(filepath)
    filepath.mkdir()
    (filepath / "saved_model.pb").write_bytes(b"partial")
    # While writing, a polling server sees no new version: the folder is hidden.
    assert filepath.parent.name.startswith(".tmp-")
    assert export.list_versions(self.base) == self.before
    self.written = filepath
    if self.fail:
      raise RuntimeError("disk full (injected)")


@pytest.fixture
def fake_archive(monkeypatch):
  made = []

  def build(generator, contract, asset_dir, volume_signatures=True):
    del generator, asset_dir, volume_signatures
    archive = made[-1]
    archive.before = export.list_versions(archive.base)
    archive.contract = contract
    return archive

  monkeypatch.setattr(export, "build_archive", build)
  return made


def test_versions_count_up_and_are_immutable(tmp_path, fake_archive):
  base = tmp_path / "qsmgan"
  assert export.next_version(base) == 1  # missing base
  base.mkdir()
  (base / ".tmp-4-abc").mkdir()  # a crashed export
  (base / "notes").mkdir()
  (base / "7").write_text("a file, not a version folder")
  assert export.list_versions(base) == [] and export.next_version(base) == 1
  for expected, version in ((1, None), (2, None), (10, 10), (11, None)):
    fake_archive.append(_FakeArchive(base))
    path = export.export_generator(None, {}, base, version)
    assert path == base / str(expected)
    assert (path / "saved_model.pb").read_bytes() == b"partial"
    assert fake_archive[-1].contract["export"]["version"] == expected
  assert export.list_versions(base) == [1, 2, 10, 11]
  with pytest.raises(InputError, match="version 2 exists already"):
    export.export_generator(None, {}, base, 2)
  with pytest.raises(InputError, match="positive integer"):
    export.export_generator(None, {}, base, 0)
  assert sorted(p.name for p in base.iterdir()) == [".tmp-4-abc", "1", "10", "11", "2", "7",
                                                    "notes"]


def test_failed_export_leaves_no_version_folder(tmp_path, fake_archive):
  base = tmp_path / "qsmgan"
  fake_archive.append(_FakeArchive(base))
  export.export_generator(None, {}, base, None)
  fake_archive.append(_FakeArchive(base, fail=True))
  with pytest.raises(RuntimeError, match="injected"):
    export.export_generator(None, {}, base, None)
  assert fake_archive[-1].written is not None  # it did fail half-way through
  assert export.list_versions(base) == [1]
  assert sorted(p.name for p in base.iterdir()) == ["1"]  # and cleaned up its temp folder


def test_resolve_and_load_errors(exported, tmp_path):
  path, _, _ = exported
  assert export.resolve_saved_model(path.parent) == path  # base path -> newest version
  with pytest.raises(InputError, match="no SavedModel"):
    export.resolve_saved_model(tmp_path)


@pytest.mark.parametrize("case, message", [
    # no contract.json
    ("empty", "has no contract.json"),
    # contract but no generator file
    ("no_generator", "has no generator_final.keras"),
    # the version exists: refused before any slow work
    ("exists", "version 1 exists already"),
])
def test_export_binary_bad_input_exits_2(exported, tmp_path, case, message):
  path, _, contract = exported
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  base = tmp_path / "base"
  if case != "empty":
    (model_dir / "contract.json").write_text(json.dumps(contract))
  if case == "exists":
    base = path.parent
  proc = _run_export(f"--model_dir={model_dir}", f"--export_base={base}", "--which=final",
                     "--version=1" if case == "exists" else "--version=5")
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last


def test_predict_cli_with_an_exported_model_keeps_geometry_and_reports_residuals(exported,
                                                                                 tmp_path):
  """`python -m qsmgan_tf.predict --method=qsmgan` end to end on a real SavedModel version."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel

  from qsmgan_tf import physics  # pylint: disable=import-outside-toplevel

  path, _, _ = exported
  shape = (30, 34, 28)
  idx = np.indices(shape).astype(np.float32)
  centre = (np.array(shape, dtype=np.float32) - 1) / 2
  r2 = sum(((idx[a] - centre[a]) / (0.4 * shape[a])) ** 2 for a in range(3))
  mask = r2 < 1.0
  chi = np.where(r2 < 0.15, 0.1, 0.0).astype(np.float32) * mask
  voxel = (1.0, 1.0, 1.0)
  field = physics.forward_field(chi, voxel) * mask
  # An oblique, scaled affine with scanner codes: the output must keep it exactly.
  rot = physics.rotation_between((0.0, 0.2, 1.0), (0.0, 0.0, 1.0))
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag(voxel)
  affine[:3, 3] = (-10.0, 5.0, 3.0)
  field_img = nib.Nifti1Image(field.astype(np.float32), affine)
  field_img.set_sform(affine, 1)
  field_img.set_qform(affine, 1)
  nib.save(field_img, str(tmp_path / "field.nii.gz"))
  nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(tmp_path / "mask.nii.gz"))
  out = tmp_path / "sub_Chimap.nii.gz"
  proc = subprocess.run(
      [sys.executable, "-m", "qsmgan_tf.predict", "--method=qsmgan", f"--model={path}",
       f"--field={tmp_path / 'field.nii.gz'}", f"--mask={tmp_path / 'mask.nii.gz'}",
       f"--output={out}", "--quiet"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  img = nib.load(str(out))
  np.testing.assert_allclose(img.affine, affine, atol=1e-5)
  assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
  data = np.asarray(img.dataobj)
  assert data.shape == shape and data.dtype == np.float32 and np.isfinite(data).all()
  assert np.all(data[~mask] == 0)
  sidecar = json.loads((tmp_path / "sub_Chimap.json").read_text())
  text = json.dumps(sidecar)
  assert str(tmp_path) not in text  # no directories: paths can carry patient identifiers
  info = sidecar["method_info"]
  # The refinement is what makes the untrained network's map consistent with the field.
  assert info["residual_after"] < info["residual_before"]


def test_refine_overrides_are_typed_and_checked():
  assert export.parse_refine("mu=0.001, tv_weight=3e-4,reweights=2") == {
      "mu": 0.001, "tv_weight": 3e-4, "reweights": 2}
  assert export.parse_refine(None) == {}
  with pytest.raises(InputError, match="unknown refinement parameter 'lam'"):
    export.parse_refine("lam=1")
  with pytest.raises(InputError, match="reweights: bad value '2.5'"):
    export.parse_refine("reweights=2.5")


def test_training_can_start_from_an_exported_model(exported):
  """`train --init_from=saved_models/qsmgan[/N]` rebuilds the generator with the same weights."""
  path, generator, trained_contract = exported
  for where in (path, path.parent):  # a version folder or the model base path
    rebuilt, contract = training_folder._load_init_generator(  # pylint: disable=protected-access
        str(where))
    assert contract["input_patch"] == trained_contract["input_patch"]
    for a, b in zip(rebuilt.get_weights(), generator.get_weights()):
      np.testing.assert_array_equal(a, b)


def test_reexport_keeps_the_network_and_changes_the_refinement(exported, loaded, tmp_path):
  """`export --from_model`: the same generator's outputs, the new refine entry, the rest of the
  contract kept."""
  path, _, _ = exported
  base = tmp_path / "base"
  new = export.reexport_model(path, base, 3, {"residual_margin": 40, "reweights": 4})
  assert new == base / "3"
  loaded_new, contract = export.load(new)
  _, old_contract = loaded
  assert contract["refine"] == {**old_contract["refine"], "residual_margin": 40, "reweights": 4}
  assert contract["data_manifest_sha256"] == old_contract["data_manifest_sha256"]
  assert contract["export"]["version"] == 3 and str(path) in contract["export"]["source"]
  patch = np.random.default_rng(3).normal(
      size=(2,) + (old_contract["input_patch"],) * 3 + (1,)).astype(np.float32) * 0.05
  old_out = loaded[0].signatures["serving_default"](tf.constant(patch))
  new_out = loaded_new.signatures["serving_default"](tf.constant(patch))
  for key, value in old_out.items():
    np.testing.assert_array_equal(new_out[key].numpy(), value.numpy())


@pytest.mark.parametrize("sources", [(), ("--model_dir=x", "--from_model=y")])
def test_export_binary_needs_exactly_one_source(tmp_path, sources):
  proc = _run_export(*sources, f"--export_base={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "exactly one of --model_dir" in proc.stderr.strip().splitlines()[-1]


def test_a_mixed_precision_generator_is_served_in_float32(exported, tmp_path):
  """Training precision must not leak into serving: a generator saved under mixed_bfloat16
  exports as float32 convolutions with its weights, giving the float32 model's numbers."""
  from tensorflow.core.framework import types_pb2  # pylint: disable=import-outside-toplevel
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel
  _, generator, contract = exported
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("mixed_bfloat16")
  try:
    mixed = networks.build_generator(networks.PRESETS["test_tiny"])
  finally:
    keras.config.set_dtype_policy(previous)
  for target, source in zip(mixed.weights, generator.weights):
    target.assign(source)
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "contract.json").write_text(json.dumps(contract))
  mixed.save(model_dir / "generator_best.keras")
  path = export.export_model(model_dir, tmp_path / "qsmgan")
  proto = saved_model_pb2.SavedModel()
  proto.ParseFromString((path / "saved_model.pb").read_bytes())
  conv_types = {node.attr["T"].type for f in proto.meta_graphs[0].graph_def.library.function
                for node in f.node_def if node.op == "Conv3D"}
  assert conv_types == {types_pb2.DT_FLOAT}
  x = np.random.default_rng(1).normal(0, 0.02, (1, 24, 24, 24, 1)).astype(np.float32)
  (served,) = export.load(path)[0].signatures["serving_default"](field_ppm=x).values()
  want = generator(x, training=False).numpy()
  np.testing.assert_allclose(served.numpy(), want, atol=1e-5 * np.abs(want).max())
