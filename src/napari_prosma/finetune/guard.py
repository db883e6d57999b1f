"""The forgetting guard of fine-tuning (issue 20): replay images the run does not train
on, measured at every held-out evaluation; a state that loses more than
``max_forgetting`` Dice on them is not kept."""

from __future__ import annotations

from typing import Any

from .config import FinetuneConfig
from .net import _freeze_norm_stats


def _guard_dice(run: Any, out: Any) -> float | None:
    """The forgetting guard's Dice now (None without a guard), recorded in the history."""
    if not run.guard:
        return None
    g = run.measure(run.guard)
    _freeze_norm_stats(run.net)
    out.history[-1]["guard_dice"] = g
    return g


def _remembers(cfg: FinetuneConfig, out: Any, g: float | None) -> bool:
    """Whether a state keeps the parent's own images: guard Dice within ``max_forgetting``
    of the parent's (always, without a guard)."""
    if g is None or out.guard_before is None:
        return True
    return g >= out.guard_before - cfg.max_forgetting
