"""Tests for qsmgan_tf.networks: generator layout, parameter count, transforms, critic."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from qsmgan_tf import networks


@pytest.fixture(autouse=True)
def _float32_policy():
  yield
  keras.mixed_precision.set_global_policy("float32")


def _conv(c_in, c_out, k=3, bias=True):
  return k**3 * c_in * c_out + (c_out if bias else 0)


def _expected_parameters(config: networks.GeneratorConfig) -> int:
  """Closed-form count (BUILD.md's arithmetic): convs without bias before BatchNorm, 4 weights
  per BatchNorm channel (gamma, beta, moving mean, moving variance)."""
  widths = config.filters()
  total, c = 0, 1
  for level, w in enumerate(widths):  # encoder levels and the bottleneck
    for _ in range(config.convs_per_level):
      total += _conv(c, w, bias=False) + 4 * w
      c = w
  for level in reversed(range(config.depth)):  # decoder
    w = widths[level]
    total += 2**3 * c * w + w  # transposed conv 2^3, stride 2
    c = 2 * w  # after the skip concatenation
    for _ in range(config.convs_per_level):
      total += _conv(c, w, bias=False) + 4 * w
      c = w
  total += _conv(c, config.head_filters, k=1) + _conv(config.head_filters, 1, k=1)
  return total


def test_paper_preset_parameter_count_is_pinned_and_matches_the_arithmetic():
  config = networks.PRESETS["paper"]
  model = networks.build_generator(config)
  assert config.filters() == [16, 32, 64, 128, 128]
  assert networks.count_parameters(model) == _expected_parameters(config) == 3_748_033
  # The uncapped 256-filter bottleneck is the prototype's 5.65 M layout.
  wide = config.replace(max_filters=None)
  assert _expected_parameters(wide) == 5_649_601


@pytest.mark.parametrize("preset", ["cpu_small", "test_tiny"])
def test_other_presets_match_the_arithmetic(preset):
  config = networks.PRESETS[preset]
  assert networks.count_parameters(networks.build_generator(config)) == \
      _expected_parameters(config)


def test_generator_is_fully_convolutional_with_the_crop_margin():
  config = networks.PRESETS["test_tiny"]
  model = networks.build_generator(config)
  c = networks.crop_margin(config)
  assert c == 4
  # Any size divisible by 2**depth = 4, not only the training patch.
  out = model(tf.zeros((2, 32, 40, 24, 1)))
  assert tuple(out.shape) == (2, 32 - 2 * c, 40 - 2 * c, 24 - 2 * c, 1)
  assert networks.crop_margin(networks.PRESETS["paper"]) == 8


def test_output_is_float32_under_mixed_bfloat16():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  model = networks.build_generator(networks.PRESETS["test_tiny"])
  assert model.get_layer("enc0_conv0").compute_dtype == "bfloat16"
  for name in ("head_conv1", "chi_ppm"):
    assert model.get_layer(name).compute_dtype == "float32"
  assert model(tf.zeros((1, 24, 24, 24, 1))).dtype == tf.float32


@pytest.mark.parametrize("kind", ["linear", "scaled_tanh"])
def test_output_transform_round_trips_microbleed_values(kind):
  layer = networks.OutputTransform(kind, chi_scale=10.0, chi_max_ppm=3.0)
  chi = np.array([-1.5, -0.6, 0.0, 0.02, 0.7, 1.5, 2.0], np.float32)
  back = np.asarray(layer(layer.forward(chi)))
  np.testing.assert_allclose(back, chi, atol=1e-4)


def test_paper_tanh_transform_saturates_below_microbleeds():
  # Pinned known limitation of tanh(10 chi) in float32: 1.5 ppm comes back as ~0.73 ppm.
  layer = networks.OutputTransform("tanh", tanh_gain=10.0)
  back = np.asarray(layer(layer.forward(np.array([0.1, 1.5], np.float32))))
  np.testing.assert_allclose(back[0], 0.1, atol=1e-4)
  assert np.isfinite(back).all() and 0.6 < back[1] < 0.75


def test_scaled_tanh_is_linear_near_zero_and_bounded():
  layer = networks.OutputTransform("scaled_tanh", chi_scale=10.0, chi_max_ppm=3.0)
  y = np.array([0.1, 1e4, -1e4], np.float32)
  chi = np.asarray(layer(y))
  np.testing.assert_allclose(chi[0], 0.01, rtol=1e-4)  # y / chi_scale near zero
  np.testing.assert_allclose(chi[1:], [3.0, -3.0], rtol=1e-6)


def test_keras_file_round_trip_gives_identical_output(tmp_path):
  config = networks.PRESETS["test_tiny"].replace(output_transform="scaled_tanh")
  model = networks.build_generator(config)
  x = tf.random.stateless_normal((1, 24, 24, 24, 1), seed=(1, 2)) * 0.05
  path = tmp_path / "g.keras"
  model.save(path)
  loaded = keras.models.load_model(path)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))
  assert loaded.get_layer("chi_ppm").kind == "scaled_tanh"


@pytest.mark.parametrize("norm,layer_type", [
    ("batch", keras.layers.BatchNormalization),
    ("instance", keras.layers.GroupNormalization),
    ("none", None),
])
def test_norm_choice_builds_the_right_layers(norm, layer_type):
  model = networks.build_generator(networks.PRESETS["test_tiny"].replace(norm=norm))
  norms = [l for l in model.layers
           if isinstance(l, (keras.layers.BatchNormalization, keras.layers.GroupNormalization))]
  if layer_type is None:
    assert not norms
  else:
    assert norms and all(isinstance(l, layer_type) for l in norms)
  if norm == "instance":
    # groups=-1: one group per channel, i.e. instance normalisation.
    assert all(l.groups == l.input.shape[-1] for l in norms)
  assert tuple(model(tf.zeros((1, 24, 24, 24, 1))).shape) == (1, 16, 16, 16, 1)


@pytest.mark.parametrize("changes,message", [
    (dict(norm="layer"), "norm must be one of"),
    (dict(output_transform="sigmoid"), "output_transform must be one of"),
    (dict(input_patch=24, output_patch=17), "centred"),
    (dict(input_patch=26, output_patch=18), "divisible by 2\\*\\*depth"),
])
def test_config_rejects_bad_values(changes, message):
  with pytest.raises(ValueError, match=message):
    networks.PRESETS["test_tiny"].replace(**changes)


def test_config_dict_round_trip_and_unknown_keys():
  config = networks.PRESETS["cpu_small"]
  assert networks.GeneratorConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="unknown GeneratorConfig fields: bogus"):
    networks.GeneratorConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_critic_is_conditional_strided_and_has_no_batchnorm():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  gen_config = networks.PRESETS["test_tiny"]
  critic = networks.build_critic(networks.CRITIC_PRESETS["test_tiny"], gen_config)
  convs = [l for l in critic.layers if isinstance(l, keras.layers.Conv3D)]
  assert len(convs) == 5  # block 0 is a field and a chi convolution, added
  assert all(l.strides == (2, 2, 2) and l.kernel_size == (4, 4, 4) for l in convs)
  assert sorted(l.filters for l in convs) == [4, 4, 8, 16, 32]
  assert not any(isinstance(l, keras.layers.BatchNormalization) for l in critic.layers)
  field = tf.random.stateless_normal((3, 24, 24, 24, 1), seed=(0, 1))
  chi = tf.zeros((3, 16, 16, 16, 1))
  score = critic([field, chi])
  assert tuple(score.shape) == (3, 1) and score.dtype == tf.float32
  # Conditioned on the field: the same chi with another field scores differently.
  other = critic([field * 0.0, chi])
  assert not np.allclose(np.asarray(score), np.asarray(other))


def test_critic_first_block_is_one_convolution_of_field_and_chi_as_channels():
  """The split first block (no Concatenate: see build_critic) equals Conv3D over the
  concatenation with the two kernels stacked on the input-channel axis, then LeakyReLU."""
  gen_config = networks.PRESETS["test_tiny"]
  critic = networks.build_critic(networks.CRITIC_PRESETS["test_tiny"], gen_config)
  rng = np.random.default_rng(3)
  field = rng.standard_normal((2, 24, 24, 24, 1)).astype(np.float32)
  chi = rng.standard_normal((2, 16, 16, 16, 1)).astype(np.float32)
  for layer in critic.layers:  # non-zero biases everywhere
    for weight in layer.weights:
      weight.assign(rng.standard_normal(weight.shape).astype(np.float32) * 0.1)
  first = keras.Model(critic.inputs, critic.get_layer("block0_act").output)(
      [field, chi]).numpy()
  margin = networks.crop_margin(gen_config)
  f = field[:, margin:-margin, margin:-margin, margin:-margin] * gen_config.field_scale
  joined = np.concatenate([f, chi * gen_config.chi_scale], axis=-1)
  field_conv, chi_conv = critic.get_layer("block0_conv_field"), critic.get_layer("block0_conv_chi")
  kernel = np.concatenate([field_conv.kernel.numpy(), chi_conv.kernel.numpy()], axis=3)
  reference = tf.nn.conv3d(joined, kernel, [1, 2, 2, 2, 1], "SAME") + field_conv.bias.numpy()
  reference = tf.nn.leaky_relu(reference, networks.CRITIC_PRESETS["test_tiny"].leaky_slope)
  np.testing.assert_allclose(first, reference.numpy(), rtol=1e-5, atol=1e-5)


def test_leaky_max_is_leaky_relu_and_saves(tmp_path):
  x = np.random.default_rng(0).standard_normal((2, 5, 5, 5, 3)).astype(np.float32)
  reference = keras.layers.LeakyReLU(negative_slope=0.1)
  ours = networks.LeakyMax(0.1)
  np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours(x)),
                                keras.ops.convert_to_numpy(reference(x)))
  grads = []
  for layer in (ours, reference):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch(xt)
      y = tf.reduce_sum(layer(xt) * xt)
    grads.append(tape.gradient(y, xt).numpy())
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)
  inp = keras.Input((4, 4, 4, 1))
  model = keras.Model(inp, networks.LeakyMax(0.2, name="act")(inp))
  model.save(tmp_path / "m.keras")
  loaded = keras.models.load_model(tmp_path / "m.keras")
  assert loaded.get_layer("act").negative_slope == pytest.approx(0.2)
  with pytest.raises(ValueError, match="negative_slope"):
    networks.LeakyMax(1.5)
