"""Tests for qsmgan_tf.physics: analytic fields, an independent forward model, COSMOS, units,
B0 direction from affines, rotations and the dipole kernel."""

import logging

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
import scipy.special

from qsmgan_tf import physics

_OBLIQUE = (0.3, -0.5, 0.8)


def _centred_grid(n):
  """Voxel coordinates relative to the grid centre (voxels), and their radius."""
  c = (n - 1) / 2.0
  i, j, k = np.meshgrid(*[np.arange(n) - c] * 3, indexing="ij")
  return i, j, k, np.sqrt(i * i + j * j + k * k)


def _sphere_field(i, j, k, r, a, dchi, b0_dir):
  """Analytic local field of a uniformly magnetised sphere (Lorentz-corrected, ppm)."""
  b = physics.unit_vector(b0_dir)
  rr = np.maximum(r, 1e-9)
  cos = (i * b[0] + j * b[1] + k * b[2]) / rr
  return np.where(r > a, dchi / 3.0 * (a / rr) ** 3 * (3.0 * cos**2 - 1.0), 0.0)


def _nrmse(x, y, mask):
  x = x[mask] - x[mask].mean()
  y = y[mask] - y[mask].mean()
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


# --------------------------------------------------------------------------------------
# Forward model against analytic solutions
# --------------------------------------------------------------------------------------
def test_binary_sphere_matches_analytic_field_b0_along_z():
  n, a, dchi = 64, 10.0, 0.1
  i, j, k, r = _centred_grid(n)
  chi = np.where(r <= a, dchi, 0.0).astype(np.float32)
  field = physics.forward_field(chi)
  expected = _sphere_field(i, j, k, r, a, dchi, (0, 0, 1))
  err = np.abs(field - expected) / dchi
  assert err[r > a + 3].max() < 0.01
  assert err[r < a - 3].max() < 0.01
  # Sign convention: a paramagnetic sphere makes a positive field along B0, negative beside it.
  c = n // 2
  assert field[c, c, c + int(a) + 4] > 0.1 * dchi
  assert field[c + int(a) + 4, c, c] < -0.05 * dchi


