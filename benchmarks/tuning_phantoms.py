"""The tuning phantoms shared by the parameter studies (`tune_refine.py`, `tune_classical.py`).

Seeds 850001-850004: a healthy brain, a brain with lesions, a brain with B0 tilted 10 deg, a
shape phantom, all at SNR 100 with their simulated magnitude. None is in a training set (dataset
seeds derive subject seeds far below) or in the model card's validation cases (seeds >= 900000),
so parameters chosen here are not chosen on the cases they are judged on.
"""

from __future__ import annotations

from typing import Iterator

PHANTOMS = (("brain", 850001, False, (0.0, 0.0, 1.0)), ("brain", 850002, True, (0.0, 0.0, 1.0)),
            ("brain", 850003, False, (0.1736482, 0.0, 0.9848078)),
            ("shapes", 850004, False, (0.0, 0.0, 1.0)))


def subjects() -> Iterator[tuple[str, object]]:
  """``(name, data_prep.simulate.Subject)`` for each tuning phantom, simulated on demand."""
  from data_prep import simulate  # pylint: disable=import-outside-toplevel
  for kind, seed, lesions, b0 in PHANTOMS:
    yield f"{kind}-{seed}", simulate.simulate_subject(kind, seed, b0_dir=b0, snr=100.0,
                                                      lesions=lesions)


def scores(chi, truth, mask) -> dict[str, float]:
  """NRMSE and HFEN in %, rounded: what the studies rank and print."""
  from qsmgan_tf import metrics  # pylint: disable=import-outside-toplevel
  out = metrics.evaluate(chi, truth, mask)
  return {"nrmse": round(out["nrmse"], 2), "hfen": round(out["hfen"], 2)}
