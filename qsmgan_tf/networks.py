"""QSMGAN networks: the 3D U-Net generator and the conditional WGAN-GP critic.

The generator maps a local field in ppm of B0, ``[B, X, Y, Z, 1]``, to susceptibility in ppm,
``[B, X - 2c, Y - 2c, Z - 2c, 1]`` with ``c = crop_margin(config)`` (8 for the published
64^3 -> 48^3 patches). Input normalisation and the output transform live inside the model, so
everything outside it speaks ppm. The model is fully convolutional: any X, Y, Z divisible by
``2**depth`` works, which is what whole-volume inference relies on.

Layout (Chen et al., NeuroImage 2020), per level 2 x [Conv3D 3^3 -> norm -> LeakyReLU(0.1)],
average pooling 2^3 down, transposed Conv3D 2^3 stride 2 up, skip concatenation, the central
crop, then a head of two 1^3 convs and the output transform.

Example:
  config = networks.PRESETS['paper']
  generator = networks.build_generator(config)
  chi_ppm = generator(field_ppm)  # [B, 64, 64, 64, 1] -> [B, 48, 48, 48, 1]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import tensorflow as tf

NORMS = ("batch", "instance", "none")
OUTPUT_TRANSFORMS = ("linear", "tanh", "scaled_tanh")

# atanh(1 - _TANH_EPS) / 10 = 0.725 ppm: the most the paper's tanh(10 chi) output can say in
# float32 (tanh rounds to exactly 1.0 beyond ~9, and atanh(1) is inf).
_TANH_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Hyper-parameters of the U-Net generator; travels in contract.json and the SavedModel.

  Attributes:
    depth: number of 2^3 poolings; spatial sizes must be divisible by ``2**depth``.
    base_filters: filters at the first level, doubled per level.
    max_filters: cap on filters per level (the bottleneck width); None = no cap.
    convs_per_level: 3^3 conv blocks per level (2 in the paper).
    input_patch: training input patch edge, voxels.
    output_patch: training output (target) patch edge, voxels; centred in the input.
    norm: 'batch', 'instance' (GroupNormalization(groups=-1)) or 'none'.
    sync_batchnorm: BatchNormalization(synchronized=True): statistics over the global batch,
      so N replicas train like one device (a no-op on one replica).
    output_transform: 'linear' (chi = y / chi_scale), 'tanh' (the paper's: chi = atanh(tanh(y))
      / tanh_gain, saturates at 0.725 ppm) or 'scaled_tanh' (chi = chi_max_ppm * tanh(y /
      (chi_scale * chi_max_ppm)): linear near 0, bounded by chi_max_ppm).
    field_scale: input normalisation, network input = field_ppm * field_scale.
    chi_scale: target normalisation, network output units per ppm (and the critic's chi input).
    tanh_gain: the paper's 10 in tanh(10 chi).
    chi_max_ppm: the 'scaled_tanh' bound, ppm (must exceed the largest |chi| to represent).
    leaky_slope: LeakyReLU negative slope (0.1 in the paper).
    head_filters: filters of the first 1^3 head conv.
  """

  depth: int = 4
  base_filters: int = 16
  max_filters: int | None = 128
  convs_per_level: int = 2
  input_patch: int = 64
  output_patch: int = 48
  norm: str = "batch"
  sync_batchnorm: bool = True
  output_transform: str = "scaled_tanh"
  field_scale: float = 10.0
  chi_scale: float = 10.0
  tanh_gain: float = 10.0
  chi_max_ppm: float = 3.0
  leaky_slope: float = 0.1
  head_filters: int = 16

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.output_transform not in OUTPUT_TRANSFORMS:
      raise ValueError(
          f"output_transform must be one of {OUTPUT_TRANSFORMS}, got {self.output_transform!r}")
    if self.depth < 1 or self.base_filters < 1 or self.convs_per_level < 1:
      raise ValueError("depth, base_filters and convs_per_level must be >= 1")
    if (self.input_patch - self.output_patch) % 2 or self.output_patch > self.input_patch:
      raise ValueError(f"output_patch {self.output_patch} must be centred in input_patch "
                       f"{self.input_patch} (even difference, not larger)")
    if self.input_patch % (2**self.depth):
      raise ValueError(f"input_patch {self.input_patch} must be divisible by 2**depth = "
                       f"{2**self.depth}")
    if self.field_scale <= 0 or self.chi_scale <= 0 or self.chi_max_ppm <= 0:
      raise ValueError("field_scale, chi_scale and chi_max_ppm must be positive")

  def filters(self) -> list[int]:
    """Filters per level, from the first level to the bottleneck (depth + 1 entries)."""
    widths = [self.base_filters * 2**level for level in range(self.depth + 1)]
    if self.max_filters:
      widths = [min(w, self.max_filters) for w in widths]
    return widths

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "GeneratorConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown GeneratorConfig fields: {', '.join(unknown)}")
    return cls(**values)

  def replace(self, **changes) -> "GeneratorConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class CriticConfig:
  """Hyper-parameters of the conditional critic (no BatchNorm: the penalty is per sample).

  Attributes:
    base_filters: filters of the first strided block, doubled per block.
    num_blocks: strided Conv3D blocks (kernel 4, stride 2).
    leaky_slope: LeakyReLU negative slope.
    norm: 'none' or 'layer' (LayerNormalization over channels); never batch norm.
  """

  base_filters: int = 16
  num_blocks: int = 4
  leaky_slope: float = 0.2
  norm: str = "none"

  def __post_init__(self):
    if self.norm not in ("none", "layer"):
      raise ValueError(f"critic norm must be 'none' or 'layer', got {self.norm!r}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "CriticConfig":
    return cls(**values)


PRESETS: dict[str, GeneratorConfig] = {
    # The published layout: 16-32-64-128 filters, 4 poolings, bottleneck capped at 128
    # (3,749,249 parameters; BUILD.md compares this with the released export's ~2.69 M).
    "paper": GeneratorConfig(),
    # Same patches and depth (the receptive field matters for a non-local inverse), a quarter of
    # the width: sized for the README's 20-minute run on 2 CPU cores.
    "cpu_small": GeneratorConfig(base_filters=8, max_filters=64, head_filters=8),
    # Seconds-scale tests: 24^3 -> 16^3 patches, two poolings, a handful of filters.
    "test_tiny": GeneratorConfig(depth=2, base_filters=4, max_filters=16, input_patch=24,
                                 output_patch=16, head_filters=4),
}

CRITIC_PRESETS: dict[str, CriticConfig] = {
    "paper": CriticConfig(base_filters=16),
    "cpu_small": CriticConfig(base_filters=8),
    "test_tiny": CriticConfig(base_filters=4),
}


def crop_margin(config: GeneratorConfig) -> int:
  """Voxels cropped from each side of the input: (input_patch - output_patch) / 2."""
  return (config.input_patch - config.output_patch) // 2


@keras.saving.register_keras_serializable(package="qsmgan_tf")
class LeakyMax(keras.layers.Layer):
  """LeakyReLU as ``max(x, slope * x)`` (0 <= slope < 1: the same function and gradient).

  Used after the generator's biased 1^3 head convolution. There Keras' LeakyReLU lets
  TensorFlow's grappler remapper fuse Conv3D + BiasAdd + LeakyRelu in the training graph and then
  abort, because the gradient (LeakyReluGrad) still reads the BiasAdd it removed: a harmless but
  alarming ``E0000 ... remapper failed: INVALID_ARGUMENT`` line in every training log. A maximum
  is not a fusion pattern. Weightless, so models built with either layer share their weights.
  """

  def __init__(self, negative_slope: float, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= negative_slope < 1.0:
      raise ValueError(f"negative_slope must be in [0, 1), got {negative_slope}")
    self.negative_slope = float(negative_slope)

  def call(self, x):
    return keras.ops.maximum(x, x * self.negative_slope)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "negative_slope": self.negative_slope}


@keras.saving.register_keras_serializable(package="qsmgan_tf")
class OutputTransform(keras.layers.Layer):
  """Maps the network's last conv output y to chi in ppm; ``forward`` is its inverse.

  Always float32: under mixed precision a bfloat16 output would quantise chi to ~3 digits and
  tanh/atanh need the full mantissa.
  """

  def __init__(self, kind: str = "linear", chi_scale: float = 10.0, tanh_gain: float = 10.0,
               chi_max_ppm: float = 3.0, **kwargs):
    kwargs["dtype"] = "float32"
    super().__init__(**kwargs)
    if kind not in OUTPUT_TRANSFORMS:
      raise ValueError(f"output transform must be one of {OUTPUT_TRANSFORMS}, got {kind!r}")
    self.kind = kind
    self.chi_scale = float(chi_scale)
    self.tanh_gain = float(tanh_gain)
    self.chi_max_ppm = float(chi_max_ppm)

  def call(self, y):
    y = tf.cast(y, tf.float32)
    if self.kind == "linear":
      return y / self.chi_scale
    if self.kind == "tanh":
      # The paper's tanh activation, then its inverse atanh(.)/10; the clip keeps it finite.
      a = tf.clip_by_value(tf.tanh(y), -1.0 + _TANH_EPS, 1.0 - _TANH_EPS)
      return tf.atanh(a) / self.tanh_gain
    return self.chi_max_ppm * tf.tanh(y / (self.chi_scale * self.chi_max_ppm))

  def forward(self, chi_ppm):
    """chi in ppm -> the pre-transform value y with call(y) == chi (where representable)."""
    chi = tf.convert_to_tensor(chi_ppm, tf.float32)
    if self.kind == "linear":
      return chi * self.chi_scale
    if self.kind == "tanh":
      return chi * self.tanh_gain  # tanh(y) = tanh(10 chi): the paper's target
    ratio = tf.clip_by_value(chi / self.chi_max_ppm, -1.0 + _TANH_EPS, 1.0 - _TANH_EPS)
    return self.chi_scale * self.chi_max_ppm * tf.atanh(ratio)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(kind=self.kind, chi_scale=self.chi_scale, tanh_gain=self.tanh_gain,
                  chi_max_ppm=self.chi_max_ppm)
    return config


def _norm_layer(config: GeneratorConfig, name: str):
  if config.norm == "batch":
    return keras.layers.BatchNormalization(synchronized=config.sync_batchnorm, name=name)
  if config.norm == "instance":
    return keras.layers.GroupNormalization(groups=-1, name=name)
  return None


def _conv_block(x, filters: int, config: GeneratorConfig, name: str):
  for i in range(config.convs_per_level):
    # No bias before a normalisation: the norm's offset replaces it.
    x = keras.layers.Conv3D(filters, 3, padding="same", use_bias=config.norm == "none",
                            name=f"{name}_conv{i}")(x)
    norm = _norm_layer(config, f"{name}_norm{i}")
    if norm is not None:
      x = norm(x)
    x = keras.layers.LeakyReLU(negative_slope=config.leaky_slope, name=f"{name}_act{i}")(x)
  return x


def build_generator(config: GeneratorConfig | None = None, name: str = "qsmgan_generator"
                    ) -> keras.Model:
  """Builds the U-Net generator, field (ppm) -> chi (ppm).

  Build it after setting the mixed-precision policy and inside the strategy scope; the head's
  last conv and the output transform are float32 whatever the policy.

  Args:
    config: a GeneratorConfig (default: the paper preset).
    name: Keras model name.

  Returns:
    A functional keras.Model, ``[B, X, Y, Z, 1]`` field ppm -> ``[B, X-2c, Y-2c, Z-2c, 1]`` chi
    ppm with ``c = crop_margin(config)``; X, Y, Z must be divisible by ``2**config.depth``.
  """
  config = config or PRESETS["paper"]
  widths = config.filters()
  field = keras.Input(shape=(None, None, None, 1), name="field_ppm")
  x = keras.layers.Rescaling(config.field_scale, name="field_normalise")(field)
  skips = []
  for level in range(config.depth):
    x = _conv_block(x, widths[level], config, f"enc{level}")
    skips.append(x)
    x = keras.layers.AveragePooling3D(2, name=f"pool{level}")(x)
  x = _conv_block(x, widths[config.depth], config, "bottleneck")
  for level in reversed(range(config.depth)):
    x = keras.layers.Conv3DTranspose(widths[level], 2, strides=2, name=f"up{level}")(x)
    x = keras.layers.Concatenate(name=f"skip{level}")([x, skips[level]])
    x = _conv_block(x, widths[level], config, f"dec{level}")
  # Crop before the 1^3 head: identical result, 58 % fewer head voxels at 64^3 -> 48^3.
  margin = crop_margin(config)
  if margin:
    x = keras.layers.Cropping3D(margin, name="centre_crop")(x)
  x = keras.layers.Conv3D(config.head_filters, 1, name="head_conv0")(x)
  x = LeakyMax(config.leaky_slope, name="head_act0")(x)
  x = keras.layers.Conv3D(1, 1, dtype="float32", name="head_conv1")(x)
  chi = OutputTransform(config.output_transform, config.chi_scale, config.tanh_gain,
                        config.chi_max_ppm, name="chi_ppm")(x)
  return keras.Model(field, chi, name=name)


def build_critic(config: CriticConfig, generator_config: GeneratorConfig,
                 name: str = "qsmgan_critic") -> keras.Model:
  """Builds the conditional WGAN critic: (field patch, chi patch) -> unbounded score.

  The critic sees the input field cropped to the output patch next to chi, so it judges "is
  this chi consistent with this field", not only "does this look like a QSM". Its first block
  is one strided convolution of the two as channels, written as a sum of two convolutions.

  Args:
    config: CriticConfig.
    generator_config: supplies patch sizes and the field/chi normalisation.
    name: Keras model name.

  Returns:
    keras.Model with inputs ``[field_ppm [B, in, in, in, 1], chi_ppm [B, out, out, out, 1]]``
    and a float32 output ``[B, 1]``.
  """
  size_in, size_out = generator_config.input_patch, generator_config.output_patch
  field = keras.Input(shape=(size_in,) * 3 + (1,), name="field_ppm")
  chi = keras.Input(shape=(size_out,) * 3 + (1,), name="chi_ppm")
  f = field
  if crop_margin(generator_config):
    f = keras.layers.Cropping3D(crop_margin(generator_config), name="field_crop")(f)
  f = keras.layers.Rescaling(generator_config.field_scale, name="field_normalise")(f)
  c = keras.layers.Rescaling(generator_config.chi_scale, name="chi_normalise")(chi)
  # The first block convolves field and chi separately and adds: the function of one
  # convolution of their channel concatenation, without a Concatenate. The gradient penalty
  # differentiates twice; the concatenation's second derivative (a Pad feeding the first
  # convolution's filter gradient) made grappler's remapper abort on every WGAN-GP step
  # ("remapper failed: INVALID_ARGUMENT: Mutation::Apply error ... condition_1/Pad").
  def conv(filters, name, use_bias=True):
    return keras.layers.Conv3D(filters, 4, strides=2, padding="same", use_bias=use_bias,
                               name=name)

  x = keras.layers.Add(name="block0_conv")([
      conv(config.base_filters, "block0_conv_field")(f),
      conv(config.base_filters, "block0_conv_chi", use_bias=False)(c)])
  for block in range(config.num_blocks):
    if block:
      x = conv(config.base_filters * 2**block, f"block{block}_conv")(x)
    if config.norm == "layer":
      x = keras.layers.LayerNormalization(name=f"block{block}_norm")(x)
    x = LeakyMax(config.leaky_slope, name=f"block{block}_act")(x)  # why: see LeakyMax
  x = keras.layers.Flatten(name="flatten")(x)
  score = keras.layers.Dense(1, dtype="float32", name="score")(x)
  return keras.Model([field, chi], score, name=name)


def count_parameters(model: keras.Model) -> int:
  """All weights (trainable and BatchNorm moving statistics): what an export stores."""
  return int(sum(math.prod(w.shape) for w in model.weights))
