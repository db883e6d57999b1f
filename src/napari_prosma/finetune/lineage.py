"""The fine-tuned model's card: its parent, the data it learnt from, settings and metrics.

Built by the loop (:func:`napari_prosma.finetune.finetune` returns it with the model);
:func:`napari_prosma.finetune.run_finetune` hands in the hashes that the model store
computed when it saved the corrections, so they are hashed once.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import ModelCard
from ..preprocess import InputError
from .config import FinetuneConfig, FinetuneResult, min_units_for_report

if TYPE_CHECKING:  # pragma: no cover
    from .loop import _Outcome, _Run

#: Characters a task text or class name may have at most.
MAX_TEXT = 200


def check_naming(
    card: ModelCard, task: str | None, class_names: Sequence[str] | None
) -> tuple[str | None, list[str] | None]:
    """The new version's task and class names as given, checked against the parent.

    Args:
        card: the parent's card.
        task: what the new model segments, in words (None or blank: the parent's).
        class_names: one name per class, background first (``K = max(out_channels, 2)``
            names), or the ``K - 1`` foreground names (the parent's background name is put
            first); None or empty: the parent's.

    Returns:
        ``(task, class_names)``: stripped, None where the parent's stay.

    Raises:
        InputError: blank or over-long names, repeated names, or a count that does not
            match the model's classes (the message names both).
    """
    task = task.strip() if isinstance(task, str) else None
    if task is not None and len(task) > MAX_TEXT:
        raise InputError(f"the task text is {len(task)} characters; {MAX_TEXT} at most")
    names = [str(n).strip() for n in class_names] if class_names else []
    if not names:
        return task or None, None
    k = max(card.out_channels, 2)
    if len(names) == k - 1:
        names = [card.class_names[0] if card.class_names else "background", *names]
    if len(names) != k:
        raise InputError(
            f"the model has {k} classes (background and {k - 1} more) but "
            f"{len(names)} class name(s) were given; give {k - 1} name(s) for what it "
            "finds, or all of them with the background first"
        )
    if any(not n or len(n) > MAX_TEXT for n in names):
        raise InputError(f"class names must not be blank nor longer than {MAX_TEXT} characters")
    if len(set(names)) != len(names):
        raise InputError(f"class names must differ from each other: {', '.join(names)}")
    return task or None, names


def data_entries(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    spacing: Sequence[Sequence[float] | None] | None,
    hashes: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One ``{"image_sha256", "labels_sha256"[, "spacing"]}`` entry per corrected image.

    Args:
        images, labels: the user's images and labels as given.
        spacing: per image, its spacing in mm, or None.
        hashes: entries with the two hashes already computed (by
            :meth:`~napari_prosma.versions.ModelStore.save_corrections`), else computed
            here with :func:`~napari_prosma.versions.correction_hashes`.
    """
    from ..versions import correction_hashes

    if hashes is None:
        hashes = correction_hashes(images, labels)
    spacing = list(spacing) if spacing is not None else [None] * len(images)
    out = []
    for k, h in enumerate(hashes):
        entry: dict[str, Any] = {
            "image_sha256": h["image_sha256"],
            "labels_sha256": h["labels_sha256"],
        }
        sp = spacing[k] if k < len(spacing) else None
        if sp is not None:
            entry["spacing"] = [float(s) for s in sp]
        out.append(entry)
    return out


def child_card(
    card: ModelCard,
    cfg: FinetuneConfig,
    data: list[dict[str, Any]],
    holdout: dict[str, Any],
    run: dict[str, Any],
    *,
    task: str | None = None,
    class_names: Sequence[str] | None = None,
    gate_range: tuple[dict[str, Any] | None, dict[str, Any] | None] | None = None,
    whole: dict[str, Any] | None = None,
) -> ModelCard:
    """The new model's card: the parent's, with lineage, data hashes, settings, metrics
    (``weights_sha256`` and ``card_sha256`` are filled in when it is saved).

    ``task`` and ``class_names`` (checked by :func:`check_naming`) replace the parent's
    ``intended_use`` and class names (a new task drops a modality the parent's card
    stated); ``gate_range`` is ``(range, how)`` measured on the new model
    (:func:`~napari_prosma.finetune.whole.gate_range`; ``(None, None)``: no sparse gate, so
    no range); ``whole`` the report on the whole images.
    """
    extra = dict(card.extra)
    # the parent's test numbers describe the parent on its test set, not this version
    metrics = {k: v for k, v in card.metrics.items() if k != "test"}
    if "test" in card.metrics:
        metrics["parent_test"] = card.metrics["test"]
    metrics["finetune_holdout"] = holdout
    if whole:
        metrics["finetune_whole"] = whole
    changes: dict[str, Any] = {}
    if task:
        changes["intended_use"] = task
        extra["parent_task"] = card.intended_use
        extra.pop("modality", None)
    if class_names:
        changes["class_names"] = list(class_names)
        extra["parent_class_names"] = list(card.class_names)
    if gate_range is not None:
        changes["gate_sparsity_range"] = gate_range[0]
        extra.pop("gate_sparsity_range_from", None)
        if gate_range[1]:
            extra["gate_sparsity_range_from"] = gate_range[1]
    return dataclasses.replace(
        card,
        **changes,
        extra=extra,
        parent_hash=card.weights_sha256,
        weights_sha256=None,
        card_sha256=None,
        created=None,
        metrics=metrics,
        training={
            "finetuned_from": card.name,
            "parent_training": card.training,
            "config": dataclasses.asdict(cfg),
            "data": data,
            **run,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )


def _notes(replay: dict[str, Any], fraction: float, n_report: int, independent: bool) -> list[str]:
    notes = [str(replay.get("message") or "")] if replay.get("message") != "replay is off" else []
    if n_report and not independent:
        notes.append(
            f"the held-out Dice is measured on the same {n_report} image(s)/slice(s) that chose "
            f"the state kept, so it is optimistic; with {min_units_for_report(fraction)} or "
            "more corrected images or slices, half of the held-out ones check the result "
            "independently"
        )
    elif not n_report:
        notes.append(
            "nothing was held out to measure the new model on (correct more images or slices)"
        )
    return [n for n in notes if n]


def _guard_notes(run: _Run, out: _Outcome) -> list[str]:
    """What the forgetting guard did, in plain words (nothing without a guard)."""
    if not run.guard or out.guard_before is None:
        return []
    n, lim = len(run.guard), run.cfg.max_forgetting
    what = (
        "validation images of the parent's data set (never trained on)"
        if run.replay_record.get("guard_from") == "validation"
        else "the parent's own training images (not trained on here)"
    )
    said = f"forgetting guard: {n} {what} scored Dice {out.guard_before:.3f} with the parent"
    if out.guard_kept is not None and out.beaten:
        said += f" and {out.guard_kept:.3f} with the state kept"
    if out.guard_rejected:
        said += (
            f"; {out.guard_rejected} state(s) that did better on your held-out corrections were "
            f"not kept because they lost more than {lim:.2f} Dice there"
        )
    return [said]


def _result(
    run: _Run,
    out: _Outcome,
    data: list[dict[str, Any]],
    label_notes: list[str],
    before: tuple[float | None, float | None],
    after: tuple[float | None, float | None],
    extras: dict[str, Any],
) -> FinetuneResult:
    """The outcome and the new card; ``before``/``after``: (selection, report) Dice;
    ``extras``: ``naming`` (task, class names), ``gate_range``, ``whole``."""
    cfg = run.cfg
    from .net import _release

    net = _release(run.net)
    seconds = run.elapsed()
    record = {**run.replay_record, "fraction": cfg.replay_fraction, "patches": out.replayed}
    holdout = {
        "dice_before": before[1],
        "dice_after": after[1],
        "n": len(run.rep),
        "selection_dice_before": before[0],
        "selection_dice_after": after[0],
        "n_selection": len(run.sel),
        "independent_report": run.independent,
        "forgetting_guard": {
            "n": len(run.guard),
            "max_forgetting": cfg.max_forgetting,
            "dice_parent": out.guard_before,
            "dice_kept": out.guard_kept,
            "states_refused": out.guard_rejected,
        },
    }
    return FinetuneResult(
        net.cpu(),
        child_card(
            run.card,
            cfg,
            data,
            holdout,
            _run_facts(run, out, record, seconds),
            task=extras["naming"][0],
            class_names=extras["naming"][1],
            gate_range=extras["gate_range"],
            whole=extras["whole"],
        ),
        before[1],
        after[1],
        out.step,
        seconds,
        out.stopped,
        len(run.train),
        run.n_holdout,
        out.history,
        selection_before=before[0],
        selection_after=after[0],
        n_select=len(run.sel),
        n_report=len(run.rep),
        independent_report=run.independent,
        replay=record,
        notes=label_notes
        + _notes(record, cfg.holdout_fraction, len(run.rep), run.independent)
        + _guard_notes(run, out),
        kept_parent=bool(run.sel) and not out.beaten,
        whole=extras["whole"],
    )


def _run_facts(run: _Run, out: _Outcome, record: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What the new card's ``training`` records about the run."""
    return {
        "n_train_units": len(run.train),
        "n_holdout_units": run.n_holdout,
        "n_selection_units": len(run.sel),
        "n_report_units": len(run.rep),
        "replay": record,
        "steps": out.step,
        "stopped": out.stopped,
        "seconds": round(seconds, 2),
        "device": str(run.device),
    }
