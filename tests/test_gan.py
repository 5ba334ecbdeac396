"""Tests for qsmgan_tf.gan: both train steps under MirroredStrategy on two logical CPUs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from qsmgan_tf import distribute
from qsmgan_tf import gan
from qsmgan_tf import metrics
from qsmgan_tf import networks

CONFIG = networks.PRESETS["test_tiny"]
CRITIC = networks.CRITIC_PRESETS["test_tiny"]


@pytest.fixture(autouse=True)
def _float32_policy():
  keras.mixed_precision.set_global_policy("float32")
  yield
  keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def mirrored():
  if len(tf.config.list_logical_devices("CPU")) < 2:
    pytest.fail("conftest.py did not split the CPU into 2 logical devices")
  # One cached strategy for the whole process (see distribute.make_strategy).
  strategy = distribute.make_strategy("mirrored")
  assert strategy.num_replicas_in_sync == 2
  return strategy


def _batch(n=4, seed=0):
  rng = np.random.default_rng(seed)
  field = (rng.normal(size=(n, 24, 24, 24, 1)) * 0.05).astype(np.float32)
  chi = (rng.normal(size=(n, 16, 16, 16, 1)) * 0.1).astype(np.float32)
  return field, chi


def _model(strategy, stage, n_critic=2, optimizer=lambda: keras.optimizers.Adam(1e-3), seed=1):
  keras.utils.set_random_seed(seed)
  with strategy.scope():  # models AND optimizers
    generator = networks.build_generator(CONFIG)
    critic = networks.build_critic(CRITIC, CONFIG) if stage == "wgan_gp" else None
    model = gan.QSMGAN(generator, critic, stage=stage, n_critic=n_critic,
                       chi_scale=CONFIG.chi_scale)
    model.compile(optimizer(), optimizer() if critic else None)
  return model


def _fit(model, batch, steps=1):
  ds = tf.data.Dataset.from_tensors(batch).repeat()
  return model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0).history


def test_one_and_two_replicas_give_the_same_pretrain_update(mirrored):
  # Same global batch, SGD (update = lr * gradient, no Adam sign-amplification of round-off),
  # synchronized BatchNorm: the losses divided by the replica count make the SUM-reduced
  # gradients equal the one-device gradient.
  batch = _batch()
  updates, stats = [], []
  for strategy in (distribute.make_strategy("one_device"), mirrored):
    model = _model(strategy, "pretrain", optimizer=lambda: keras.optimizers.SGD(0.1))
    before = [w.numpy().copy() for w in model.generator.trainable_weights]
    history = _fit(model, batch)
    assert np.isfinite(history["loss"][0]) and history["loss"][0] > 0
    assert history["gen_voxel_loss"] == history["loss"]
    assert model.gen_optimizer.iterations.numpy() == 1
    updates.append([w.numpy() - a for a, w in zip(before, model.generator.trainable_weights)])
    stats.append([w.numpy() for w in model.generator.non_trainable_weights])
  largest = max(np.abs(u).max() for u in updates[0])
  worst = max(np.abs(a - b).max() for a, b in zip(*updates))
  assert largest > 1e-3
  assert all(np.abs(u).max() > 0 for u in updates[1])  # every weight moved
  assert worst < 1e-3 * largest, (worst, largest)
  # Synchronized BatchNorm: the moving statistics agree too (unsynchronized ones would not).
  assert max(np.abs(a - b).max() for a, b in zip(*stats)) < 1e-5


def test_wgan_gp_step_counts_critic_updates(mirrored):
  n_critic = 3
  model = _model(mirrored, "wgan_gp", n_critic=n_critic)
  history = _fit(model, _batch())
  gen_steps = model.gen_optimizer.iterations.numpy()
  critic_steps = model.critic_optimizer.iterations.numpy()
  assert gen_steps == 1
  assert critic_steps == n_critic * gen_steps
  for key in ("critic_loss", "gradient_penalty", "wasserstein", "gen_voxel_loss",
              "gen_adv_loss", "loss"):
    assert np.isfinite(history[key][0]), key
  assert history["gradient_penalty"][0] >= 0


def test_gradient_penalty_epsilon_differs_between_replicas(mirrored):
  model = _model(mirrored, "wgan_gp")

  @tf.function
  def draw():
    return mirrored.run(lambda: model._epsilon(4, 0))  # pylint: disable=protected-access

  values = [np.asarray(v) for v in mirrored.experimental_local_results(draw())]
  assert values[0].shape == (4, 1, 1, 1, 1) and values[0].dtype == np.float32
  assert np.all((values[0] >= 0) & (values[0] < 1))
  assert not np.allclose(values[0], values[1])


def test_gradient_penalty_is_zero_for_a_unit_gradient_critic():
  # critic(field, chi) = sum(chi) / sqrt(N): gradient norm exactly 1 everywhere -> penalty 0;
  # scaled by 3 -> (3 - 1)^2 = 4.
  n = 16**3
  for scale, expected in ((1.0, 0.0), (3.0, 4.0)):
    field = keras.Input((24, 24, 24, 1))
    chi = keras.Input((16, 16, 16, 1))
    score = keras.layers.Lambda(
        lambda t, s=scale: tf.reduce_sum(t, axis=[1, 2, 3, 4])[:, None] * s / np.sqrt(n))(chi)
    critic = keras.Model([field, chi], score)
    model = gan.QSMGAN(networks.build_generator(CONFIG), critic, stage="wgan_gp")
    model.compile(keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0))
    f, c = (tf.constant(a) for a in _batch(2))
    penalty = model._gradient_penalty(f, c, c * 0.5, 0)  # pylint: disable=protected-access
    np.testing.assert_allclose(float(penalty), expected, atol=1e-4)


def test_voxel_loss_is_scaled_l1_and_gradient_term_sees_edges():
  true = np.zeros((1, 8, 8, 8, 1), np.float32)
  pred = true + 0.02  # constant offset: no gradient error
  np.testing.assert_allclose(float(gan.voxel_loss(pred, true, 10.0, 0.0)), 0.2, rtol=1e-6)
  np.testing.assert_allclose(float(gan.voxel_loss(pred, true, 10.0, 1.0)), 0.2, rtol=1e-6)
  edge = true.copy()
  edge[:, 4:] = 0.1
  assert float(gan.voxel_loss(true, edge, 10.0, 1.0)) > float(gan.voxel_loss(true, edge, 10.0, 0))


def test_nrmse_metric_known_values():
  metric = gan.NRMSE()
  true = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 4, 4, 4, 1)
  metric.update_state(true, 1.1 * true)
  np.testing.assert_allclose(float(metric.result()), 10.0, rtol=1e-5)
  metric.reset_state()
  metric.update_state(true, np.zeros_like(true))
  np.testing.assert_allclose(float(metric.result()), 100.0, rtol=1e-6)


def test_nrmse_standard_error_matches_a_bootstrap_over_patches():
  """The delta-method standard error of the pooled NRMSE against an independent estimate: the
  spread of the score over 4,000 resamplings of the patches (with replacement)."""
  rng = np.random.default_rng(5)
  n = 120
  true = rng.standard_normal((n, 6, 6, 6, 1)).astype(np.float32)
  true *= rng.uniform(0.2, 2.0, (n, 1, 1, 1, 1)).astype(np.float32)  # patches of unequal energy
  pred = (true * rng.uniform(0.5, 1.0, (n, 1, 1, 1, 1))
          + 0.3 * rng.standard_normal(true.shape)).astype(np.float32)
  metric, se = gan.NRMSE(), gan.NRMSEStandardError()
  for batch in np.array_split(np.arange(n), 7):  # batches of unequal size add up
    metric.update_state(true[batch], pred[batch])
    se.update_state(true[batch], pred[batch])
  e = ((pred - true) ** 2).sum(axis=(1, 2, 3, 4), dtype=np.float64)
  r = (true ** 2).sum(axis=(1, 2, 3, 4), dtype=np.float64)
  np.testing.assert_allclose(float(metric.result()), 100 * np.sqrt(e.sum() / r.sum()), rtol=1e-5)
  draws = rng.integers(0, n, (4000, n))
  boot = 100 * np.sqrt(e[draws].sum(axis=1) / r[draws].sum(axis=1))
  assert float(se.result()) == pytest.approx(boot.std(), rel=0.1)
  # The NumPy form the benchmarks use (metrics.pooled_patch_nrmse) is the same.
  assert metrics.pooled_patch_nrmse(e, r) == pytest.approx(
      (float(metric.result()), float(se.result())), rel=1e-4)
  # Twice the patches of the same kind: about 1/sqrt(2) of the error.
  se.reset_state()
  se.update_state(np.concatenate([true, true]), np.concatenate([pred, pred]))
  assert float(se.result()) == pytest.approx(boot.std() / np.sqrt(2), rel=0.1)
  # One patch has no spread to measure.
  se.reset_state()
  se.update_state(true[:1], pred[:1])
  assert float(se.result()) == 0.0


def test_test_step_reports_l1_and_nrmse(mirrored):
  """The scores of the whole batch, not the mean of the two replicas' scores: the second
  replica's patches are made almost right (NRMSE ~10 % there, ~100 % on the first)."""
  model = _model(mirrored, "pretrain")
  field, chi = _batch()
  pred = np.asarray(model.generator(field))
  chi[2:] = pred[2:] + 0.1 * np.std(pred[2:]) * np.random.default_rng(1).standard_normal(
      pred[2:].shape)
  result = model.evaluate(tf.data.Dataset.from_tensors((field, chi)), verbose=0,
                          return_dict=True)
  np.testing.assert_allclose(result["l1_ppm"], np.abs(pred - chi).mean(), rtol=1e-4)
  expected = 100 * np.sqrt(((pred - chi)**2).sum() / (chi**2).sum())
  per_replica = [100 * np.sqrt(((pred - chi)[h]**2).sum() / (chi[h]**2).sum())
                 for h in (slice(0, 2), slice(2, 4))]
  assert abs(np.mean(per_replica) - expected) > 0.05 * expected  # the test can tell them apart
  np.testing.assert_allclose(result["nrmse"], expected, rtol=1e-4)
  # The replicas' patch moments add up: the delta-method error over all four patches.
  _, want_se = metrics.pooled_patch_nrmse(((pred - chi) ** 2).sum(axis=(1, 2, 3, 4)),
                                          (chi ** 2).sum(axis=(1, 2, 3, 4)))
  np.testing.assert_allclose(result["nrmse_se"], want_se, rtol=1e-3)


