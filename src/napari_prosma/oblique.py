"""Scanner geometry as napari layer geometry: ``scale``/``translate``, or a full ``affine``.

Conventions (see docs/FORMATS.md):

- napari data axes are the array axes: ``(Z, Y, X)`` for a volume, ``(Y, X)`` for a 2D image.
- napari *world* axes, when a layer is placed by an affine, are DICOM's patient axes **LPS**
  (x towards the patient's Left, y towards Posterior, z towards Superior/head) listed in
  napari's order ``(z, y, x)``. With napari's default view (rows downwards, columns to the
  right) an axial slice then shows as radiologists read it: anterior at the top, the
  patient's left on the right of the screen.
- A NIfTI affine maps voxel ``(i, j, k)`` to **RAS** (x towards Right, y Anterior, z
  Superior); the array is read transposed, ``(k, j, i)``. ``LPS = diag(-1, -1, 1) @ RAS``.

An axis-aligned NIfTI keeps the reader's long-standing display (``scale`` = voxel size,
``translate`` = the affine's origin, in the reader's own ``(z, y, x)`` order of the RAS
axes): nothing changes for the files that open today. A NIfTI whose axes are rotated or
sheared relative to the scanner gets the full index-to-LPS matrix as its layer ``affine``.
Writers never use what is shown: they write the source affine back exactly (the reader keeps
it in the layer metadata), so labels painted on a layer shown either way keep it.

Qt-free, torch-free, numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Relative size of off-diagonal terms below which a matrix counts as axis-aligned (the
#: NIfTI reader's threshold for its rotation warning).
ALIGNED_RTOL = 1e-4
#: Degrees of out-of-plane tilt above which napari's 2D view cannot show the slices in place.
TILT_WARN_DEG = 1.0
_LPS_FROM_RAS = np.array([-1.0, -1.0, 1.0])


def plane_rows(source_affine: np.ndarray, spatial_dims: int) -> list[int]:
    """The world axes (RAS rows of a NIfTI affine) a NIfTI's voxel axes are shown along.

    A volume uses x, y, z. A 2D image uses x, y, unless its axes point mostly along
    another pair (a coronal or sagittal slice saved as 2D: its y or x column is zero there,
    and the x-y block alone would give it a zero voxel size).

    Args:
        source_affine: the file's ``(4, 4)`` affine.
        spatial_dims: 2 or 3.

    Returns:
        Sorted row indices, one per voxel axis.
    """
    if spatial_dims == 3:
        return [0, 1, 2]
    cols = np.abs(np.asarray(source_affine, dtype=float)[:3, :2])
    w = {int(np.argmax(cols[:, 0])), int(np.argmax(cols[:, 1]))}
    return sorted(w) if len(w) == 2 else [0, 1]


def plane_matrix(source_affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """A NIfTI affine reduced to its voxel axes and :func:`plane_rows`: ``(n+1, n+1)``,
    voxel ``(i, j[, k])`` to those world axes (file order on both sides)."""
    src = np.asarray(source_affine, dtype=float)
    n = spatial_dims
    rows = plane_rows(src, n)
    out = np.eye(n + 1)
    out[:n, :n] = src[np.ix_(rows, range(n))]
    out[:n, n] = src[rows, 3]
    return out


def is_axis_aligned(linear: np.ndarray, rtol: float = ALIGNED_RTOL) -> bool:
    """Whether an ``(n, n)`` index-to-world matrix has no rotation or shear (flips allowed)."""
    lin = np.asarray(linear, dtype=float)
    off = lin - np.diag(np.diag(lin))
    return bool(np.abs(off).max() <= rtol * max(np.abs(lin).max(), 1e-12))


def layer_geometry(affine: np.ndarray, rtol: float = ALIGNED_RTOL) -> dict[str, Any]:
    """napari keyword arguments that place a layer by an index-to-world matrix.

    Args:
        affine: ``(n+1, n+1)`` homogeneous matrix, napari order on both sides (data axes as
            the array's, world axes ``(z, y, x)``).
        rtol: see :func:`is_axis_aligned`.

    Returns:
        ``{"scale", "translate"}`` when the matrix is diagonal with positive entries (napari
        then shows the grid as it is); otherwise ``{"affine"}``: the full matrix, with
        ``scale`` ones and ``translate`` zeros so the affine alone places the layer.
    """
    a = np.asarray(affine, dtype=float)
    n = a.shape[0] - 1
    lin = a[:n, :n]
    if is_axis_aligned(lin, rtol) and np.all(np.diag(lin) > 0):
        return {
            "scale": tuple(float(v) for v in np.diag(lin)),
            "translate": tuple(float(v) for v in a[:n, n]),
        }
    return {"scale": (1.0,) * n, "translate": (0.0,) * n, "affine": a.copy()}


def nifti_display_affine(source_affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """The napari-order index-to-LPS matrix of a NIfTI read as this plugin reads it.

    Args:
        source_affine: the file's ``(4, 4)`` affine, voxel ``(i, j, k)`` to RAS (mm).
        spatial_dims: 3 (array ``(k, j, i)``) or 2 (array ``(j, i)``, the third axis dropped).

    Returns:
        ``(n+1, n+1)`` matrix: napari data index ``(k, j, i)`` -> world ``(z, y, x)`` in LPS.
    """
    n = spatial_dims
    src = plane_matrix(source_affine, n)
    rev = np.eye(n)[::-1]
    flip = np.diag(_LPS_FROM_RAS[plane_rows(source_affine, n)])
    out = np.eye(n + 1)
    out[:n, :n] = rev @ flip @ src[:n, :n] @ rev
    out[:n, n] = rev @ flip @ src[:n, n]
    return out


def nifti_layer_geometry(
    source_affine: np.ndarray, spatial_dims: int, unit_scale: float = 1.0
) -> tuple[dict[str, Any], list[str]]:
    """How the reader shows a NIfTI: layer keyword arguments and plain-words warnings.

    Args:
        source_affine: the file's ``(4, 4)`` affine (voxel ``(i, j, k)`` to RAS).
        spatial_dims: 2 or 3 (as read: ``(j, i)`` or ``(k, j, i)``).
        unit_scale: millimetres per file unit (the header's xyz unit).

    Returns:
        ``(kwargs, warnings)``. Axis-aligned: ``scale``/``translate`` exactly as the reader
        computed them before (voxel size; origin in the reader's reversed RAS order).
        Rotated or sheared: ``affine`` (see :func:`nifti_display_affine`), and a warning
        only when napari cannot show it fully (:func:`tilt_warning`).
    """
    n = spatial_dims
    src = plane_matrix(source_affine, n)
    rev = np.eye(n)[::-1]
    lin = rev @ src[:n, :n] @ rev
    if is_axis_aligned(lin):
        return {
            "scale": tuple(float(v) * unit_scale for v in np.linalg.norm(lin, axis=0)),
            "translate": tuple(float(v) * unit_scale for v in src[:n, n][::-1]),
        }, []
    shown = nifti_display_affine(source_affine, n)
    shown[:n, :] *= unit_scale
    kwargs = {"scale": (1.0,) * n, "translate": (0.0,) * n, "affine": shown}
    warning = tilt_warning(shown)
    return kwargs, [warning] if warning else []


def out_of_plane_tilt_deg(affine: np.ndarray) -> float:
    """Angle (degrees) between the data's first axis and the world axis napari slices along.

    napari's 2D view of a volume shows data planes ``[k, :, :]``; when their normal is
    tilted against world axis 0 the plane is shown flattened onto the view.
    """
    a = np.asarray(affine, dtype=float)
    n = a.shape[0] - 1
    if n < 3:
        return 0.0
    lin = a[:n, :n]
    normal = np.cross(lin[:, 1], lin[:, 2])
    norm = np.linalg.norm(normal)
    if norm == 0:
        return 90.0
    cos = abs(normal[0]) / norm
    return float(np.degrees(np.arccos(np.clip(cos, 0.0, 1.0))))


def tilt_warning(affine: np.ndarray) -> str | None:
    """The one thing napari cannot show of a placed volume, in words, or None."""
    tilt = out_of_plane_tilt_deg(affine)
    if tilt <= TILT_WARN_DEG:
        return None
    return (
        f"the slices are tilted {tilt:.0f}° against napari's viewing plane: the 2D view shows "
        "each slice flattened onto it (the 3D view shows the scan where the scanner put it)"
    )


def world_of(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """World coordinates of data indices: ``(..., n)`` -> ``(..., n)``."""
    a = np.asarray(affine, dtype=float)
    n = a.shape[0] - 1
    idx = np.asarray(index, dtype=float)
    return idx @ a[:n, :n].T + a[:n, n]