@pytest.mark.parametrize("b0_dir", [
    (0, 0, 1),      # B0 along the slice axis
    (1, 1, 1),      # 54.7 degrees from every axis
    _OBLIQUE,       # generic oblique direction, theta measured from b0_dir
])
def test_soft_sphere_matches_analytic_field(b0_dir):
  # A sharp voxelised sphere has energy up to the edge of the k-space cube, where the sampled
  # continuous kernel is not periodic for oblique B0: that rings ~3% of dchi at 3 voxels, in every
  # k-space implementation. A 1-voxel erf edge makes the source band-limited; a radially symmetric
  # source is exactly a point dipole outside its support and gives zero field inside its plateau.
  n, a, dchi, sigma = 64, 10.0, 0.1, 1.0
  i, j, k, r = _centred_grid(n)
  chi = (dchi * 0.5 * scipy.special.erfc((r - a) / (np.sqrt(2.0) * sigma))).astype(np.float32)
  a_eff = (3.0 * chi.sum(dtype=np.float64) / (4.0 * np.pi * dchi)) ** (1.0 / 3.0)
  field = physics.forward_field(chi, b0_dir=b0_dir)
  expected = _sphere_field(i, j, k, r, a_eff, dchi, b0_dir)
  err = np.abs(field - expected) / dchi
  assert err[r > a + 3].max() < 0.01
  assert err[r < a - 3].max() < 0.01
  # The field pattern turns with B0: along b0_dir it is +2/3 dchi (a/r)^3.
  b = physics.unit_vector(b0_dir)
  p = np.round(np.array([n // 2] * 3) + 16 * b).astype(int)
  rp = r[tuple(p)]
  assert field[tuple(p)] == pytest.approx(expected[tuple(p)], abs=0.01 * dchi)
  assert field[tuple(p)] > 0.5 * (2.0 / 3.0) * dchi * (a_eff / rp) ** 3


def test_forward_field_is_linear_and_zero_for_zero():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 18, 20)).astype(np.float32)
  y = rng.normal(size=(16, 18, 20)).astype(np.float32)
  fx = physics.forward_field(x, (1, 1, 1.5), _OBLIQUE)
  fy = physics.forward_field(y, (1, 1, 1.5), _OBLIQUE)
  fxy = physics.forward_field(2 * x - y, (1, 1, 1.5), _OBLIQUE)
  np.testing.assert_allclose(fxy, 2 * fx - fy, atol=1e-4)
  assert np.all(physics.forward_field(np.zeros((8, 8, 8))) == 0)


def _qsm_forward_phantom(n=48):
  rng = np.random.default_rng(0)
  chi = np.zeros((n, n, n))
  chi[8:-8, 8:-8, 8:-8] = rng.normal(0.0, 0.05, (n - 16,) * 3)
  chi = scipy.ndimage.gaussian_filter(chi, 1.0)
  # qsm-forward pads with the corner voxel's value: a zero border makes that zero-padding too.
  chi[:4], chi[-4:], chi[:, :4], chi[:, -4:], chi[:, :, :4], chi[:, :, -4:] = 0, 0, 0, 0, 0, 0
  return chi


@pytest.mark.parametrize("voxel_size_mm, b0_dir, tol", [
    ((1, 1, 1), (0, 0, 1), 1e-5),        # isotropic, B0 = z: identical up to float32
    ((1, 1, 2), (0, 0, 1), 1e-5),        # thick slices
    ((1, 1, 1), _OBLIQUE, 5e-3),         # oblique: the two differ only at the Nyquist planes
])
def test_forward_field_matches_qsm_forward(voxel_size_mm, b0_dir, tol):
  # qsm-forward (GPL, test-only) builds its kernel with meshgrid and full complex FFTs on a 2x
  # corner-padded grid and sets D(0) = 1/3: a constant offset, removed with the mean. It swaps
  # the voxel sizes of axes 0 and 1, so only voxel sizes with dx == dy are compared.
  qsm_forward = pytest.importorskip("qsm_forward")
  chi = _qsm_forward_phantom()
  b = physics.unit_vector(b0_dir)
  ours = physics.forward_field(chi, voxel_size_mm, b).astype(np.float64)
  theirs = qsm_forward.generate_field(chi, voxel_size=list(voxel_size_mm), B0_dir=list(b))
  ours -= ours.mean()
  theirs -= theirs.mean()
  assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < tol


def test_cosmos_recovers_chi_from_three_orientations():
  n = 48
  i, j, k, _ = _centred_grid(n)
  rng = np.random.default_rng(0)
  mask = (i / 18) ** 2 + (j / 16) ** 2 + (k / 15) ** 2 <= 1
  chi = np.where(mask, scipy.ndimage.gaussian_filter(rng.normal(size=(n,) * 3), 2.0) * 0.3, 0.0)
  chi[(i - 5) ** 2 + (j + 3) ** 2 + (k - 2) ** 2 < 16] += 0.2
  chi = scipy.ndimage.gaussian_filter(chi, 0.7).astype(np.float32)

  def tilt(deg, azimuth):
    t, p = np.radians(deg), np.radians(azimuth)
    return (np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t))

  dirs = [(0, 0, 1), tilt(25, 0), tilt(25, 90)]
  fields = [physics.forward_field(chi, b0_dir=d) for d in dirs]
  assert _nrmse(physics.cosmos(fields, (1, 1, 1), dirs), chi, mask) < 0.05
  # Fields paired with the wrong directions must fail: the test sees the geometry.
  assert _nrmse(physics.cosmos(fields, (1, 1, 1), [dirs[0], dirs[2], dirs[1]]), chi, mask) > 0.2


def test_cosmos_rejects_bad_input():
  f = np.zeros((8, 8, 8))
  with pytest.raises(ValueError, match="at least 3"):
    physics.cosmos([f, f], (1, 1, 1), [(0, 0, 1), (0, 1, 0)])
  with pytest.raises(ValueError, match="same shape"):
    physics.cosmos([f, f, np.zeros((8, 8, 9))], (1, 1, 1), [(0, 0, 1)] * 3)


def test_field_residual_zero_for_consistent_pair():
  rng = np.random.default_rng(2)
  chi = scipy.ndimage.gaussian_filter(rng.normal(size=(24, 24, 24)), 1.5).astype(np.float32)
  mask = np.zeros(chi.shape, bool)
  mask[4:-4, 4:-4, 4:-4] = True
  field = physics.forward_field(chi, b0_dir=_OBLIQUE)
  assert physics.field_residual(chi, field + 0.3, mask, b0_dir=_OBLIQUE) < 1e-5
  assert physics.field_residual(chi, -field, mask, b0_dir=_OBLIQUE) == pytest.approx(2.0, rel=1e-4)


