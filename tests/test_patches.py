"""Patch pairs: centring, background share, and augmentation that keeps the dipole physics."""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage

from data_prep import patches
from qsmgan_tf import physics


@dataclasses.dataclass
class _Subject:
  """The fields of data_prep.simulate.Subject that patch_pairs reads."""
  subject_id: str
  field_ppm: np.ndarray
  target_ppm: np.ndarray
  mask: np.ndarray
  voxel_size_mm: tuple
  b0_dir: np.ndarray
  snr: float = 100.0
  meta: dict = dataclasses.field(default_factory=lambda: {"kind": "shapes"})


def _sphere_subject(n=32, radius=11, voxel=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0), seed=0):
  rng = np.random.default_rng(seed)
  idx = np.indices((n, n, n)) - (n - 1) / 2
  mask = (idx**2).sum(0) <= radius**2
  chi = np.where(mask, rng.normal(0, 0.05, (n, n, n)), 0).astype(np.float32)
  field = np.where(mask, physics.forward_field(chi, voxel, b0), 0).astype(np.float32)
  return _Subject("s-1", field, chi, mask, voxel, physics.unit_vector(b0))


def test_grid_centres_are_regular_and_centred():
  c = patches.grid_centres((33, 20, 8), 8)
  xs = np.unique(c[:, 0])
  np.testing.assert_array_equal(xs, [0, 8, 16, 24, 32])
  np.testing.assert_array_equal(np.unique(c[:, 1]), [1, 9, 17])  # margins 1 and 2
  assert len(c) == 5 * 3 * 1


@pytest.mark.parametrize("augment", [False, True])
def test_target_is_centre_crop_of_input_region(augment):
  subject = _sphere_subject()
  # Field := chi, so each input patch holds chi and the target must be its centre crop.
  subject.field_ppm = subject.target_ppm.copy()
  cfg = patches.PatchConfig(16, 8, 8, augment=augment, dtype="float32", chi_scale_range=(1, 1))
  pairs = list(patches.patch_pairs(subject, cfg, seed=3))
  assert pairs
  m = cfg.margin
  for arrays, meta in pairs:
    np.testing.assert_array_equal(arrays["chi"], arrays["field"][m:-m, m:-m, m:-m])
    # And the input is the volume around meta/centre (zero outside), transformed.
    c = meta["centre"]
    padded = np.pad(subject.target_ppm, 8)
    region = padded[c[0]:c[0] + 16, c[1]:c[1] + 16, c[2]:c[2] + 16]
    expected = patches.transform_volume(region, meta["transform"].reshape(3, 3))
    np.testing.assert_array_equal(arrays["field"], expected)
    mask_region = np.pad(subject.mask, 8)[c[0]:c[0] + 16, c[1]:c[1] + 16, c[2]:c[2] + 16]
    mask_crop = patches.transform_volume(mask_region, meta["transform"].reshape(3, 3))[m:-m, m:-m, m:-m]
    np.testing.assert_array_equal(arrays["mask"], mask_crop.astype(np.uint8))


def test_background_share_and_placement():
  subject = _sphere_subject(n=48, radius=14)
  cfg = patches.PatchConfig(16, 8, 6, background_fraction=0.5)
  centres, background = patches.select_centres(subject.mask, cfg, np.random.default_rng(0))
  n_brain = int((~background).sum())
  assert background.sum() == round(0.5 * n_brain)
  assert subject.mask[tuple(centres[~background].T)].all()
  assert not subject.mask[tuple(centres[background].T)].any()
  # Background centres are near the edge: their input region touches the mask.
  padded = np.pad(subject.mask, 8)
  for c in centres[background]:
    assert padded[c[0]:c[0] + 16, c[1]:c[1] + 16, c[2]:c[2] + 16].any()
  cfg_cap = dataclasses.replace(cfg, max_patches=12)
  centres, background = patches.select_centres(subject.mask, cfg_cap, np.random.default_rng(0))
  assert len(centres) == 12 and background.sum() == 4


@pytest.mark.parametrize("b0, voxel, size", [
    ((0, 0, 1), (1, 1, 1), 16),        # flips of x, y, z and the x<->y swap
    ((0, 0, 1), (1, 1, 2), 16),        # anisotropic in z: the swap keeps the voxel
    ((0, 0, 1), (1, 2, 3), 8),         # no swap: voxel sizes would move
    ((1, 0, 1), (1, 1, 1), 8),         # oblique in x-z: y flip, x<->z swap, (x, z) negation
    ((0.3, 0.2, 0.93), (1, 1, 1), 2),  # general: identity and the full inversion
])
def test_symmetry_group_size(b0, voxel, size):
  group = patches.symmetry_group(voxel, b0)
  assert len(group) == size
  assert np.array_equal(group[0], np.eye(3))


