"""The Qt-free part of the widgets: what to segment, running it, and reading the gates.

Nothing here imports Qt or napari, and torch only when a model runs, so it is tested
without a display and reused by scripts.

Three ways to segment a layer (:func:`plan_input`):

- ``"image"``: the whole 2D image, or the whole volume with a 3D model (one ``predict``).
- ``"slices"``: a volume with a 2D model, every slice along ``slice_axis`` (one
  ``predict_batch``; the gates are then known per slice).
- ``"slice"``: the current slice of a volume with a 2D model; the result is placed into
  the volume's grid at ``slice_index`` (other slices of an existing result are kept).

Gate sparsity range (``ModelCard.gate_sparsity_range``)
    ``{"stage1": [min, max], "stage2": [min, max], ...}``: for each decoder stage (1 =
    finest, full resolution), the lowest and highest *mean exact-zero fraction of z** (the
    stage's ``zero_frac_mean``, a number in [0, 1]) seen over the model's training images.
    :func:`gate_sparsity_range` computes it from predictions; :func:`sparsity_warnings`
    compares a scan with it. A scan outside the range is unlike what the model was
    trained on, and its segmentation deserves extra care.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ..finetune.run import finetune_outcome  # noqa: F401  (moved there)
from ..inference.types import (
    StageGates,
    gate_sparsity_range,  # noqa: F401  (re-exported)
)
from ..preprocess import InputError
from ..versions import VersionRow, version_rows  # noqa: F401  (moved there)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard
    from ..inference import Prediction

MODES = ("image", "slices", "slice")
SCOPES = ("whole", "slice")


# ---------------------------------------------------------------------------- input


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
    if len(grid) == 2:
        if spatial_dims == 3:
            raise InputError(
                "this model segments 3D volumes, but the layer is a 2D image; choose a 2D model"
            )
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


# ---------------------------------------------------------------------------- gates


@dataclass
class GateStage(StageGates):
    """One decoder stage's gates, on the layer's grid: a :class:`StageGates` plus per-slice
    values.

    ``c_slices`` / ``zero_frac_slices`` are per-slice values (``(Z, C_x)`` / ``(Z,)``) when
    a 2D model segmented a volume slice by slice; a 3D model's channel gate pools over each
    3D tile, so it is one vector for the whole volume (``c_slices`` is None).
    """

    c_slices: np.ndarray | None = None
    zero_frac_slices: np.ndarray | None = None

    def psi_pass_fraction(self, threshold: float = 0.5) -> float | None:
        """Fraction of the grid where ψ lets more than ``threshold`` through."""
        if self.psi is None or self.psi.size == 0:
            return None
        return float(np.mean(self.psi > threshold))


def _from_stage(g: StageGates) -> GateStage:
    """The engine's gates of one stage as a :class:`GateStage` (arrays shared, not copied)."""
    return GateStage(**{f.name: getattr(g, f.name) for f in fields(StageGates)})


def _stack_stages(preds: Sequence[Prediction], axis: int) -> list[GateStage]:
    """Per-slice predictions' gates as volume gates (maps stacked along ``axis``)."""
    if not preds or not preds[0].gates:
        return []
    out = []
    for k, first in enumerate(preds[0].gates):
        stages = [p.gates[k] for p in preds]

        def stack(attr: str, stages: list[StageGates] = stages) -> np.ndarray | None:
            vals = [getattr(s, attr) for s in stages]
            return None if any(v is None for v in vals) else np.stack(vals, axis=axis)

        def rows(attr: str, stages: list[StageGates] = stages) -> np.ndarray | None:
            vals = [getattr(s, attr) for s in stages]
            return None if any(v is None for v in vals) else np.stack(vals)

        zf_rows = rows("zero_frac")
        c_rows = rows("c")
        means = [s.zero_frac_mean for s in stages]
        out.append(
            GateStage(
                stage=first.stage,
                scale=first.scale,
                psi=stack("psi"),
                zero_map=stack("zero_map"),
                zero_frac=None if zf_rows is None else zf_rows.mean(0),
                zero_frac_mean=None if zf_rows is None else float(zf_rows.mean()),
                c=None if c_rows is None else c_rows.mean(0),
                lam=first.lam,
                c_slices=c_rows,
                zero_frac_slices=None
                if any(m is None for m in means)
                else np.asarray(means, dtype=np.float64),
            )
        )
    return out


def slice_sparsity(stage: GateStage, axis: int, index: int) -> float | None:
    """Mean exact-zero fraction of z* on one slice of a volume result (from the zero map)."""
    if stage.zero_frac_slices is not None and 0 <= index < len(stage.zero_frac_slices):
        return float(stage.zero_frac_slices[index])
    if stage.zero_map is None or stage.zero_map.ndim != 3:
        return None
    index = int(np.clip(index, 0, stage.zero_map.shape[axis] - 1))
    return float(np.take(stage.zero_map, index, axis=axis).mean())


def slice_channel_gate(stage: GateStage, index: int | None) -> tuple[np.ndarray | None, bool]:
    """``(c, per_slice)``: the channel gate of one slice when known per slice, else the
    whole result's (``per_slice`` False)."""
    if index is not None and stage.c_slices is not None and 0 <= index < len(stage.c_slices):
        return stage.c_slices[index], True
    return stage.c, False


