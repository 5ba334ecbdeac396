"""Tests for qsmgan_tf.inference: whole-volume pass, sliding window, geometry, model loading
and `reconstruct_qsmgan` end to end (tiny shapes, test_tiny preset with random weights)."""

import json

import keras
import numpy as np
import pytest
import scipy.ndimage

from qsmgan_tf import inference
from qsmgan_tf import model_location
from qsmgan_tf import networks
from qsmgan_tf import physics
from qsmgan_tf import refine
from qsmgan_tf.errors import InputError
from qsmgan_tf.inference import graph
from qsmgan_tf.inference import window

_TINY = networks.PRESETS["test_tiny"]  # 24^3 -> 16^3, crop margin 4, multiple 4
_CONTRACT = {"generator": _TINY.to_dict(), "voxel_size_mm": [1.0, 1.0, 1.0],
             "b0_dir": [0.0, 0.0, 1.0], "refine": dict(refine.DEFAULTS)}
_OBLIQUE = physics.unit_vector((0.35, 0.1, 1.0))  # ~20 deg from z


def _phantom(shape=(36, 40, 30), seed=0, voxel=(1, 1, 1), b0=(0, 0, 1), offset=(0, 0, 0)):
  """Ellipsoidal mask (optionally off-centre, touching the border), smooth chi, 2x field."""
  rng = np.random.default_rng(seed)
  g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  g = g - np.asarray(offset, float)[:, None, None, None]
  mask = (g[0] ** 2 / 0.7 + g[1] ** 2 / 0.75 + g[2] ** 2 / 0.6) < 1
  chi = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), 2.5) * 0.5
  for _ in range(4):
    c = rng.uniform(-0.4, 0.4, 3)
    chi += rng.uniform(-0.2, 0.3) * np.exp(-((g - c[:, None, None, None]) ** 2).sum(0) / 0.02)
  chi = (chi * mask).astype(np.float32)
  field = (physics.forward_field(chi, voxel, b0) * mask).astype(np.float32)
  return chi, field, mask


def _local_generator(margin=4, seed=0):
  """A network whose receptive field fits inside its crop margin: exactly shift-equivariant,
  so any correct tiling reproduces the single pass to round-off."""
  x = inp = keras.Input((None, None, None, 1))
  x = keras.layers.Conv3D(2, 3, padding="same", use_bias=False,
                          kernel_initializer=keras.initializers.RandomNormal(seed=seed))(x)
  x = keras.layers.Conv3D(1, 3, padding="same", use_bias=False,
                          kernel_initializer=keras.initializers.RandomNormal(seed=seed + 1))(x)
  return keras.Model(inp, keras.layers.Cropping3D(margin)(x))


def _identity_generator(margin=4):
  inp = keras.Input((None, None, None, 1))
  return keras.Model(inp, keras.layers.Cropping3D(margin)(inp))


@pytest.fixture(scope="module")
def tiny():
  keras.utils.set_random_seed(0)
  return networks.build_generator(_TINY)


def _corr(a, b, mask):
  return float(np.corrcoef(a[mask], b[mask])[0, 1])


# --------------------------------------------------------------------------------------
# Whole-volume pass
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,offset", [
    ((36, 40, 30), (0, 0, 0)),       # centred brain
    ((33, 27, 21), (0.4, -0.3, 0)),  # odd sizes, mask touching the volume's edges
])
def test_volume_pass_places_the_output_exactly(shape, offset):
  _, field, mask = _phantom(shape, offset=offset)
  assert mask[0].any() or mask[-1].any() or offset == (0, 0, 0)
  out = inference.volume_pass_tf(_identity_generator(4), field, mask.astype(np.float32), 4, 4)
  np.testing.assert_array_equal(out.numpy(), field * mask)


def test_network_volume_fn_traces_once_for_any_shape(tiny):
  fn = inference.make_network_volume_fn(tiny, _CONTRACT)
  for shape in [(30, 34, 28), (25, 31, 22)]:
    _, field, mask = _phantom(shape)
    out = fn(field, mask.astype(np.float32))["chi_ppm"].numpy()
    assert out.shape == shape and not out[~mask].any() and np.abs(out[mask]).max() > 0
  assert len(fn._list_all_concrete_functions()) == 1  # pylint: disable=protected-access


