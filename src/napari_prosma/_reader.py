"""npe2 reader: NIfTI (``.nii``, ``.nii.gz``), TIFF and JPEG with their geometry.

The NIfTI affine becomes the layer's ``scale`` and ``translate`` (napari axis order); the
full affine, the source affine and the header are kept in the layer's metadata under
``"prosma_io"`` so that :mod:`napari_prosma._writer` can give labels and maps drawn on the
layer the same geometry back. A scan stored rotated or sheared relative to the scanner axes
is placed by the layer's ``affine`` where the scanner put it (:mod:`napari_prosma.oblique`);
a warning remains only where napari cannot show it (a tilt in 2D views).

TIFF files keep their resolution (XResolution/YResolution, ImageJ spacing, OME
PhysicalSizeX/Y/Z) as the scale; a TIFF holding several image series opens as one layer per
series. JPEG files are read here too, so that an EXIF orientation tag is applied (napari's
built-in reader shows the raw pixel order, unlike every photo viewer) and labels drawn on
the layer match the photo as viewers show it. PNG is left to napari's built-in reader.

Qt-free and torch-free: the heavy lifting is :func:`napari_prosma.io.read_image`; the
geometry kept in layer metadata is :mod:`napari_prosma.io.layers`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .fs import stem_of, suffix_of
from .io.image import PNG_SUFFIXES, ImageData
from .io.layers import (  # noqa: F401 - re-exported: their old home
    IO_KEY,
    _from_source_file,
    _header,
    image_data_from_layer,
    source_metadata,
)
from .io.read import READ_SUFFIXES, read_series
from .report import CT_SOFT_TISSUE, looks_like_ct

#: File stems that name a label map rather than an image (opened as a Labels layer when the
#: data are whole numbers).
_LABEL_STEM = re.compile(
    r"(^|[_\-. ])(label|labels|seg|segmentation|mask|masks|gt)($|[_\-. ])", re.IGNORECASE
)

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | Sequence[str]) -> Callable[..., list[LayerData]] | None:
    """Return :func:`read_layers` when every path is a NIfTI, TIFF or JPEG file, else None."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(suffix_of(p) in READ_SUFFIXES + PNG_SUFFIXES for p in paths):
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
            for w in _shown_warnings(img):
                _warn(f"{Path(p).name}: {w}")
            name = f"{stem_of(p)} [series {k}]" if len(images) > 1 else None
            out.append(layer_data(img, name))
    return out


def layer_data(img: ImageData, name: str | None = None) -> LayerData:
    """An :class:`~napari_prosma.io.ImageData` as a napari layer data tuple.

    Whole-number data whose file name says label/seg/mask open as a Labels layer.
    """
    kwargs = img.layer_kwargs()
    kwargs.update(_oblique_geometry(img)[0])
    kwargs["name"] = name or (stem_of(img.path) if img.path else "image")
    kwargs["metadata"][IO_KEY] = source_metadata(img)
    if img.unit == "mm":  # napari shows sizes and the scale bar in mm
        kwargs["units"] = ("mm",) * img.spatial_dims
    kind = "image"
    if _looks_like_labels(img, kwargs["name"], img.path):
        kind = "labels"
        kwargs.pop("rgb", None)
        data = img.data if img.data.dtype.kind in "iu" else img.data.astype(np.int32)
        return data, kwargs, kind
    if img.kind != "rgb":
        kwargs["colormap"] = "gray"
        if img.format == "nifti" and img.data.dtype.kind in "iuf" and img.data.size:
            lo, hi = np.percentile(img.data, [0.5, 99.5])
            if looks_like_ct(img.data):  # Hounsfield units: a soft-tissue window (issue 16)
                lo, hi = CT_SOFT_TISSUE
                kwargs["metadata"]["ct_window"] = [lo, hi]
            if hi > lo:
                kwargs["contrast_limits"] = (float(lo), float(hi))
    return img.data, kwargs, kind


_NOT_ROTATED = "the scan is stored rotated or sheared relative to the scanner axes"


def _oblique_geometry(img: ImageData) -> tuple[dict[str, Any], list[str]]:
    """A NIfTI's layer geometry from its own affine (issue 17): axis-aligned scans keep
    ``scale``/``translate``; a rotated or sheared one is placed by the layer's ``affine``
    where the scanner put it. Returns ``({}, [])`` for other formats."""
    if img.format != "nifti" or img.source_affine is None:
        return {}, []
    from .oblique import nifti_layer_geometry, plane_matrix

    n = img.spatial_dims
    rev = np.eye(n)[::-1]
    lin = rev @ plane_matrix(img.source_affine, n)[:n, :n] @ rev
    unit_scale = float(img.spacing[0]) / float(np.linalg.norm(lin[:, 0]))  # mm per file unit
    return nifti_layer_geometry(img.source_affine, n, unit_scale)


def _shown_warnings(img: ImageData) -> list[str]:
    """The reader's warnings as napari shows the layer: a rotated NIfTI is shown rotated,
    so only what napari cannot show (a tilt in 2D views) is said."""
    kwargs, tilt = _oblique_geometry(img)
    if "affine" not in kwargs:
        return list(img.warnings)
    return [w for w in img.warnings if not w.startswith(_NOT_ROTATED)] + tilt


#: Folders of label maps (the Medical Segmentation Decathlon's labelsTr / labelsTs, ...).
_LABEL_DIR = re.compile(r"^(labels?(tr|ts)?|masks?|segmentations?|gt|ground_?truth)$", re.I)
#: Whole-number grey data with at most this many distinct values (0 among them) is a mask.
MAX_MASK_VALUES = 8


def _looks_like_labels(img: ImageData, name: str, path: Any = None) -> bool:
    """Labels: whole numbers named like a label map (stem or folder), or a grey integer
    PNG of a few values, 0 among them (a mask, 0/1 or 0/255)."""
    if img.kind == "rgb":
        return False
    a = img.data
    whole = a.dtype.kind in "iub" or (
        a.dtype.kind == "f" and bool(np.all(a == np.round(a))) and float(a.min()) >= 0
    )
    if not whole:
        return False
    folder = Path(path).parent.name if path else ""
    if _LABEL_STEM.search(name) or _LABEL_DIR.match(folder):
        return True
    if img.format != "png" or a.dtype.kind not in "iub" or a.size == 0:
        return False  # by content only for PNG (a mask there is 0/1 or 0/255)
    values = np.unique(a)
    return 2 <= len(values) <= MAX_MASK_VALUES and values[0] == 0


def _warn(message: str) -> None:
    try:
        from napari.utils.notifications import show_warning
    except ImportError:  # pragma: no cover - napari is there whenever this runs as a plugin
        import warnings

        warnings.warn(message, stacklevel=3)
    else:
        show_warning(message)
