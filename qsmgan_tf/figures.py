"""The evaluation figure: susceptibility maps and their errors, one row per method.

Laid out like the QSMGAN paper's comparison figures: the truth in the first row, then one row
per method; columns are axial, coronal and sagittal slices of chi at a fixed ppm window, then
the same three slices of the error (method - truth) at the same window, so rows can be compared
by eye without a per-image colour scale. Slices go through the centre of the mask's bounding
box. Display orientation: axial = (i, j) at fixed k, coronal = (i, k) at fixed j, sagittal =
(j, k) at fixed i, first index to the right and second upwards (nibabel voxel order, nothing
reoriented), each pixel stretched to the voxel size.

Rendering uses matplotlib's Agg backend (no display needed); matplotlib is imported inside the
function so importing this module stays cheap.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from qsmgan_tf import nifti_io
from qsmgan_tf import physics

_VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def slice_centre(mask: np.ndarray) -> tuple[int, int, int]:
  """Voxel index of the centre of the mask's bounding box (the slices' crossing point)."""
  box = physics.bounding_box(np.asarray(mask, bool))
  return tuple(int((s.start + s.stop - 1) // 2) for s in box)


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
  """2D view for imshow: rows = the second remaining axis (flipped up by origin='lower')."""
  plane = np.take(volume, index, axis=axis)
  return plane.T


def _aspect(voxel_size_mm: Sequence[float], axis: int) -> float:
  """imshow aspect (row spacing / column spacing) for a slice perpendicular to ``axis``."""
  first, second = [float(voxel_size_mm[a]) for a in range(3) if a != axis]
  return second / first


def render_comparison(truth_ppm: np.ndarray, maps: Sequence[tuple[str, np.ndarray]],
                      mask: np.ndarray, voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                      window_ppm: tuple[float, float] = (-0.15, 0.15),
                      error_window_ppm: tuple[float, float] | None = None,
                      centre: Sequence[int] | None = None, dpi: int = 100) -> bytes:
  """Renders the comparison figure as PNG bytes.

  Args:
    truth_ppm: reference susceptibility, ppm, ``[X, Y, Z]``.
    maps: ``(label, chi_ppm)`` per method, in row order.
    mask: brain mask; both maps are shown demeaned over it and zero outside (as scored).
    voxel_size_mm: voxel size, mm (pixel aspect).
    window_ppm: display window for chi, ppm.
    error_window_ppm: display window for method - truth, ppm (default: ``window_ppm``).
    centre: voxel where the three slices cross (default: mask bounding-box centre).
    dpi: figure resolution.

  Returns:
    The PNG file content.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  mask = np.asarray(mask, bool)
  centre = tuple(centre) if centre is not None else slice_centre(mask)
  error_window_ppm = error_window_ppm or window_ppm

  def shown(chi):
    chi = np.asarray(chi, np.float32)
    return np.where(mask, chi - chi[mask].mean(), 0.0)

  truth = shown(truth_ppm)
  rows = [("truth", truth, None)] + [(label, shown(chi), None) for label, chi in maps]
  rows = [(label, chi, None if i == 0 else np.where(mask, chi - truth, 0.0))
          for i, (label, chi, _) in enumerate(rows)]
  ncols = 2 * len(_VIEWS)
  fig = Figure(figsize=(1.6 * ncols + 0.8, 1.7 * len(rows) + 0.6), dpi=dpi)
  axes = fig.subplots(len(rows), ncols, squeeze=False)
  chi_image = err_image = None
  for r, (label, chi, err) in enumerate(rows):
    for c, (view, axis) in enumerate(_VIEWS):
      for block, volume, window in ((0, chi, window_ppm), (1, err, error_window_ppm)):
        ax = axes[r, block * len(_VIEWS) + c]
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
          spine.set_visible(False)
        if r == 0:
          ax.set_title(f"{view}" + (" error" if block else ""), fontsize=9)
        if volume is None:
          continue
        image = ax.imshow(_slice(volume, axis, centre[axis]), cmap="gray", vmin=window[0],
                          vmax=window[1], origin="lower", aspect=_aspect(voxel_size_mm, axis),
                          interpolation="nearest")
        if block:
          err_image = image
        else:
          chi_image = image
    axes[r, 0].set_ylabel(label, fontsize=9)
  fig.subplots_adjust(left=0.08, right=0.86, top=0.93, bottom=0.03, wspace=0.04, hspace=0.08)
  for image, y, name in ((chi_image, 0.52, "chi (ppm)"), (err_image, 0.05, "error (ppm)")):
    if image is not None:
      cax = fig.add_axes([0.875, y, 0.015, 0.4])
      fig.colorbar(image, cax=cax).set_label(name, fontsize=8)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  return buffer.getvalue()


def write_comparison(path, truth_ppm, maps, mask, **kwargs) -> None:
  """Renders `render_comparison` and writes it atomically (temp file, then rename) to ``path``."""
  png = render_comparison(truth_ppm, maps, mask, **kwargs)
  nifti_io.write_bytes(path, png)