def test_predict_volume_fn_outputs(tiny):
  _, field, mask = _phantom(b0=_OBLIQUE)
  fn = inference.make_predict_volume_fn(tiny, _CONTRACT)
  out = fn(field, mask.astype(np.float32), np.float32([1, 1, 1]), np.float32(_OBLIQUE))
  assert set(out) == {"chi_ppm", "chi_net_ppm", "tv_weight_used", "residual_before",
                      "residual_after"}
  want = refine.refine_cg(out["chi_net_ppm"].numpy(), field, mask, (1, 1, 1), _OBLIQUE)
  np.testing.assert_allclose(out["chi_ppm"].numpy(), want, atol=1e-4 * np.abs(want).max())
  assert float(out["residual_after"]) < float(out["residual_before"])
  ref = inference.make_refine_fn(_CONTRACT)(out["chi_net_ppm"], field, mask.astype(np.float32),
                                            np.float32([1, 1, 1]), np.float32(_OBLIQUE))
  np.testing.assert_allclose(ref["chi_ppm"].numpy(), out["chi_ppm"].numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------
# In-graph tiles (predict_volume beyond the memory budget)
# --------------------------------------------------------------------------------------
def _tiny_budget(tile_out=16, overlap=0.25):
  """A contract whose budget (one voxel) forces in-graph tiles on any volume."""
  return dict(_CONTRACT, inference={"max_single_pass_voxels": 1, "tile_output_voxels": tile_out,
                                    "tile_overlap": overlap})


@pytest.mark.parametrize("shape,offset,tile,step", [
    ((33, 27, 21), (0.4, -0.3, 0), 8, 4),   # odd sizes, mask touching the edges, overlap 1/2
    ((33, 27, 21), (0.4, -0.3, 0), 12, 8),  # box not a multiple of tile or step
    ((36, 40, 30), (0, 0, 0), 16, 16),      # no overlap: tiles abut; last one flush
    ((36, 40, 18), (0, 0, 0), 40, 28),      # tile larger than the region on some axes
])
def test_volume_tiles_cover_the_mask_without_holes(shape, offset, tile, step):
  """An identity network: any uncovered voxel would be 0, any misplaced tile wrong."""
  _, field, mask = _phantom(shape, offset=offset)
  assert (field[mask] != 0).all()
  out = inference.volume_tiles_tf(_identity_generator(4), field, mask.astype(np.float32), 4, 4,
                                  tile, step).numpy()
  # acc / wsum of the same weights: exact up to float32 division.
  np.testing.assert_allclose(out, field * mask, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tile,step,mode", [
    (8, 4, "gaussian"),
    (16, 12, "gaussian"),
    (12, 8, "constant"),
])
def test_volume_tiles_equal_single_pass_for_a_local_network(tile, step, mode):
  _, field, mask = _phantom((33, 27, 30), offset=(0.3, 0, -0.2))
  generator = _local_generator(4)
  single = inference.volume_pass_tf(generator, field, mask.astype(np.float32), 4, 4).numpy()
  tiled = inference.volume_tiles_tf(generator, field, mask.astype(np.float32), 4, 4, tile, step,
                                    mode=mode).numpy()
  np.testing.assert_allclose(tiled, single, atol=1e-5 * np.abs(single).max())


def test_network_volume_fn_tiles_beyond_the_budget(tiny):
  """Forced tiling of test_tiny: close to the single pass (only tile borders differ), equal
  to `volume_tiles_tf`, one trace for several shapes; the default budget keeps one pass."""
  fn = inference.make_network_volume_fn(tiny, _tiny_budget())
  for shape in [(36, 40, 30), (25, 31, 22)]:
    _, field, mask = _phantom(shape)
    m = mask.astype(np.float32)
    single = inference.volume_pass_tf(tiny, field, m, 4, 4).numpy()
    tiled = fn(field, m)["chi_ppm"].numpy()
    plan = inference.network_pass_plan(mask, _tiny_budget())
    assert plan["pass"] == "tiles" and plan["tiles"] > 1
    assert tiled.shape == shape and not tiled[~mask].any() and (tiled[mask] != 0).all()
    assert _corr(tiled, single, mask) >= 0.995
    assert np.abs(tiled - single).max() > 1e-3 * np.abs(single).max()  # it did tile
    np.testing.assert_allclose(
        tiled, inference.volume_tiles_tf(tiny, field, m, 4, 4, 16, 12).numpy(),
        atol=1e-6 * np.abs(single).max())
  assert len(fn._list_all_concrete_functions()) == 1  # pylint: disable=protected-access
  default = inference.make_network_volume_fn(tiny, _CONTRACT)(field, m)["chi_ppm"].numpy()
  np.testing.assert_allclose(default, single, atol=1e-6 * np.abs(single).max())
  assert inference.network_pass_plan(mask, _CONTRACT)["pass"] == "single"


