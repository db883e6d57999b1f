"""Fine-tuning into the model store: corrections saved first, a new version only when it
beats its parent, the regression guard on activation, and the words that tell the user
what happened (Qt-free).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import ModelCard, read_card, resolve, save
from ..errors import Cancelled, cancel_check
from ..preprocess import InputError
from ..versions import ModelStore, atomic_write_json
from .config import (
    CANCEL_MESSAGE,
    NOT_IMPROVED,
    FinetuneConfig,
    FinetuneProgress,
    FinetuneResult,
    min_units_for_report,
)
from .lineage import check_naming
from .loop import finetune
from .units import corrected_units

if TYPE_CHECKING:  # pragma: no cover
    from .replay import ReplaySet

ACTIVATE = ("if_better", "always", "never")


def run_finetune(
    parent: str | Path,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    store: ModelStore | None = None,
    config: FinetuneConfig | None = None,
    previous: Sequence[np.ndarray | None] | None = None,
    spacing: Sequence[Sequence[float] | None] | None = None,
    replay: ReplaySet | Sequence[tuple[Any, ...]] | str | Path | None = None,
    activate: str = "if_better",
    progress: Callable[[FinetuneProgress], None] | None = None,
    cancel: Any = None,
    task: str | None = None,
    class_names: Sequence[str] | None = None,
    label: str | None = None,
) -> tuple[FinetuneResult, str]:
    """Fine-tune ``parent`` (bundled name, checkpoint, or store version) into a new version.

    Bad input is refused before anything is written; the corrections are saved first; a
    version folder appears only complete and only when a held-out evaluation beat the
    parent (else :data:`NOT_IMPROVED`, nothing saved). ``activate``: ``"if_better"`` (keep
    the parent active when the report-part Dice got worse), ``"always"``, ``"never"``.
    ``replay``: ``"auto"``, a data set name, a folder, samples or None
    (:mod:`napari_prosma.finetune.replay`). ``task``/``class_names``: the new card's (None:
    the parent's; :func:`~napari_prosma.finetune.lineage.check_naming`); the gate range is
    always measured again. ``label``: the user's words in ``run.json`` and the version id
    (``<parent>-<label>-ft-<date>``; the task's first words when None).

    Returns:
        ``(result, version_id)``.

    Raises:
        InputError: bad input, a diverged loss, or no improvement (the message says where
            the corrections are kept). Cancelled: the user cancelled.
    """
    from ..checkpoint import load

    store = store or ModelStore()
    cfg = _checked(config, activate)
    cancelled = cancel_check(cancel)
    parent = store.version_of(parent) or parent  # a version is named by its id
    model, card = load(_parent_path(parent, store))
    task, class_names = check_naming(card, task, class_names)
    label = label.strip() if isinstance(label, str) and label.strip() else None
    replay = _load_replay(card, replay, cfg)
    # bad input is refused before anything is saved (no copy of it left in .incoming)
    corrected_units(images, labels, card, previous, spacing=spacing, slice_axis=cfg.slice_axis)
    recovered = store.recover()  # runs killed earlier: their corrections go to .incoming
    try:
        with store.staging(version_base(card.name, label or task)) as (vid, stage):
            hashes = store.save_corrections(
                stage / "corrections", list(images), list(labels), {"parent": str(parent)}
            )
            kw = {"previous": previous, "spacing": spacing, "replay": replay}
            kw |= {"progress": progress, "cancel": cancel, "hashes": hashes}
            kw |= {"task": task, "class_names": class_names}
            result = finetune(model, card, images, labels, config=cfg, **kw)
            del model  # the parent's copy: only the trained one is kept
            if cancelled():  # a cancel comes first, whatever the outcome
                raise Cancelled(CANCEL_MESSAGE)
            if result.kept_parent:  # no empty versions
                raise _not_improved(result)
            if recovered:
                result.notes.append(_recovered_note(store, recovered))
            _save_version(stage, vid, parent, card, result, cancelled, label)
    except (InputError, Cancelled) as e:
        raise _say_where_kept(e) from None
    if activate == "always" or (activate == "if_better" and result.improved is not False):
        store.activate(vid)
    return result, vid


def _checked(config: FinetuneConfig | None, activate: str) -> FinetuneConfig:
    """The run's config (default if None), validated, and ``activate`` checked."""
    cfg = config or FinetuneConfig()
    cfg.validate()
    if activate not in ACTIVATE:
        raise InputError("activate must be 'if_better', 'always' or 'never'")
    return cfg


def _load_replay(card: ModelCard, replay: Any, cfg: FinetuneConfig) -> Any:
    """Replay samples for ``run_finetune``: a name, folder or ``"auto"`` is loaded
    (:func:`~napari_prosma.finetune.replay.load_replay`); samples or None pass through."""
    if not isinstance(replay, (str, Path)):
        return replay
    from .replay import load_replay

    n_guard = cfg.forgetting_guard if cfg.guard_from == "validation" else 0
    return load_replay(card, replay, n=cfg.replay_samples, seed=cfg.seed, n_guard=n_guard)


def _recovered_note(store: ModelStore, recovered: Sequence[str]) -> str:
    """The note for corrections an interrupted earlier run left behind."""
    return (
        f"an earlier fine-tuning run in {store.root} was interrupted; the corrections it "
        f"had saved are kept in {store.root / '.incoming'} ({', '.join(recovered)})"
    )


def _parent_path(parent: str | Path, store: ModelStore) -> str:
    """The checkpoint to load for ``parent``: a store version's, else what
    :func:`~napari_prosma.checkpoint.resolve` finds (until :mod:`napari_prosma.models`
    resolves every kind of model name in one place)."""
    return store.checkpoint_of(parent) or str(resolve(parent))


def _save_version(
    stage: Path,
    vid: str,
    parent: str | Path,
    card: ModelCard,
    result: FinetuneResult,
    cancelled: Callable[[], bool],
    label: str | None = None,
) -> None:
    """Write the checkpoint and ``run.json`` into the staging folder (a cancel before or
    while they are written raises :class:`Cancelled`; the folder then goes)."""
    if cancelled():
        raise Cancelled(CANCEL_MESSAGE)
    result.card.name = vid
    save(result.model, stage / "model", result.card)
    saved = read_card(stage / "model")
    record = _run_record(parent, card, result)
    record.update(label=label, task=result.card.intended_use)
    record.update(weights_sha256=saved.weights_sha256, card_sha256=saved.card_sha256)
    atomic_write_json(stage / "run.json", record)
    if cancelled():  # while saving: the staging folder goes, the parent stays
        raise Cancelled(CANCEL_MESSAGE)


def _not_improved(result: FinetuneResult) -> InputError:
    """The refusal when no held-out evaluation beat the parent (nothing is saved)."""
    evals = [h["holdout_dice"] for h in result.history if "holdout_dice" in h]
    best = f"{max(evals):.3f}" if evals else "?"
    before = result.selection_before
    curve = ", ".join(f"{s}:{d:.3f}" for s, d in result.curve)
    guard = (result.card.metrics or {}).get("finetune_holdout", {}).get("forgetting_guard", {})
    refused = int(guard.get("states_refused") or 0)
    why = ""
    if refused:  # better on the corrections, but the parent's own images suffered
        worst = [h["guard_dice"] for h in result.history if "guard_dice" in h]
        own = (
            "validation images of its own data set"
            if result.replay.get("guard_from") == "validation"
            else "its own training images"
        )
        why = (
            f"; {refused} state(s) did better on your held-out corrections but were refused "
            f"because the model forgot what it knew: on {guard.get('n')} {own} its Dice fell "
            f"from {guard.get('dice_parent', float('nan')):.3f} "
            f"to as low as {min(worst):.3f} (at most {guard.get('max_forgetting'):.2f} allowed)"
        )
    exc = InputError(
        f"{NOT_IMPROVED} (held-out Dice {before:.3f} before training, at best {best} in "
        f"{len(evals)} evaluation(s) over {result.steps} steps; step:Dice {curve}){why}; the "
        "previous model stays active"
    )
    exc.result = result  # type: ignore[attr-defined]
    return exc


def _say_where_kept(e: Exception) -> Exception:
    """``e``, its message ending with where the staging folder kept the corrections."""
    kept = getattr(e, "kept_corrections", None)
    if kept is None:
        return e
    again = type(e)(f"{e}; your corrections are kept in {kept}")
    again.__dict__.update(e.__dict__)
    return again


def _run_record(parent: str | Path, card: ModelCard, result: FinetuneResult) -> dict[str, Any]:
    return {
        "parent": str(parent),
        "parent_hash": card.weights_sha256,
        "dice_before": result.dice_before,
        "dice_after": result.dice_after,
        "improved": result.improved,
        "independent_report": result.independent_report,
        "selection_dice_before": result.selection_before,
        "selection_dice_after": result.selection_after,
        "n_train": result.n_train,
        "n_selection": result.n_select,
        "n_report": result.n_report,
        "replay": {k: v for k, v in result.replay.items() if k != "ids"},
        "notes": result.notes,
        "steps": result.steps,
        "seconds": result.seconds,
        "stopped": result.stopped,
        "holdout_curve": result.curve,
        "whole": result.whole,
    }


def version_base(name: str, words: str | None) -> str:
    """The start of a new version's id: the parent's name, and the user's label (or the
    first words of the task) as a short slug, so ids say what the version is for."""
    if not words:
        return name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", words.lower()).strip("-")[:32].strip("-")
    return f"{name}-{slug}" if slug else name


def finetune_outcome(
    dice_before: float | None,
    dice_after: float | None,
    version: str,
    activated: bool,
    independent: bool = True,
) -> tuple[str, str]:
    """``(level, text)`` that tells the user what a finished fine-tuning run did; level is
    ``"info"`` or ``"warning"``. ``independent``: the held-out Dice was measured on
    corrections that did not also choose the state kept (else it is called optimistic)."""
    if dice_before is None or dice_after is None:
        measured = (
            "there was no held-out part of your corrections to measure it on (correct more "
            "images or slices for that)"
        )
    else:
        measured = f"held-out Dice {dice_before:.3f} → {dice_after:.3f}"
        if independent:
            measured += " (on the held-out images kept aside to check it, not the curve's)"
        else:
            measured += (
                " (optimistic: the same held-out images chose the state kept; with "
                f"{min_units_for_report(FinetuneConfig().holdout_fraction)} or more corrected "
                "images or slices, half the held-out ones check it independently)"
            )
    if activated:
        return "info", f"the new model {version} is active: {measured}"
    if dice_before is not None and dice_after is not None and dice_after < dice_before:
        return "warning", (
            f"the new model {version} did worse on the held-out part of your corrections "
            f"({measured}), so the previous model stays active; it is kept in the list of "
            "versions and can be activated anyway"
        )
    return "info", f"the new model {version} was saved but not activated: {measured}"
