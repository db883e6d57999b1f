"""The fine-tuning loop: train a copy of a model on corrected units, measure it on the
held-out ones, keep the best state (Qt-free; torch imported when a run starts).

:func:`finetune` writes nothing; :func:`napari_prosma.finetune.run_finetune` saves its
result in the model store.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import ModelCard
from ..preprocess import InputError
from .config import (
    CANCEL_MESSAGE,
    FinetuneConfig,
    FinetuneProgress,
    FinetuneResult,
)
from .guard import _guard_dice, _guard_units, _new_task_replay, _remembers
from .lineage import _result, check_naming, data_entries
from .net import (
    _freeze_norm_stats,
    _loss_fn,
    free_device_memory,
    holdout_dice,
    trainable_parameters,
)
from .units import (
    Unit,
    _batch,
    _patch_size,
    _replay_units,
    _working,
    corrected_units,
    split_units,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .replay import ReplaySet

DIVERGED = (
    "fine-tuning diverged (the loss became infinite or NaN); the previous model stays "
    "active. Try a lower learning rate or training fewer layers"
)


# ---------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """One run's fixed parts: settings, the network being trained, the units by role."""

    cfg: FinetuneConfig
    card: ModelCard
    net: Any
    device: Any
    fmt: Any
    train: list[Unit]
    sel: list[Unit]
    rep: list[Unit]
    n_holdout: int
    independent: bool
    replay: list[Unit]
    replay_record: dict[str, Any]
    rng: np.random.Generator
    gen: Any
    cancelled: Callable[[], bool]
    progress: Callable[[FinetuneProgress], None] | None
    t0: float = field(default_factory=time.perf_counter)
    guard: list[Unit] = field(default_factory=list)  # replay units measured, not trained on

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def report(self, step: int, loss: float | None, d: float | None, phase: str) -> None:
        if self.progress is not None:
            self.progress(
                FinetuneProgress(step, self.cfg.max_steps, loss, d, self.elapsed(), phase)
            )

    def check(self) -> None:
        from ..inference import Cancelled

        if self.cancelled():
            raise Cancelled(CANCEL_MESSAGE)

    def measure(self, units: list[Unit]) -> float | None:
        """Held-out Dice of the network now (None for no units)."""
        return holdout_dice(self.net, self.card, units, str(self.device), self.cancelled)