def test_predict_volume_fn_with_tiles(tiny):
  _, field, mask = _phantom((30, 34, 28))
  args = (field, mask.astype(np.float32), np.float32([1, 1, 1]), np.float32([0, 0, 1]))
  tiled = inference.make_predict_volume_fn(tiny, _tiny_budget())(*args)
  single = inference.make_predict_volume_fn(tiny, _CONTRACT)(*args)
  assert {k: v.shape for k, v in tiled.items()} == {k: v.shape for k, v in single.items()}
  assert _corr(tiled["chi_net_ppm"].numpy(), single["chi_net_ppm"].numpy(), mask) >= 0.995
  assert float(tiled["residual_after"]) < float(tiled["residual_before"])


def test_tiling_params_from_the_contract():
  # Contracts written before the key existed: the defaults.
  assert inference.tiling_params(_CONTRACT) == inference.TILING_DEFAULTS
  # The paper preset's default tile sits on its 16-voxel grid; ~12 GB budget keeps a
  # 256x256x160 field of view whole.
  paper = {"generator": networks.PRESETS["paper"].to_dict()}
  assert inference.tile_geometry(paper) == {"max_single_pass_voxels": 23_000_000,
                                            "tile_output_voxels": 176, "tile_step_voxels": 128}
  for shape, expected in (((256, 256, 160), "single"), ((320, 320, 224), "tiles")):
    corners = np.zeros(shape, bool)  # a bounding box filling the volume, cheaply
    corners[0, 0, 0] = corners[-1, -1, -1] = True
    assert inference.network_pass_plan(corners, paper)["pass"] == expected
  # A tile off the pooling grid is rounded down onto it (15 + 2 x 4 -> 20 - 8 = 12).
  partial = dict(_CONTRACT, inference={"tile_output_voxels": 15})
  assert inference.tile_geometry(partial)["tile_output_voxels"] == 12
  assert inference.tiling_params(partial)["max_single_pass_voxels"] == 23_000_000
  with pytest.raises(InputError, match="tile_overlap"):
    inference.tiling_params(dict(_CONTRACT, inference={"tile_overlap": 1.0}))
  with pytest.raises(InputError, match="divisible"):
    inference.volume_tiles_tf(_identity_generator(4), np.ones((8, 8, 8), np.float32),
                              np.ones((8, 8, 8), np.float32), 4, 4, 10, 4)


def test_importance_map_in_the_graph_equals_numpy():
  for mode in inference.BLEND_MODES:
    # pylint: disable=protected-access
    profiles = window._importance_profiles((16, 12, 8), mode, 0.125)
    w = graph._importance_map_tf(profiles, [16, 12, 8]).numpy()
    np.testing.assert_allclose(w, inference.importance_map((16, 12, 8), mode), rtol=1e-6)


# --------------------------------------------------------------------------------------
# Sliding window
# --------------------------------------------------------------------------------------
def test_importance_map():
  g = inference.importance_map((16, 16, 16), "gaussian", 0.25)
  assert g.max() == pytest.approx(1.0) and g.min() >= 1e-3
  np.testing.assert_allclose(g, g[::-1, ::-1, ::-1])  # symmetric about the window centre
  assert g[7, 7, 7] > g[0, 7, 7] > g[0, 0, 0]
  np.testing.assert_array_equal(inference.importance_map((4, 5, 6), "constant"), 1.0)


@pytest.mark.parametrize("mode,overlap,batch", [
    ("gaussian", 0.25, 1),
    ("constant", 0.5, 3),   # batches that do not divide the window count
    ("gaussian", 0.0, 2),   # no overlap: windows tile exactly
])
def test_sliding_window_equals_single_pass_for_a_local_network(mode, overlap, batch):
  _, field, mask = _phantom((33, 27, 30), offset=(0.3, 0, -0.2))
  backend = inference.KerasBackend(_local_generator(4), _CONTRACT)
  single = backend.network_volume(field, mask)
  tiled, info = inference.sliding_window(field, mask, backend.patch_fn, roi_size=16, margin=4,
                                         multiple=4, overlap=overlap, mode=mode,
                                         sw_batch_size=batch, progress=False)
  assert info["windows"] > 1
  np.testing.assert_allclose(tiled, single, atol=1e-5 * np.abs(single).max())


