"""What to segment, running it, and placing the result back on the layer's grid.

Qt-free (numpy; torch only when a model runs): the widgets and scripts plan through here.

Three ways to segment a layer (:func:`plan_input`):

- ``"image"``: the whole 2D image, or the whole volume with a 3D model (one ``predict``).
- ``"slices"``: a volume with a 2D model, every slice along ``slice_axis`` (one
  ``predict_batch``; the gates are then known per slice).
- ``"slice"``: the current slice of a volume with a 2D model; the result is placed into
  the volume's grid at ``slice_index`` (other slices of an existing result are kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..preprocess import InputError
from .gates import GateStage, _from_stage, _stack_stages

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard

MODES = ("image", "slices", "slice")
SCOPES = ("whole", "slice")


@dataclass
class InputPlan:
    """What a run segments and where its result goes.

    Attributes:
        mode: ``"image"``, ``"slices"`` or ``"slice"`` (see the module docstring).
        data: the array handed to the engine: the image/volume (``image``, ``slices``) or
            one slice (``slice``); colour kept last.
        grid: spatial shape of the layer (where the labels live).
        rgb: whether the layer's last axis is colour.
        slice_axis: the volume axis slices are taken along (``slices``/``slice``).
        slice_index: the slice segmented (``slice``).
        spacing: voxel spacing of ``data``'s spatial axes in mm, or None when unknown.
    """

    mode: str
    data: Any
    grid: tuple[int, ...]
    rgb: bool = False
    slice_axis: int | None = None
    slice_index: int | None = None
    spacing: tuple[float, ...] | None = None

    def describe(self) -> str:
        if self.mode == "slice":
            return f"slice {self.slice_index} (axis {self.slice_axis}) of the volume"
        if self.mode == "slices":
            n = self.grid[self.slice_axis or 0]
            return f"all {n} slices of the volume, one at a time (2D model)"
        return "the whole volume" if len(self.grid) == 3 else "the whole image"


def check_fit(what: str, *, ndim: int, rgb: bool, spatial_dims: int) -> None:
    """Refuse a 2D image (grey or colour) for a 3D model. Whether the data is colour comes
    from the layer or the file (the engine alone cannot tell an ``(H, W, 3)`` photo from a
    3-slice volume); a volume with a 2D model is segmented slice by slice instead.

    Raises:
        InputError: naming ``what`` (``"the layer"``, a file name).
    """
    if ndim == 2 and spatial_dims == 3:
        if rgb:
            raise InputError(
                f"{what} is a 2D colour image but the model segments 3D volumes; for a 2D "
                "image choose a 2D model"
            )
        raise InputError(
            f"{what} is a 2D image but the model segments 3D volumes; choose a 2D model"
        )


def plan_input(
    data: Any,
    *,
    rgb: bool,
    spatial_dims: int,
    scope: str = "whole",
    point: Sequence[float] | None = None,
    slice_axis: int = 0,
    spacing: Sequence[float] | None = None,
    multiscale: bool = False,
    what: str = "the layer",
) -> InputPlan:
    """Decide how to segment a layer's data with a model of ``spatial_dims`` dimensions.

    Args:
        data: the layer data (numpy, dask, ...; only a slice is read in ``"slice"`` mode).
        rgb: whether the last axis is colour.
        spatial_dims: the model's dimensions (2 or 3).
        scope: ``"whole"`` or ``"slice"`` (the current slice of a volume).
        point: the viewer's current position in the layer's data coordinates (``"slice"``).
        slice_axis: the volume axis that is not displayed (slices are taken along it).
        spacing: the layer's voxel spacing in mm, or None when unknown.
        multiscale: the layer is multiscale (refused: open the full-resolution image).
        what: how messages name the data (``"the layer"``, a file name).

    Raises:
        InputError: with a plain message when the layer and model do not fit.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    if multiscale:
        raise InputError(
            "this layer is a multi-resolution pyramid; open the full-resolution image to segment it"
        )
    shape = tuple(int(s) for s in np.shape(data))
    grid = shape[:-1] if rgb else shape
    sp = tuple(float(s) for s in spacing) if spacing is not None else None
    if len(grid) < 2 or len(grid) > 3:
        raise InputError(
            f"the layer has {len(grid)} spatial dimension(s) (shape {shape}); only 2D images "
            "and 3D volumes can be segmented (split time series or channels first)"
        )
    check_fit(what, ndim=len(grid), rgb=rgb, spatial_dims=spatial_dims)
    if len(grid) == 2:
        return InputPlan("image", data, grid, rgb, spacing=sp)
    # a volume
    if spatial_dims == 3:
        if rgb:
            raise InputError("a 3D model needs a greyscale volume, not a colour stack")
        if scope == "slice":
            raise InputError(
                "this model segments whole 3D volumes; choose 'whole volume' instead of "
                "'current slice'"
            )
        return InputPlan("image", data, grid, rgb, spacing=sp)
    axis = int(slice_axis)
    if not 0 <= axis < 3:
        raise ValueError("slice_axis must be 0, 1 or 2")
    plane_sp = None if sp is None else tuple(s for i, s in enumerate(sp) if i != axis)
    if scope == "whole":
        return InputPlan("slices", data, grid, rgb, slice_axis=axis, spacing=plane_sp)
    if point is None:
        raise ValueError("the current position is needed to segment the current slice")
    index = int(np.clip(round(float(point[axis])), 0, grid[axis] - 1))
    sl = [slice(None)] * len(shape)
    sl[axis] = index
    return InputPlan(
        "slice",
        np.asarray(data[tuple(sl)]),
        grid,
        rgb,
        slice_axis=axis,
        slice_index=index,
        spacing=plane_sp,
    )


