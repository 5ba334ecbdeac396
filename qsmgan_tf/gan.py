"""QSMGAN as a keras.Model: the pretraining and WGAN-GP steps in one ``train_step``.

Stage 'pretrain' minimises the voxel loss (L1 on the 48^3 output, optional finite-difference
gradient term). Stage 'wgan_gp' runs ``n_critic`` critic updates with a gradient penalty, then one
generator update with voxel loss + ``lambda_adv`` x adversarial loss. ``Model.fit`` drives both,
so progress bars, callbacks and TensorBoard come from Keras.

Distribution (measured pitfalls): gradients are SUM-reduced across replicas,
so every hand-written loss is divided by ``num_replicas_in_sync`` before the gradient; trackers get
unscaled values. Both optimizers are built in ``compile()`` under the strategy scope. The critic
loop is a Python loop (unrolled in the graph): no ``tf.cond`` around ``optimizer.apply``. The
penalty's epsilon comes from stateless draws seeded with (seed + replica id, step), because
``keras.random.SeedGenerator`` gives every replica the same numbers.

Example:
  with strategy.scope():
    model = gan.QSMGAN(generator, critic, stage='wgan_gp')
    model.compile(gen_optimizer=keras.optimizers.Adam(1e-4, beta_1=0.5),
                  critic_optimizer=keras.optimizers.Adam(1e-4, beta_1=0.5))
  model.fit(dataset, steps_per_epoch=100, epochs=10)
"""

from __future__ import annotations

import keras
import tensorflow as tf

STAGES = ("pretrain", "wgan_gp")


def _num_replicas() -> int:
  return tf.distribute.get_strategy().num_replicas_in_sync


def _replica_id():
  ctx = tf.distribute.get_replica_context()
  return ctx.replica_id_in_sync_group if ctx is not None else 0


def _finite_differences(x):
  """Forward differences of a [B, X, Y, Z, C] volume along each spatial axis."""
  return (x[:, 1:] - x[:, :-1], x[:, :, 1:] - x[:, :, :-1], x[:, :, :, 1:] - x[:, :, :, :-1])


def voxel_loss(chi_pred, chi_true, chi_scale: float, gradient_weight: float = 0.0):
  """Per-replica mean L1 in normalised units (ppm x chi_scale), plus a gradient L1 term.

  Computed in ppm whatever the output transform, so transforms are compared on one scale.

  Args:
    chi_pred: predicted chi, ppm, [B, X, Y, Z, 1].
    chi_true: target chi, ppm, same shape.
    chi_scale: normalisation (network units per ppm).
    gradient_weight: weight of the L1 of finite-difference gradient errors (0 = off).

  Returns:
    Scalar float32: mean over the local batch.
  """
  pred = tf.cast(chi_pred, tf.float32) * chi_scale
  true = tf.cast(chi_true, tf.float32) * chi_scale
  loss = tf.reduce_mean(tf.abs(pred - true))
  if gradient_weight:
    grads = [tf.reduce_mean(tf.abs(gp - gt))
             for gp, gt in zip(_finite_differences(pred), _finite_differences(true))]
    loss += gradient_weight * tf.add_n(grads) / 3.0
  return loss


def _global_sums(*values):
  """Metric sums over every replica: inside a replica's step a variable reads as that replica's
  share, and Keras averages the replicas' logs, so a ratio of sums would come out as the mean
  of the replicas' ratios (all-reduced here instead); elsewhere the read is already the sum."""
  values = [tf.convert_to_tensor(v) for v in values]
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return values
  return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


class NRMSE(keras.metrics.Metric):
  """Patch NRMSE, %: 100 * sqrt(sum (pred - true)^2 / sum true^2) over everything seen.

  Patches carry no mask, so no mean is removed (unlike QSM-CI's whole-brain NRMSE); summing
  numerator and denominator over the whole validation set keeps near-empty background patches
  from dominating.
  """

  def __init__(self, name="nrmse", **kwargs):
    super().__init__(name=name, **kwargs)
    self.err2 = self.add_variable(shape=(), initializer="zeros", name="err2")
    self.ref2 = self.add_variable(shape=(), initializer="zeros", name="ref2")

  def update_state(self, chi_true, chi_pred, sample_weight=None):
    del sample_weight
    true = tf.cast(chi_true, tf.float32)
    pred = tf.cast(chi_pred, tf.float32)
    self.err2.assign_add(tf.reduce_sum(tf.square(pred - true)))
    self.ref2.assign_add(tf.reduce_sum(tf.square(true)))

  def result(self):
    err2, ref2 = _global_sums(self.err2, self.ref2)
    return 100.0 * tf.sqrt(tf.math.divide_no_nan(err2, ref2))

  def reset_state(self):
    self.err2.assign(0.0)
    self.ref2.assign(0.0)