def test_mixed_bfloat16_runs_the_gan_step():
  # The wgan_gp step runs the generator (voxel loss) and the critic (penalty) paths.
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  model = _model(distribute.make_strategy("one_device"), "wgan_gp")
  history = _fit(model, _batch(2))
  assert all(np.isfinite(v[0]) for v in history.values())
  assert model.generator.get_layer("enc0_conv0").compute_dtype == "bfloat16"
  assert model.critic.get_layer("block0_conv").compute_dtype == "bfloat16"


def test_mixed_float16_wraps_both_optimizers_in_loss_scaling():
  # Constructed and checked only: float16 conv backprop on CPU is ~1000x slower.
  keras.mixed_precision.set_global_policy("mixed_float16")
  model = _model(distribute.make_strategy("one_device"), "wgan_gp")
  assert isinstance(model.gen_optimizer, keras.optimizers.LossScaleOptimizer)
  assert isinstance(model.critic_optimizer, keras.optimizers.LossScaleOptimizer)
  assert model.gen_optimizer.built and model.critic_optimizer.built
  assert model.optimizer is model.gen_optimizer
  scaled = model._scaled(model.gen_optimizer, tf.constant(1.0))  # pylint: disable=protected-access
  assert float(scaled) == float(model.gen_optimizer.dynamic_scale.numpy())


def test_optimizer_made_outside_the_scope_is_refused(mirrored):
  outside = keras.optimizers.SGD(0.1)  # would apply per replica: steps counted twice
  with mirrored.scope():
    model = gan.QSMGAN(networks.build_generator(CONFIG))
    with pytest.raises(ValueError, match="inside strategy.scope"):
      model.compile(outside)


def test_bad_arguments():
  generator = networks.build_generator(CONFIG)
  with pytest.raises(ValueError, match="needs a critic"):
    gan.QSMGAN(generator, None, stage="wgan_gp")
  with pytest.raises(ValueError, match="stage must be one of"):
    gan.QSMGAN(generator, None, stage="cyclegan")
