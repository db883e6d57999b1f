"""Gate stacking, per-slice gate values and the gate sparsity range (Qt-free, numpy only).

Gate sparsity range (``ModelCard.gate_sparsity_range``)
    ``{"stage1": [min, max], "stage2": [min, max], ...}``: for each decoder stage (1 =
    finest, full resolution), the lowest and highest *mean exact-zero fraction of z** (the
    stage's ``zero_frac_mean``, a number in [0, 1]) seen over the model's training images.
    It is computed once (:func:`gate_sparsity_range`, from predictions with gates), stored
    in the card, read back (:func:`parse_sparsity_range`) and compared with a scan
    (:func:`sparsity_warnings`). A scan outside the range is unlike what the model was
    trained on, and its segmentation deserves extra care.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .types import StageGates

if TYPE_CHECKING:  # pragma: no cover
    from .types import Prediction


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
            d = _digits_apart(v, lo if v < lo else hi)
            out.append(
                f"stage {g.stage}: {v:.{d}%} of the gate's responses are exactly zero, {side} "
                f"than on any training image ({fmt_range(lo, hi, d)}); this scan is unlike "
                "what the model was trained on, check the segmentation with extra care"
            )
    return out


def _digits_apart(a: float, b: float, start: int = 0) -> int:
    """Decimals of a percent (at least ``start``, at most 3) that show ``a`` and ``b`` as
    different numbers (a scan at 0.2 % below a training range from 0.3 % read "0% ...,
    fewer than ... (0%–1%)")."""
    for digits in range(start, 3):
        if f"{a:.{digits}%}" != f"{b:.{digits}%}":
            return digits
    return 3


def fmt_range(lo: float, hi: float, min_digits: int = 0) -> str:
    """``"12%–40%"``, with a decimal when whole percents would hide the difference (at
    least ``min_digits`` decimals)."""
    d = min_digits if lo == hi else _digits_apart(lo, hi, min_digits)
    return f"{lo:.{d}%}–{hi:.{d}%}"


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


def gate_sparsity_range(
    predictions: Iterable[Prediction], margin: float = 0.0
) -> dict[str, list[float]]:
    """The ``gate_sparsity_range`` a model card records, from predictions made with
    ``return_gates=True`` on the training images: per stage ``[min, max]`` of
    ``zero_frac_mean``, widened by ``margin`` on both sides and clipped to [0, 1].

    A scan whose sparsity falls outside this range is unlike what the model was trained on
    (the plugin warns about it).
    """
    seen: dict[int, list[float]] = {}
    for p in predictions:
        for g in p.gates:
            if g.zero_frac_mean is not None:
                seen.setdefault(g.stage, []).append(float(g.zero_frac_mean))
    return {
        f"stage{s}": [max(0.0, min(v) - margin), min(1.0, max(v) + margin)]
        for s, v in sorted(seen.items())
    }