def test_sliding_window_matches_single_pass_on_test_tiny(tiny):
  """A real U-Net sees window borders, so only ~equality; a 1-voxel misplacement would drop
  the correlation to ~0.6 (checked below), so 0.995 is a meaningful bar."""
  _, field, mask = _phantom((36, 40, 30))
  backend = inference.KerasBackend(tiny, _CONTRACT)
  single = backend.network_volume(field, mask)
  tiled, _ = inference.sliding_window(field, mask, backend.patch_fn, roi_size=16, margin=4,
                                      multiple=4, overlap=0.25, mode="gaussian", progress=False)
  assert _corr(tiled, single, mask) >= 0.995
  assert max(_corr(np.roll(single, 1, axis=a), single, mask) for a in range(3)) < 0.9


def test_sliding_window_rejects_bad_roi():
  _, field, mask = _phantom((20, 20, 20))
  with pytest.raises(InputError, match="divisible"):
    inference.sliding_window(field, mask, lambda x: x, roi_size=15, margin=4, multiple=4)


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
def test_resampling_round_trip_1x1x2():
  _, field, mask = _phantom((36, 40, 20), voxel=(1, 1, 2))
  smooth = scipy.ndimage.gaussian_filter(field, (2, 2, 1))
  up = inference.resample(smooth, (1, 1, 2), (1, 1, 1))
  assert up.shape == (36, 40, 40)
  back = inference.resample(up, (1, 1, 1), (1, 1, 2), shape=smooth.shape)
  inner = scipy.ndimage.binary_erosion(mask, iterations=2)

  def rel(x):
    return np.linalg.norm((x - smooth)[inner]) / np.linalg.norm(smooth[inner])

  # Trilinear up and down smooths a little; a misalignment by half a voxel would cost ~4x more.
  assert rel(back) < 0.08
  assert rel(scipy.ndimage.shift(smooth, (0, 0, 0.5), order=1)) > 2 * rel(back)
  # centres aligned: the upsampled grid's centre slice is the original's centre, in mm
  com = np.array(scipy.ndimage.center_of_mass(np.abs(up))) * (1, 1, 1)
  com0 = np.array(scipy.ndimage.center_of_mass(np.abs(smooth))) * (1, 1, 2)
  np.testing.assert_allclose(com - (np.array(up.shape) - 1) / 2 * (1, 1, 1),
                             com0 - (np.array(smooth.shape) - 1) / 2 * (1, 1, 2), atol=0.05)


def test_model_frame_rotates_b0_onto_the_model_axis():
  """The field of chi with oblique B0, taken into the model frame, is the field of the
  equally rotated chi with B0 along z (the rotation's direction is right)."""
  chi, field, mask = _phantom((40, 40, 40), b0=_OBLIQUE)
  frame = inference.ModelFrame(mask, (1, 1, 1), _OBLIQUE, [(1, 1, 1)], (0, 0, 1))
  assert frame.rotated and not frame.resampled
  np.testing.assert_allclose(frame.model_b0, (0, 0, 1), atol=1e-12)
  field_m, mask_m = frame.forward(field)
  chi_m, _ = frame.forward(chi)
  inner = scipy.ndimage.binary_erosion(mask_m, iterations=3)
  right = physics.forward_field(chi_m, (1, 1, 1), (0, 0, 1))
  wrong = physics.forward_field(chi_m, (1, 1, 1), frame.rotation @ frame.rotation @ _OBLIQUE)
  assert _corr(right, field_m, inner) > 0.97
  assert _corr(wrong, field_m, inner) < _corr(right, field_m, inner) - 0.05


@pytest.mark.parametrize("voxel", [(1, 1, 1), (1, 1, 2)])
def test_model_frame_round_trip_on_smooth_volumes(voxel):
  shape = (36, 40, 40) if voxel == (1, 1, 1) else (36, 40, 20)
  _, field, mask = _phantom(shape, voxel=voxel, b0=_OBLIQUE)
  smooth = (scipy.ndimage.gaussian_filter(field, 2) * mask).astype(np.float32)
  frame = inference.ModelFrame(mask, voxel, _OBLIQUE, [(1, 1, 1)], (0, 0, 1))
  assert frame.rotated and frame.resampled == (voxel != (1, 1, 1))
  back = frame.backward(*frame.forward(smooth))
  assert not back[~mask].any()
  inner = scipy.ndimage.binary_erosion(mask, iterations=2)
  assert np.linalg.norm((back - smooth)[inner]) < 0.05 * np.linalg.norm(smooth[inner])