class NRMSEStandardError(keras.metrics.Metric):
  """Standard error of `NRMSE` over the patches seen, %: how far the score of a validation set
  this size could move on another draw of patches, i.e. whether it can rank two checkpoints.

  `NRMSE` is a ratio of sums, ``R = sum e_i / sum r_i`` with ``e_i = sum (pred - true)^2`` and
  ``r_i = sum true^2`` per patch; its delta-method variance is
  ``n / (sum r_i)^2 * var_i(e_i - R r_i)``, and ``NRMSE = 100 sqrt(R)`` gives
  ``SE = 100 SE(R) / (2 sqrt(R))``. The patch moments are sums, so replicas add up.
  """

  def __init__(self, name="nrmse_se", **kwargs):
    super().__init__(name=name, **kwargs)
    # float64: the spread is a small difference of large sums when e_i ~ R r_i (float32 loses
    # it: 38 % off on a test batch).
    self.sums = {key: self.add_variable(shape=(), initializer="zeros", dtype="float64",
                                        name=key)
                 for key in ("n", "e", "r", "ee", "rr", "er")}

  def update_state(self, chi_true, chi_pred, sample_weight=None):
    del sample_weight
    true = tf.cast(chi_true, tf.float32)
    axes = tf.range(1, tf.rank(true))
    e = tf.cast(tf.reduce_sum(tf.square(tf.cast(chi_pred, tf.float32) - true), axis=axes),
                tf.float64)
    r = tf.cast(tf.reduce_sum(tf.square(true), axis=axes), tf.float64)
    for key, value in (("n", tf.ones_like(e)), ("e", e), ("r", r), ("ee", e * e),
                       ("rr", r * r), ("er", e * r)):
      self.sums[key].assign_add(tf.reduce_sum(value))

  def result(self):
    n, e, r, ee, rr, er = _global_sums(*self.sums.values())
    ratio = tf.math.divide_no_nan(e, r)
    # sum (e_i - R r_i)^2; sum (e_i - R r_i) is 0 by R's definition.
    spread = tf.maximum(ee - 2.0 * ratio * er + ratio * ratio * rr, tf.constant(0.0, tf.float64))
    var_ratio = tf.math.divide_no_nan(n * tf.math.divide_no_nan(spread, n - 1.0), r * r)
    se = tf.where(n > 1.0, 50.0 * tf.math.divide_no_nan(tf.sqrt(var_ratio), tf.sqrt(ratio)),
                  tf.constant(0.0, tf.float64))
    return tf.cast(se, tf.float32)

  def reset_state(self):
    for variable in self.sums.values():
      variable.assign(0.0)


