"""Tissue labels and values every phantom draws from (`data_prep.phantoms` brains and
`data_prep.shapes` objects): the qsm-ci segmentation labels, each label's literature range of
susceptibility (`draw_value` draws one per seed), and the proton density and R2* of the magnitude.

Example:
  chi_ppm = draw_value(np.random.default_rng(0), LABELS["putamen"])
"""

from __future__ import annotations

import numpy as np

# qsm-ci segmentation labels (qsm_ci.qsm_eval.DSEG_LABELS) plus 17 for microbleeds and 12 for the
# compact objects of anatomy-free phantoms (12 is unused by qsm-ci).
LABELS = {
    "caudate": 1, "globus_pallidus": 2, "putamen": 3, "red_nucleus": 4, "dentate": 5,
    "substantia_nigra": 6, "thalamus": 7, "white_matter": 8, "grey_matter": 9, "csf": 10,
    "vessel": 11, "object": 12, "calcification": 16, "microbleed": 17,
}

# Susceptibility ranges (ppm, relative to CSF) each seed draws from, per label: in-vivo values at
# 3T/7T (e.g. Deistung 2013, Lim 2013, the QSM challenge 2.0 head phantom).
CHI_RANGES_PPM = {
    1: (0.06, 0.09),    # caudate
    2: (0.15, 0.19),    # globus pallidus
    3: (0.07, 0.11),    # putamen
    4: (0.10, 0.15),    # red nucleus
    5: (0.10, 0.15),    # dentate
    6: (0.12, 0.19),    # substantia nigra
    7: (0.02, 0.05),    # thalamus
    8: (-0.045, -0.015),  # white matter
    9: (0.01, 0.035),   # cortical grey matter
    10: (-0.01, 0.01),  # CSF
    11: (0.30, 0.45),   # venous blood
    16: (-0.5, -0.2),   # calcification
    17: (0.5, 1.5),     # microbleed (haemosiderin)
}

# Proton density (a.u., CSF = 1) and R2* (1/s at 3T) per label, for the magnitude image.
PD = {1: 0.78, 2: 0.72, 3: 0.78, 4: 0.74, 5: 0.74, 6: 0.72, 7: 0.76, 8: 0.69, 9: 0.80, 10: 1.0,
      11: 0.85, 12: 0.80, 16: 0.25, 17: 0.65}
R2STAR_HZ = {1: 21.0, 2: 38.0, 3: 25.0, 4: 30.0, 5: 30.0, 6: 35.0, 7: 20.0, 8: 20.0, 9: 15.0,
             10: 3.0, 11: 45.0, 12: 20.0, 16: 90.0, 17: 180.0}


def draw_value(rng: np.random.Generator, label: int) -> float:
  """A susceptibility (ppm) for ``label`` uniform in its literature range."""
  lo, hi = CHI_RANGES_PPM[label]
  return float(rng.uniform(lo, hi))
