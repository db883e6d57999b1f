"""npe2 reader: NIfTI (``.nii``, ``.nii.gz``) and TIFF with their geometry.

The NIfTI affine becomes the layer's ``scale`` and ``translate`` (napari axis order); the
full affine, the source affine and the header are kept in the layer's metadata under
``"prosma_io"`` so that :mod:`napari_prosma._writer` can give labels and maps drawn on the
layer the same geometry back. A scan stored rotated or sheared relative to the scanner axes
cannot be shown rotated in napari without breaking the label layers' alignment: it is shown
with its voxel spacing and origin only, and a warning says so.

TIFF files keep their resolution (XResolution/YResolution, ImageJ spacing, OME
PhysicalSizeX/Y/Z) as the scale; a TIFF holding several image series opens as one layer per
series. JPEG files are read here too, so that an EXIF orientation tag is applied (napari's
built-in reader shows the raw pixel order, unlike every photo viewer) and labels drawn on
the layer match the photo as viewers show it. PNG is left to napari's built-in reader.

Qt-free and torch-free: the heavy lifting is :func:`napari_prosma.io.read_image`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import (
    JPEG_SUFFIXES,
    NIFTI_SUFFIXES,
    TIFF_SUFFIXES,
    ImageData,
    read_image,
    read_series,
    stem_of,
    suffix_of,
)

READ_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES + JPEG_SUFFIXES
#: Formats whose files carry a geometry worth reading back for a layer that lost it.
_GEOMETRY_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES
#: File stems that name a label map rather than an image (opened as a Labels layer when the
#: data are whole numbers).
_LABEL_STEM = re.compile(
    r"(^|[_\-. ])(label|labels|seg|segmentation|mask|masks|gt)($|[_\-. ])", re.IGNORECASE
)
#: Key of the layer metadata that holds the geometry a writer needs.
IO_KEY = "prosma_io"

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | Sequence[str]) -> Callable[..., list[LayerData]] | None:
    """Return :func:`read_layers` when every path is a NIfTI, TIFF or JPEG file, else None."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(suffix_of(p) in READ_SUFFIXES for p in paths):
        return None
    return read_layers


def read_layers(path: str | Sequence[str]) -> list[LayerData]:
    """Read one or more files into napari layer data tuples (one layer per file, or per
    image series of a multi-series TIFF, named ``"<stem> [series k]"``).

    Plain-words warnings (rotation/shear not shown, unknown slice spacing, alpha dropped,
    EXIF orientation applied, several series) are shown as napari notifications; errors
    propagate (napari reports them).
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    out = []
    for p in paths:
        images = read_series(p)
        if len(images) > 1:
            _warn(f"{Path(p).name} holds {len(images)} image series: one layer each")
        for k, img in enumerate(images):
            for w in img.warnings:
                _warn(f"{Path(p).name}: {w}")
            name = f"{stem_of(p)} [series {k}]" if len(images) > 1 else None
            out.append(layer_data(img, name))
    return out


def layer_data(img: ImageData, name: str | None = None) -> LayerData:
    """An :class:`~napari_prosma.io.ImageData` as a napari layer data tuple.

    Whole-number data whose file name says label/seg/mask open as a Labels layer.
    """
    kwargs = img.layer_kwargs()
    kwargs["name"] = name or (stem_of(img.path) if img.path else "image")
    kwargs["metadata"][IO_KEY] = source_metadata(img)
    kind = "image"
    if _looks_like_labels(img, kwargs["name"]):
        kind = "labels"
        kwargs.pop("rgb", None)
        data = img.data if img.data.dtype.kind in "iu" else img.data.astype(np.int32)
        return data, kwargs, kind
    if img.kind != "rgb":
        kwargs["colormap"] = "gray"
        if img.format == "nifti" and img.data.dtype.kind in "iuf" and img.data.size:
            lo, hi = np.percentile(img.data, [0.5, 99.5])
            if hi > lo:
                kwargs["contrast_limits"] = (float(lo), float(hi))
    return img.data, kwargs, kind


def _looks_like_labels(img: ImageData, name: str) -> bool:
    if img.kind == "rgb" or not _LABEL_STEM.search(name):
        return False
    a = img.data
    if a.dtype.kind in "iub":
        return True
    return a.dtype.kind == "f" and bool(np.all(a == np.round(a))) and float(a.min()) >= 0


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
    if not path or suffix_of(path) not in _GEOMETRY_SUFFIXES or not Path(path).is_file():
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


def _warn(message: str) -> None:
    try:
        from napari.utils.notifications import show_warning
    except ImportError:  # pragma: no cover - napari is there whenever this runs as a plugin
        import warnings

        warnings.warn(message, stacklevel=3)
    else:
        show_warning(message)