def test_training_contract_geometry():
  """The keys `training_folder.build_contract` writes: voxel sizes, B0 axis and trained tilts."""
  tilt = np.radians(15.0)
  contract = {"generator": _TINY.to_dict(), "voxel_sizes_mm": [[1, 1, 1], [1, 1, 2]],
              "b0_dir": [0, 0, 1], "b0_dirs_trained": [[0, 0, 1], [np.sin(tilt), 0, np.cos(tilt)]]}
  assert inference.model_voxel_sizes(contract) == [(1, 1, 1), (1, 1, 2)]
  assert inference.model_b0_tolerance_deg(contract) == pytest.approx(15.0)
  assert inference.network_geometry(contract) == {"margin": 4, "multiple": 4, "input_patch": 24,
                                                  "output_patch": 16}
  _, _, mask = _phantom((20, 20, 20))
  for angle, rotated in ((10.0, False), (20.0, True)):
    b0 = (0, np.sin(np.radians(angle)), np.cos(np.radians(angle)))
    frame = inference.ModelFrame(mask, (1, 1, 2), b0, inference.model_voxel_sizes(contract),
                                 inference.model_b0_axis(contract),
                                 inference.model_b0_tolerance_deg(contract))
    assert frame.rotated == rotated and not frame.resampled  # 1x1x2 was trained on


def test_model_frame_is_identity_when_nothing_differs():
  _, field, mask = _phantom()
  frame = inference.ModelFrame(mask, (1, 1, 1), (0, 0.005, 1), [(1, 1, 1)], (0, 0, 1))
  assert frame.identity and 0 < frame.angle_deg < 1
  assert frame.forward(field)[0] is field


# --------------------------------------------------------------------------------------
# reconstruct_qsmgan
# --------------------------------------------------------------------------------------
def test_reconstruct_axial_runs_the_whole_graph(tiny):
  _, field, mask = _phantom()
  chi, info = inference.reconstruct_qsmgan(field, mask, (1, 1, 1), (0, 0, 1),
                                           model=(tiny, _CONTRACT), progress=False)
  assert chi.shape == field.shape and chi.dtype == np.float32 and not chi[~mask].any()
  assert info["refine"]["in_graph"] and info["refine"]["mu"] == refine.DEFAULTS["mu"]
  assert info["residual_after"] < info["residual_before"]
  assert not info["rotated"] and not info["resampled"]
  # The in-graph path equals network + the NumPy reference refinement.
  net, _ = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT), refine="none")
  want = refine.refine_cg(net, field, mask)
  np.testing.assert_allclose(chi, want, atol=1e-4 * np.abs(want).max())


def test_reconstruct_oblique_anisotropic_uses_the_true_b0(tiny):
  voxel = (1.0, 1.0, 2.0)
  _, field, mask = _phantom((36, 40, 20), voxel=voxel, b0=_OBLIQUE)
  chi, info = inference.reconstruct_qsmgan(field, mask, voxel, _OBLIQUE,
                                           model=(tiny, _CONTRACT), progress=False)
  assert info["rotated"] and info["resampled"] and info["model_voxel_size_mm"] == [1, 1, 1]
  assert info["b0_angle_to_model_deg"] == pytest.approx(20.3, abs=0.5)
  assert chi.shape == field.shape and not chi[~mask].any()
  assert info["residual_after"] < 0.5 * info["residual_before"]
  # Refining with an axial B0 instead leaves a larger residual against the true physics.
  axial, _ = inference.reconstruct_qsmgan(field, mask, voxel, (0, 0, 1), model=(tiny, _CONTRACT))
  true_res = physics.field_residual(chi, field, mask, voxel, _OBLIQUE)
  assert true_res < 0.5 * physics.field_residual(axial, field, mask, voxel, _OBLIQUE)


def test_rotate_above_deg_overrides_the_trained_tilt(tiny):
  """A tilt within the contract's trained range is not rotated unless asked for; a huge
  threshold keeps even a 20 deg tilt unrotated. The refinement's B0 is the true one either way."""
  tilt = np.radians(25.0)
  contract = dict(_CONTRACT, b0_dir=[0, 0, 1],
                  b0_dirs_trained=[[0, 0, 1], [np.sin(tilt), 0, np.cos(tilt)]])
  _, field, mask = _phantom((36, 40, 30), b0=_OBLIQUE)
  runs = {}
  for threshold in (None, 5.0, 90.0):
    chi, info = inference.reconstruct_qsmgan(field, mask, (1, 1, 1), _OBLIQUE,
                                             model=(tiny, contract), progress=False,
                                             rotate_above_deg=threshold)
    runs[threshold] = (chi, info)
    assert info["b0_dir"] == pytest.approx(list(physics.unit_vector(_OBLIQUE)))
  assert not runs[None][1]["rotated"] and not runs[90.0][1]["rotated"]
  assert runs[5.0][1]["rotated"]
  np.testing.assert_array_equal(runs[None][0], runs[90.0][0])
  assert np.abs(runs[5.0][0] - runs[None][0]).max() > 0