# --------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------
def test_unit_conversions_match_hand_computed_values():
  # 1 ppm at 3 T = 42.57747892 MHz/T * 3 T * 1e-6 = 127.7324 Hz.
  assert physics.ppm_to_hz(1.0, 3.0) == pytest.approx(127.73243676, rel=1e-9)
  assert physics.hz_to_ppm(127.73243676, 3.0) == pytest.approx(1.0, rel=1e-9)
  # 127.73 Hz for 20 ms: 2*pi*127.73244*0.02 = 16.05133 rad.
  assert physics.hz_to_rad(127.73243676, 0.02) == pytest.approx(16.051331, rel=1e-6)
  assert physics.to_ppm(np.float32(16.051331), "rad", 3.0, 0.02) == pytest.approx(1.0, rel=1e-6)
  assert physics.to_ppm(np.float32(127.73244), "hz", b0_tesla=3.0) == pytest.approx(1.0, rel=1e-6)
  # 7 T: 1 ppm = 298.04 Hz.
  assert physics.ppm_to_hz(1.0, 7.0) == pytest.approx(298.0424, rel=1e-6)


@pytest.mark.parametrize("units", physics.FIELD_UNITS)
def test_unit_conversions_round_trip(units):
  x = np.linspace(-0.2, 0.3, 11)
  there = physics.from_ppm(x, units, b0_tesla=2.89, te_seconds=0.0204)
  back = physics.to_ppm(there, units, b0_tesla=2.89, te_seconds=0.0204)
  assert back.dtype == np.float32
  np.testing.assert_allclose(back, x, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(physics.rad_to_hz(physics.hz_to_rad(x, 0.01), 0.01), x)


@pytest.mark.parametrize("units, b0, te, match", [
    ("tesla", 3.0, 0.02, "unknown field unit"),   # not a unit
    ("hz", None, None, "B0"),                     # Hz needs B0
    ("rad", 3.0, None, "echo time"),              # rad needs TE
    ("rad", None, 0.02, "B0"),                    # ... and B0
    ("hz", -3.0, None, "B0"),                     # B0 must be positive
])
def test_to_ppm_rejects_missing_parameters(units, b0, te, match):
  with pytest.raises(ValueError, match=match):
    physics.to_ppm(np.ones(3), units, b0, te)


# --------------------------------------------------------------------------------------
# B0 direction from the affine
# --------------------------------------------------------------------------------------
def _rot_x(deg):
  t = np.radians(deg)
  return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def _rot_y(deg):
  t = np.radians(deg)
  return np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])


def _affine(m3):
  a = np.eye(4)
  a[:3, :3] = m3
  a[:3, 3] = (-90, -120, -60)
  return a


_SPD = np.array([[1.0, 0.15, 0.05], [0.15, 0.9, -0.1], [0.05, -0.1, 2.0]])  # scaling + shear

_S20 = np.sin(np.radians(20))
_C20 = np.cos(np.radians(20))


@pytest.mark.parametrize("m3, expected", [
    (np.eye(3), (0, 0, 1)),                                        # axial, 1 mm
    (np.diag([0.5, 0.5, 2.0]), (0, 0, 1)),                         # axial, anisotropic voxels
    (_rot_x(20), (0, _S20, _C20)),                                 # 20 degrees about x
    (_rot_x(20) @ np.diag([0.8, 0.8, 1.6]), (0, _S20, _C20)),      # ... with scaled voxels
    (_rot_x(20) @ _SPD, (0, _S20, _C20)),                          # ... with scaling and shear
    (_rot_y(-20) @ _rot_x(20), tuple(_rot_x(20).T @ _rot_y(-20).T @ [0, 0, 1])),  # double oblique
    (np.diag([-1.0, 1.0, 1.0]), (0, 0, 1)),                        # LAS: flipped x
    (np.diag([1.0, 1.0, -1.0]), (0, 0, -1)),                       # slices run head to foot
    ([[0, 1, 0], [0, 0, 1], [1, 0, 0]], (1, 0, 0)),                # voxel i runs along scanner z
    ([[0, -1, 0], [0, 0, -1], [-1, 0, 0]], (-1, 0, 0)),            # ... reversed (all axes flipped)
])
def test_b0_dir_from_affine(m3, expected):
  got = physics.b0_dir_from_affine(_affine(np.asarray(m3, dtype=float)))
  np.testing.assert_allclose(got, expected, atol=1e-12)
  assert np.linalg.norm(got) == pytest.approx(1.0)


