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
from napari.layers import Image, Labels

from ..inference.plan import InputPlan, plan_input
from ..io.layers import IO_KEY

#: Layer metadata key of everything this plugin puts on its output layers.
META = "prosma"
#: Metadata role of a labels layer kept for its corrections (never written into again).
CORRECTED_ROLE = "corrected"
#: Roles of the layers this plugin adds (never offered as inputs).
OUTPUT_ROLES = ("labels", "probability", "uncertainty", "psi", "zeros")
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


def by_name(layers: Sequence[Any], name: Any) -> Any:
    """The layer called ``name`` among ``layers``, or None."""
    return next((layer for layer in layers if layer.name == name), None)


def grid_of(image: Any) -> tuple[int, ...]:
    """The spatial shape of an image layer (colour axis dropped)."""
    shape = tuple(int(s) for s in np.shape(image.data))
    return shape[:-1] if getattr(image, "rgb", False) else shape


def kind_of(layer: Any) -> str | None:
    """``"rgb"``, ``"grey"`` or ``"volume"`` for an image layer (None for no layer)."""
    from ..report import image_kind

    if layer is None:
        return None
    return image_kind(len(grid_of(layer)), bool(getattr(layer, "rgb", False)))


def image_layers(viewer: Any) -> list[Any]:
    """The viewer's image layers that can be segmented (not this plugin's own maps)."""
    return [
        layer
        for layer in viewer.layers
        if isinstance(layer, Image) and (info_of(layer) or {}).get("role") not in OUTPUT_ROLES
    ]


def labels_layers(viewer: Any) -> list[Any]:
    """The viewer's labels layers."""
    return [layer for layer in viewer.layers if isinstance(layer, Labels)]


def slicing_axis(viewer: Any, ndim: int) -> int:
    """The axis of an ``ndim``-dimensional layer that the viewer steps through (the last
    one not displayed; 0 when every axis is shown)."""
    offset = viewer.dims.ndim - ndim
    hidden = [a - offset for a in viewer.dims.not_displayed if a >= offset]
    return int(hidden[-1]) if hidden else 0


def current_point(viewer: Any, layer: Any) -> Any:
    """The viewer's current position in ``layer``'s data coordinates."""
    offset = viewer.dims.ndim - layer.ndim
    return layer.world_to_data(viewer.dims.point[offset:])


def plan_for(viewer: Any, layer: Any, card: Any, scope: str = "whole") -> InputPlan:
    """How to segment image ``layer`` with a model of ``card`` (raises ``InputError``)."""
    point, axis = None, 0
    if layer.ndim >= 3:
        axis = slicing_axis(viewer, layer.ndim)
        point = current_point(viewer, layer)
    return plan_input(
        layer.data,
        rgb=bool(layer.rgb),
        spatial_dims=card.spatial_dims,
        scope=scope,
        point=point,
        slice_axis=axis,
        spacing=layer_spacing_mm(layer),
        multiscale=bool(layer.multiscale),
    )


def layer_spacing_mm(layer: Any) -> tuple[float, ...] | None:
    """The layer's voxel spacing in mm when known (read by this plugin, or napari units)."""
    meta = layer.metadata if isinstance(layer.metadata, Mapping) else {}
    src = meta.get(IO_KEY)
    if isinstance(src, dict) and src.get("unit") == "mm":
        return tuple(float(s) for s in layer.scale)
    if meta.get("unit") == "mm":
        return tuple(float(s) for s in layer.scale)
    try:
        units = [str(u) for u in layer.units]
    except AttributeError:
        return None
    if units and all(u in ("millimeter", "mm") for u in units):
        return tuple(float(s) for s in layer.scale)
    return None


def spacing_of(layer: Any) -> tuple[float, ...] | None:
    """A layer's pixel/voxel spacing in mm when known for each spatial axis, as Segment
    hands it to the engine (so that fine-tuning resamples as segmenting does)."""
    sp = layer_spacing_mm(layer)
    return sp if sp is not None and len(sp) == len(grid_of(layer)) else None


def geometry_kwargs(image_layer: Any) -> dict[str, Any]:
    """Layer keyword arguments that put a new layer on ``image_layer``'s grid, with the
    geometry metadata a writer needs (copied from the image layer)."""
    meta = image_layer.metadata if isinstance(image_layer.metadata, Mapping) else {}
    carried = {k: meta[k] for k in ("affine", "unit", "path", IO_KEY) if k in meta}
    if (
        IO_KEY in carried
        and isinstance(carried[IO_KEY], dict)
        and getattr(image_layer, "rgb", False)
    ):
        src = dict(carried[IO_KEY])  # the outputs are grey on the colour image's grid
        src["kind"] = "grey"
        src["shape"] = tuple(src.get("spatial_shape", ()))
        carried[IO_KEY] = src
    affine = getattr(getattr(image_layer, "affine", None), "affine_matrix", None)
    return {
        "scale": tuple(image_layer.scale),
        "translate": tuple(image_layer.translate),
        # an oblique scan is placed by its affine (issue 17): its outputs must be too
        "affine": None if affine is None else [list(map(float, r)) for r in affine],
        "metadata": carried,
    }


def fingerprint(data: Any) -> str:
    """SHA-256 of an array's dtype, shape and values (what was written into a layer)."""
    from ..fs import array_sha256

    return array_sha256(np.asarray(data))