@dataclass
class SegResult:
    """A finished run, ready to be placed into layers.

    Attributes:
        plan: what was segmented.
        labels: labels on the segmented grid (one slice in ``"slice"`` mode).
        probabilities: ``(K, *grid)`` class probabilities or None.
        uncertainty: ``(*grid)`` TTA spread or None.
        gates: per decoder stage, finest first.
        class_names: background first.
        notes: plain-words notes from the engine.
        device: where it ran.
        seconds: total time.
    """

    plan: InputPlan
    labels: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    gates: list[GateStage] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    seconds: float = 0.0


def run_segmentation(
    plan: InputPlan,
    model: torch.nn.Module,
    card: ModelCard,
    *,
    device: str = "auto",
    tta: bool = False,
    probabilities: bool = False,
    gates: bool | str = True,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
    tile_size: int | Sequence[int] | None = None,
    overlap: float = 0.5,
) -> SegResult:
    """Run the engine as ``plan`` says (in whatever thread calls it).

    ``gates`` is the engine's ``return_gates`` (True, ``"stats"`` for the numbers without
    maps, False); ``tile_size`` and ``overlap`` go to the engine as they are.
    """
    from .engine import predict, predict_batch

    kw = dict(
        device=device,
        tta=tta,
        return_probabilities=probabilities,
        return_gates=gates,
        progress=progress,
        cancel=cancel,
        spacing=plan.spacing,
        tile_size=tile_size,
        overlap=overlap,
    )
    if plan.mode == "slices":
        axis = plan.slice_axis or 0
        vol = np.asarray(plan.data)
        slices = [np.take(vol, i, axis=axis) for i in range(vol.shape[axis])]
        preds = predict_batch(slices, model, card, **kw)
        p0 = preds[0]
        probs = None
        if probabilities and p0.probabilities is not None:
            probs = np.stack([p.probabilities for p in preds], axis=axis + 1)
        unc = None
        if p0.uncertainty is not None:
            unc = np.stack([p.uncertainty for p in preds], axis=axis)
        return SegResult(
            plan=plan,
            labels=np.stack([p.labels for p in preds], axis=axis),
            probabilities=probs,
            uncertainty=unc,
            gates=_stack_stages(preds, axis),
            class_names=list(p0.class_names),
            notes=list(p0.notes),
            device=p0.device,
            seconds=float(p0.timings.get("total", 0.0)),
        )
    p = predict(plan.data, model, card, **kw)
    return SegResult(
        plan=plan,
        labels=p.labels,
        probabilities=p.probabilities,
        uncertainty=p.uncertainty,
        gates=[_from_stage(g) for g in p.gates],
        class_names=list(p.class_names),
        notes=list(p.notes),
        device=p.device,
        seconds=float(p.timings.get("total", 0.0)),
    )


def place(
    plan: InputPlan,
    values: np.ndarray,
    existing: np.ndarray | None = None,
    channels: bool = False,
) -> np.ndarray:
    """``values`` on the layer's grid: as they are for whole-image runs; for one slice,
    written into ``existing`` (copied, when it has the right shape) or into zeros.

    Args:
        channels: ``values`` has a leading channel axis (probabilities).
    """
    if plan.mode != "slice":
        return values
    lead = values.shape[:1] if channels else ()
    shape = (*lead, *plan.grid)
    if existing is not None and tuple(np.shape(existing)) == shape:
        out = np.array(existing, dtype=np.result_type(np.asarray(existing).dtype, values.dtype))
    else:
        out = np.zeros(shape, dtype=values.dtype)
    sl: list[Any] = [slice(None)] * len(shape)
    sl[len(lead) + (plan.slice_axis or 0)] = plan.slice_index
    out[tuple(sl)] = values
    return out


def class_name(names: Sequence[str], k: int) -> str:
    """Name of class ``k`` (``"class k"`` when the card names none)."""
    return names[k] if k < len(names) and names[k] else f"class {k}"