def test_b0_dir_oblique_agrees_with_voxel_axes_in_world():
  # Independent statement: the B0 component along voxel axis n is the scanner-z component of
  # that axis' unit direction in world space (for an orthogonal, scaled affine).
  m3 = _rot_y(12) @ _rot_x(-31) @ np.diag([0.7, 0.9, 1.3])
  cols = m3 / np.linalg.norm(m3, axis=0)
  np.testing.assert_allclose(physics.b0_dir_from_affine(_affine(m3)), cols[2], atol=1e-12)


def _image(sform_code, qform_code, m3=np.eye(3)):
  img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
  img.set_sform(_affine(m3), code=sform_code)
  img.set_qform(_affine(m3), code=qform_code)
  return img


_TILTED = (0, _S20, _C20)


@pytest.mark.parametrize("sform_code, qform_code, warns, expected", [
    (1, 1, False, _TILTED),    # scanner
    (2, 0, False, _TILTED),    # aligned to another scanner image
    (0, 1, False, _TILTED),    # only a scanner qform
    (4, 1, True, _TILTED),     # MNI sform wins over the scanner qform
    (3, 0, True, _TILTED),     # talairach
    (5, 0, True, _TILTED),     # template
    (0, 0, True, (0, 0, 1)),   # no orientation at all: nibabel falls back to the zooms
])
def test_b0_dir_from_nifti_warns_for_non_scanner_frames(sform_code, qform_code, warns, expected,
                                                        caplog):
  img = _image(sform_code, qform_code, _rot_x(20))
  with caplog.at_level(logging.WARNING):
    b0, warning = physics.b0_dir_from_nifti(img)
  np.testing.assert_allclose(b0, expected, atol=1e-6)
  assert (warning is not None) == warns
  if warns:
    assert "--b0_dir" in warning
    assert any("--b0_dir" in rec.getMessage() for rec in caplog.records)


def test_unit_vector_rejects_zero_and_wrong_length():
  with pytest.raises(ValueError, match="zero length"):
    physics.unit_vector((0, 0, 0))
  with pytest.raises(ValueError, match="3 components"):
    physics.unit_vector((0, 1))
  with pytest.raises(ValueError, match="zero length"):
    physics.unit_vector((np.nan, 0, 1))


# --------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b", [
    ((0, 0, 1), _OBLIQUE),      # generic
    ((1, 0, 0), (0, 1, 0)),     # 90 degrees
    ((0, 0, 1), (0, 0, 1)),     # identity
    ((0, 0, 1), (0, 0, -1)),    # antiparallel
    ((1, 0, 0), (-2, 0, 0)),    # antiparallel along the fallback axis
])
def test_rotation_between(a, b):
  rot = physics.rotation_between(a, b)
  np.testing.assert_allclose(rot @ physics.unit_vector(a), physics.unit_vector(b), atol=1e-12)
  np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
  assert np.linalg.det(rot) == pytest.approx(1.0)


def _blob(shape, centre, sigma=2.0):
  idx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  r2 = sum((x - c) ** 2 for x, c in zip(idx, centre))
  return np.exp(-r2 / (2 * sigma**2)).astype(np.float32)


def _centre_of_mass_mm(vol, voxel_size_mm):
  c = (np.asarray(vol.shape) - 1) / 2.0
  return (np.asarray(scipy.ndimage.center_of_mass(vol)) - c) * np.asarray(voxel_size_mm)


@pytest.mark.parametrize("voxel_size_mm", [(1, 1, 1), (1, 1, 2)])
def test_rotate_volume_moves_object_by_rotation(voxel_size_mm):
  shape = (32, 32, 24)
  vol = _blob(shape, (20.0, 15.5, 12.5), sigma=1.5)  # 4.5 mm off-centre along i
  rot = physics.rotation_between((1, 0, 0), (0, 1, 0))  # 90 degrees about z
  out = physics.rotate_volume(vol, rot, voxel_size_mm)
  assert out.shape == vol.shape and out.dtype == vol.dtype
  q = _centre_of_mass_mm(vol, voxel_size_mm)
  np.testing.assert_allclose(_centre_of_mass_mm(out, voxel_size_mm), rot @ q, atol=0.05)


