"""npe2 hooks for DICOM: a reader (files and folders) and a DICOM-SEG writer for labels.

Registered in ``napari.yaml`` as their own reader and writer contributions, beside the
NIfTI/TIFF ones (whose module is untouched).

- Reader: one layer per series (a folder may hold several); a notification says which
  series were read and which not, with why. The layer's scale/translate (or affine, when
  oblique), the series' window as contrast limits and the geometry a writer needs are set.
- Writer: a Labels layer made on a DICOM image (its ``prosma_io`` metadata, copied by the
  Segment widget onto its outputs) is written as a SEG referencing the series; the model
  card the Segment widget keeps on its labels layer names the segments and the algorithm.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import ImageData
from ..oblique import layer_geometry
from . import read_dicom
from .scan import DICOM_SUFFIXES, looks_like_dicom
from .volume import contrast_limits

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | Sequence[str]) -> Callable[..., list[LayerData]] | None:
    """:func:`read_layers` when every path is a DICOM file or a folder holding DICOM."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths:
        return None
    for p in paths:
        named = str(p).lower().endswith(DICOM_SUFFIXES)
        if not (named and Path(p).is_file()) and not looks_like_dicom(p):
            return None
    return read_layers


def read_layers(path: str | Sequence[str]) -> list[LayerData]:
    """DICOM files/folders -> one napari image layer per series (refusals raise)."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    images, notes = read_dicom(paths)
    for note in notes:
        _notify(note, warning=note.startswith("not read"))
    for img in images:
        for w in img.warnings:
            _notify(f"{img.meta['dicom']['label']}: {w}", warning=True)
    return [layer_data(img) for img in images]


def layer_data(img: ImageData) -> LayerData:
    """An image read from DICOM as a napari layer data tuple."""
    from .._reader import IO_KEY, source_metadata

    info = img.meta["dicom"]
    kwargs: dict[str, Any] = {
        "name": info["label"],
        "metadata": {
            "affine": img.affine.copy(),
            "unit": img.unit,
            "path": str(img.path) if img.path else None,
            "warnings": list(img.warnings),
            IO_KEY: source_metadata(img),
        },
    }
    if img.kind == "rgb":
        kwargs["rgb"] = True
        kwargs.update(scale=tuple(img.spacing), translate=tuple(img.origin))
        return img.data, kwargs, "image"
    if img.kind == "volume":
        kwargs.update(layer_geometry(img.affine))
    else:
        kwargs.update(scale=tuple(img.spacing), translate=tuple(img.origin))
    kwargs["rgb"] = False  # napari would take a last axis of 3 or 4 slices for colour
    kwargs["colormap"] = "gray"
    limits = contrast_limits(info.get("window"))
    if limits is None and img.data.size:
        lo, hi = np.percentile(img.data, [0.5, 99.5])
        limits = (float(lo), float(hi)) if hi > lo else None
    if limits is not None:
        kwargs["contrast_limits"] = tuple(float(v) for v in limits)
    return img.data, kwargs, "image"


def write_seg_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer: one Labels layer as a DICOM Segmentation (``.dcm``)."""
    from .._reader import image_data_from_layer
    from .seg import write_seg

    a = np.asarray(data[0] if isinstance(data, list | tuple) else data)
    like = image_data_from_layer(a, meta, rgb=False)
    info = (meta.get("metadata") or {}).get("prosma") or {}
    # a card handed in by a script, else the one named by the layer's plain metadata
    card = (info.get("card") or _card_of(info)) if isinstance(info, dict) else None
    made = info.get("made_by") if isinstance(info, dict) else None
    version = made.get("version") if isinstance(made, dict) else None
    target = Path(path)
    if not target.name.lower().endswith(".dcm"):
        target = target.with_name(target.name + ".dcm")
    out = write_seg(
        target, a, like, card, version=version, algorithm_type="SEMIAUTOMATIC", overwrite=True
    )
    return [str(out)]


def _card_of(info: dict[str, Any]) -> Any:
    """The card of the model that made a labels layer: the layer's metadata holds plain data
    only (the model spec and its weights hash), so the card is read again (hash-checked) and
    used only when its weights are the ones that made the layer; else None (labels painted
    by hand are written as such)."""
    from ..models import read_model_card

    spec = info.get("model")
    if not spec:
        return None
    try:
        card = read_model_card(str(spec))
    except Exception:  # the model is gone or changed: the SEG says "manual"
        return None
    made = info.get("made_by")
    want = made.get("weights_sha256") if isinstance(made, dict) else None
    return card if want in (None, card.weights_sha256) else None


def _notify(message: str, warning: bool = False) -> None:
    try:
        from napari.utils.notifications import show_info, show_warning
    except ImportError:  # pragma: no cover - napari is there whenever this runs as a plugin
        import warnings

        warnings.warn(message, stacklevel=3)
    else:
        (show_warning if warning else show_info)(message)