@pytest.mark.parametrize("options", [
    {"inference": "sliding_window", "overlap": 0.5, "mode": "constant", "sw_batch_size": 4},
    {"refine": "closed"},
    {"refine_mu": 1e9},   # overrides the contract: the prior wins
])
def test_reconstruct_options(tiny, options):
  _, field, mask = _phantom()
  net, _ = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT), refine="none")
  chi, info = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT),
                                           progress=False, **options)
  assert not chi[~mask].any()
  if "refine_mu" in options:
    assert info["refine"]["mu"] == 1e9 and not info["refine"]["in_graph"]
    np.testing.assert_allclose(chi, net, atol=1e-6 * np.abs(net).max())
  else:
    assert info["residual_after"] < info["residual_before"]
  if options.get("inference") == "sliding_window":
    assert info["sliding_window"]["windows"] > 1


@pytest.mark.parametrize("overrides", [
    {"tv_weight": 1e-4, "reweights": 2},                                          # L1 prior
    {"tv_weight": 1e-4, "reweights": 3, "edge_fraction": 0.2, "edge_refresh": 1},  # refreshed M_G
    {"tv_weight": 1e-4, "reweights": 3, "margin": 2, "residual_margin": 10},  # defect correction
])
def test_reconstruct_edge_prior_overrides_match_the_reference(tiny, overrides):
  """refine_<key> overrides reach the TF refinement, which equals the NumPy one."""
  _, field, mask = _phantom()
  net, _ = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT), refine="none")
  chi, info = inference.reconstruct_qsmgan(
      field, mask, model=(tiny, _CONTRACT), progress=False,
      **{f"refine_{k}": v for k, v in overrides.items()})
  assert {k: info["refine"][k] for k in overrides} == overrides
  want = refine.refine_cg(net, field, mask, **overrides)
  np.testing.assert_allclose(chi, want, atol=1e-4 * np.abs(want).max())


def test_reconstruct_bad_refine_override_is_an_input_error(tiny):
  _, field, mask = _phantom()
  with pytest.raises(InputError, match="refinement parameter edge_refresh"):
    inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT), refine_edge_refresh="x")


def test_reconstruct_single_tiles_in_graph_beyond_the_budget(tiny):
  _, field, mask = _phantom()
  want, info = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT))
  assert info["network_pass"]["pass"] == "single"
  got, info = inference.reconstruct_qsmgan(field, mask, model=(tiny, _tiny_budget()))
  assert info["inference"] == "single" and info["refine"]["in_graph"]
  assert info["network_pass"]["pass"] == "tiles" and info["network_pass"]["tiles"] > 1
  assert not got[~mask].any() and _corr(got, want, mask) >= 0.995


def test_contract_without_voxel_size_is_not_resampled(tiny):
  _, field, mask = _phantom((36, 40, 20), voxel=(1, 1, 2))
  contract = {"generator": _TINY.to_dict()}
  _, info = inference.reconstruct_qsmgan(field, mask, (1, 1, 2), model=(tiny, contract))
  assert info["model_voxel_size_mm"] is None and not info["resampled"]


def test_bfloat16_generator_is_close_to_float32(tiny):
  _, field, mask = _phantom()
  policy = keras.config.dtype_policy().name
  a, _ = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT), refine="none")
  b, info = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT), refine="none",
                                         precision="bfloat16")
  assert info["precision"] == "bfloat16" and keras.config.dtype_policy().name == policy
  assert _corr(a, b, mask) > 0.99 and not np.array_equal(a, b)


def test_keras_file_and_training_folder(tmp_path, tiny):
  _, field, mask = _phantom()
  tiny.save(tmp_path / "generator_best.keras")
  (tmp_path / "contract.json").write_text(json.dumps(_CONTRACT))
  want, _ = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT))
  for model in (tmp_path, tmp_path / "generator_best.keras"):
    got, info = inference.reconstruct_qsmgan(field, mask, model=str(model))
    assert info["backend"] == "keras" and info["model"].endswith("generator_best.keras")
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_saved_model_gives_the_local_numbers(tmp_path, tiny):
  """CLI == TF Serving: a SavedModel's predict_volume gives the Keras model's result."""
  from qsmgan_tf import exporting as export  # pylint: disable=import-outside-toplevel
  version = export.export_generator(tiny, _CONTRACT, tmp_path / "qsmgan", version=3)
  _, field, mask = _phantom()
  want, _ = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT))
  got, info = inference.reconstruct_qsmgan(field, mask, model=str(tmp_path / "qsmgan"))
  assert info["backend"] == "saved_model" and info["refine"]["in_graph"]
  assert info["model"] == str(version) and info.get("model_version") == 3
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  tiled, _ = inference.reconstruct_qsmgan(field, mask, model=str(version), progress=False,
                                          inference="sliding_window")
  assert _corr(tiled, want, mask) > 0.995


