"""Tests for qsmgan_tf.inference.options: reconstruct_qsmgan's options, typed and checked once."""

import pytest

from qsmgan_tf import refine
from qsmgan_tf.errors import InputError
from qsmgan_tf.inference.options import QsmganOptions


def test_keyword_options_collect_refinement_overrides():
  options = QsmganOptions.from_kwargs(refine_mu=0.01, refine_fit_level=None, inference="tiled",
                                      refine_lam=0.02, refine="CG")
  assert options.inference == "sliding_window" and options.refine == "cg"
  assert dict(options.refine_overrides) == {"mu": 0.01} and options.refine_lam == 0.02
  changed = options.replace(refine_iterations=3, overlap=0.5)
  assert dict(changed.refine_overrides) == {"mu": 0.01, "iterations": 3}
  assert changed.overlap == 0.5 and options.overlap == 0.25  # frozen: a new object
  params = changed.refine_params({"refine": {"mu": 0.1, "tv_weight": 3e-4}})
  assert params == refine.RefineParams(mu=0.01, iterations=3, tv_weight=3e-4)
  # Every RefineParams field can be overridden, not only the ones the binaries name.
  assert QsmganOptions.from_kwargs(refine_robust_data=2).refine_params(None).robust_data == 2.0


@pytest.mark.parametrize("kwargs,message", [
    ({"inference": "patches"}, "inference must be one of"),
    ({"refine": "lsqr"}, "unknown refinement 'lsqr'"),
    ({"mode": "mean"}, "mode must be one of"),
    ({"precision": "float16"}, "precision must be one of"),
    ({"refine_fit_level": 3}, "fit_level: 3 must be 0, 1 or 2"),
    ({"refine_reweights": "x"}, "reweights: bad value 'x'"),
    ({"refine_overrides": {"bogus": 1}}, "unknown refinement parameter"),
])
def test_bad_options_are_one_line_input_errors(kwargs, message):
  with pytest.raises(InputError, match=message):
    QsmganOptions.from_kwargs(**kwargs)


def test_an_unknown_keyword_is_a_type_error_as_in_a_call():
  with pytest.raises(TypeError, match="unexpected qsmgan option"):
    QsmganOptions.from_kwargs(refinement="cg")
