"""Placing results into layers: a segmentation's labels and maps, and the gate maps.

Built on :mod:`._layers` (find, update-or-add, never over the user's edits); no Qt here
beyond napari's layer classes, no notifications (the widgets say what happened).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..inference.plan import InputPlan, SegResult, class_name, place
from ._layers import META, find, geometry_kwargs, info_of, same_source, uid, update_or_add

# ---------------------------------------------------------------------------- results


@dataclass
class Placed:
    """Where a result went: its labels layer, and an edited labels layer that was kept
    instead of being written into (None when there was none)."""

    labels: Any
    kept: Any = None


def place_result(viewer: Any, req: Mapping[str, Any], card: Any, result: SegResult) -> Placed:
    """Put a finished result into ``req["layer"]``'s output layers (main thread).

    Builds every array first, then changes the layers, so nothing is half-updated; maps
    not asked for this time are removed (they would be stale); the labels end on top and
    selected, ready for corrections. The labels layer's metadata records, as plain data,
    the model, the prediction (whole-image and every-slice runs) and the options asked for.

    Args:
        req: ``layer`` (the image), ``spec`` (the model), ``probabilities``,
            ``uncertainty`` (bools) and the other run options.
    """
    image = req["layer"]
    geo = geometry_kwargs(image)
    source = {"source": image.name, "source_id": uid(image)}
    options = {k: bool(req.get(k)) for k in ("tta", "probabilities", "uncertainty", "gates")}
    placed, produced = Placed(None), set()
    for role, name, arr, extra in _outputs(viewer, req, result):
        info = {"role": role, **source, **extra}
        if role == "labels":
            whole = result.plan.mode != "slice"
            info.update(
                model=req["spec"],
                mode=result.plan.mode,
                options=options,
                prediction=result.labels if whole else None,
                made_by=made_by(card, req["spec"]),
                class_names=list(result.class_names),
            )
        old = find(viewer, image, role, extra.get("class"))
        layer, kept = update_or_add(
            viewer, image, role, arr, info, geo, _adder(viewer, role, arr, image), name
        )
        if role != "labels" and old is not None and uid(old) == uid(layer):
            layer.reset_contrast_limits()
        produced.add(uid(layer))
        copy_units(image, layer)
        if role == "labels":
            placed = Placed(layer, kept)
            style_labels(layer, result.class_names, "prediction")
            if kept is not None:
                style_labels(kept, result.class_names, "truth")
    _drop_stale_maps(viewer, image, produced)
    labels = placed.labels
    top = len(viewer.layers) - 1
    if viewer.layers.index(labels) != top:
        viewer.layers.move(viewer.layers.index(labels), top + 1)
    viewer.layers.selection.active = labels
    return placed


def copy_units(image: Any, layer: Any) -> None:
    """Give an output layer the image's units when they are mm (sizes read in mm)."""
    from ._layers import layer_spacing_mm

    if layer_spacing_mm(image) is not None and layer.ndim == len(image.units or ()):
        try:
            layer.units = tuple(image.units)
        except (ValueError, TypeError):
            pass


def made_by(card: Any, spec: str) -> dict[str, Any]:
    """What made a result (model, store version, weights hash, date), as plain data."""
    from ..models import version_id_of
    from ..report import provenance

    return provenance(card, spec, version_id_of(spec))


def style_labels(layer: Any, names: Any, role: str) -> None:
    """Class names (hovering shows them) and colours on a labels layer: warm colours for a
    prediction, cool ones for ground truth and corrections (``role`` ``"truth"``)."""
    from napari.utils.colormaps import DirectLabelColormap

    from ..report import class_colours, class_names_for, label_features

    n = max(len(names), int(np.max(layer.data, initial=0)) + 1, 2)
    names = class_names_for(list(names), n)
    colours = {**class_colours(n, role), None: (0.6, 0.6, 0.6, 1.0)}
    layer.colormap = DirectLabelColormap(color_dict=colours)
    layer.features = label_features(names)
    info = info_of(layer)
    if info is not None:
        info["class_names"] = names


def _outputs(
    viewer: Any, req: Mapping[str, Any], result: SegResult
) -> list[tuple[str, str, np.ndarray, dict[str, Any]]]:
    """``(role, name, data, extra metadata)`` of every output layer of a result, on the
    image's grid (a *current slice* result placed into the existing layer's volume)."""
    image, plan = req["layer"], result.plan

    def existing(role: str, cls: str | None = None) -> np.ndarray | None:
        layer = find(viewer, image, role, cls)
        return None if layer is None else np.asarray(layer.data)

    labels = place(plan, result.labels, existing("labels"))
    if labels is result.labels:  # the layer gets painted on: keep the prediction intact
        labels = labels.copy()
    out = [("labels", f"{image.name} labels", labels, {})]
    if req.get("probabilities") and result.probabilities is not None:
        for k in range(1, result.probabilities.shape[0]):
            cls = class_name(result.class_names, k)
            arr = place(
                plan, result.probabilities[k].astype(np.float32), existing("probability", cls)
            )
            out.append(("probability", f"{image.name} P({cls})", arr, {"class": cls}))
    if req.get("uncertainty") and result.uncertainty is not None:
        arr = place(plan, result.uncertainty.astype(np.float32), existing("uncertainty"))
        out.append(("uncertainty", f"{image.name} uncertainty", arr, {}))
    return out


