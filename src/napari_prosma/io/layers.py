"""Geometry ↔ napari layer metadata, shared by the reader, the writers and the widgets.

A layer read by this plugin keeps what a writer needs (the napari-order affine, the source
affine and NIfTI header, TIFF resolution) under :data:`IO_KEY` in its metadata;
:func:`image_data_from_layer` rebuilds an :class:`ImageData` from it, or from the file the
layer came from, or from the layer's own ``scale``/``translate``. Qt-free and torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..fs import suffix_of
from .image import ImageData
from .read import GEOMETRY_SUFFIXES, read_image

#: Key of the layer metadata that holds the geometry a writer needs.
IO_KEY = "prosma_io"


def source_metadata(img: ImageData) -> dict[str, Any]:
    """What a writer needs to restore ``img``'s geometry (kept in layer metadata)."""
    return {
        "kind": img.kind,
        "shape": tuple(int(s) for s in img.data.shape),
        "spatial_shape": tuple(int(s) for s in img.spatial_shape),
        "spacing": tuple(img.spacing),
        "origin": tuple(img.origin),
        "affine": np.asarray(img.affine).copy(),
        "unit": img.unit,
        "format": img.format,
        "path": str(img.path) if img.path else None,
        "source_affine": None if img.source_affine is None else np.asarray(img.source_affine),
        "header": img.header,
        "meta": dict(img.meta),
    }


def image_data_from_layer(
    data: Any, attributes: dict[str, Any] | None, rgb: bool | None = None
) -> ImageData:
    """Rebuild the geometry of a layer as an :class:`ImageData` (with a placeholder array).

    In order of preference: ``attributes["metadata"]["prosma_io"]`` when it fits the data's
    grid (layers read by this plugin, and the layers the Segment widget makes from them);
    the file named by ``metadata["path"]`` when it is still there and fits (e.g. the sample
    menu's layers); the napari-order ``metadata["affine"]``; the layer's ``scale`` and
    ``translate``.

    Args:
        data: the layer data (only its shape is used).
        attributes: napari layer attributes (``scale``, ``translate``, ``metadata``, ``rgb``).
        rgb: whether the last axis is colour; default: ``attributes["rgb"]``.
    """
    attributes = dict(attributes or {})
    shape = tuple(int(s) for s in np.shape(data))
    if rgb is None:
        rgb = bool(attributes.get("rgb", False))
    spatial = shape[:-1] if rgb else shape
    meta = attributes.get("metadata") or {}
    src = meta.get(IO_KEY) if isinstance(meta, dict) else None
    placeholder = np.broadcast_to(np.zeros((), dtype=np.uint8), shape)
    if isinstance(src, dict) and tuple(src.get("spatial_shape", ())) == spatial:
        return ImageData(
            data=placeholder,
            kind="rgb" if rgb else src.get("kind", "volume" if len(spatial) == 3 else "grey"),
            spacing=tuple(src["spacing"]),
            origin=tuple(src["origin"]),
            affine=np.asarray(src["affine"], dtype=float),
            unit=src.get("unit"),
            path=Path(src["path"]) if src.get("path") else None,
            format=src.get("format"),
            source_affine=None
            if src.get("source_affine") is None
            else np.asarray(src["source_affine"], dtype=float),
            header=_header(src.get("header"), src.get("meta", {})),
            meta=dict(src.get("meta") or {}),
        )
    meta = meta if isinstance(meta, dict) else {}
    from_file = _from_source_file(meta.get("path"), spatial, rgb, placeholder)
    if from_file is not None:
        return from_file
    n = len(spatial)
    kind = "rgb" if rgb else ("volume" if n == 3 else "grey")
    unit = meta.get("unit")
    affine = meta.get("affine")
    if affine is not None and np.shape(affine) == (n + 1, n + 1):
        affine = np.asarray(affine, dtype=float)
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:n, :n], axis=0))
        origin = tuple(float(v) for v in affine[:n, n])
        return ImageData(placeholder, kind, spacing, origin, affine, unit=unit)
    scale = attributes.get("scale")
    translate = attributes.get("translate")
    scale = tuple(float(s) for s in (scale if scale is not None else (1.0,) * n))[-n:]
    origin = tuple(float(s) for s in (translate if translate is not None else (0.0,) * n))[-n:]
    affine = np.eye(n + 1)
    affine[:n, :n] = np.diag(scale)
    affine[:n, n] = origin
    return ImageData(placeholder, kind, scale, origin, affine, unit=unit)


def _from_source_file(
    path: Any, spatial: tuple[int, ...], rgb: bool, placeholder: np.ndarray
) -> ImageData | None:
    """The geometry of the file a layer came from (layers opened by other loaders, e.g. the
    sample menu, keep only its path), when that file is still there and fits the grid."""
    if not path or suffix_of(path) not in GEOMETRY_SUFFIXES or not Path(path).is_file():
        return None
    try:
        src = read_image(path)
    except Exception:  # moved, changed or unreadable: fall back to the layer's own geometry
        return None
    if tuple(src.spatial_shape) != spatial:
        return None
    src.data = placeholder
    if rgb:
        src.kind = "rgb"
    elif src.kind == "rgb":
        src.kind = "grey"
    return src


def _header(header: Any, meta: dict[str, Any]) -> Any:
    """A nibabel header from what metadata holds (the header itself, or its bytes)."""
    if header is None or not isinstance(header, bytes | bytearray):
        return header
    import nibabel as nib

    cls = nib.Nifti2Header if meta.get("nifti_class") == "Nifti2Image" else nib.Nifti1Header
    return cls(binaryblock=bytes(header))
