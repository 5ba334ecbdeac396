"""Tests for qsmgan_tf.physics_tf: every in-graph function against the NumPy reference
(`physics`), including oblique B0, anisotropic voxels, odd sizes and dynamic shapes."""

import numpy as np
import pytest
import scipy.fft
import tensorflow as tf

from qsmgan_tf import physics
from qsmgan_tf import physics_tf

_OBLIQUE = (0.3, -0.5, 0.8)


def test_next_fast_len_matches_scipy():
  sizes = np.concatenate([np.arange(1, 700), [997, 1021, 2047, 4099, 8191]]).astype(np.int32)
  got = physics_tf.next_fast_len(tf.constant(sizes)).numpy()
  want = [scipy.fft.next_fast_len(int(n), real=True) for n in sizes]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape,factor,margin", [
    ((37, 50, 41), 1.0, 0),    # fast size only
    ((37, 50, 41), 1.0, 12),   # the refinement's margin
    ((37, 50, 41), 2.0, 0),    # simulation's 2x
    ((16, 17, 9), 1.5, 3),     # both constraints, tiny
])
def test_fft_shape_matches_physics(shape, factor, margin):
  got = physics_tf.fft_shape(tf.constant(shape), factor, margin).numpy()
  assert tuple(got) == physics.fft_shape(shape, factor, margin)


@pytest.mark.parametrize("shape,voxel,b0,rfft", [
    ((16, 16, 16), (1, 1, 1), (0, 0, 1), True),       # axial, isotropic
    ((16, 17, 9), (1, 1, 1), (0, 0, 1), False),       # odd sizes, full spectrum
    ((16, 17, 9), (0.8, 1.1, 2.0), _OBLIQUE, True),   # oblique + anisotropic, half spectrum
    ((15, 20, 12), (0.8, 1.1, 2.0), _OBLIQUE, False),  # oblique + anisotropic, full spectrum
    ((12, 10, 11), (1, 1, 1), (1, 0, 0), True),       # B0 along the first voxel axis
    ((12, 10, 11), (1, 1, 1), (0, 0, -2), True),      # unnormalised, antiparallel
])
def test_dipole_kernel_matches_physics(shape, voxel, b0, rfft):
  want = physics.dipole_kernel(shape, voxel, b0, rfft=rfft)
  got = physics_tf.dipole_kernel(tf.constant(shape), tf.constant(voxel, tf.float32),
                                 tf.constant(b0, tf.float32), rfft=rfft).numpy()
  assert got.shape == want.shape
  assert got[0, 0, 0] == 0.0  # D(0) = 0, not 1/3
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("voxel,b0,pad_factor,margin", [
    ((1, 1, 1), (0, 0, 1), 2.0, 0),
    ((0.8, 1.1, 2.0), _OBLIQUE, 2.0, 0),
    ((0.8, 1.1, 2.0), _OBLIQUE, 1.0, 6),   # the refinement's padding style
])
def test_forward_field_matches_physics(voxel, b0, pad_factor, margin):
  rng = np.random.default_rng(0)
  chi = rng.standard_normal((19, 22, 15)).astype(np.float32)
  want = physics.forward_field(chi, voxel, b0, pad_factor, margin)
  got = physics_tf.forward_field(chi, voxel, b0, pad_factor, margin).numpy()
  np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())


def test_graph_functions_take_dynamic_shapes():
  """One trace with unknown shapes serves volumes of different sizes, as a SavedModel must."""
  @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32),
                                tf.TensorSpec([3], tf.float32), tf.TensorSpec([3], tf.float32)])
  def field_of(chi, voxel, b0):
    return physics_tf.forward_field(chi, voxel, b0, 1.0, 5)

  rng = np.random.default_rng(1)
  for shape in [(12, 14, 10), (17, 9, 13)]:
    chi = rng.standard_normal(shape).astype(np.float32)
    got = field_of(chi, np.float32([1, 1.2, 1.5]), np.float32(_OBLIQUE)).numpy()
    want = physics.forward_field(chi, (1, 1.2, 1.5), _OBLIQUE, 1.0, 5)
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())
  assert len(field_of._list_all_concrete_functions()) == 1  # pylint: disable=protected-access


def test_pad_and_crop_match_physics_and_invert():
  x = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
  padded = physics_tf.pad_to(x, tf.constant([8, 9, 12])).numpy()
  np.testing.assert_array_equal(padded, physics.pad_to(x, (8, 9, 12)))
  np.testing.assert_array_equal(physics_tf.crop_from(padded, tf.constant([5, 6, 7])).numpy(), x)


@pytest.mark.parametrize("margin", [0, 3, 50])  # 50: clipped at the volume's edges
def test_bounding_box_matches_physics(margin):
  mask = np.zeros((20, 21, 22), bool)
  mask[4:9, 0:3, 10:22] = True
  mask[12, 5, 11] = True
  begin, size = physics_tf.bounding_box(mask, margin)
  want = physics.bounding_box(mask, margin)
  assert list(begin.numpy()) == [s.start for s in want]
  assert list((begin + size).numpy()) == [s.stop for s in want]


def test_field_residual_matches_physics():
  rng = np.random.default_rng(2)
  mask = np.zeros((18, 20, 16), bool)
  mask[3:15, 4:17, 2:14] = True
  chi = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  field = physics.forward_field(chi, (1, 1, 1.5), _OBLIQUE) + 0.3  # an offset the de-meaning drops
  noisy = (chi + 0.5 * rng.standard_normal(mask.shape) * mask).astype(np.float32)
  for candidate in (chi, noisy):
    want = physics.field_residual(candidate, field, mask, (1, 1, 1.5), _OBLIQUE)
    got = float(physics_tf.field_residual(candidate, field, mask.astype(np.float32),
                                          (1, 1, 1.5), _OBLIQUE))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
  # The true source explains its own field (up to the offset), a noisy one does not.
  assert float(physics_tf.field_residual(chi, field, mask, (1, 1, 1.5), _OBLIQUE)) < 1e-5
