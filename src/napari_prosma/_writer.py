"""npe2 writers: a Labels or Image layer to NIfTI (``.nii.gz``, ``.nii``) or TIFF.

The geometry comes from the layer's metadata (``"prosma_io"``, filled by this plugin's
reader and copied by the Segment widget from the source image onto its output layers): a
NIfTI source gets its own affine and header back, a TIFF source its resolution. Layers
without it are written with their ``scale`` and ``translate`` (a diagonal affine).

napari's save dialog asks before replacing a file, so these writers replace an existing
file; the write itself is atomic (a temporary file moved into place), never half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import io
from .io.layers import image_data_from_layer

WRITE_SUFFIXES = io.NIFTI_SUFFIXES + io.TIFF_SUFFIXES
#: Labels may also be saved as PNG (2D, at most 255 classes; io.write_labels says why not).
LABEL_SUFFIXES = WRITE_SUFFIXES + io.PNG_SUFFIXES


def _target(path: str, like: io.ImageData, known: tuple[str, ...] = WRITE_SUFFIXES) -> Path:
    """``path``, with ``.nii.gz`` (NIfTI sources) or ``.tif`` added when it has no suffix
    this writer knows."""
    p = Path(path).expanduser()
    if io.suffix_of(p) in known:
        return p
    return p.with_name(p.name + (".nii.gz" if like.format == "nifti" else ".tif"))


def _materialise(data: Any) -> np.ndarray:
    """Layer data as one numpy array (the finest level of a multiscale layer)."""
    if isinstance(data, list | tuple) and data and hasattr(data[0], "shape"):
        data = data[0]
    return np.asarray(data)


def _refused(path: str, meta: dict[str, Any], exc: Exception) -> list[str]:
    """Tell the user why nothing was written (napari's own message, "not a valid writer"
    or "No data written!", never says why: it drops a writer's ValueError), and write
    nothing."""
    from napari.utils.notifications import show_error

    name = meta.get("name") or "the layer"
    show_error(f"'{name}' was not saved to {Path(path).name}: {exc}")
    return []


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one Labels layer; returns the path written (none, after a notification that
    says why, when the format cannot hold the data: a volume or over 255 classes in PNG)."""
    a = _materialise(data)
    like = image_data_from_layer(a, meta, rgb=False)
    target = _target(path, like, LABEL_SUFFIXES)
    try:
        out = io.write_labels(target, a, like, overwrite=True)
    except io.InputError as exc:
        return _refused(path, meta, exc)
    return [str(out)]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one Image layer (grey, RGB, volume or a probability/ψ map); returns the path
    (none, after a notification that says why, when the format cannot hold the data)."""
    a = _materialise(data)
    like = image_data_from_layer(a, meta)
    target = _target(path, like)
    try:
        if like.kind == "rgb" and io.suffix_of(target) in io.NIFTI_SUFFIXES:
            raise io.InputError("colour images are saved as TIFF (.tif), not NIfTI")
        out = io.write_image(target, a, like, overwrite=True)
    except io.InputError as exc:
        return _refused(path, meta, exc)
    return [str(out)]