@dataclass
class _Outcome:
    """What the training steps left: the best selection Dice and state, the curve."""

    best: float
    best_state: dict[str, Any] | None
    beaten: bool = False
    step: int = 0
    stopped: str = "max_steps"
    replayed: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    guard_before: float | None = None  # the forgetting guard's Dice: the parent's
    guard_kept: float | None = None  # ... and the kept state's
    guard_rejected: int = 0  # better held-out states refused because they forgot


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
    hashes: Sequence[dict[str, Any]] | None = None,
    task: str | None = None,
    class_names: Sequence[str] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on corrected labels; the input model is not changed.

    Args:
        model: the parent network (any device; it is copied).
        card: its model card.
        images: raw images in napari layout (2D grey ``(H, W)``, RGB ``(H, W, 3)``, volumes
            ``(Z, Y, X)``), as the user sees them.
        labels: label arrays on the images' grids (0 = background; values checked by
            :func:`~napari_prosma.finetune.units.check_labels`).
        config: hyper-parameters (defaults: :class:`FinetuneConfig`).
        previous: the last prediction per image, to find which slices were corrected.
        spacing: per image, its voxel spacing in mm (napari order), or None when unknown;
            a 3D model then trains on the volume resampled to its card's spacing.
        replay: base-model training samples: a
            :class:`~napari_prosma.finetune.replay.ReplaySet` or ``(image, labels[,
            spacing])`` tuples; None: no replay.
        progress: called with a :class:`FinetuneProgress` after every step and evaluation.
        cancel: a callable returning True, or a ``threading.Event``, to stop at once.
        hashes: the images' and labels' hashes when already computed (the store's
            corrections index), for the new card.
        task, class_names: what the new model segments and its classes, for its card
            (:func:`~napari_prosma.finetune.lineage.check_naming`; None: the parent's).

    The new card's gate-sparsity range is measured on the new model (the user's whole
    images and the replay samples, :mod:`.whole`); ``result.whole`` compares the parent
    and the new model on the whole images (``config.whole_report``). The training copy's
    optimiser, gradients and device memory are given back before this returns.

    Returns:
        :class:`FinetuneResult` with the best model on the selection part (the last state
        when nothing is held out) and a card for it (no file written; see
        :func:`~napari_prosma.finetune.run_finetune`).

    Raises:
        InputError: unusable inputs, or a diverged loss. Cancelled: the user cancelled.
    """
    cfg = config or FinetuneConfig()
    cfg.validate()
    naming = check_naming(card, task, class_names)
    label_notes: list[str] = []
    replay = _new_task_replay(card, naming[1], replay, label_notes)
    run = _setup(
        model, card, images, labels, cfg, previous, spacing, replay, label_notes, progress, cancel
    )
    try:
        return _run(run, images, labels, previous, spacing, hashes, label_notes, naming)
    finally:
        _free(run)


def _run(
    run: _Run,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    previous: Sequence[np.ndarray | None] | None,
    spacing: Sequence[Sequence[float] | None] | None,
    hashes: Sequence[dict[str, Any]] | None,
    label_notes: list[str],
    naming: tuple[str | None, list[str] | None],
) -> FinetuneResult:
    """Measure, train, measure again, and build the result (see :func:`finetune`)."""
    from .whole import gate_range, whole_images, whole_pass, whole_report

    cfg, card, dev = run.cfg, run.card, str(run.device)
    items = whole_images(images, labels, card, previous, spacing)
    sel_before = run.measure(run.sel)
    rep_before = run.measure(run.rep) if run.independent else sel_before
    run.report(0, None, sel_before, "before")
    whole_before = None
    if cfg.whole_report and items:
        run.report(0, None, sel_before, "whole")
        whole_before = whole_pass(run.net, card, items, cfg.slice_axis, dev, run.cancelled)
    run.check()
    out = _train(run, sel_before)
    run.check()
    if out.best_state is not None:
        run.net.load_state_dict(out.best_state)
    out.best_state = None  # a copy of every weight, on the device
    sel_after = out.best if run.sel else None
    if run.independent:
        rep_after = run.measure(run.rep)
    elif run.sel:  # measured again on the kept state (what the user gets)
        rep_after = sel_after = run.measure(run.sel)
    else:
        rep_after = None
    run.report(out.step, None, sel_after, "whole")
    after = whole_pass(run.net, card, items, cfg.slice_axis, dev, run.cancelled, gates=True)
    gates = gate_range(run.net, card, after, run.replay, dev, run.cancelled)
    whole = {}
    if whole_before is not None:
        whole = whole_report(
            items, whole_before, after, card, cfg.slice_axis, len(run.rep), run.independent
        )
    run.check()
    run.report(out.step, None, sel_after, "done")
    data = data_entries(images, labels, spacing, hashes)
    extras = {"naming": naming, "gate_range": gates, "whole": whole}
    return _result(
        run, out, data, label_notes, (sel_before, rep_before), (sel_after, rep_after), extras
    )


def _free(run: _Run) -> None:
    """Give back what training held: the optimiser and gradients go with ``_train``'s frame
    and :func:`_release`; the caching allocator returns the freed device memory (GPU
    memory that other tools keep after fine-tuning, micro-sam #952)."""
    gc.collect()
    free_device_memory(run.device)


def _setup(
    model: Any,
    card: ModelCard,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    cfg: FinetuneConfig,
    previous: Sequence[np.ndarray | None] | None,
    spacing: Sequence[Sequence[float] | None] | None,
    replay: Any,
    notes: list[str],
    progress: Callable[[FinetuneProgress], None] | None,
    cancel: Any,
) -> _Run:
    """Units by role, replay units and a copy of the network on the device."""
    import torch

    from ..errors import cancel_check as _cancel_check
    from ..inference.device import memory_format, resolve_device

    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    units = corrected_units(
        images,
        labels,
        card,
        previous,
        spacing=spacing,
        slice_axis=cfg.slice_axis,
        notes=notes,
    )
    train_idx, sel_idx, rep_idx = split_units(len(units), cfg.holdout_fraction, rng)
    replay_units, replay_record = _replay_units(replay, card)
    replay_units, guard, replay_record = _guard_units(
        cfg, replay, replay_units, replay_record, card
    )
    device = resolve_device(cfg.device)
    fmt = memory_format(device, card.spatial_dims)  # channels-last: faster on CPU and CUDA
    return _Run(
        cfg,
        card,
        copy.deepcopy(model).to(device, memory_format=fmt),
        device,
        fmt,
        train=[units[i] for i in train_idx],
        sel=[units[i] for i in sel_idx],
        rep=[units[i] for i in rep_idx],
        n_holdout=len(set(sel_idx) | set(rep_idx)),
        independent=bool(rep_idx) and set(sel_idx).isdisjoint(rep_idx),
        replay=replay_units,
        replay_record=replay_record,
        rng=rng,
        gen=gen,
        cancelled=_cancel_check(cancel),
        progress=progress,
        t0=t0,
        guard=guard,
    )


def _train(run: _Run, sel_before: float | None) -> _Outcome:
    """The optimiser steps, with held-out evaluations and early stopping on the selection
    part; the best state is kept (with nothing held out, the last one is)."""
    import torch

    cfg, net = run.cfg, run.net
    prep = [_working(u, run.card) for u in run.train]
    rep = [_working(u, run.card) for u in run.replay]
    patch = _patch_size(cfg, run.card, [y.shape for _, y in prep], run.device.type)
    loss_fn = _loss_fn(run.card)
    params = trainable_parameters(net, cfg.trainable)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    anchors = [p.detach().clone() for p in params] if cfg.anchor else []
    out = _Outcome(
        best=sel_before if sel_before is not None else -math.inf,
        best_state=copy.deepcopy(net.state_dict()) if run.sel else None,
    )
    out.guard_before = out.guard_kept = run.measure(run.guard) if run.sel and run.guard else None
    stale = 0
    every, every_s = _eval_spacing(cfg)
    start = last_eval = run.elapsed()  # the budget counts training and its evaluations
    net.train()
    _freeze_norm_stats(net)
    for step in range(1, cfg.max_steps + 1):
        run.check()
        out.step = step
        xb, yb, n_rep = _batch(prep, rep, cfg, patch, run.rng, run.gen)
        out.replayed += n_rep
        lv = _step(run, opt, loss_fn, xb, yb)
        if anchors:  # L2-SP, decoupled: back towards the parent's weights
            with torch.no_grad():
                torch._foreach_lerp_(params, anchors, cfg.lr * cfg.anchor)
        out.history.append({"step": step, "loss": lv})
        run.report(step, lv, None, "train")
        out_of_time = cfg.time_budget_s is not None and run.elapsed() - start > cfg.time_budget_s
        due = step % every == 0 or step == cfg.max_steps or out_of_time
        if run.sel and (due or run.elapsed() - last_eval >= every_s):
            d = run.measure(run.sel)
            last_eval = run.elapsed()
            _freeze_norm_stats(net)
            out.history[-1]["holdout_dice"] = d
            run.report(step, lv, d, "eval")
            g = _guard_dice(run, out)
            better = d is not None and d > out.best + cfg.min_improvement
            if better and _remembers(cfg, out, g):
                out.best, stale, out.beaten, out.guard_kept = d, 0, True, g
                out.best_state = copy.deepcopy(net.state_dict())
            else:
                out.guard_rejected += better
                stale += 1
                if stale >= cfg.patience:
                    out.stopped = "early_stopping"
                    break
        if out_of_time:
            out.stopped = "time_budget"
            break
    return out


def _eval_spacing(cfg: FinetuneConfig) -> tuple[int, float]:
    """Steps and seconds between held-out evaluations: every ``eval_every`` steps, and with
    a time budget also every ``time_budget_s / min_evals`` seconds of training (on a slow
    machine the budget ends a run before many ``eval_every`` steps are done)."""
    seconds = math.inf
    if cfg.min_evals and cfg.time_budget_s:
        seconds = cfg.time_budget_s / cfg.min_evals
    return cfg.eval_every, seconds


def _step(run: _Run, opt: Any, loss_fn: Any, xb: torch.Tensor, yb: torch.Tensor) -> float:
    """One optimiser step on ``xb (B, C, *patch)``, ``yb (B, *patch)``; returns the loss.

    Raises:
        InputError: the loss is not finite (a diverged model is never saved).
    """
    from ..inference.device import autocast

    xb, yb = xb.to(run.device).contiguous(memory_format=run.fmt), yb.to(run.device)
    with autocast(run.device):  # bf16 on CUDA only: CPU bf16 training diverged (NaN)
        logits = run.net(xb)
    loss = loss_fn(logits.float(), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    lv = float(loss.detach())
    if not math.isfinite(lv):
        raise InputError(DIVERGED)
    return lv
