"""Fine-tune a model on a user's corrected labels (Qt-free).

:func:`finetune` trains a copy of the model in memory and returns it with before/after
held-out Dice; it writes nothing. :func:`run_finetune` wraps it with the model store
(:mod:`napari_prosma.versions`): the corrections are saved before training starts, the new
checkpoint goes into a fresh version folder (never over its parent), its card records the
lineage, and a regression guard keeps the parent active when held-out Dice got worse.
A cancel (the ``cancel`` flag, checked every step, inside every held-out evaluation and
once more after the checkpoint is written) raises :class:`~napari_prosma.inference.Cancelled`
and leaves the parent active and no version.

Held-out corrections (``FinetuneConfig.holdout_fraction`` of the training units, at least
one when there are two or more) are never trained on. They serve two purposes that must not
share images for the regression guard to mean anything:

- *selection*: early stopping and the choice of the state that is kept;
- *report*: the Dice before and after that the user is shown and the guard decides on.

With :data:`REPORT_SPLIT_MIN` (4) or more held-out units they are split in two (the larger
half reports). With fewer, both roles use the same units; the kept state was chosen on
them, so "after" is optimistic and the guard can hardly fire (``FinetuneResult.notes``
says so).

Volumes: a 3D model trains on the volume resampled to its card's spacing, as the inference
engine segments it (:func:`napari_prosma.inference.resample.working_shape`); a 2D model
learns from the corrected slices along ``FinetuneConfig.slice_axis``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .checkpoint import ModelCard, file_sha256, read_card, resolve, save
from .preprocess import InputError, prepare
from .versions import ModelStore, array_sha256, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .replay import ReplaySet

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
        time_budget_s: stop after this many seconds of training (None: no limit).
        lr: AdamW learning rate; ``weight_decay`` its decoupled weight decay.
        batch_size: patches per step.
        patch_size: training patch (default: the card's, capped by the data; 2D 192 on CPU).
        fg_fraction: fraction of patches centred on a foreground voxel.
        holdout_fraction: share of the corrected units held out to measure Dice (split
            into selection and report parts when there are :data:`REPORT_SPLIT_MIN` or more).
        eval_every: steps between held-out evaluations (early stopping keeps the best).
        patience: evaluations without improvement before stopping.
        replay_fraction: share of each batch drawn from the base model's training samples
            when they are given (limits forgetting); ``batch_size * replay_fraction``
            patches per step, the fractional part drawn at random.
        replay_samples: base-model samples read for replay at most.
        slice_axis: the volume axis along which a 2D model takes corrected slices (and a
            3D model crops to the slab of corrected slices).
        device: ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.
        seed: random seed of the split, sampling and augmentation.
    """

    trainable: str = "decoder_gates"
    max_steps: int = 300
    time_budget_s: float | None = 120.0
    lr: float = 3e-4
    weight_decay: float = 1e-4
    batch_size: int = 4
    patch_size: Sequence[int] | None = None
    fg_fraction: float = 0.5
    holdout_fraction: float = 0.25
    eval_every: int = 20
    patience: int = 4
    replay_fraction: float = 0.25
    replay_samples: int = 32
    slice_axis: int = 0
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` (plain words) for settings that cannot work."""
        if self.trainable not in TRAINABLE:
            raise InputError(f"'trainable' must be one of {TRAINABLE}, not {self.trainable!r}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise InputError("max_steps and batch_size must be at least 1")
        if not 0 <= self.holdout_fraction < 1:
            raise InputError("holdout_fraction must lie in [0, 1)")
        if not 0 <= self.replay_fraction < 1:
            raise InputError("replay_fraction must lie in [0, 1)")
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
    phase: str  # "before", "train", "eval", "done"


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

    @property
    def improved(self) -> bool | None:
        """Whether the report-part Dice did not drop (None: nothing held out)."""
        if self.dice_before is None or self.dice_after is None:
            return None
        return self.dice_after >= self.dice_before


class Unit(NamedTuple):
    """One training or held-out unit: an image (napari layout), its labels, its spacing."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...] | None = None


# ---------------------------------------------------------------------------- samples


def corrected_units(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    card: ModelCard,
    previous: Sequence[np.ndarray | None] | None = None,
    *,
    spacing: Sequence[Sequence[float] | None] | None = None,
    slice_axis: int = 0,
    notes: list[str] | None = None,
) -> list[Unit]:
    """Split the user's data into training units.

    A 2D model learns from 2D images and, for a volume, from its corrected slices along
    ``slice_axis``: those whose labels differ from the last prediction (``previous``), else
    all slices with any label. A 3D model learns from whole volumes, cropped to the slab of
    corrected slices along ``slice_axis``.

    Args:
        images: 2D grey ``(H, W)``, RGB ``(H, W, 3)`` or volumes ``(Z, Y, X)``.
        labels: integer labels on each image's grid.
        card: the model's card (dimensions, classes).
        previous: the last prediction per image (same grid), or None.
        spacing: per image, its voxel spacing in mm (napari order) or None when unknown.
        slice_axis: the volume axis slices are taken along (0, 1 or 2).
        notes: where to add what was done to the labels (0/255 masks taken as 0/1).

    Returns:
        Units ``(image, labels, spacing)``; a slice's spacing is its in-plane spacing;
        labels as int64 class numbers (:func:`check_labels`).

    Raises:
        InputError: shapes that don't match, label values that cannot be classes (see
            :func:`check_labels`), or nothing labelled.
    """
    if len(images) != len(labels):
        raise InputError(f"{len(images)} image(s) but {len(labels)} label image(s)")
    if slice_axis not in (0, 1, 2):
        raise InputError(f"slice_axis must be 0, 1 or 2, not {slice_axis}")
    previous = list(previous) if previous is not None else [None] * len(images)
    spacing = list(spacing) if spacing is not None else [None] * len(images)
    units: list[Unit] = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        img, lab = np.asarray(img), np.asarray(lab)
        lab, note = _check_pair(img, lab, card)
        if note and notes is not None and note not in notes:
            notes.append(note)
        prev = previous[k] if k < len(previous) else None
        sp = spacing[k] if k < len(spacing) else None
        sp = tuple(float(s) for s in sp) if sp is not None else None
        if lab.ndim == 3:
            units += _volume_units(img, lab, prev, sp, card, slice_axis)
        else:
            changed = prev is not None and np.shape(prev) == lab.shape and np.any(lab != prev)
            if changed or np.any(lab > 0) or prev is not None:
                units.append(Unit(img, lab, sp))
    if not units:
        raise InputError("no corrected or labelled image found: draw or correct labels first")
    return units


def _check_pair(
    img: np.ndarray, lab: np.ndarray, card: ModelCard
) -> tuple[np.ndarray, str | None]:
    """Refuse labels not on the image's grid; returns :func:`check_labels` of them."""
    spatial = img.shape[:-1] if img.ndim == lab.ndim + 1 else img.shape
    if tuple(spatial) != tuple(lab.shape):
        raise InputError(
            f"the labels (shape {lab.shape}) do not match the image (shape {img.shape})"
        )
    return check_labels(lab, card)


def _values(v: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(f"{x:g}" for x in v[:n].tolist())
    return shown + (f" and {v.size - n} more" if v.size > n else "")


def check_labels(
    lab: np.ndarray, card: ModelCard, what: str = "the labels"
) -> tuple[np.ndarray, str | None]:
    """The one check of label values, used by the CLI, the widget and replay alike.

    Labels are class numbers ``0 .. K-1`` (``K = max(out_channels, 2)``, 0 = background).
    A binary mask stored as ``{0, m}`` with ``m > 1`` (0/255, as Kvasir-SEG, BUSI and most
    tools store masks) is taken as ``{0, 1}`` for a binary model, and said. Whole-number
    floats are taken as integers.

    Args:
        lab: a label array ``(*S)`` of any numeric dtype.
        card: the model's card (number and names of its classes).
        what: how messages name the labels.

    Returns:
        ``(labels, note)``: int64 labels ``(*S)`` and a sentence for the user when the
        values were mapped (else None).

    Raises:
        InputError: non-numbers, NaN, fractional or negative values, or classes the model
            does not know; the message names the values.
    """
    lab = np.asarray(lab)
    k = max(card.out_channels, 2)
    names = ", ".join(card.class_names) or "?"
    if lab.dtype.kind == "b":
        return lab.astype(np.int64), None
    if lab.dtype.kind not in "iuf":
        raise InputError(f"{what} must be integers, not {lab.dtype}")
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all():
            raise InputError(f"{what} contain NaN or infinite values; labels are class numbers")
        frac = np.unique(lab[lab != np.round(lab)])
        if frac.size:
            raise InputError(
                f"{what} hold fractional values ({_values(frac)}); labels are whole class "
                f"numbers (0 = background, 1 … {k - 1} = {names}): round or threshold them first"
            )
    if lab.size and lab.min() < 0:
        neg = np.unique(lab[lab < 0])
        raise InputError(
            f"{what} hold negative values ({_values(neg)}); labels are class numbers "
            f"0 … {k - 1} ({names}); mark what is not labelled as 0 (background)"
        )
    out = lab.astype(np.int64)
    if not out.size or int(out.max()) < k:
        return out, None
    top = int(out.max())
    values = np.unique(out)
    if k == 2 and (values.tolist() == [0, top] or values.tolist() == [255]):
        fg = card.class_names[1] if len(card.class_names) > 1 else "foreground"
        return (out > 0).astype(np.int64), (
            f"{what} are stored as 0 and {top}: taken as 0 = background, {top} = {fg}"
        )
    raise InputError(
        f"{what} use class {top} but the model knows {k} classes ({names})"
        + (f"; values found: {_values(values.astype(float))}" if values.size > 1 else "")
    )


def _volume_units(
    img: np.ndarray,
    lab: np.ndarray,
    prev: np.ndarray | None,
    sp: tuple[float, ...] | None,
    card: ModelCard,
    axis: int,
) -> list[Unit]:
    """The corrected slices (2D model) or slab (3D model) of one volume."""
    others = tuple(a for a in range(3) if a != axis)
    rows = np.array([], int)
    if prev is not None and np.shape(prev) == lab.shape:
        rows = np.flatnonzero(np.any(lab != np.asarray(prev), axis=others))
    if rows.size == 0:
        rows = np.flatnonzero(np.any(lab > 0, axis=others))
    if rows.size == 0:
        return []
    if card.spatial_dims == 2:
        plane = None if sp is None else tuple(s for a, s in enumerate(sp) if a != axis)
        return [
            Unit(np.take(img, int(z), axis=axis), np.take(lab, int(z), axis=axis), plane)
            for z in rows
        ]
    sl: list[Any] = [slice(None)] * img.ndim
    sl[axis] = slice(int(rows.min()), int(rows.max()) + 1)
    return [Unit(img[tuple(sl)], lab[tuple(sl[:3])], sp)]


def split_units(
    n: int, fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int], list[int]]:
    """Indices ``(train, selection, report)`` of ``n`` units.

    ``round(n * fraction)`` units are held out (at least one when ``fraction > 0`` and
    ``n >= 2``; never all). With :data:`REPORT_SPLIT_MIN` or more, the first half of them
    (in random order) selects the kept state and the rest reports; with fewer, selection
    and report are the same units.
    """
    order = rng.permutation(n).tolist()
    n_hold = min(max(round(n * fraction), 1 if fraction > 0 and n >= 2 else 0), n - 1)
    hold = order[:n_hold]
    train = sorted(order[n_hold:])
    if n_hold >= REPORT_SPLIT_MIN:
        half = n_hold // 2
        return train, sorted(hold[:half]), sorted(hold[half:])
    return train, sorted(hold), sorted(hold)


# ---------------------------------------------------------------------------- tensors


def _sample_patch(
    x: np.ndarray, y: np.ndarray, patch: Sequence[int], fg: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A patch ``(C, *patch)`` / ``(*patch)`` from ``x (C, *S)``, ``y (*S)``, zero-padded."""
    shape = y.shape
    pad = [(0, max(p - s, 0)) for p, s in zip(patch, shape)]
    if any(p[1] for p in pad):
        x = np.pad(x, [(0, 0), *pad])
        y = np.pad(y, pad)
        shape = y.shape
    if fg and np.any(y > 0):
        pts = np.argwhere(y > 0)
        centre = pts[rng.integers(len(pts))]
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, shape)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return x[(slice(None), *sl)], y[sl]


def _augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips of every spatial axis, a 90° rotation in-plane where square, and a
    random intensity scale/shift; ``x (B, C, *S)``, ``y (B, *S)``."""
    import torch

    sd = y.ndim - 1
    for ax in range(sd):
        if torch.rand((), generator=gen) < 0.5:
            x, y = x.flip(2 + ax), y.flip(1 + ax)
    if x.shape[-1] == x.shape[-2] and torch.rand((), generator=gen) < 0.5:
        x, y = x.transpose(-1, -2), y.transpose(-1, -2)
    b = x.shape[0]
    shape = (b, 1) + (1,) * sd
    scale = 1 + 0.1 * (2 * torch.rand(shape, generator=gen) - 1)
    shift = 0.1 * (2 * torch.rand(shape, generator=gen) - 1)
    return x * scale.to(x.device) + shift.to(x.device), y


def trainable_parameters(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """Parameters to train for ``which`` in :data:`TRAINABLE`; the rest are frozen."""
    if which not in TRAINABLE:
        raise InputError(f"'trainable' must be one of {TRAINABLE}")
    if which == "all":
        params = list(model.parameters())
    else:
        mods = (
            [model.gates]
            if which == "gates"
            else [model.ups, model.gates, model.decoder, model.head]
        )
        params = [p for m in mods for p in m.parameters()]
    if not params:
        raise InputError(f"this model has nothing to train for {which!r} (plain skips?)")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def _loss_fn(card: ModelCard) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from .losses import bce_dice_loss, dice_ce_loss

    if card.out_channels == 1:
        return lambda logits, y: bce_dice_loss(logits, (y > 0)[:, None].float())
    return lambda logits, y: dice_ce_loss(logits, y.long())


def _freeze_norm_stats(model: torch.nn.Module) -> None:
    """Keep BatchNorm running statistics fixed: a few patches would corrupt them."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def holdout_dice(
    model: Any,
    card: ModelCard,
    units: Sequence[Unit | tuple[np.ndarray, np.ndarray]],
    device: str,
    cancel: Any = None,
) -> float | None:
    """Mean foreground Dice of the model on held-out units, through the inference engine
    (resampled to the card's spacing / input size and back, as a user's image is).

    Raises:
        Cancelled: ``cancel`` was set during the evaluation.
    """
    from .inference import Cancelled, predict
    from .metrics import dice

    if not units:
        return None
    scores = []
    was_training = model.training
    model.eval()
    try:
        for u in units:
            img, lab = u[0], u[1]
            sp = u[2] if len(u) > 2 else None
            try:
                pred = predict(img, model, card, device=device, spacing=sp, cancel=cancel)
            except Cancelled:
                raise Cancelled(CANCEL_MESSAGE) from None
            if card.out_channels == 1:
                lab = (lab > 0).astype(np.uint8)
            classes = range(1, max(card.out_channels, 2))
            per = [dice(pred.labels == c, lab == c) for c in classes if np.any(lab == c)]
            if not per:  # nothing to find: perfect only if nothing was predicted
                per = [1.0 if not np.any(pred.labels > 0) else 0.0]
            scores.append(float(np.mean(per)))
    finally:
        model.train(was_training)
    return float(np.mean(scores))


# ---------------------------------------------------------------------------- engine


def finetune(
    model: torch.nn.Module,
    card: ModelCard,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    config: FinetuneConfig | None = None,
    previous: Sequence[np.ndarray | None] | None = None,
    spacing: Sequence[Sequence[float] | None] | None = None,
    replay: ReplaySet | Sequence[tuple[Any, ...]] | None = None,
    progress: Callable[[FinetuneProgress], None] | None = None,
    cancel: Callable[[], bool] | Any | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on corrected labels; the input model is not changed.

    Args:
        model: the parent network (any device; it is copied).
        card: its model card.
        images: raw images in napari layout (2D grey ``(H, W)``, RGB ``(H, W, 3)``, volumes
            ``(Z, Y, X)``), as the user sees them.
        labels: integer label arrays on the images' grids (0 = background).
        config: hyper-parameters (defaults: :class:`FinetuneConfig`).
        previous: the last prediction per image, to find which slices were corrected.
        spacing: per image, its voxel spacing in mm (napari order), or None when unknown;
            a 3D model then trains on the volume resampled to its card's spacing.
        replay: base-model training samples: a :class:`~napari_prosma.replay.ReplaySet`
            or ``(image, labels[, spacing])`` tuples; None: no replay.
        progress: called with a :class:`FinetuneProgress` after every step and evaluation.
        cancel: a callable returning True, or a ``threading.Event``, to stop at once.

    Returns:
        :class:`FinetuneResult` with the best model on the selection part and a card for it
        (no file written; see :func:`run_finetune`).

    Raises:
        InputError: unusable inputs. Cancelled: the user cancelled.
    """
    import torch

    from .inference import Cancelled
    from .inference.device import autocast, memory_format, resolve_device

    cfg = config or FinetuneConfig()
    cfg.validate()
    cancelled = _cancel_check(cancel)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    label_notes: list[str] = []
    units = corrected_units(
        images, labels, card, previous, spacing=spacing, slice_axis=cfg.slice_axis,
        notes=label_notes,
    )
    train_idx, sel_idx, rep_idx = split_units(len(units), cfg.holdout_fraction, rng)
    train_units = [units[i] for i in train_idx]
    sel_units = [units[i] for i in sel_idx]
    rep_units = [units[i] for i in rep_idx]
    independent = bool(rep_units) and set(sel_idx).isdisjoint(rep_idx)
    replay_units, replay_record = _replay_units(replay, card)
    device = resolve_device(cfg.device)

    def report(step: int, loss: float | None, d: float | None, phase: str) -> None:
        if progress is not None:
            progress(
                FinetuneProgress(step, cfg.max_steps, loss, d, time.perf_counter() - t0, phase)
            )

    def check() -> None:
        if cancelled():
            raise Cancelled(CANCEL_MESSAGE)

    fmt = memory_format(device, card.spatial_dims)  # channels-last: faster on CPU and CUDA
    net = copy.deepcopy(model).to(device, memory_format=fmt)
    sel_before = holdout_dice(net, card, sel_units, str(device), cancelled)
    rep_before = (
        holdout_dice(net, card, rep_units, str(device), cancelled) if independent else sel_before
    )
    report(0, None, sel_before, "before")
    check()

    prep = [_working(u, card) for u in train_units]
    rep = [_working(u, card) for u in replay_units]
    patch = _patch_size(cfg, card, [y.shape for _, y in prep], device.type)
    loss_fn = _loss_fn(card)
    params = trainable_parameters(net, cfg.trainable)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the state kept: the best on the selection part; with nothing held out, the last one
    best_state = copy.deepcopy(net.state_dict()) if sel_units else None
    best = sel_before if sel_before is not None else -math.inf
    history: list[dict[str, float]] = []
    stale, stopped, step, replayed = 0, "max_steps", 0, 0
    beaten = False  # whether an evaluation beat the parent on the selection part
    net.train()
    _freeze_norm_stats(net)
    for step in range(1, cfg.max_steps + 1):
        check()
        xb, yb, n_rep = _batch(prep, rep, cfg, patch, rng, gen)
        replayed += n_rep
        xb, yb = xb.to(device).contiguous(memory_format=fmt), yb.to(device)
        with autocast(device):  # bf16 on CUDA only: CPU bf16 training diverged (NaN)
            logits = net(xb)
        loss = loss_fn(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        if not math.isfinite(lv):  # never save (or activate) a diverged model
            raise InputError(
                "fine-tuning diverged (the loss became infinite or NaN); the previous model "
                "stays active. Try a lower learning rate or training fewer layers"
            )
        history.append({"step": step, "loss": lv})
        report(step, lv, None, "train")
        out_of_time = cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s
        if sel_units and (step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time):
            d = holdout_dice(net, card, sel_units, str(device), cancelled)
            _freeze_norm_stats(net)
            history[-1]["holdout_dice"] = d
            report(step, lv, d, "eval")
            if d is not None and d > best:
                best, stale, beaten = d, 0, True
                best_state = copy.deepcopy(net.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    stopped = "early_stopping"
                    break
        if out_of_time:
            stopped = "time_budget"
            break
    check()
    if best_state is not None:
        net.load_state_dict(best_state)
    sel_after = best if sel_units else None
    if independent:
        rep_after = holdout_dice(net, card, rep_units, str(device), cancelled)
    elif sel_units:  # measured again on the kept state (what the user gets)
        rep_after = sel_after = holdout_dice(net, card, sel_units, str(device), cancelled)
    else:
        rep_after = None
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    net = net.to(memory_format=torch.contiguous_format)  # checkpoints store plain layouts
    seconds = time.perf_counter() - t0
    report(step, None, sel_after, "done")
    replay_record = {**replay_record, "fraction": cfg.replay_fraction, "patches": replayed}
    notes = label_notes + _notes(replay_record, cfg.holdout_fraction, len(rep_units), independent)
    new_card = _child_card(
        card, cfg, images, labels, spacing,
        holdout={
            "dice_before": rep_before,
            "dice_after": rep_after,
            "n": len(rep_units),
            "selection_dice_before": sel_before,
            "selection_dice_after": sel_after,
            "n_selection": len(sel_units),
            "independent_report": independent,
        },
        run={
            "n_train_units": len(train_units),
            "n_holdout_units": len(set(sel_idx) | set(rep_idx)),
            "n_selection_units": len(sel_units),
            "n_report_units": len(rep_units),
            "replay": replay_record,
            "steps": step,
            "stopped": stopped,
            "seconds": round(seconds, 2),
            "device": str(device),
        },
    )
    return FinetuneResult(
        net.cpu(),
        new_card,
        rep_before,
        rep_after,
        step,
        seconds,
        stopped,
        len(train_units),
        len(set(sel_idx) | set(rep_idx)),
        history,
        selection_before=sel_before,
        selection_after=sel_after,
        n_select=len(sel_units),
        n_report=len(rep_units),
        independent_report=independent,
        replay=replay_record,
        notes=notes,
        kept_parent=bool(sel_units) and not beaten,
    )


def _batch(
    prep: list[tuple[np.ndarray, np.ndarray]],
    rep: list[tuple[np.ndarray, np.ndarray]],
    cfg: FinetuneConfig,
    patch: tuple[int, ...],
    rng: np.random.Generator,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One augmented batch ``x (B, C, *patch)``, ``y (B, *patch)``: the user's patches and
    ``n_rep`` replay patches; each part foreground-centred in ``fg_fraction`` of its
    patches. Returns ``(x, y, n_rep)``."""
    import torch

    n_rep = _n_replay(cfg.batch_size, cfg.replay_fraction, rng) if rep else 0
    xs, ys = [], []
    for pool, count in ((prep, cfg.batch_size - n_rep), (rep, n_rep)):
        n_fg = math.ceil(count * cfg.fg_fraction)
        for b in range(count):
            x, y = pool[int(rng.integers(len(pool)))]
            px, py = _sample_patch(x, y, patch, b < n_fg, rng)
            xs.append(px)
            ys.append(py)
    xb, yb = _augment(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), gen)
    return xb, yb, n_rep


def _n_replay(batch: int, fraction: float, rng: np.random.Generator) -> int:
    """Replay patches in a batch: ``batch * fraction`` on average (the fractional part at
    random), leaving at least one patch of the user's when the batch has two or more."""
    want = batch * fraction
    n = int(want)
    if rng.random() < want - n:
        n += 1
    return min(n, batch - 1) if batch > 1 else n


def _replay_units(
    replay: ReplaySet | Sequence[tuple[Any, ...]] | None, card: ModelCard
) -> tuple[list[Unit], dict[str, Any]]:
    """Replay samples as units, and what the card records about them."""
    if replay is None:
        return [], {"used": False, "n_samples": 0, "source": None, "message": "replay is off"}
    if hasattr(replay, "record"):
        record = replay.record()
        items = list(replay.units)
    else:
        items = list(replay)
        record = {"used": bool(items), "n_samples": len(items), "source": "given by the caller",
                  "message": f"replaying {len(items)} samples given by the caller"}
    units = []
    for it in items:
        img, lab = np.asarray(it[0]), np.asarray(it[1])
        sp = it[2] if len(it) > 2 else None
        lab, _ = _check_pair(img, lab, card)
        units.append(Unit(img, lab, tuple(float(s) for s in sp) if sp is not None else None))
    return units, record


def min_units_for_report(fraction: float) -> int:
    """The fewest units whose held-out part (``fraction``) is split into selection and
    report parts (:func:`split_units`); 0 when none is held out."""
    if fraction <= 0:
        return 0
    n = REPORT_SPLIT_MIN + 1
    while min(max(round(n * fraction), 1), n - 1) < REPORT_SPLIT_MIN:
        n += 1
    return n


def _notes(
    replay: dict[str, Any], fraction: float, n_report: int, independent: bool
) -> list[str]:
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


def _child_card(
    card: ModelCard,
    cfg: FinetuneConfig,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    spacing: Sequence[Sequence[float] | None] | None,
    holdout: dict[str, Any],
    run: dict[str, Any],
) -> ModelCard:
    """The new model's card: the parent's, with lineage, data hashes, settings, metrics."""
    spacing = list(spacing) if spacing is not None else [None] * len(images)
    data = []
    for k, (i, lab) in enumerate(zip(images, labels)):
        entry: dict[str, Any] = {
            "image_sha256": array_sha256(np.asarray(i)),
            "labels_sha256": array_sha256(np.asarray(lab)),
        }
        sp = spacing[k] if k < len(spacing) else None
        if sp is not None:
            entry["spacing"] = [float(s) for s in sp]
        data.append(entry)
    return dataclasses.replace(
        card,
        parent_hash=card.weights_sha256,
        weights_sha256=None,
        created=None,
        metrics={**card.metrics, "finetune_holdout": holdout},
        training={
            "finetuned_from": card.name,
            "parent_training": card.training,
            "config": dataclasses.asdict(cfg),
            "data": data,
            **run,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )


def _working(unit: Unit | tuple[Any, ...], card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """A training unit on the grid the network sees at inference: normalised ``(C, *S)``
    and integer labels ``(*S)``, resized to the card's ``input_size`` (2D models trained on
    resized images) or resampled to the card's ``spacing`` (3D models, when the unit's
    spacing is known and differs), exactly as :func:`napari_prosma.inference.predict`
    does (:func:`~napari_prosma.inference.resample.working_shape`, then ``resize``)."""
    from .inference.resample import working_shape

    img, lab = unit[0], unit[1]
    sp = unit[2] if len(unit) > 2 else None
    x = prepare(img, card.in_channels, card.spatial_dims, card.normalization)[0]
    y = np.asarray(lab).astype(np.int64)
    work, _ = working_shape(y.shape, sp, card)
    if tuple(work) != tuple(y.shape):
        import torch

        from .inference.resample import resize

        x = resize(torch.from_numpy(np.ascontiguousarray(x))[None], work)[0].numpy()
        y = resize(torch.from_numpy(y)[None, None].float(), work, labels=True)[0, 0]
        y = y.numpy().astype(np.int64)
    return x, y


def _patch_size(
    cfg: FinetuneConfig, card: ModelCard, shapes: list[tuple[int, ...]], dev: str
) -> tuple[int, ...]:
    sd = card.spatial_dims
    if cfg.patch_size is not None:
        p = tuple(int(v) for v in cfg.patch_size)
    elif card.patch_size:
        p = tuple(int(v) for v in card.patch_size)
    else:
        p = (256,) * sd if sd == 2 else (64,) * sd
    if dev == "cpu" and sd == 2 and cfg.patch_size is None:
        p = tuple(min(v, 192) for v in p)
    largest = np.max(np.array(shapes), axis=0)
    return tuple(int(min(v, s)) for v, s in zip(p, largest))


def _cancel_check(cancel: Any) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    return lambda: bool(cancel())


# ---------------------------------------------------------------------------- lineage


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
) -> tuple[FinetuneResult, str]:
    """Fine-tune ``parent`` (bundled name, checkpoint path or store version id) and save
    the result as a new version in ``store``.

    The corrections are written first (so a crash never loses them); the checkpoint lands
    in a new version folder only when complete, and a cancel that arrives while it is
    written still removes it. ``activate``: ``"if_better"`` (regression guard: keep the
    parent active when the report-part held-out Dice got worse), ``"always"`` or
    ``"never"``. ``replay``: ``"auto"`` (the base model's training data set, when it is on
    this computer), a data set name, a folder, samples, or None/``"none"`` (see
    :mod:`napari_prosma.replay`); what was found is in ``result.notes``.

    Returns:
        ``(result, version_id)``.
    """
    from .checkpoint import load
    from .inference import Cancelled

    store = store or ModelStore()
    cfg = config or FinetuneConfig()
    cfg.validate()
    if activate not in ("if_better", "always", "never"):
        raise InputError("activate must be 'if_better', 'always' or 'never'")
    cancelled = _cancel_check(cancel)
    parent_path = _parent_path(parent, store)
    model, card = load(parent_path)
    if card.weights_sha256 is None and Path(parent_path).suffix == ".safetensors":
        card.weights_sha256 = file_sha256(parent_path)
    if isinstance(replay, (str, Path)):
        from .replay import load_replay

        replay = load_replay(card, replay, n=cfg.replay_samples, seed=cfg.seed)
    # bad input is refused before anything is saved (no copy of it left in .incoming)
    corrected_units(images, labels, card, previous, spacing=spacing, slice_axis=cfg.slice_axis)
    recovered = store.recover()  # runs killed earlier: their corrections go to .incoming
    try:
        with store.staging(card.name) as (vid, stage):
            store.save_corrections(
                stage / "corrections", list(images), list(labels), {"parent": str(parent)}
            )
            result = finetune(
                model, card, images, labels, config=cfg, previous=previous,
                spacing=spacing, replay=replay, progress=progress, cancel=cancel,
            )
            if cancelled():  # a cancel comes first, whatever the outcome
                raise Cancelled(CANCEL_MESSAGE)
            if result.kept_parent:  # no empty versions
                raise _not_improved(result)
            if recovered:
                result.notes.append(
                    f"an earlier fine-tuning run in {store.root} was interrupted; the "
                    f"corrections it had saved are kept in {store.root / '.incoming'} "
                    f"({', '.join(recovered)})"
                )
            _save_version(stage, vid, parent, card, result, cancelled)
    except (InputError, Cancelled) as e:
        raise _say_where_kept(e) from None
    if activate == "always" or (activate == "if_better" and result.improved is not False):
        store.activate(vid)
    return result, vid


def _save_version(
    stage: Path,
    vid: str,
    parent: str | Path,
    card: ModelCard,
    result: FinetuneResult,
    cancelled: Callable[[], bool],
) -> None:
    """Write the checkpoint and ``run.json`` into the staging folder (a cancel before or
    while they are written raises :class:`Cancelled`; the folder then goes)."""
    from .inference import Cancelled

    if cancelled():
        raise Cancelled(CANCEL_MESSAGE)
    result.card.name = vid
    save(result.model, stage / "model", result.card)
    saved = read_card(stage / "model")
    record = _run_record(parent, card, result)
    record.update(weights_sha256=saved.weights_sha256, card_sha256=saved.card_sha256)
    atomic_write_json(stage / "run.json", record)
    if cancelled():  # while saving: the staging folder goes, the parent stays
        raise Cancelled(CANCEL_MESSAGE)


def _not_improved(result: FinetuneResult) -> InputError:
    """The refusal when no held-out evaluation beat the parent (nothing is saved)."""
    evals = [h["holdout_dice"] for h in result.history if "holdout_dice" in h]
    best = f"{max(evals):.3f}" if evals else "?"
    before = result.selection_before
    exc = InputError(
        f"{NOT_IMPROVED} (held-out Dice {before:.3f} before training, at best {best} in "
        f"{len(evals)} evaluation(s) over {result.steps} steps); the previous model stays "
        "active"
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
    }


def _parent_path(parent: str | Path, store: ModelStore) -> str:
    if (store.root / str(parent) / "model.safetensors").exists():
        return str(store.root / str(parent) / "model.safetensors")
    return str(resolve(parent))