def test_missing_default_model_says_how_to_get_one(tmp_path, monkeypatch):
  monkeypatch.setattr(model_location, "default_model_base",  # where the resolver looks
                      lambda: tmp_path / "saved_models" / "qsmgan")
  _, field, mask = _phantom((20, 20, 20))
  with pytest.raises(InputError, match="no QSMGAN model found.*export"):
    inference.reconstruct_qsmgan(field, mask)


@pytest.mark.parametrize("kwargs,message", [
    ({"inference": "patches"}, "inference must be one of"),
    ({"refine": "lsqr"}, "unknown refinement"),
    ({"mode": "mean"}, "mode must be one of"),
    ({"model": "/nonexistent/model"}, "model not found"),
    ({"model": "x", "server": "localhost:8500"}, "only one of"),
])
def test_bad_options_are_input_errors(kwargs, message):
  _, field, mask = _phantom((20, 20, 20))
  with pytest.raises(InputError, match=message):
    inference.reconstruct_qsmgan(field, mask, **kwargs)


def test_empty_mask_is_an_input_error():
  z = np.zeros((20, 20, 20), np.float32)
  with pytest.raises(InputError, match="mask is empty"):
    inference.reconstruct_qsmgan(z, z > 0, model="unused")


class _FakeServer:
  """Stands in for a TF Serving server: answers signatures from a local Keras model."""

  def __init__(self, generator):
    self.predict_volume = inference.make_predict_volume_fn(generator, _CONTRACT)
    self.generator = generator
    self.calls = []

  def grpc_client(self, host_port, **_):
    server = self

    class Client:
      def contract(self):
        return dict(_CONTRACT)

      def predict(self, signature_name, inputs):
        server.calls.append(signature_name)
        if signature_name == "predict_volume":
          out = server.predict_volume(**{k: np.asarray(v, np.float32) for k, v in inputs.items()})
        else:
          out = {"chi_ppm": server.generator(inputs["field_ppm"], training=False)}
        return {k: np.asarray(v) for k, v in out.items()}, {"server": host_port}

    return Client()

  def rest_client(self, url, **_):
    server = self

    class Client:
      def contract(self):
        return dict(_CONTRACT)

      def predict_patches(self, patches):
        server.calls.append("serving_default")
        return server.generator(patches, training=False).numpy()

    return Client()


def test_server_and_rest_url_delegate_to_serving(monkeypatch, tiny):
  from qsmgan_tf import serving  # pylint: disable=import-outside-toplevel
  fake = _FakeServer(tiny)
  monkeypatch.setattr(serving, "GrpcClient", fake.grpc_client)
  monkeypatch.setattr(serving, "RestClient", fake.rest_client)
  _, field, mask = _phantom()
  want, _ = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT))
  got, info = inference.reconstruct_qsmgan(field, mask, server="localhost:8500")
  assert info["backend"] == "grpc" and fake.calls == ["predict_volume"]
  np.testing.assert_allclose(got, want, atol=1e-6)
  got, info = inference.reconstruct_qsmgan(field, mask, rest_url="http://h:8501/v1/models/q",
                                           progress=False)
  assert info["backend"] == "rest" and info["inference"] == "sliding_window"
  assert _corr(got, want, mask) > 0.995


def _amplitude_contract(reference_std_ppm):
  return dict(_CONTRACT, inference={"field_reference_std_ppm": reference_std_ppm})


