"""Layers this plugin writes: find them, update them or add new ones, never overwrite edits.

Every output layer carries plain data under ``layer.metadata["prosma"]``: its ``role``
(``"labels"``, ``"probability"``, ...), the image it was made from (``source``,
``source_id``), and ``written``, a fingerprint of the data the plugin last wrote into it.
A labels layer whose data no longer match that fingerprint holds the user's edits: it is
never written into again (:func:`update_or_add` adds a new layer instead and keeps the
edited one as ``"corrected"``).

Updating an unedited labels layer in place goes through ``Labels.data_setitem`` inside one
``block_history``: the change is one undo step, so ``layer.undo()`` brings back the
previous result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: Layer metadata key of everything this plugin puts on its output layers.
META = "prosma"
#: Metadata role of a labels layer kept for its corrections (never written into again).
CORRECTED_ROLE = "corrected"
#: In-place updates that change more voxels than this replace the data wholesale (the
#: undo step would need 8 bytes per axis per changed voxel); nothing of the user's is lost
#: then, since only unedited layers are updated in place.
UNDO_LIMIT = 4_000_000


def uid(layer: Any) -> str:
    """A layer's lasting identity (napari hands plugins proxies: ``id()`` changes)."""
    return str(layer.unique_id)


def info_of(layer: Any) -> dict[str, Any] | None:
    """The plugin's metadata of ``layer`` (a dict), or None."""
    meta = layer.metadata if isinstance(layer.metadata, Mapping) else {}
    info = meta.get(META)
    return info if isinstance(info, dict) else None


def fingerprint(data: Any) -> str:
    """SHA-256 of an array's dtype, shape and values (what was written into a layer)."""
    from ..versions import array_sha256

    return array_sha256(np.asarray(data))


def is_edited(layer: Any) -> bool:
    """True when ``layer``'s data differ from what the plugin last wrote into it (or the
    plugin does not know what it wrote: then it is not the plugin's to overwrite)."""
    written = (info_of(layer) or {}).get("written")
    return not isinstance(written, str) or fingerprint(layer.data) != written


def _is_labels(layer: Any) -> bool:
    return type(layer).__name__ == "Labels" or hasattr(layer, "data_setitem")


def _fits(data: np.ndarray, dtype: np.dtype) -> bool:
    """Integer ``data`` whose values ``dtype`` holds."""
    if not (np.issubdtype(data.dtype, np.integer) and np.issubdtype(dtype, np.integer)):
        return False
    if data.size == 0:
        return True
    lim = np.iinfo(dtype)
    return lim.min <= int(data.min()) and int(data.max()) <= lim.max


def write_data(layer: Any, data: np.ndarray) -> None:
    """Put ``data`` into an existing layer; for a labels layer of the same shape as one
    undoable step (``layer.undo()`` restores what was there)."""
    old = np.asarray(layer.data)
    if _is_labels(layer) and old.shape == data.shape and _fits(data, old.dtype):
        changed = np.nonzero(old != data)
        if changed[0].size <= UNDO_LIMIT:
            if changed[0].size:
                with layer.block_history():
                    layer.data_setitem(changed, data[changed])
            return
    layer.data = data
    reset = getattr(layer, "_reset_history", None)
    if callable(reset):  # undo steps recorded on the old data would corrupt the new data
        reset()


def keep_as_corrected(layer: Any, prediction: np.ndarray | None) -> None:
    """Mark an edited labels layer as the user's: role ``"corrected"``, with the model
    prediction it started from (for fine-tuning); its data and name stay as they are."""
    info = dict(info_of(layer) or {})
    kept = {
        "role": CORRECTED_ROLE,
        "source": info.get("source"),
        "source_id": info.get("source_id"),
        "model": info.get("model"),
        "prediction": prediction,
    }
    layer.metadata = {**layer.metadata, META: kept}


def layer_prediction(info: Any, shape: Sequence[int]) -> np.ndarray | None:
    """The model prediction a labels layer started from, on the layer's grid, or None.

    ``info`` is the layer's plugin metadata: a Segment result (``result``; whole image or
    every slice of a volume; a *current slice* run does not say what the rest of the volume
    was) or a layer kept for its corrections (``prediction``).
    """
    if not isinstance(info, Mapping):
        return None
    pred = info.get("prediction")
    if pred is None:
        result = info.get("result")
        plan = getattr(result, "plan", None)
        if plan is None or plan.mode == "slice":
            return None
        pred = result.labels
    pred = np.asarray(pred)
    return pred if tuple(pred.shape) == tuple(int(s) for s in shape) else None


def same_source(info: Mapping[str, Any], image: Any) -> bool:
    """``info`` (an output layer's metadata) was made from the layer ``image``."""
    return info.get("source_id") == uid(image) or (
        info.get("source") == image.name and "source_id" not in info
    )


def find(viewer: Any, image: Any, role: str, cls: str | None = None) -> Any:
    """The output layer of ``role`` (and class ``cls``) made from ``image``, or None."""
    for layer in viewer.layers:
        info = info_of(layer)
        if (
            info is not None
            and info.get("role") == role
            and same_source(info, image)
            and (cls is None or info.get("class") == cls)
        ):
            return layer
    return None


def update_or_add(
    viewer: Any,
    image: Any,
    role: str,
    data: np.ndarray,
    info: dict[str, Any],
    geo: Mapping[str, Any],
    add: Callable[..., Any],
    name: str,
) -> tuple[Any, Any]:
    """Write ``data`` into ``image``'s output layer of ``role``, or into a new layer.

    A labels layer the user edited is never written into: it is kept as ``"corrected"``
    (:func:`keep_as_corrected`) and ``data`` goes to a new layer.

    Args:
        data: the layer data on ``image``'s grid.
        info: the plugin metadata of the layer (``role``, ``source``...; ``written`` is
            added here).
        geo: :func:`geometry_kwargs` of ``image``.
        add: ``add(data, name=..., scale=..., translate=..., metadata=...)`` makes the
            layer when there is none to update (``viewer.add_labels`` or a styled
            ``add_image``).
        name: the new layer's name (napari appends `` [1]`` when it is taken).

    Returns:
        ``(layer, kept)``: the layer written, and the edited layer that was kept (or None).
    """
    layer = find(viewer, image, role, info.get("class"))
    kept = None
    if layer is not None and role == "labels" and is_edited(layer):
        keep_as_corrected(layer, layer_prediction(info_of(layer), np.shape(layer.data)))
        kept, layer = layer, None
    meta = {**geo["metadata"], META: dict(info)}
    if layer is not None and layer.ndim == data.ndim:
        write_data(layer, data)
        layer.scale, layer.translate = geo["scale"], geo["translate"]
        layer.metadata = {**layer.metadata, **meta}
    else:
        if layer is not None:  # unedited, on another grid: replaced
            viewer.layers.remove(layer)
        layer = add(data, name=name, scale=geo["scale"], translate=geo["translate"], metadata=meta)
    layer.metadata[META]["written"] = fingerprint(layer.data)
    return layer, kept
