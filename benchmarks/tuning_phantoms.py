"""The tuning phantoms shared by the parameter studies (`tune_refine.py`, `tune_classical.py`).

Seeds 850001-850004: a healthy brain, a brain with lesions, a brain with B0 tilted 10 deg, a
shape phantom, all at SNR 100 with their simulated magnitude; optionally (`EXTENDED`) 850005, a
brain with B0 tilted 20 deg, and 850006, a brain at 1x1x2 mm. None is in a training set (dataset
seeds derive subject seeds far below) or in the model card's validation cases (seeds >= 900000),
so parameters chosen here are not chosen on the cases they are judged on.

`subjects(realistic=True)` gives the same phantoms with model errors (opt-in): each gets
`data_prep.model_errors.realistic_model_errors(seed, probability=1)` (correlated noise, edge and
smooth background residuals, white-matter anisotropy, a mask a few voxels off; all of them on, at
levels drawn from mild to severe: four to six phantoms are too few to leave any error to chance)
and an SNR drawn uniformly in `REALISTIC_SNR` (not 100), both seeded by the phantom's seed, so the
set is fixed. Real fields depart from the dipole model of the true chi this way; parameters tuned
on exact forward fields with white noise at SNR 100 over-trust the data.

`subjects(detail='fine')` gives the brains the fine anatomy of `data_prep.phantoms.brain_phantom`
(thin veins, texture, folded borders; opt-in): the same brains otherwise, with more of their
energy at fine scales, as measured maps have (benchmarks/phantom_spectrum.py).
"""

from __future__ import annotations

from typing import Iterator

_Z = (0.0, 0.0, 1.0)
_ISO = (1.0, 1.0, 1.0)
PHANTOMS = (("brain", 850001, False, _Z, _ISO), ("brain", 850002, True, _Z, _ISO),
            ("brain", 850003, False, (0.1736482, 0.0, 0.9848078), _ISO),
            ("shapes", 850004, False, _Z, _ISO))
# Two more for the cases the first four do not cover (`subjects(extended=True)`): B0 tilted
# 20 deg (the validation's oblique case has 20 deg too, another seed and azimuth) and a
# 1x1x2 mm acquisition.
EXTENDED = (("brain", 850005, False, (0.0, 0.3420201, 0.9396926), _ISO),
            ("brain", 850006, False, _Z, (1.0, 1.0, 2.0)))
# SNR range of the realistic set (`subjects(realistic=True)`).
REALISTIC_SNR = (20.0, 60.0)
_REALISTIC_SNR_KEY = 4241


def realistic_snr(seed: int) -> float:
  """The realistic set's SNR for a phantom seed: uniform in `REALISTIC_SNR`, seeded."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return float(np.random.default_rng([int(seed), _REALISTIC_SNR_KEY]).uniform(*REALISTIC_SNR))


def subjects(extended: bool = False, only: set[str] | None = None,
             realistic: bool = False, detail: str = "none") -> Iterator[tuple[str, object]]:
  """``(name, data_prep.simulate.Subject)`` for each tuning phantom (with `EXTENDED` too if
  asked; only those named in ``only`` if given), simulated on demand.

  ``realistic``: with seeded model errors and SNR (see the module docstring); the names stay
  ``<kind>-<seed>``, the levels are in ``subject.meta['model_errors']`` and ``subject.snr``.
  ``detail``: the brains' fine anatomy, 'none' or 'fine' (`simulate.make_phantom`: shapes
  ignore it)."""
  from data_prep import model_errors  # pylint: disable=import-outside-toplevel
  from data_prep import simulate  # pylint: disable=import-outside-toplevel
  for kind, seed, lesions, b0, voxel in PHANTOMS + (EXTENDED if extended else ()):
    name = f"{kind}-{seed}"
    if only is None or name in only:
      yield name, simulate.simulate_subject(
          kind, seed, voxel_size_mm=voxel, b0_dir=b0,
          snr=realistic_snr(seed) if realistic else 100.0, lesions=lesions,
          model_errors=model_errors.realistic_model_errors(seed, 1.0) if realistic else None,
          detail=detail)


def scores(chi, truth, mask) -> dict[str, float]:
  """NRMSE and HFEN in %, rounded: what the studies rank and print."""
  from qsmgan_tf import metrics  # pylint: disable=import-outside-toplevel
  out = metrics.evaluate(chi, truth, mask)
  return {"nrmse": round(out["nrmse"], 2), "hfen": round(out["hfen"], 2)}
