"""Settings, progress and outcome of a fine-tuning run (Qt-free, no torch at import).

See :mod:`napari_prosma.finetune` for what a run does; these types are shared by the loop
(:mod:`.loop`), the store wrapper (:mod:`.run`), the CLI and the widget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..preprocess import InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import ModelCard

TRAINABLE = ("all", "decoder_gates", "gates")
#: Held-out units needed to split them into a selection part and a report part.
REPORT_SPLIT_MIN = 4
CANCEL_MESSAGE = "fine-tuning was cancelled; the previous model stays active"
NOT_IMPROVED = "the corrections did not improve the model; nothing was saved"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of a fine-tuning run (all recorded in the new model's card).

    Attributes:
        trainable: ``"all"``, ``"decoder_gates"`` (upsampling, gates, decoder, head) or
            ``"gates"`` (theta, W_x, W_g, f_ms, Psi and the channel MLP of every gate).
        max_steps: optimiser steps at most.
        time_budget_s: stop after this many seconds of training and its held-out
            evaluations (None: no limit); the measurements before training and the
            whole-image report come on top.
        lr: AdamW learning rate; ``weight_decay`` its decoupled weight decay.
        batch_size: patches per step.
        patch_size: training patch (default: the card's, capped by the data; 2D 192 on CPU).
        fg_fraction: fraction of patches centred on a foreground voxel.
        holdout_fraction: share of the corrected units held out to measure Dice (split
            into selection and report parts when there are :data:`REPORT_SPLIT_MIN` or more).
        eval_every: steps between held-out evaluations (early stopping keeps the best).
        min_evals: with a time budget, held-out evaluations a run that lasts its budget
            makes at least: one every ``time_budget_s / min_evals`` seconds of training as
            well as every ``eval_every`` steps (on a slow CPU the budget ends a run before
            many ``eval_every`` steps are done; the curve of held-out Dice then still has
            this many points besides the one before training).
        patience: evaluations without improvement before stopping.
        min_improvement: how much a held-out Dice must beat the best so far to count as
            better (2 or 3 held-out images: smaller changes are noise, and a "new version"
            that differs from its parent by 0.0001 only clutters the versions list).
        replay_fraction: share of each batch drawn from the base model's training samples
            when they are given (limits forgetting); ``batch_size * replay_fraction``
            patches per step, the fractional part drawn at random.
        replay_samples: base-model samples read for replay at most.
        forgetting_guard: replay samples kept out of replay training and measured at every
            held-out evaluation (when at least twice as many are given); a state is kept only
            if their Dice has not fallen by more than ``max_forgetting`` from the parent's.
            0: no guard.
        max_forgetting: the Dice the guard allows the parent's own images to lose.
        guard_from: where the guard's images come from: ``"validation"`` (default) draws
            ``forgetting_guard`` images of the *validation* part of the parent's split when
            replay reads its data set and the split has one (images the parent never
            trained on, so they behave like its test images; the replay samples are then
            all trained on), else falls back to ``"replay"``: the last replay samples, kept
            out of training (images the parent trained on and fits better than unseen ones,
            session 9: with them as the guard the Kvasir-SEG test part still lost 0.05-0.10).
        anchor: pull of every trainable weight back towards the parent's after each
            step, decoupled like AdamW's decay but towards the parent instead of zero
            (L2-SP): ``w -= lr * anchor * (w - w_parent)``. 0: none.
        slice_axis: the volume axis along which a 2D model takes corrected slices (and a
            3D model crops to the slab of corrected slices).
        whole_report: also segment the user's whole images and volumes with the parent
            before training and with the new model after it, for the report on every slice
            (:mod:`.whole`); the new model's pass is made anyway when it has sparse gates
            (its gate-sparsity range comes from it).
        device: ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.
        seed: random seed of the split, sampling and augmentation.
    """

    trainable: str = "decoder_gates"
    max_steps: int = 300
    time_budget_s: float | None = 120.0
    lr: float = 3e-5
    weight_decay: float = 1e-4
    batch_size: int = 4
    patch_size: Sequence[int] | None = None
    fg_fraction: float = 0.5
    holdout_fraction: float = 0.25
    eval_every: int = 20
    min_evals: int = 5
    patience: int = 4
    min_improvement: float = 0.005
    replay_fraction: float = 0.25
    replay_samples: int = 32
    forgetting_guard: int = 8
    max_forgetting: float = 0.02
    guard_from: str = "validation"
    anchor: float = 0.0
    slice_axis: int = 0
    whole_report: bool = True
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` (plain words) for settings that cannot work."""
        if self.trainable not in TRAINABLE:
            raise InputError(f"'trainable' must be one of {TRAINABLE}, not {self.trainable!r}")
        if self.max_steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise InputError("max_steps, batch_size and eval_every must be at least 1")
        if self.min_evals < 0:
            raise InputError("min_evals must be 0 or more")
        if not 0 <= self.holdout_fraction < 1:
            raise InputError("holdout_fraction must lie in [0, 1)")
        if not 0 <= self.replay_fraction < 1:
            raise InputError("replay_fraction must lie in [0, 1)")
        if not 0 <= self.min_improvement < 1:
            raise InputError("min_improvement must lie in [0, 1)")
        if self.forgetting_guard < 0 or not 0 <= self.max_forgetting <= 1:
            raise InputError("forgetting_guard must be 0 or more and max_forgetting in [0, 1]")
        if self.guard_from not in ("validation", "replay"):
            raise InputError("guard_from must be 'validation' or 'replay'")
        if not 0 <= self.anchor or self.anchor * self.lr >= 1:
            raise InputError("anchor must be 0 or more, and anchor * lr below 1")
        if self.slice_axis not in (0, 1, 2):
            raise InputError(f"slice_axis must be 0, 1 or 2, not {self.slice_axis}")


@dataclass
class FinetuneProgress:
    """What a progress callback receives.

    ``holdout_dice`` is the Dice on the selection part of the held-out units (the curve
    early stopping follows); in the ``"done"`` report it is that of the state kept.
    """

    step: int
    max_steps: int
    loss: float | None
    holdout_dice: float | None
    elapsed_s: float
    phase: str  # "before", "train", "eval", "whole" (segmenting the whole images), "done"


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune` (the model is the best state on the selection part).

    Attributes:
        dice_before, dice_after: mean Dice on the *report* part of the held-out units (what
            the regression guard decides on); None when nothing was held out.
        selection_before, selection_after: the same on the selection part.
        independent_report: True when the report part is disjoint from the selection part
            (see :data:`REPORT_SPLIT_MIN`); False means "after" is optimistic.
        n_train, n_select, n_report, n_holdout: training / selection / report / all
            held-out units.
        replay: what was replayed (:meth:`ReplaySet.record` plus patches used).
        notes: plain sentences for the user (replay, how trustworthy the report is).
        kept_parent: no held-out evaluation beat the parent, so the model returned is the
            parent's state (:func:`run_finetune` then saves nothing).
        whole: the parent and the new model on the user's whole images and volumes
            (:func:`~napari_prosma.finetune.whole.whole_report`; empty when not made).
    """

    model: Any
    card: ModelCard
    dice_before: float | None
    dice_after: float | None
    steps: int
    seconds: float
    stopped: str
    n_train: int
    n_holdout: int
    history: list[dict[str, float]] = field(default_factory=list)
    selection_before: float | None = None
    selection_after: float | None = None
    n_select: int = 0
    n_report: int = 0
    independent_report: bool = False
    replay: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kept_parent: bool = False
    whole: dict[str, Any] = field(default_factory=dict)

    @property
    def curve(self) -> list[tuple[int, float]]:
        """The held-out Dice as it went: ``(step, dice)`` from before training (step 0) to
        the last evaluation."""
        pts = [(0, self.selection_before)] if self.selection_before is not None else []
        pts += [(int(h["step"]), h["holdout_dice"]) for h in self.history if "holdout_dice" in h]
        return [(s, float(d)) for s, d in pts if d is not None]

    @property
    def improved(self) -> bool | None:
        """Whether the report-part Dice did not drop (None: nothing held out)."""
        if self.dice_before is None or self.dice_after is None:
            return None
        return self.dice_after >= self.dice_before


def min_units_for_report(fraction: float) -> int:
    """The fewest units whose held-out part (``fraction``) is split into selection and
    report parts (:func:`split_units`); 0 when none is held out."""
    if fraction <= 0:
        return 0
    n = REPORT_SPLIT_MIN + 1
    while min(max(round(n * fraction), 1), n - 1) < REPORT_SPLIT_MIN:
        n += 1
    return n