def parse_sparsity_range(raw: Mapping[str, Any] | None) -> dict[int, tuple[float, float]]:
    """Read ``card.gate_sparsity_range`` (``{"stage1": [min, max], ...}``; keys ``"1"``
    or ``1`` are accepted too). Malformed entries are skipped."""
    out: dict[int, tuple[float, float]] = {}
    if not isinstance(raw, Mapping):
        return out
    for key, value in raw.items():
        text = str(key).lower().removeprefix("stage").strip("_ -")
        try:
            stage = int(text)
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(lo) and math.isfinite(hi) and lo <= hi:
            out[stage] = (lo, hi)
    return out


def sparsity_warnings(
    card_range: Mapping[str, Any] | None, gates: Iterable[GateStage]
) -> list[str]:
    """Plain-words warnings for stages whose exact-zero sparsity lies outside the range
    the card records for the training data (empty when in range or no range is known)."""
    ranges = parse_sparsity_range(card_range)
    out = []
    for g in gates:
        if g.stage not in ranges or g.zero_frac_mean is None:
            continue
        lo, hi = ranges[g.stage]
        v = g.zero_frac_mean
        if v < lo or v > hi:
            side = "fewer" if v < lo else "more"
            out.append(
                f"stage {g.stage}: {v:.0%} of the gate's responses are exactly zero, {side} than "
                f"on any training image ({fmt_range(lo, hi)}); this scan is unlike what the "
                "model was trained on, check the segmentation with extra care"
            )
    return out


def fmt_range(lo: float, hi: float) -> str:
    """``"12%–40%"``, with a decimal when whole percents would hide the difference."""
    for digits in (0, 1, 2):
        a, b = f"{lo:.{digits}%}", f"{hi:.{digits}%}"
        if a != b or lo == hi:
            return f"{a}–{b}"
    return f"{lo:.3%}–{hi:.3%}"


def describe_gates(gates: Sequence[GateStage]) -> list[str]:
    """One plain line per stage: how much z* removes, where ψ passes, what c keeps."""
    lines = []
    for g in gates:
        res = "full res." if g.scale == 1 else f"1/{g.scale} res."
        parts = []
        if g.zero_frac_mean is not None:
            parts.append(f"{g.zero_frac_mean:.0%} of z* exactly zero")
        passed = g.psi_pass_fraction()
        if passed is not None:
            parts.append(f"ψ passes > ½ on {passed:.0%} of the image")
        if g.c is not None:
            parts.append(f"mean c {float(np.mean(g.c)):.2f}")
        lines.append(f"Stage {g.stage} ({res}): " + "; ".join(parts or ["no gate"]))
    return lines


# ---------------------------------------------------------------------------- results


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
    gates: bool = True,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
) -> SegResult:
    """Run the engine as ``plan`` says (in whatever thread calls it)."""
    from ..inference import predict, predict_batch

    kw = dict(
        device=device,
        tta=tta,
        return_probabilities=probabilities,
        return_gates=gates,
        progress=progress,
        cancel=cancel,
        spacing=plan.spacing,
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


# ---------------------------------------------------------------------------- models


@dataclass
class ModelChoice:
    """An entry of the model chooser: a bundled name, a store version or a file."""

    label: str
    spec: str
    kind: str  # "bundled", "version", "file"


def model_choices(extra_files: Iterable[str] = ()) -> tuple[list[ModelChoice], str | None]:
    """Bundled models, the user's fine-tuned versions and added files; and the spec of the
    active model (from :class:`~napari_prosma.versions.ModelStore`), if any."""
    from ..checkpoint import list_bundled
    from ..versions import ModelStore

    choices = [ModelChoice(f"{n}  (bundled)", n, "bundled") for n in list_bundled()]
    active_spec = None
    try:
        store = ModelStore()
        versions = store.versions()
        active = store.active()
    except OSError:
        versions, active = [], None
    for v in versions:
        choices.append(ModelChoice(f"{v.id}  (fine-tuned)", str(v.checkpoint), "version"))
        if active == v.id:
            active_spec = str(v.checkpoint)
    if active_spec is None and active:
        if any(c.spec == active for c in choices):
            active_spec = active
    for f in extra_files:
        if not any(c.spec == f for c in choices):
            try:
                name = read_model_card(f).name
            except Exception:  # shown as unusable once selected
                name = ""
            base = os.path.basename(f)
            label = f"{name}  (file {base})" if name and name != base else f"{base}  (file)"
            choices.append(ModelChoice(label, f, "file"))
    if active_spec is not None:
        for c in choices:
            if c.spec == active_spec:
                c.label += "  ★ active"
    return choices, active_spec


_MODEL_CACHE: dict[tuple[str, float, str], tuple[Any, Any]] = {}


def get_model(spec: str, device: str = "auto") -> tuple[torch.nn.Module, ModelCard]:
    """Load (and cache, per file and device) a model; safe to call from a worker thread."""
    from ..checkpoint import checkpoint_paths, resolve
    from ..inference import load_model, resolve_device

    path = resolve(spec)
    weights, _ = checkpoint_paths(path)
    try:
        mtime = os.path.getmtime(weights)
    except OSError:
        mtime = 0.0
    key = (str(path), mtime, str(resolve_device(device)))
    if key not in _MODEL_CACHE:
        if len(_MODEL_CACHE) > 4:
            _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_model(path, device=device)
    return _MODEL_CACHE[key]


def read_model_card(spec: str) -> ModelCard:
    """The card of a model spec (bundled name or path), without loading weights."""
    from ..checkpoint import read_card, resolve

    return read_card(resolve(spec))


# ---------------------------------------------------------------------------- fine-tuning


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


def nothing_corrected(labels: np.ndarray, prediction: np.ndarray | None) -> bool:
    """True when the labels are exactly the model's own prediction (nothing to learn)."""
    return prediction is not None and np.array_equal(np.asarray(labels), prediction)
