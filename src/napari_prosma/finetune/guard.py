"""The forgetting guard of fine-tuning (issue 20): replay images the run does not train
on, measured at every held-out evaluation; a state that loses more than
``max_forgetting`` Dice on them is not kept."""

from __future__ import annotations

from typing import Any

from .config import FinetuneConfig
from .net import _freeze_norm_stats


def _guard_units(
    cfg: FinetuneConfig, replay: Any, units: list[Any], record: dict[str, Any], card: Any
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Split the guard off: ``(replay units to train on, guard units, replay record)``.

    With ``guard_from="validation"`` and a replay set that read validation images
    (``ReplaySet.guard``), those are the guard and every replay unit is trained on;
    otherwise the last ``forgetting_guard`` replay units (the set is a seeded pick in id
    order) are kept out of training, when at least twice as many are given.
    """
    from .units import _replay_units

    k = cfg.forgetting_guard
    if not k:
        return units, [], record
    val = list(getattr(replay, "guard", None) or [])[:k]
    if cfg.guard_from == "validation" and val:
        guard, _ = _replay_units(val, card)
        rec = {**record, "forgetting_guard": len(guard), "guard_from": "validation"}
        return units, guard, rec
    if len(units) < 2 * k:
        return units, [], record
    msg = f"{record.get('message', '')} ({k} of them not trained on: the forgetting guard)"
    rec = {**record, "forgetting_guard": k, "guard_from": "replay", "message": msg.strip()}
    return units[:-k], units[-k:], rec


def _new_task_replay(
    card: Any, class_names: list[str] | None, replay: Any, notes: list[str]
) -> Any:
    """``replay``, or None when ``class_names`` (checked, background first) differ from the
    parent's: a new task. The parent's images are labelled for its old classes, so replaying
    them would teach the old outlines as the new class, and holding the new model to them
    (the forgetting guard) would refuse it for learning what it was asked to. Says so in
    ``notes``."""
    old = list(card.class_names or [])
    if replay is None or class_names is None or class_names == old:
        return replay
    notes.append(
        f"new classes ({', '.join(class_names[1:])} instead of the parent's "
        f"{', '.join(old[1:])}): the parent's own images were neither replayed nor used to "
        "guard against forgetting; the new version is for the new task only"
    )
    return None


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