@pytest.mark.parametrize("voxels", [1000, 999])  # even and odd counts: the median's two forms
def test_field_amplitude_scale_graph_equals_numpy(voxels):
  rng = np.random.default_rng(voxels)
  field = (rng.standard_normal((10, 10, 12)) * 0.01).astype(np.float32)
  mask = np.zeros(field.shape, bool)
  mask.flat[:voxels] = True
  values = field[mask].astype(np.float64)
  mad_std = 1.4826 * np.median(np.abs(values - np.median(values)))
  for reference, want in ((0.02, 0.02 / mad_std), (1.0, 4.0), (1e-5, 0.25)):
    got = inference.field_amplitude_scale(field, mask, reference)
    assert got == pytest.approx(want, rel=1e-9)
    graph = inference.field_amplitude_scale_tf(field, mask.astype(np.float32), reference)
    assert float(graph) == pytest.approx(want, rel=1e-5)
  # Off, and nothing to measure: no scaling.
  assert inference.field_amplitude_scale(field, mask, 0.0) == 1.0
  for flat, where in ((np.full_like(field, 0.3), mask), (field, np.zeros_like(mask))):
    assert inference.field_amplitude_scale(flat, where, 0.02) == 1.0
    assert float(inference.field_amplitude_scale_tf(flat, where.astype(np.float32), 0.02)) == 1.0


def _saturating_generator(margin=4):
  """A network that compresses strong fields, as a trained one does (tanh)."""
  inp = keras.Input((None, None, None, 1))
  x = keras.layers.Conv3D(1, 3, padding="same", use_bias=False,
                          kernel_initializer=keras.initializers.RandomNormal(seed=3))(inp)
  x = keras.layers.Activation("tanh")(keras.layers.Rescaling(200.0)(x))
  return keras.Model(inp, keras.layers.Cropping3D(margin)(keras.layers.Rescaling(0.005)(x)))


def test_amplitude_scaling_makes_the_network_pass_scale_equivariant():
  _, field, mask = _phantom()
  mask32 = mask.astype(np.float32)
  generator = _saturating_generator()
  reference = 2.0 * inference.robust_std(field[mask])  # 3x the field stays within the limits
  plain = inference.make_network_volume_fn(generator, _CONTRACT)
  scaled = inference.make_network_volume_fn(generator, _amplitude_contract(reference))
  ratios = {}
  for name, fn in (("plain", plain), ("scaled", scaled)):
    once = fn(field, mask32)["chi_ppm"].numpy()
    thrice = fn(field * np.float32(3.0), mask32)["chi_ppm"].numpy()
    ratios[name] = np.abs(thrice - 3.0 * once).max() / np.abs(3.0 * once).max()
  # The dipole inversion is linear; the network's output transform is not.
  assert ratios["scaled"] < 1e-5 < 1e-2 < ratios["plain"]
  # At the reference amplitude the scaled pass is the plain one.
  s = inference.field_amplitude_scale(field, mask, reference)
  at_reference = plain(field * np.float32(s), mask32)["chi_ppm"].numpy() / np.float32(s)
  np.testing.assert_allclose(scaled(field, mask32)["chi_ppm"].numpy(), at_reference,
                             atol=1e-5 * np.abs(at_reference).max())


def test_reconstruct_records_the_amplitude_scale_on_every_path(tmp_path):
  from qsmgan_tf import exporting  # pylint: disable=import-outside-toplevel
  _, field, mask = _phantom()
  tiny = _saturating_generator()
  reference = 3.0 * inference.robust_std(field[mask])  # into the tanh's bend
  contract = _amplitude_contract(reference)
  want_scale = inference.field_amplitude_scale(field, mask, reference)
  assert want_scale == pytest.approx(3.0)
  whole, info = inference.reconstruct_qsmgan(field, mask, model=(tiny, contract), refine="none")
  assert info["network_field_scale"] == pytest.approx(want_scale)
  tiled, info = inference.reconstruct_qsmgan(field, mask, model=(tiny, contract), refine="none",
                                             inference="sliding_window", progress=False)
  assert info["network_field_scale"] == pytest.approx(want_scale)
  assert _corr(tiled, whole, mask) > 0.995
  plain, info = inference.reconstruct_qsmgan(field, mask, model=(tiny, _CONTRACT), refine="none")
  assert "network_field_scale" not in info
  assert np.abs(plain - whole).max() > 0.05 * np.abs(whole).max()  # the scale mattered
  # The exported model records the reference and scales in its own graph.
  version = exporting.export_generator(tiny, contract, tmp_path / "qsmgan", version=1)
  _, exported = exporting.load(version)
  assert exported["inference"]["field_reference_std_ppm"] == pytest.approx(reference)
  got, info = inference.reconstruct_qsmgan(field, mask, model=str(version), refine="none")
  assert info["network_field_scale"] == pytest.approx(want_scale)
  np.testing.assert_allclose(got, whole, atol=1e-5 * np.abs(whole).max())
  with pytest.raises(InputError, match="field_reference_std_ppm"):
    inference.tiling_params(_amplitude_contract(-1.0))