def is_edited(layer: Any) -> bool:
    """True when ``layer``'s data differ from what the plugin last wrote into it (or the
    plugin does not know what it wrote: then it is not the plugin's to overwrite)."""
    written = (info_of(layer) or {}).get("written")
    return not isinstance(written, str) or fingerprint(layer.data) != written


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
    if isinstance(layer, Labels) and old.shape == data.shape and _fits(data, old.dtype):
        changed = np.nonzero(old != data)
        if changed[0].size <= UNDO_LIMIT:
            if changed[0].size:
                with layer.block_history():
                    layer.data_setitem(changed, data[changed])
            return
    layer.data = data
    # undo steps recorded on the old data would corrupt the new data: drop them (napari's
    # own method, on the layer behind the plugin proxy)
    reset = getattr(getattr(layer, "__wrapped__", layer), "_reset_history", None)
    if callable(reset):
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
        "made_by": info.get("made_by"),
        "class_names": info.get("class_names"),
        "prediction": prediction,
    }
    layer.metadata = {**layer.metadata, META: kept}


def layer_prediction(info: Any, shape: Sequence[int]) -> np.ndarray | None:
    """The model prediction a labels layer started from, on the layer's grid, or None.

    ``info`` is the layer's plugin metadata; its ``prediction`` is kept for whole-image and
    every-slice results (a *current slice* run does not say what the rest of the volume
    was) and for layers kept for their corrections.
    """
    if not isinstance(info, Mapping) or info.get("prediction") is None:
        return None
    pred = np.asarray(info["prediction"])
    return pred if tuple(pred.shape) == tuple(int(s) for s in shape) else None


def nothing_corrected(labels: np.ndarray, prediction: np.ndarray | None) -> bool:
    """True when the labels are exactly the model's own prediction (nothing to learn)."""
    return prediction is not None and np.array_equal(np.asarray(labels), prediction)


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
        if geo.get("affine") is not None:
            layer.affine = geo["affine"]
        layer.metadata = {**layer.metadata, **meta}
    else:
        if layer is not None:  # unedited, on another grid: replaced
            viewer.layers.remove(layer)
        layer = add(
            data,
            name=name,
            scale=geo["scale"],
            translate=geo["translate"],
            affine=geo.get("affine"),
            metadata=meta,
        )
    layer.metadata[META]["written"] = fingerprint(layer.data)
    return layer, kept


# ---------------------------------------------------------------------------- corrections


def labels_for(viewer: Any, image: Any) -> Any:
    """The labels layer that most likely holds the corrections of ``image``: one kept for
    its corrections, else its Segment labels, else the newest labels on its grid."""
    if image is None:
        return None
    layers = labels_layers(viewer)
    mine = [x for x in layers if (info_of(x) or {}).get("source_id") == uid(image)]
    # the Segment labels the user corrected since (after a fine-tune, the new result
    # they just corrected), else a layer kept for its corrections, else its Segment labels
    for layer in mine[::-1]:
        info = info_of(layer) or {}
        pred = layer_prediction(info, np.shape(layer.data))
        if info.get("role") == "labels" and pred is not None:
            if not nothing_corrected(np.asarray(layer.data), pred):
                return layer
    for role in (CORRECTED_ROLE, "labels"):
        for layer in mine[::-1]:
            if (info_of(layer) or {}).get("role") == role:
                return layer
    same = [layer for layer in layers if tuple(layer.data.shape) == grid_of(image)]
    return same[-1] if same else (layers[-1] if layers else None)


def other_pairs(viewer: Any, image: Any) -> list[tuple[Any, Any, np.ndarray]]:
    """``(image, labels layer, prediction)`` of the other images whose Segment labels
    differ from their prediction (corrected)."""
    out = []
    for other in image_layers(viewer):
        if image is not None and uid(other) == uid(image):
            continue
        for layer in labels_layers(viewer):
            info = info_of(layer) or {}
            mine = info.get("source_id") == uid(other)
            if not mine or info.get("role") not in ("labels", CORRECTED_ROLE):
                continue
            data = np.asarray(layer.data)
            pred = layer_prediction(info, data.shape)
            if pred is not None and not nothing_corrected(data, pred):
                out.append((other, layer, pred))
                break
    return out


def prediction_for(viewer: Any, labels: Any, image: Any) -> np.ndarray | None:
    """The last prediction of ``image`` on ``labels``' grid, if the plugin knows it (from
    ``labels`` itself, else from the image's Segment labels layer)."""
    shape = tuple(labels.data.shape)
    own = layer_prediction(info_of(labels), shape)
    if own is not None:
        return own
    seg = next(
        (
            layer
            for layer in labels_layers(viewer)
            if (info_of(layer) or {}).get("role") == "labels"
            and (info_of(layer) or {}).get("source_id") == uid(image)
        ),
        None,
    )
    return None if seg is None else layer_prediction(info_of(seg), shape)


def keep_corrections(viewer: Any, layer: Any, image: Any, prediction: Any) -> bool:
    """Before segmenting ``image`` again: take its Segment labels layer ``layer``, which
    holds the corrections, out of the plugin's hands (kept as ``"corrected"`` and renamed
    ``<image> corrected``; its data stay as they are). False when ``layer`` is not that."""
    info = info_of(layer) or {}
    if not (
        info.get("role") == "labels"
        and info.get("source_id") == uid(image)
        and uid(layer) in {uid(x) for x in viewer.layers}
    ):
        return False
    keep_as_corrected(layer, prediction)
    layer.name = f"{image.name} corrected"
    from ._placing import style_labels

    style_labels(layer, info.get("class_names") or [], "truth")
    return True
