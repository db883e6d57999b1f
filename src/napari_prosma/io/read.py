"""Read images and volumes with their geometry, in napari's axis order.

Formats: PNG/JPEG (imageio; an EXIF orientation applied as viewers do), TIFF
(:mod:`.tiff`), NIfTI ``.nii``/``.nii.gz`` (:mod:`.nifti`). Data come back as 2D
``(H, W)`` grey or ``(H, W, 3)`` RGB, 3D ``(Z, Y, X)``. Qt-free and torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..fs import suffix_of
from ..preprocess import InputError
from .checks import _corrupt
from .image import (
    JPEG_SUFFIXES,
    NIFTI_SUFFIXES,
    PNG_SUFFIXES,
    TIFF_SUFFIXES,
    ImageData,
    _classify,
    from_array,
)
from .nifti import _read_nifti
from .tiff import _read_tiff, _tiff_series_count

#: What the plugin's napari reader opens (PNG is left to napari's own reader).
READ_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES + JPEG_SUFFIXES
#: Formats whose files carry a geometry worth reading back for a layer that lost it.
GEOMETRY_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES
#: EXIF orientation -> the numpy equivalent of what PIL.ImageOps.exif_transpose applies.
_EXIF_TRANSPOSE: dict[int, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    2: ("mirrored left-right", lambda a: a[:, ::-1]),
    3: ("rotated 180°", lambda a: a[::-1, ::-1]),
    4: ("mirrored top-bottom", lambda a: a[::-1]),
    5: ("flipped across its diagonal", lambda a: np.swapaxes(a, 0, 1)),
    6: ("rotated 90° clockwise", lambda a: np.rot90(a, -1)),
    7: ("flipped across its anti-diagonal", lambda a: np.swapaxes(a[::-1, ::-1], 0, 1)),
    8: ("rotated 90° counter-clockwise", lambda a: np.rot90(a, 1)),
}


def read_image(path: str | os.PathLike[str], series: int | None = None) -> ImageData:
    """Read a PNG, JPEG, TIFF or NIfTI file with its geometry.

    Args:
        path: the file.
        series: TIFF only: which image series to read. A TIFF holding several series is
            refused unless one is named (:func:`read_series` reads them all).

    Raises:
        FileNotFoundError: no such file.
        InputError: an unsupported format, or a corrupt/truncated/unusable file (the
            message names the file).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        if p.is_dir():
            raise InputError(f"{p} is a folder, not an image file")
        raise FileNotFoundError(2, "no such file", str(p))
    suf = suffix_of(p)
    if series not in (None, 0) and suf not in TIFF_SUFFIXES:
        raise InputError(f"{p.name} holds one image; only a TIFF can hold several series")
    if suf in NIFTI_SUFFIXES:
        img = _read_nifti(p)
    elif suf in TIFF_SUFFIXES:
        img = _read_tiff(p, series)
    elif suf in PNG_SUFFIXES + JPEG_SUFFIXES:
        img = _read_plain(p, "png" if suf in PNG_SUFFIXES else "jpeg")
    else:
        raise InputError(
            f"{p.name}: unsupported format {suf or '(no suffix)'}; "
            "use PNG, JPEG, TIFF or NIfTI (.nii, .nii.gz)"
        )
    img.path = p
    if img.data.size == 0:
        raise InputError(f"{p.name} holds an empty image (shape {img.data.shape})")
    return img


def read_series(path: str | os.PathLike[str]) -> list[ImageData]:
    """Every image series of a file, in order: several for a multi-series TIFF (each
    with ``meta["tiff_series"] = (index, count)``), else the one image."""
    p = Path(path).expanduser()
    n = _tiff_series_count(p) if suffix_of(p) in TIFF_SUFFIXES and p.is_file() else 1
    if n <= 1:
        return [read_image(p)]
    out = []
    for k in range(n):
        img = read_image(p, series=k)
        img.meta["tiff_series"] = (k, n)
        out.append(img)
    return out


def exif_orientation(path: str | os.PathLike[str]) -> int:
    """The EXIF orientation tag of a JPEG or PNG (1, the default, when it has none)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            raw = im.info.get("exif")  # a PNG's eXIf chunk after the pixels is not sought
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(0x0112, 1) or 1)
    except Exception:  # unreadable EXIF: the pixels are read (or refused) on their own
        return 1


def _read_plain(p: Path, fmt: str) -> ImageData:
    import imageio.v3 as iio
    from PIL import Image

    try:
        a = np.asarray(iio.imread(p))  # imageio ignores the EXIF orientation (rotate=False)
    except Image.DecompressionBombError as e:
        raise InputError(f"{p.name} is too large to read safely ({e})") from None
    except Exception as e:
        raise _corrupt(p, fmt.upper(), e) from None
    if a.ndim == 3 and a.shape[-1] == 2:  # grey + alpha
        a = a[..., 0]
    notes: list[str] = []
    orientation = exif_orientation(p) if a.ndim in (2, 3) else 1
    if orientation in _EXIF_TRANSPOSE:
        what, transpose = _EXIF_TRANSPOSE[orientation]
        a = np.ascontiguousarray(transpose(a))
        notes.append(
            f"the image was {what}, as its EXIF orientation tag ({orientation}) asks, so that "
            "it and its labels look as image viewers show the file"
        )
    a, kind, warnings, _ = _classify(p, a, rgb_last=True)
    if kind == "volume":  # animated PNG / multi-frame: refuse rather than guess
        raise InputError(f"{p.name} holds several frames; save one frame per file")
    img = from_array(a)
    img.kind, img.format, img.warnings = kind, fmt, notes + warnings
    if orientation != 1:
        img.meta["exif_orientation"] = orientation
    return img
