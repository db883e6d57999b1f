"""Before a run, in plain words (Qt-free): how long it may take (:func:`estimate_run`, from
the tiles the engine will run and the speed measured in this session) and why the user
should think first (:func:`run_warning`: another modality, a spacing far from the
model's, a long run)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .report import card_modality

#: Seconds per tile-voxel on a CPU (from the 14-minute run of issue 16: the 3D MRI model on
#: the spleen CT, 320 tiles of 32×48×32, on the 2-core CPU of the project's test machine);
#: replaced by what runs measure in this session (:func:`record_rate`).
DEFAULT_RATE = {"cpu": 5.3e-5, "gpu": 1.0e-6}
_MEASURED: dict[str, float] = {}


@dataclass
class RunEstimate:
    """What a run will do: the grid the network runs on, tiles, and a time estimate."""

    work_shape: tuple[int, ...]
    n_tiles: int
    tile_voxels: int
    seconds: float
    measured: bool
    notes: list[str]


def record_rate(device: str, tile_voxels: int, seconds: float) -> None:
    """Remember how fast a finished run went on ``device`` (for later estimates)."""
    if tile_voxels > 0 and seconds > 0:
        _MEASURED["cpu" if device == "cpu" else "gpu"] = seconds / tile_voxels


def estimate_run(
    card: Any,
    grid: Sequence[int],
    spacing: Sequence[float] | None,
    *,
    device: str = "cpu",
    tta: bool = False,
    n_images: int = 1,
) -> RunEstimate:
    """Estimate a run of ``card`` on ``n_images`` images of spatial shape ``grid``."""
    from .inference.resample import working_shape
    from .inference.tiling import count_windows

    work, notes = working_shape(grid, spacing, card)
    tile = (
        tuple(min(int(t), int(w)) for t, w in zip(card.patch_size or work, work))
        if card.patch_size and len(card.patch_size) == len(work)
        else tuple(work)
    )
    n = count_windows(work, tile, [0.5] * len(work)) * n_images * (2 ** len(work) if tta else 1)
    voxels = n * math.prod(tile)
    key = "cpu" if device == "cpu" else "gpu"
    rate = _MEASURED.get(key, DEFAULT_RATE[key])
    return RunEstimate(tuple(work), n, voxels, voxels * rate, key in _MEASURED, notes)


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{max(s, 1):.0f} s"
    return f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def run_warning(
    card: Any,
    grid: Sequence[int],
    spacing: Sequence[float] | None,
    est: RunEstimate,
    *,
    image_is_ct: bool,
    slow_s: float = 60.0,
) -> str:
    """Why the user should think before running ("" when nothing is far off): another
    modality (the image looks like CT, the model was not trained on CT, or the reverse), a
    spacing more than twice finer or coarser than the model's, or a long run."""
    reasons = []
    modality = card_modality(card)
    if image_is_ct and modality and modality != "CT":
        reasons.append(f"the image looks like CT but the model was trained on {modality}")
    elif modality == "CT" and not image_is_ct and len(grid) == 3:
        reasons.append("the model was trained on CT but the image does not look like CT")
    if card.spacing and spacing is not None and len(spacing) == len(card.spacing):
        ratios = [float(s) / float(t) for s, t in zip(spacing, card.spacing)]
        if any(r > 2 or r < 0.5 for r in ratios):
            reasons.append(
                f"its voxels ({_mm(spacing)}) are far from the model's ({_mm(card.spacing)}): "
                f"it will be resampled {'×'.join(map(str, grid))} → "
                f"{'×'.join(map(str, est.work_shape))} voxels"
            )
    if est.seconds > slow_s:
        reasons.append("it is a long run")
    if not reasons:
        return ""
    how = "measured in this session" if est.measured else "a rough CPU estimate"
    return (
        "Before running: " + "; ".join(reasons) + f". Expected time about "
        f"{fmt_seconds(est.seconds)} ({est.n_tiles} tiles; {how})."
    )


def _mm(sp: Sequence[float]) -> str:
    return " × ".join(f"{float(s):.3g}" for s in sp) + " mm"
