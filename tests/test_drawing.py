"""Tests for data_prep.drawing (grid, canvas, drawing primitives, smooth fields)."""

import math

import numpy as np
import pytest

from data_prep import drawing
from data_prep import tissues


@pytest.mark.parametrize("voxel", [(1.0, 1.0, 1.0), (0.7, 1.0, 1.5)])
def test_primitive_volumes_are_analytic(voxel):
  grid = drawing.Grid.centred((64, 64, 48), voxel)
  dv = float(np.prod(voxel))
  # Rotated ellipsoid: 4/3 pi abc.
  sl, occ = drawing.ellipsoid_region(grid, (2.0, -3.0, 1.0), (9.0, 6.0, 5.0),
                                     drawing.euler_rotation((20, 30, 40)))
  assert occ.sum() * dv == pytest.approx(4 / 3 * math.pi * 9 * 6 * 5, rel=0.03)
  # Finite cylinder: pi r^2 * 2h.
  sl, occ = drawing.cylinder_region(grid, (0, 0, 0), (1, 1, 0.5), 4.0, 10.0)
  assert occ.sum() * dv == pytest.approx(math.pi * 16 * 20, rel=0.04)
  # Straight tube: pi r^2 L plus two hemispherical caps.
  pts = drawing.bezier_points([(-12, 0, 0), (12, 4, 2)])
  sl, occ = drawing.tube_region(grid, pts, 2.0)
  length = float(np.linalg.norm([24, 4, 2]))
  assert occ.sum() * dv == pytest.approx(math.pi * 4 * length + 4 / 3 * math.pi * 8, rel=0.05)
  assert occ.shape == tuple(s.stop - s.start for s in sl)


def test_paint_replaces_and_labels():
  grid = drawing.Grid.centred((32, 32, 32), (1, 1, 1))
  canvas = drawing.Canvas.empty(grid)
  canvas.chi[:] = 0.1
  canvas.paint(drawing.ellipsoid_region(grid, (0, 0, 0), (6, 6, 6)), 1.0, 17)
  assert canvas.chi[16, 16, 16] == pytest.approx(1.0)
  assert canvas.chi[0, 0, 0] == pytest.approx(0.1)
  assert canvas.seg[16, 16, 16] == 17 and canvas.seg[0, 0, 0] == 0
  assert canvas.r2s[16, 16, 16] == pytest.approx(tissues.R2STAR_HZ[17])
  # appearance=False paints chi and labels only; paint_appearance paints PD and R2* only.
  canvas.paint(drawing.ellipsoid_region(grid, (8, 8, 8), (3, 3, 3)), 0.3, 1, appearance=False)
  assert canvas.chi[24, 24, 24] == pytest.approx(0.3) and canvas.seg[24, 24, 24] == 1
  assert canvas.r2s[24, 24, 24] == 0 and canvas.pd[24, 24, 24] == 0
  canvas.paint_appearance(drawing.ellipsoid_region(grid, (9, 8, 8), (3, 3, 3)), 0.7, 40.0)
  assert canvas.r2s[25, 24, 24] == pytest.approx(40.0)
  assert canvas.pd[25, 24, 24] == pytest.approx(0.7)
  assert canvas.chi[25, 24, 24] == pytest.approx(0.3)
  canvas.paint(drawing.ellipsoid_region(grid, (0, 0, 0), (3, 3, 3)), 0.5, None, additive=True)
  assert canvas.chi[16, 16, 16] == pytest.approx(1.5)


def test_smooth_field_statistics():
  rng = np.random.default_rng(0)
  field = drawing.smooth_field((40, 48, 32), rng, 8.0)
  assert abs(field.mean()) < 1e-5 and field.std() == pytest.approx(1.0, rel=1e-3)
  # Smooth: neighbours nearly equal.
  assert np.corrcoef(field[1:].ravel(), field[:-1].ravel())[0, 1] > 0.95
  again = drawing.smooth_field((40, 48, 32), np.random.default_rng(0), 8.0)
  np.testing.assert_array_equal(field, again)
