"""Tests for qsmgan_tf.refine.params: the refinement parameters' resolution and checks."""

import pytest

from qsmgan_tf import refine


def test_params_resolution_order():
  contract = {"refine": {"mu": 0.01, "iterations": 7}}
  assert refine.resolve_params(None) == refine.DEFAULTS
  assert refine.resolve_params(contract) == {**refine.DEFAULTS, "mu": 0.01, "iterations": 7}
  assert refine.resolve_params(contract, mu=0.5, iterations=None)["mu"] == 0.5
  assert refine.resolve_params(contract, mu=0.5)["iterations"] == 7


@pytest.mark.parametrize("key,value", [("reweights", "x"), ("edge_refresh", "yes"), ("mu", [1])])
def test_bad_parameter_values_are_named(key, value):
  with pytest.raises(ValueError, match=f"refinement parameter {key}: bad value"):
    refine.resolve_params(None, **{key: value})


@pytest.mark.parametrize("value", [-1, refine.MAX_FIT_OFFSET + 1])
def test_fit_offset_out_of_range_is_named(value):
  with pytest.raises(ValueError, match="refinement parameter fit_offset"):
    refine.resolve_params(None, fit_offset=value)


@pytest.mark.parametrize("bad", ["lsqr", "CG2"])
def test_unknown_method_is_rejected(bad):
  with pytest.raises(ValueError, match="unknown refinement"):
    refine.resolve_method(bad)


@pytest.mark.parametrize("bad", ["data_erosion_mm=-1", "lcurve_stages=-1", "lcurve_factor=1",
                                 "lcurve_reweights=0", "fit_level=3", "robust_data=-1"])
def test_resolve_params_refuses_out_of_range_values(bad):
  key, value = bad.split("=")
  with pytest.raises(ValueError, match=key):
    refine.resolve_params(**{key: value})
