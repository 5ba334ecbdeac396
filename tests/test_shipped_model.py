"""The model shipped in saved_models/qsmgan: it loads, honours its contract, and does the job.

These tests use the committed SavedModel (the newest version), not a model trained on the fly:
they fail if the shipped model is missing, broken, or worse than TKD on a small unseen phantom.
"""

import json

import numpy as np
import pytest

from data_prep import simulate
from qsmgan_tf import classical
from qsmgan_tf import exporting
from qsmgan_tf import inference
from qsmgan_tf import metrics

SEED = 900201  # validation seeds (>= 900000) never appear in a training set


@pytest.fixture(scope="module")
def shipped():
  path = inference.default_model_path()
  model, contract = exporting.load(path)
  return path, model, contract


@pytest.fixture(scope="module")
def phantom():
  return simulate.simulate_subject("brain", SEED, shape=(80, 96, 80), snr=100.0, lesions=True)


def test_shipped_model_contract_and_signatures(shipped):
  path, model, contract = shipped
  assert set(model.signatures) >= {"serving_default", "predict_volume", "network_volume",
                                   "refine", "contract"}
  assert contract["input_patch"] == 64 and contract["output_patch"] == 48
  assert contract["dipole_convention"].startswith("D(k) = 1/3 - (k.b0)^2/|k|^2")
  assert contract["refine"]["iterations"] >= 1 and contract["refine"]["mu"] > 0
  # The zero-input signature returns the same contract the assets hold.
  served = json.loads(model.signatures["contract"]()["contract_json"].numpy().decode())
  assert served["data_example_digest"] == contract["data_example_digest"]
  rng = np.random.default_rng(0)
  patch = rng.normal(0.0, 0.02, (1, 64, 64, 64, 1)).astype(np.float32)
  out = model.signatures["serving_default"](field_ppm=patch)
  (chi,) = out.values()
  assert chi.shape == (1, 48, 48, 48, 1) and np.isfinite(chi.numpy()).all()
  assert (path / "assets" / "contract.json").exists()


def test_shipped_model_beats_tkd_and_lowers_the_residual(shipped, phantom):
  _, model, _ = shipped
  s = phantom
  mask = s.mask.astype(np.float32)
  out = model.signatures["predict_volume"](
      field_ppm=s.field_ppm.astype(np.float32), mask=mask,
      b0_dir=np.float32(s.b0_dir), voxel_size_mm=np.float32(s.voxel_size_mm))
  chi = out["chi_ppm"].numpy()
  tkd = classical.reconstruct("tkd", s.field_ppm, s.mask, voxel_size_mm=s.voxel_size_mm,
                              b0_dir=s.b0_dir)
  scores = {name: metrics.evaluate(x, s.chi_ppm, s.mask)["nrmse"]
            for name, x in (("qsmgan", chi), ("tkd", tkd))}
  assert scores["qsmgan"] < scores["tkd"], scores
  assert float(out["residual_after"]) < float(out["residual_before"])


def test_shipped_network_pass_is_scale_equivariant(shipped, phantom):
  """The shipped contract runs the network at its training amplitude: a field twice as strong
  gives a map twice as strong (a linear inversion's invariant), to float32 round-off."""
  _, model, contract = shipped
  assert contract["inference"]["field_reference_std_ppm"] > 0
  s = phantom
  mask = s.mask.astype(np.float32)
  maps = [model.signatures["network_volume"](
      field_ppm=(s.field_ppm * np.float32(k)).astype(np.float32), mask=mask)["chi_ppm"].numpy()
          for k in (1.0, 2.0)]
  np.testing.assert_allclose(maps[1], 2.0 * maps[0], atol=1e-4 * np.abs(maps[1]).max())


def test_shipped_refinement_records_its_fine_scale_gains(shipped, phantom):
  """Since version 7 the solve's correction is weighed per band of |k| by the field's own SNR;
  the sidecar says how (a clean SNR-100 field keeps its coarse bands whole and drops the
  finest). Version 8 solves twice, the second time with Huber weights (``robust_data``), and the
  sidecar records the threshold."""
  from qsmgan_tf import fine_shrinkage  # pylint: disable=import-outside-toplevel
  path, _, contract = shipped
  assert contract["refine"]["fine_shrinkage"] == 1
  _, info = inference.reconstruct_qsmgan(phantom.field_ppm, phantom.mask, phantom.voxel_size_mm,
                                         phantom.b0_dir, model=str(path), progress=False)
  gains = np.asarray(info["refine"]["fine_shrinkage_gains"])
  assert gains.shape == (fine_shrinkage.SHELLS,) and np.all(np.diff(gains) <= 0)
  assert gains[0] > 0.95 and gains[-1] < 0.5
  assert info["refine"]["in_graph"] and info["refine"]["fine_shrinkage_noise_ppm"] > 0
  assert contract["refine"]["robust_data"] > 0
  assert info["refine"]["robust_data"] == contract["refine"]["robust_data"]