class QSMGAN(keras.Model):
  """Generator + conditional critic with a stage-dependent ``train_step``.

  Attributes:
    generator: field ppm [B, in, in, in, 1] -> chi ppm [B, out, out, out, 1].
    critic: [field ppm (input patch), chi ppm (output patch)] -> score [B, 1]; may be None for
      the pretrain stage.
    gen_optimizer / critic_optimizer: set by compile(); LossScaleOptimizers under mixed_float16.
  """

  def __init__(self, generator: keras.Model, critic: keras.Model | None = None,
               stage: str = "pretrain", n_critic: int = 5, lambda_gp: float = 10.0,
               lambda_adv: float = 1e-2, gradient_loss_weight: float = 0.0,
               chi_scale: float = 10.0, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    if stage not in STAGES:
      raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "wgan_gp" and critic is None:
      raise ValueError("stage 'wgan_gp' needs a critic")
    if n_critic < 1:
      raise ValueError(f"n_critic must be >= 1, got {n_critic}")
    self.generator = generator
    self.critic = critic
    self.stage = stage
    self.n_critic = int(n_critic)
    self.lambda_gp = float(lambda_gp)
    self.lambda_adv = float(lambda_adv)
    self.gradient_loss_weight = float(gradient_loss_weight)
    self.chi_scale = float(chi_scale)
    self.seed = int(seed)
    mean = keras.metrics.Mean
    self.loss_tracker = mean(name="loss")
    self.voxel_tracker = mean(name="gen_voxel_loss")
    self.adv_tracker = mean(name="gen_adv_loss")
    self.critic_tracker = mean(name="critic_loss")
    self.gp_tracker = mean(name="gradient_penalty")
    self.wasserstein_tracker = mean(name="wasserstein")
    self.l1_ppm_tracker = mean(name="l1_ppm")
    self.nrmse_metric = NRMSE(name="nrmse")
    self.nrmse_se_metric = NRMSEStandardError(name="nrmse_se")
    self.gen_optimizer = None
    self.critic_optimizer = None
    self.built = True

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Everything is built by __init__ (functional sub-models) and compile() (optimizers).
    # Keras' version draws a training batch and strategy.reduce()s it, which fails under
    # MultiWorkerMirroredStrategy with a distributed dataset (Keras 3.15, measured) and would
    # consume a batch.
    del iterator, data_batch

  def call(self, field_ppm, training=False):
    return self.generator(field_ppm, training=training)

  @property
  def metrics(self):
    return [self.loss_tracker, self.voxel_tracker, self.adv_tracker, self.critic_tracker,
            self.gp_tracker, self.wasserstein_tracker, self.l1_ppm_tracker, self.nrmse_metric,
            self.nrmse_se_metric]

  def compile(self, gen_optimizer, critic_optimizer=None, **kwargs):
    """Wraps (under mixed_float16) and builds both optimizers. Call under strategy.scope().

    Args:
      gen_optimizer: keras optimizer for the generator.
      critic_optimizer: keras optimizer for the critic (required for 'wgan_gp').
      **kwargs: passed to keras.Model.compile (jit_compile defaults to False: XLA on CPU was
        6.5x slower here).
    """
    float16 = keras.mixed_precision.global_policy().name == "mixed_float16"

    def prepare(opt, variables):
      # A Keras optimizer binds to the strategy current at its construction; one made outside
      # the scope applies per replica under MirroredStrategy (steps counted twice).
      bound = getattr(opt, "_distribution_strategy", None)
      if bound is not None and bound is not tf.distribute.get_strategy():
        raise ValueError("create the optimizers inside strategy.scope(), like the models")
      if float16 and not isinstance(opt, keras.optimizers.LossScaleOptimizer):
        opt = keras.optimizers.LossScaleOptimizer(opt)
      # Built here, under the scope: building lazily inside the first distributed step dies
      # with "You must feed a value for placeholder tensor".
      opt.build(variables)
      return opt

    self.gen_optimizer = prepare(gen_optimizer, self.generator.trainable_variables)
    if self.stage == "wgan_gp":
      if critic_optimizer is None:
        raise ValueError("stage 'wgan_gp' needs a critic_optimizer")
      self.critic_optimizer = prepare(critic_optimizer, self.critic.trainable_variables)
    kwargs.setdefault("jit_compile", False)
    super().compile(optimizer=self.gen_optimizer, **kwargs)
    # Keras 3.15 reduces per-replica logs under MultiWorkerMirroredStrategy with
    # strategy.reduce(MEAN, v, axis=0), which fails on scalars (measured); [1]-shaped logs
    # reduce to the same scalar mean.
    self._vector_logs = isinstance(tf.distribute.get_strategy(),
                                   tf.distribute.MultiWorkerMirroredStrategy)

  def _logs(self, logs):
    if getattr(self, "_vector_logs", False):
      return {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs

  # --- losses -------------------------------------------------------------------------
  def _voxel_loss(self, chi_pred, chi_true):
    return voxel_loss(chi_pred, chi_true, self.chi_scale, self.gradient_loss_weight)

  def _epsilon(self, batch_size, critic_iteration: int):
    """U[0, 1] per sample, float32, different per replica, step and critic iteration."""
    step = tf.cast(self.critic_optimizer.iterations, tf.int32)
    seed = tf.stack([self.seed + tf.cast(_replica_id(), tf.int32) * 7919,
                     step * 131 + critic_iteration])
    return tf.random.stateless_uniform([batch_size, 1, 1, 1, 1], seed=seed, dtype=tf.float32)

  def _gradient_penalty(self, field, chi_real, chi_fake, critic_iteration: int):
    """E[(||d critic / d chi_hat||_2 - 1)^2] at random points between real and fake, float32."""
    real = tf.cast(chi_real, tf.float32)
    fake = tf.cast(chi_fake, tf.float32)
    eps = self._epsilon(tf.shape(real)[0], critic_iteration)
    chi_hat = eps * real + (1.0 - eps) * fake
    with tf.GradientTape() as tape:
      tape.watch(chi_hat)
      score = self.critic([field, chi_hat], training=True)
    grad = tf.cast(tape.gradient(score, chi_hat), tf.float32)
    norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3, 4]) + 1e-12)
    return tf.reduce_mean(tf.square(norm - 1.0))

  @staticmethod
  def _scaled(optimizer, loss):
    """The loss to differentiate: divided by the replica count (gradients are SUM-reduced),
    times the loss scale under float16. Must be computed inside the tape."""
    scaled = loss / _num_replicas()
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
      scaled = optimizer.scale_loss(scaled)
    return scaled

  @staticmethod
  def _apply(optimizer, tape, scaled_loss, variables):
    # LossScaleOptimizer.apply unscales and skips non-finite steps itself.
    optimizer.apply(tape.gradient(scaled_loss, variables), variables)

  # --- steps ----------------------------------------------------------------------------
  def train_step(self, data):
    field, chi_true = data
    gen_vars = self.generator.trainable_variables
    with tf.GradientTape() as tape:
      # One generator pass serves the critic updates too (the generator does not change
      # during them). It also orders the replicas' collectives: synchronized BatchNorm's
      # all-reduces come before the critic's gradient all-reduces on every replica; a second,
      # independent generator pass let replicas interleave them differently (shape-mismatch
      # abort in the collective executor).
      chi_fake = self.generator(field, training=True)
      voxel = self._voxel_loss(chi_fake, chi_true)
      total = voxel
      if self.stage == "wgan_gp":
        with tape.stop_recording():
          self._critic_updates(field, chi_true, tf.stop_gradient(chi_fake))
        adv = -tf.reduce_mean(tf.cast(self.critic([field, chi_fake], training=True),
                                      tf.float32))
        total = voxel + self.lambda_adv * adv
      scaled = self._scaled(self.gen_optimizer, total)
    self._apply(self.gen_optimizer, tape, scaled, gen_vars)

    self.loss_tracker.update_state(total)
    self.voxel_tracker.update_state(voxel)
    logs = {"loss": self.loss_tracker.result(), "gen_voxel_loss": self.voxel_tracker.result()}
    if self.stage == "wgan_gp":
      self.adv_tracker.update_state(adv)
      for tracker in (self.adv_tracker, self.critic_tracker, self.gp_tracker,
                      self.wasserstein_tracker):
        logs[tracker.name] = tracker.result()
    return self._logs(logs)

  def _critic_updates(self, field, chi_true, chi_fake):
    critic_vars = self.critic.trainable_variables
    for i in range(self.n_critic):  # Python loop: unrolled, no tf.cond around apply().
      with tf.GradientTape() as tape:
        real_score = tf.reduce_mean(tf.cast(self.critic([field, chi_true], training=True),
                                            tf.float32))
        fake_score = tf.reduce_mean(tf.cast(self.critic([field, chi_fake], training=True),
                                            tf.float32))
        penalty = self._gradient_penalty(field, chi_true, chi_fake, i)
        wasserstein = real_score - fake_score
        critic_loss = -wasserstein + self.lambda_gp * penalty
        scaled = self._scaled(self.critic_optimizer, critic_loss)
      self._apply(self.critic_optimizer, tape, scaled, critic_vars)
      self.critic_tracker.update_state(critic_loss)
      self.gp_tracker.update_state(penalty)
      self.wasserstein_tracker.update_state(wasserstein)

  def test_step(self, data):
    field, chi_true = data
    chi_pred = self.generator(field, training=False)
    voxel = self._voxel_loss(chi_pred, chi_true)
    self.loss_tracker.update_state(voxel)
    self.l1_ppm_tracker.update_state(
        tf.reduce_mean(tf.abs(tf.cast(chi_pred, tf.float32) - tf.cast(chi_true, tf.float32))))
    self.nrmse_metric.update_state(chi_true, chi_pred)
    self.nrmse_se_metric.update_state(chi_true, chi_pred)
    return self._logs({"loss": self.loss_tracker.result(), "l1_ppm": self.l1_ppm_tracker.result(),
                       "nrmse": self.nrmse_metric.result(),
                       "nrmse_se": self.nrmse_se_metric.result()})