@pytest.mark.parametrize("b0", [(0, 0, 1), (1, 0, 1), (0.3, 0.2, 0.93)])
def test_augmentation_keeps_the_physics(b0):
  rng = np.random.default_rng(1)
  voxel = (1.0, 1.0, 1.0)
  # Smooth, compact chi: with oblique B0 the discrete kernel on the Nyquist planes depends on
  # whether the grid calls that frequency -1/2 or +1/2 (physics' rfft kernel uses +1/2 on the
  # last axis, -1/2 on the others), which an x<->z swap exchanges. Band-limited sources do not
  # see the difference; the identity holds for them to float precision.
  idx = np.indices((16, 16, 16)) - 7.5
  window = np.exp(-(idx**2).sum(0) / (2 * 2.5**2))
  chi = (scipy.ndimage.gaussian_filter(rng.normal(0, 1.0, (16, 16, 16)), 2.0)
         * window).astype(np.float32)
  field = physics.forward_field(chi, voxel, b0)
  for matrix in patches.symmetry_group(voxel, b0):
    new_b0, new_voxel = patches.transform_geometry(matrix, voxel, b0)
    assert min(np.abs(new_b0 - physics.unit_vector(b0)).max(),
               np.abs(new_b0 + physics.unit_vector(b0)).max()) < 1e-9
    got = physics.forward_field(np.ascontiguousarray(patches.transform_volume(chi, matrix)),
                                new_voxel, new_b0)
    error = np.abs(got - patches.transform_volume(field, matrix)).max() / np.abs(field).max()
    assert error < 1e-3, (matrix.tolist(), error)
  # With the old B0 kept, a B0-moving permutation would break it (the test has teeth).
  if b0 == (1, 0, 1):
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # x<->y moves B0 from x-z to y-z
    got = physics.forward_field(np.ascontiguousarray(patches.transform_volume(chi, swap)),
                                voxel, b0)
    assert np.abs(got - patches.transform_volume(field, swap)).max() > 0.1 * np.abs(field).max()


def test_b0_moving_permutation_records_new_b0():
  rng = np.random.default_rng(2)
  voxel, b0 = (1.0, 1.5, 2.0), (0.0, 0.0, 1.0)
  chi = rng.normal(0, 0.1, (10, 12, 14)).astype(np.float32)
  field = physics.forward_field(chi, voxel, b0)
  swap_xz = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]])
  assert not any(np.array_equal(swap_xz, g) for g in patches.symmetry_group(voxel, b0))
  assert any(np.array_equal(swap_xz, g) for g in patches.symmetry_group(voxel, b0, True))
  new_b0, new_voxel = patches.transform_geometry(swap_xz, voxel, b0)
  np.testing.assert_allclose(new_b0, (1, 0, 0))
  np.testing.assert_allclose(new_voxel, (2.0, 1.5, 1.0))
  moved = np.ascontiguousarray(patches.transform_volume(chi, swap_xz))
  np.testing.assert_allclose(physics.forward_field(moved, new_voxel, new_b0),
                             patches.transform_volume(field, swap_xz), atol=1e-6)
  # Keeping the old B0 would be wrong: the test above has teeth.
  assert np.abs(physics.forward_field(moved, new_voxel, b0)
                - patches.transform_volume(field, swap_xz)).max() > 1e-2


def test_chi_scaling_scales_field_and_target_together():
  subject = _sphere_subject()
  base = patches.PatchConfig(16, 8, 8, dtype="float32")
  scaled = dataclasses.replace(base, augment=True, chi_scale_range=(2.0, 2.0))
  plain = {tuple(m["centre"]): a for a, m in patches.patch_pairs(subject, base, seed=5)}
  for arrays, meta in patches.patch_pairs(subject, scaled, seed=5):
    assert meta["chi_scale"] == 2.0
    ref = plain[tuple(meta["centre"])]
    matrix = meta["transform"].reshape(3, 3)
    for name in ("field", "chi"):
      np.testing.assert_allclose(arrays[name], 2.0 * patches.transform_volume(ref[name], matrix),
                                 rtol=1e-6)


def test_pairs_depend_on_seed_only():
  subject = _sphere_subject()
  cfg = patches.PatchConfig(16, 8, 8, augment=True)
  def summary(seed):
    return [(tuple(m["centre"]), tuple(m["transform"]), m["chi_scale"], a["field"].tobytes())
            for a, m in patches.patch_pairs(subject, cfg, seed)]
  assert summary(11) == summary(11)
  assert summary(11) != summary(12)
  assert all(a["field"].dtype == np.float16 for a, _ in patches.patch_pairs(subject, cfg, 11))


def test_bad_inputs_are_refused():
  subject = _sphere_subject()
  subject.mask = np.zeros_like(subject.mask)
  with pytest.raises(ValueError, match="empty mask"):
    list(patches.patch_pairs(subject, patches.PatchConfig(16, 8, 8), seed=0))
  with pytest.raises(ValueError, match="output_patch"):
    patches.PatchConfig(16, 18, 8)
