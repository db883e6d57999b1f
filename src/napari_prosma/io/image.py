"""The image a reader returns: data in napari's axis order with the geometry it came with."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fs import suffix_of
from ..preprocess import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES + PNG_SUFFIXES + JPEG_SUFFIXES


@dataclass
class ImageData:
    """An image or volume in napari axis order, with the geometry it came with.

    Attributes:
        data: ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(Z, Y, X)`` volume.
        kind: ``"grey"``, ``"rgb"`` or ``"volume"``.
        spacing: voxel size per spatial axis, napari order (``(y, x)`` or ``(z, y, x)``).
        origin: world position of the first voxel, napari order (napari ``translate``).
        affine: ``(n+1, n+1)`` homogeneous index-to-world matrix in napari order
            (``n`` spatial axes); diagonal unless the scan is rotated or sheared.
        unit: unit of ``spacing``/``origin`` (``"mm"``, ``"um"``, ...) or None (pixels).
        path: the file it was read from, if any.
        format: ``"nifti"``, ``"tiff"``, ``"png"`` or ``"jpeg"``, or None.
        source_affine: NIfTI only: the file's own 4x4 affine (voxel ``(i, j, k)`` order).
        header: NIfTI only: the file's header (a ``nibabel.Nifti1Header``), restored on write.
        meta: format details a writer needs (NIfTI source shape, raw TIFF resolution tags).
        warnings: plain-words notes about what could not be shown or kept.
    """

    data: np.ndarray
    kind: str
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    affine: np.ndarray
    unit: str | None = None
    path: Path | None = None
    format: str | None = None
    source_affine: np.ndarray | None = None
    header: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the RGB axis: ``(H, W)`` or ``(Z, Y, X)``."""
        return tuple(self.data.shape[:2] if self.kind == "rgb" else self.data.shape)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.spatial_shape)

    def layer_kwargs(self) -> dict[str, Any]:
        """napari layer keyword arguments (``scale``, ``translate``, ``metadata``, ``rgb``)."""
        kw: dict[str, Any] = {
            "scale": tuple(self.spacing),
            "translate": tuple(self.origin),
            "metadata": {
                "affine": self.affine.copy(),
                "unit": self.unit,
                "path": str(self.path) if self.path else None,
                "warnings": list(self.warnings),
            },
        }
        if self.kind == "rgb":
            kw["rgb"] = True
        return kw


def from_array(data: np.ndarray, spacing: tuple[float, ...] | None = None) -> ImageData:
    """Wrap a bare array (2D grey, ``(H, W, 3)`` RGB or 3D volume) with unit geometry."""
    a = np.asarray(data)
    kind = (
        "rgb"
        if a.ndim == 3 and a.shape[-1] in (3, 4) and spacing is None
        else ("grey" if a.ndim == 2 else "volume")
    )
    n = 2 if kind in ("grey", "rgb") else 3
    sp = tuple(float(s) for s in (spacing or (1.0,) * n))
    return ImageData(a, kind, sp, (0.0,) * n, _diag_affine(sp, (0.0,) * n))


def _diag_affine(spacing: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    n = len(spacing)
    a = np.eye(n + 1)
    a[:n, :n] = np.diag(spacing)
    a[:n, n] = origin
    return a


def is_supported(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`read_image` knows the file's format by its suffix."""
    return suffix_of(path) in SUPPORTED_SUFFIXES


def _classify(
    p: Path, a: np.ndarray, rgb_last: bool, axes: str = ""
) -> tuple[np.ndarray, str, list[str], str]:
    """Squeeze singleton axes and decide grey / rgb / volume.

    Returns ``(array, kind, warnings, axes)``: ``axes`` is ``axes`` (one letter per input
    axis, e.g. tifffile's ``"ZYX"``) with the squeezed axes dropped, or ``""``.
    """
    warnings: list[str] = []
    if a.ndim > 2:
        # keep the two image axes (and the colour axis): a 1-pixel or 1-row RGB image
        # (1, 1, 3) / (1, W, 3) must not become a grey (1, 3) / (W, 3) image
        colour = rgb_last and a.shape[-1] in (3, 4)
        last = a.ndim - (3 if colour else 2)
        keep = [i for i, s in enumerate(a.shape) if s != 1 or i >= last]
        if len(axes) == a.ndim:
            axes = "".join(axes[i] for i in keep)
        a = a.reshape([a.shape[i] for i in keep])
    if len(axes) != a.ndim:
        axes = ""
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.ndim == 2:
        return a, "grey", warnings, axes
    if a.ndim == 3 and rgb_last and a.shape[-1] in (3, 4):
        if a.shape[-1] == 4:
            warnings.append("the alpha (transparency) channel was dropped")
            a = a[..., :3]
        return a, "rgb", warnings, axes
    if a.ndim == 3:
        return a, "volume", warnings, axes
    raise InputError(
        f"{p.name} has {a.ndim} dimensions (shape {a.shape}); only 2D images and 3D volumes "
        "are supported (split time series or channels first)"
    )
