"""Tests for qsmgan_tf.training (with training_config, training_folder, training_callbacks),
qsmgan_tf.train (the CLI) and qsmgan_tf.distribute."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qsmgan_tf import distribute
from qsmgan_tf import networks
from qsmgan_tf.records import codec
from qsmgan_tf import training
from qsmgan_tf import training_callbacks
from qsmgan_tf import training_config
from qsmgan_tf import training_folder
from qsmgan_tf.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _float32_policy():
  yield
  keras.mixed_precision.set_global_policy("float32")


def _pairs(n, size_in=24, size_out=16, seed=0, nan=False):
  """Learnable toy pairs: chi is the centre of a smooth volume, the field a scaled copy."""
  rng = np.random.default_rng(seed)
  m = (size_in - size_out) // 2
  vol = rng.normal(size=(n, size_in, size_in, size_in)).astype(np.float32) * 0.05
  field = vol * 0.3
  chi = vol[:, m:m + size_out, m:m + size_out, m:m + size_out].copy()
  if nan:
    chi[:] = np.nan
  return field[..., None], chi[..., None]


def write_tiny_dataset(out_dir, n_train=8, n_val=4, size_in=24, size_out=16, shards=2):
  """A small TFRecord dataset in the data_prep format (codec.encode + build_manifest)."""
  from data_prep import manifest as manifest_lib  # pylint: disable=import-outside-toplevel
  from data_prep import patches  # pylint: disable=import-outside-toplevel

  os.makedirs(out_dir, exist_ok=True)
  cfg = patches.PatchConfig(input_patch=size_in, output_patch=size_out, stride=8,
                            dtype="float32")
  scans, subjects = {}, {}
  for split, n, n_shards, seed in (("train", n_train, shards, 0), ("val", n_val, 1, 1)):
    sid = f"{split}-subject"
    field, chi = _pairs(n, size_in, size_out, seed)
    paths = [os.path.join(out_dir, f"{split}-{i:05d}-of-{n_shards:05d}.tfrecord")
             for i in range(n_shards)]
    blobs = []
    for k in range(n):
      arrays = {"field": field[k, ..., 0], "chi": chi[k, ..., 0],
                "mask": np.ones((size_out,) * 3, np.uint8)}
      meta = {"subject_id": sid, "kind": "shapes", "voxel_size_mm": [1, 1, 1],
              "b0_dir": [0, 0, 1], "centre": [0, 0, 0], "background": 0,
              "transform": np.eye(3, dtype=int).ravel(), "chi_scale": 1.0, "snr": 0.0}
      blobs.append(codec.encode(arrays, meta, cfg.storage_dtypes()))
    for i, path in enumerate(paths):
      codec.write_records(path, blobs[i::n_shards])
    scans[split] = [manifest_lib.scan_for_manifest(p) for p in paths]
    subjects[split] = [{"subject_id": sid, "kind": "shapes", "seed": seed,
                        "shape": [size_in] * 3, "voxel_size_mm": [1.0, 1.0, 1.0],
                        "b0_dir": [0.0, 0.0, 1.0], "snr": 0.0}]
  manifest_lib.write_manifest(out_dir, manifest_lib.build_manifest(
      shard_scans=scans, subjects=subjects, patch_config=cfg, target="chi"))
  return out_dir


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  return write_tiny_dataset(str(tmp_path_factory.mktemp("data") / "tiny"))


def _in_memory(n_train=8, nan_after=None):
  field, chi = _pairs(n_train)
  train = tf.data.Dataset.from_tensor_slices((field, chi)).batch(2, drop_remainder=True)
  if nan_after is not None:
    bad = tf.data.Dataset.from_tensor_slices(_pairs(2, nan=True)).batch(2)
    train = train.repeat(nan_after).concatenate(bad.repeat())
  else:
    train = train.repeat()
  vf, vc = _pairs(4, seed=1)
  val = tf.data.Dataset.from_tensor_slices((vf, vc)).batch(2)
  return train, val


def _config(model_dir, **kw):
  values = dict(model_dir=str(model_dir), strategy="one_device", precision="float32",
                quiet=True)
  values.update(kw)
  return training_config.resolve_config("test_tiny", **values)


def _tags(folder):
  tags = set()
  for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
    acc = EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    tags.update(acc.Tags()["tensors"])
  return tags


def test_two_stage_run_writes_contract_models_and_tensorboard(tmp_path):
  summary = training.train(_config(tmp_path, total_steps=4, gan_fraction=0.5, n_critic=2),
                           datasets=_in_memory())
  assert summary["stages"]["pretrain"]["end_step"] == 2
  assert summary["stages"]["wgan_gp"]["end_step"] == 2
  assert summary["stages"]["wgan_gp"]["critic_steps"] == 4  # n_critic x generator steps
  flags = json.loads((tmp_path / "flags.json").read_text())
  assert flags["preset"] == "test_tiny" and flags["total_steps"] == 4
  contract = json.loads((tmp_path / "contract.json").read_text())
  assert networks.GeneratorConfig.from_dict(contract["generator"]) == \
      networks.PRESETS["test_tiny"]
  assert contract["crop_margin"] == 4 and "paramagnetic" in contract["dipole_convention"]
  for name in ("generator_final.keras", "generator_best.keras"):
    model = keras.models.load_model(tmp_path / name)
    assert tuple(model(tf.zeros((1, 24, 24, 24, 1))).shape) == (1, 16, 16, 16, 1)
  train_tags = _tags(tmp_path / "logs" / "train")
  for tag in ("critic_loss", "gradient_penalty", "wasserstein", "gen_adv_loss",
              "gen_voxel_loss"):
    assert any(tag in t for t in train_tags), (tag, train_tags)
  assert any("nrmse" in t for t in _tags(tmp_path / "logs" / "validation"))
  assert any("nrmse_se" in t for t in _tags(tmp_path / "logs" / "validation"))
  best = json.loads((tmp_path / "best.json").read_text())
  assert best["val_nrmse"] > 0 and best["val_nrmse_se"] > 0  # the score and its error
  assert any(t.startswith("val_slices") for t in _tags(tmp_path / "logs" / "images"))


def test_init_from_a_folder_continues_with_its_critic(tmp_path):
  """A WGAN-GP stage writes critic_final.keras; --init_from=<that folder> starts the next run's
  critic from it (with a zero critic learning rate its weights come out unchanged), a run
  without it starts a fresh critic."""
  first = tmp_path / "first"
  training.train(_config(first, stage="wgan_gp", total_steps=1, n_critic=1),
                 datasets=_in_memory())
  saved = keras.models.load_model(first / "critic_final.keras").get_weights()
  outcomes = {}
  for name, init in (("continued", str(first)), ("fresh", None)):
    folder = tmp_path / name
    training.train(_config(folder, stage="wgan_gp", total_steps=1, n_critic=1, critic_lr=0.0,
                           init_from=init, seed=5), datasets=_in_memory())
    weights = keras.models.load_model(folder / "critic_final.keras").get_weights()
    outcomes[name] = all(np.array_equal(a, b) for a, b in zip(saved, weights))
  assert outcomes == {"continued": True, "fresh": False}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Finite batches, then NaN targets forever; checkpoints every 2 steps.
  config = _config(tmp_path, stage="pretrain", total_steps=50, steps_per_epoch=50,
                   checkpoint_every_steps=2)
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite loss at step \d+.*ckpt-"):
    training.train(config, datasets=_in_memory(nan_after=5))
  latest = tf.train.latest_checkpoint(str(tmp_path / "ckpt" / "pretrain"))
  assert latest is not None
  reader = tf.train.load_checkpoint(latest)
  for name in reader.get_variable_to_shape_map():
    if name.startswith("generator/"):
      assert np.isfinite(reader.get_tensor(name)).all(), name
  assert not (tmp_path / "generator_final.keras").exists()


def test_a_checkpoint_of_other_networks_is_a_clear_error(tmp_path, monkeypatch):
  """Resuming with networks the checkpoint does not fit (another code version's critic) is
  one InputError naming the checkpoint, not a restore traceback."""
  config = _config(tmp_path, stage="wgan_gp", total_steps=1, n_critic=1)
  training.train(config, datasets=_in_memory())
  build = networks.build_critic
  monkeypatch.setattr(networks, "build_critic", lambda critic_config, *a, **k: build(
      dataclasses.replace(critic_config, base_filters=critic_config.base_filters + 1), *a, **k))
  with pytest.raises(InputError, match=r"wgan_gp: the checkpoint .*ckpt-1 does not fit"):
    training.train(_config(tmp_path, stage="wgan_gp", total_steps=2, n_critic=1),
                   datasets=_in_memory())


def _checkpoint_steps(ckpt_dir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(ckpt_dir))
  return (int(reader.get_tensor("gen_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")),
          int(reader.get_tensor("critic_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")))


def _latest_step(ckpt_dir):
  latest = tf.train.latest_checkpoint(str(ckpt_dir))
  return int(latest.rsplit("-", 1)[1]) if latest else 0


def test_sigkill_then_rerun_resumes_both_optimizers_and_the_step(tmp_path, tiny_dataset):
  model_dir = tmp_path / "run"
  ckpt_dir = model_dir / "ckpt" / "wgan_gp"
  total, n_critic = 40, 2
  command = [sys.executable, "-m", "qsmgan_tf.train", f"--data_dir={tiny_dataset}",
             f"--model_dir={model_dir}", "--preset=test_tiny", "--stage=wgan_gp",
             f"--total_steps={total}", f"--n_critic={n_critic}", "--checkpoint_every_steps=2",
             "--steps_per_epoch=30", "--precision=float32", "--strategy=one_device", "--quiet"]
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,  # pylint: disable=consider-using-with
                          stderr=subprocess.DEVNULL)
  try:
    # Wait on the manager's state file, not on ``ckpt-4.index``: the index is written before the
    # state file names it, so a kill in between rightly resumes from the previous checkpoint.
    deadline = time.time() + 240
    while time.time() < deadline and _latest_step(ckpt_dir) < 4:
      assert proc.poll() is None, "training ended before it could be killed"
      time.sleep(0.2)
    assert _latest_step(ckpt_dir) >= 4, "no checkpoint within the deadline"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_gen, killed_critic = _checkpoint_steps(str(ckpt_dir))
  assert 4 <= killed_gen < total and killed_critic == n_critic * killed_gen

  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"resumed from {ckpt_dir}/ckpt-{killed_gen}" in done.stderr
  gen_steps, critic_steps = _checkpoint_steps(str(ckpt_dir))
  # Both step counters continued from the checkpoint (a fresh critic optimizer would have
  # counted only the steps after the restart).
  assert gen_steps == total and critic_steps == n_critic * total
  assert (model_dir / "generator_final.keras").exists()


def test_cli_bad_data_dir_is_one_line_exit_2(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run([sys.executable, "-m", "qsmgan_tf.train", f"--model_dir={tmp_path}",
                         f"--data_dir={tmp_path / 'missing'}", "--preset=test_tiny"],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2
  assert "error: dataset folder not found" in done.stderr
  assert "Traceback" not in done.stderr


def test_init_from_refuses_a_generator_of_another_preset(tmp_path):
  other = networks.build_generator(networks.PRESETS["test_tiny"].replace(base_filters=8))
  path = tmp_path / "other.keras"
  other.save(path)
  target = networks.build_generator(networks.PRESETS["test_tiny"])
  with pytest.raises(InputError, match="do not match"):
    training_folder._copy_weights(  # pylint: disable=protected-access
        keras.models.load_model(path), target, "x")
  same = networks.build_generator(networks.PRESETS["test_tiny"])
  training_folder._copy_weights(target, same, "x")  # pylint: disable=protected-access
  for a, b in zip(target.weights, same.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_bad_init_from_is_one_error_and_writes_nothing(tmp_path):
  (tmp_path / "bad.keras").write_text("not a zip")
  for source, message in ((tmp_path / "missing.keras", "--init_from model not found"),
                          (tmp_path / "bad.keras", "--init_from is not a loadable .keras")):
    model_dir = tmp_path / "run"
    with pytest.raises(InputError, match=message):
      training.train(_config(model_dir, init_from=str(source)), datasets=_in_memory())
    assert not model_dir.exists()


def test_presets_are_defaults_and_explicit_values_win():
  config = training_config.resolve_config("test_tiny", model_dir="m", total_steps=None, n_critic=7)
  assert config.total_steps == training_config.PRESET_TRAINING["test_tiny"]["total_steps"]
  assert config.n_critic == 7
  assert training_config.plan_stages(training_config.resolve_config(
      "cpu_small", model_dir="m", total_steps=1000, gan_fraction=0.2)) == \
      [("pretrain", 800, 0), ("wgan_gp", 200, 800)]
  with pytest.raises(InputError, match="--model_dir is required"):
    training_config.resolve_config("test_tiny")
  with pytest.raises(InputError, match="unknown preset"):
    training_config.resolve_config("huge", model_dir="m")
  with pytest.raises(InputError, match="--output_transform must be one of linear, tanh"):
    training_config.resolve_config("test_tiny", model_dir="m", output_transform="sigmoid")


def test_slice_panel_is_in_unit_range_with_the_fixed_window():
  field = np.zeros((24, 24, 24), np.float32)
  truth = np.zeros((16, 16, 16), np.float32)
  truth[8, 8, 8] = 1.0  # far outside the window: clipped, not rescaled
  image = training_callbacks.slice_panel(field, truth * 0, truth)
  assert image.shape == (1, 4 * 16, 3 * 16, 1)
  assert image.min() >= 0 and image.max() <= 1
  # Zero maps to mid-grey in every row: the window is fixed in ppm, not per image.
  assert np.isclose(np.median(image), 0.5)


@pytest.mark.parametrize("flags_line,has_gpu,expected", [
    ("flags : fpu avx512f avx512_bf16 amx_tile", False, "mixed_bfloat16"),  # BF16 CPU
    ("flags : fpu avx2 amx_bf16", False, "mixed_bfloat16"),                 # AMX only
    ("flags : fpu avx2 avx512f", False, "float32"),                         # no BF16
    ("flags : fpu avx2", True, "mixed_float16"),                            # GPU wins
])
def test_auto_precision(tmp_path, flags_line, has_gpu, expected):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor : 0\n{flags_line}\n")
  assert distribute.resolve_precision("auto", has_gpu=has_gpu,
                                      cpuinfo_path=str(cpuinfo)) == expected
  assert distribute.resolve_precision("float32", has_gpu=True) == "float32"


def test_strategy_choices_and_errors(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  assert distribute.make_strategy("one_device").num_replicas_in_sync == 1
  assert distribute.make_strategy("auto").num_replicas_in_sync == 1  # no GPUs, no cluster
  assert distribute.make_strategy("one_device") is distribute.make_strategy("one_device")
  with pytest.raises(InputError, match="needs TF_CONFIG"):
    distribute.make_strategy("multi_worker")
  with pytest.raises(InputError, match="unknown --strategy"):
    distribute.make_strategy("tpu")
  with pytest.raises(InputError, match="unknown --precision"):
    distribute.resolve_precision("float8")