def _adder(viewer: Any, role: str, arr: np.ndarray, image: Any) -> Callable[..., Any]:
    """How a new output layer of ``role`` is added (labels, or a styled hidden map), with
    the image's units (napari warns of mixed units otherwise)."""
    units = tuple(image.units)
    if role == "labels":
        return functools.partial(viewer.add_labels, units=units)
    if role == "probability":
        style = {"colormap": "viridis", "contrast_limits": (0.0, 1.0), "opacity": 0.6}
    else:
        hi = float(arr.max()) if arr.size and arr.max() > 0 else 1.0
        style = {"colormap": "inferno", "contrast_limits": (0.0, hi), "opacity": 0.7}
    return functools.partial(
        viewer.add_image, blending="additive", visible=False, units=units, **style
    )


def _drop_stale_maps(viewer: Any, image: Any, produced: set[str]) -> None:
    """Maps from an earlier run that were not asked for this time would be stale."""
    for layer in list(viewer.layers):
        info = info_of(layer)
        if (
            info is not None
            and info.get("role") in ("probability", "uncertainty")
            and same_source(info, image)
            and uid(layer) not in produced
        ):
            viewer.layers.remove(layer)


# ---------------------------------------------------------------------------- gate maps


def gate_layer(viewer: Any, kind: str, stage: int, source_id: Any) -> Any:
    """The ``"psi"`` or ``"zeros"`` layer of decoder ``stage`` made from the image
    ``source_id``, or None."""
    for layer in viewer.layers:
        info = info_of(layer)
        if (
            info is not None
            and info.get("role") == kind
            and info.get("stage") == stage
            and info.get("source_id") == source_id
        ):
            return layer
    return None


def show_gate_layer(
    viewer: Any, labels: Any, plan: InputPlan, kind: str, stage: int, values: np.ndarray
) -> Any:
    """Show a gate map (``(*S)`` ψ or exact-zero fraction, on the segmented grid) of the
    result held by ``labels`` as a layer on its image's grid: updated when there is one,
    else added under the labels (which stay on top). Returns the layer.

    The map is drawn see-through over the scan (:data:`GATE_STYLE`: transparent where the
    value is low, coloured where high) with contrast limits spanning its values
    (:func:`gate_limits`), so that where it varies shows; limits the user changed are
    kept when the map is updated."""
    info = info_of(labels) or {}
    layer = gate_layer(viewer, kind, stage, info.get("source_id"))
    arr = place(plan, values.astype(np.float32), None if layer is None else layer.data)
    limits = gate_limits(values)
    geo = geometry_kwargs(labels)
    own = {
        "role": kind,
        "stage": stage,
        "source": info.get("source"),
        "source_id": info.get("source_id"),
        "limits": limits,
    }
    meta = {**geo["metadata"], META: own}
    if layer is not None and layer.ndim == arr.ndim:
        before = (info_of(layer) or {}).get("limits")
        untouched = before is not None and np.allclose(layer.contrast_limits, before)
        layer.data = arr
        layer.scale, layer.translate = geo["scale"], geo["translate"]
        if geo.get("affine") is not None:
            layer.affine = geo["affine"]
        if untouched:
            layer.contrast_limits = limits
            layer.metadata = {**layer.metadata, META: own}
        layer.visible = True
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    symbol = "ψ" if kind == "psi" else "zeros"
    layer = viewer.add_image(
        arr,
        name=f"{info.get('source')} {symbol} stage {stage}",
        contrast_limits=limits,
        scale=geo["scale"],
        translate=geo["translate"],
        affine=geo.get("affine"),
        metadata=meta,
        units=tuple(labels.units),  # added with them: napari warns of mixed units otherwise
        **gate_style(kind),
    )
    viewer.layers.move(viewer.layers.index(labels), len(viewer.layers))  # labels on top
    return layer


def gate_limits(values: np.ndarray, span: float = 0.1) -> tuple[float, float]:
    """Contrast limits for a gate map in [0, 1]: its 2nd to 98th percentile, at least
    ``span`` wide (a nearly constant map is not blown up into noise), within [0, 1]."""
    v = np.asarray(values, dtype=np.float32)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, [2, 98]))
    if hi - lo < span:  # widen around the middle, kept inside [0, 1]
        mid = min(max((lo + hi) / 2, span / 2), 1.0 - span / 2)
        lo, hi = mid - span / 2, mid + span / 2
    return max(0.0, lo), min(1.0, hi)


#: Colour of each gate map where its value is high (it fades to transparent below).
GATE_COLOURS = {"psi": (1.0, 0.84, 0.0), "zeros": (0.0, 0.78, 1.0)}


def gate_style(kind: str) -> dict[str, Any]:
    """Layer keywords of a gate map: a see-through colour ramp, translucent blending (the
    scan shows through where the gate is low, the colour marks where it is high)."""
    from napari.utils.colormaps import Colormap

    r, g, b = GATE_COLOURS[kind]
    # clear over the lower half of the contrast range, so the scan stays readable; the
    # colour grows over the upper half (where the gate is highest)
    ramp = Colormap(
        colors=[[r, g, b, 0.0], [r, g, b, 0.0], [r, g, b, 0.2], [r, g, b, 0.55]],
        controls=[0.0, 0.45, 0.75, 1.0],
        name=f"prosma {'ψ' if kind == 'psi' else 'zeros'}",
    )
    return {"colormap": ramp, "opacity": 0.9, "blending": "translucent"}