def test_rotate_volume_round_trip():
  shape = (32, 32, 32)
  vol = scipy.ndimage.gaussian_filter(
      np.random.default_rng(3).normal(size=shape), 2.5).astype(np.float32)
  rot = physics.rotation_between((0, 0, 1), _OBLIQUE)
  back = physics.rotate_volume(physics.rotate_volume(vol, rot, order=3), rot.T, order=3)
  inner = (slice(10, 22),) * 3  # far from the corners that leave the grid
  assert _nrmse(back[inner], vol[inner], np.ones((12,) * 3, bool)) < 0.02
  # Label maps keep their labels with order 0.
  labels = (vol > 0).astype(np.int16)
  assert set(np.unique(physics.rotate_volume(labels, rot, order=0))) <= {0, 1}


# --------------------------------------------------------------------------------------
# Dipole kernel and FFT grid helpers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("b0_dir", [(0, 0, 1), _OBLIQUE])
def test_dipole_kernel_basic_properties(b0_dir):
  shape = (16, 20, 18)
  d = physics.dipole_kernel(shape, (1.0, 0.9, 1.5), b0_dir)
  assert d.shape == shape and d.dtype == np.float32
  assert d[0, 0, 0] == 0.0
  assert d.min() >= -2.0 / 3.0 - 1e-6 and d.max() <= 1.0 / 3.0 + 1e-6
  half = physics.dipole_kernel(shape, (1.0, 0.9, 1.5), b0_dir, rfft=True)
  assert half.shape == (16, 20, 10)
  np.testing.assert_array_equal(half[..., :9], d[..., :9])
  # The last rfft column holds frequency +1/2 where fftfreq says -1/2: for oblique B0 those
  # differ, and D(k) = D(-k) maps it to the mirrored column of the full grid (away from the
  # other axes' own Nyquist rows, which mirror onto themselves).
  mirror = d[(-np.arange(16)) % 16][:, (-np.arange(20)) % 20]
  keep = (np.arange(16) != 8)[:, None] & (np.arange(20) != 10)[None, :]
  np.testing.assert_array_equal(half[..., 9][keep], mirror[..., 9][keep])
  # D depends on the axis of B0 only, not on its sign.
  np.testing.assert_array_equal(
      d, physics.dipole_kernel(shape, (1.0, 0.9, 1.5), -np.asarray(b0_dir, float)))


def test_dipole_kernel_hand_computed_values():
  d = physics.dipole_kernel((32, 32, 32), (1.0, 1.0, 2.0), (0, 0, 1), dtype=np.float64)
  assert d[0, 0, 1] == pytest.approx(-2.0 / 3.0)   # k along B0
  assert d[1, 0, 0] == pytest.approx(1.0 / 3.0)    # k perpendicular to B0
  # k = (1/32, 0, 1/64) cycles/mm with 2 mm slices: (k.b)^2/|k|^2 = 1/5 (1/2 if the voxel size
  # were ignored).
  assert d[1, 0, 1] == pytest.approx(1.0 / 3.0 - 1.0 / 5.0)
  # B0 along x on a cube is B0 along z with the axes swapped.
  dz = physics.dipole_kernel((12, 12, 12), b0_dir=(0, 0, 1))
  dx = physics.dipole_kernel((12, 12, 12), b0_dir=(1, 0, 0))
  np.testing.assert_allclose(dx, np.transpose(dz, (2, 1, 0)), atol=1e-6)


def test_fft_grid_helpers():
  shape = physics.fft_shape((30, 47, 61), factor=2.0)
  assert all(p >= 2 * n for p, n in zip(shape, (30, 47, 61)))
  assert all(p >= 44 for p in physics.fft_shape((30,) * 3, margin=7))
  per_axis = physics.fft_shape((30,) * 3, margin=(7, 0, 20))  # e.g. a margin in mm
  assert per_axis[0] >= 44 and per_axis[1] == physics.fft_shape((30,))[0] and per_axis[2] >= 70
  x = np.random.default_rng(4).normal(size=(5, 6, 7))
  padded = physics.pad_to(x, (9, 10, 11))
  assert padded.shape == (9, 10, 11) and padded.sum() == pytest.approx(x.sum())
  np.testing.assert_array_equal(physics.crop_from(padded, x.shape), x)
  with pytest.raises(ValueError):
    physics.pad_to(x, (4, 6, 7))
  mask = np.zeros((10, 10, 10), bool)
  mask[3:5, 4, 6:9] = True
  assert physics.bounding_box(mask, margin=2) == (slice(1, 7), slice(2, 7), slice(4, 10))
  with pytest.raises(ValueError, match="empty"):
    physics.bounding_box(np.zeros((4, 4, 4), bool))
