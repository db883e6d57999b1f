"""Fine-tune a model on a user's corrected labels (Qt-free).

:func:`finetune` trains a copy of the model in memory and returns it with before/after
held-out Dice; it writes nothing. :func:`run_finetune` wraps it with the model store
(:mod:`napari_prosma.versions`): the corrections are saved before training starts, the new
checkpoint goes into a fresh version folder (never over its parent), its card records the
lineage, and a regression guard keeps the parent active when held-out Dice got worse.
A cancel (the ``cancel`` flag, checked every step) raises
:class:`~napari_prosma.inference.Cancelled` and leaves the parent active and no version.
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
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import ModelCard, file_sha256, resolve, save
from .preprocess import InputError, prepare
from .versions import ModelStore, array_sha256, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

TRAINABLE = ("all", "decoder_gates", "gates")


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
        holdout_fraction: share of the corrected samples held out to measure Dice.
        eval_every: steps between held-out evaluations (early stopping keeps the best).
        patience: evaluations without improvement before stopping.
        replay_fraction: share of each batch drawn from the base model's training samples
            when they are given (limits forgetting).
        device: ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.
        seed: random seed of sampling and augmentation.
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
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if self.trainable not in TRAINABLE:
            raise InputError(f"'trainable' must be one of {TRAINABLE}, not {self.trainable!r}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise InputError("max_steps and batch_size must be at least 1")
        if not 0 <= self.holdout_fraction < 1:
            raise InputError("holdout_fraction must lie in [0, 1)")


@dataclass
class FinetuneProgress:
    """What a progress callback receives."""

    step: int
    max_steps: int
    loss: float | None
    holdout_dice: float | None
    elapsed_s: float
    phase: str  # "before", "train", "eval", "done"


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune` (the model is the best held-out state)."""

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

    @property
    def improved(self) -> bool | None:
        if self.dice_before is None or self.dice_after is None:
            return None
        return self.dice_after >= self.dice_before


# ---------------------------------------------------------------------------- samples


def _is_volume(image: np.ndarray, card: ModelCard) -> bool:
    a = np.asarray(image)
    if a.ndim == 3 and card.in_channels in (3, 4) and a.shape[-1] in (3, 4):
        return False
    return a.ndim == 3 and not (a.shape[-1] in (3, 4) and card.in_channels == 3)


def corrected_units(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    card: ModelCard,
    previous: Sequence[np.ndarray | None] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split the user's data into training units ``(raw image, labels)``.

    A 2D model learns from 2D images and, for a volume, from its corrected slices: those
    whose labels differ from the last prediction (``previous``), else all slices with any
    label. A 3D model learns from whole volumes, cropped to the slab of corrected slices.

    Raises:
        InputError: shapes that don't match, or nothing labelled.
    """
    if len(images) != len(labels):
        raise InputError(f"{len(images)} image(s) but {len(labels)} label image(s)")
    previous = list(previous) if previous is not None else [None] * len(images)
    units: list[tuple[np.ndarray, np.ndarray]] = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        img, lab = np.asarray(img), np.asarray(lab)
        spatial = img.shape[:-1] if img.ndim == lab.ndim + 1 else img.shape
        if tuple(spatial) != tuple(lab.shape):
            raise InputError(
                f"the labels (shape {lab.shape}) do not match the image (shape {img.shape})"
            )
        if lab.dtype.kind not in "biu":
            raise InputError(f"labels must be integers, not {lab.dtype}")
        if lab.size and int(lab.max()) >= max(card.out_channels, 2):
            raise InputError(
                f"the labels use class {int(lab.max())} but the model knows "
                f"{max(card.out_channels, 2)} classes ({', '.join(card.class_names) or '?'})"
            )
        prev = previous[k] if k < len(previous) else None
        if lab.ndim == 3 and _is_volume(img, card):
            if prev is not None and np.shape(prev) == lab.shape:
                rows = np.flatnonzero(np.any(lab != np.asarray(prev), axis=(1, 2)))
            else:
                rows = np.array([], int)
            if rows.size == 0:
                rows = np.flatnonzero(np.any(lab > 0, axis=(1, 2)))
            if rows.size == 0:
                continue
            if card.spatial_dims == 2:
                units += [(img[z], lab[z]) for z in rows]
            else:
                lo, hi = int(rows.min()), int(rows.max()) + 1
                units.append((img[lo:hi], lab[lo:hi]))
        else:
            changed = prev is not None and np.shape(prev) == lab.shape and np.any(lab != prev)
            if changed or np.any(lab > 0) or prev is not None:
                units.append((img, lab))
    if not units:
        raise InputError("no corrected or labelled image found: draw or correct labels first")
    return units


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    order = rng.permutation(n).tolist()
    n_hold = min(max(round(n * fraction), 1 if fraction > 0 and n >= 2 else 0), n - 1)
    return sorted(order[n_hold:]), sorted(order[:n_hold])


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
    units: Sequence[tuple[np.ndarray, np.ndarray]],
    device: str,
    cancel: Callable[[], bool] | None = None,
) -> float | None:
    """Mean foreground Dice of the model on held-out units, through the inference engine
    (``cancel`` is polled between its tiles)."""
    from .inference import predict
    from .metrics import dice

    if not units:
        return None
    scores = []
    was_training = model.training
    model.eval()
    try:
        for img, lab in units:
            pred = predict(img, model, card, device=device, cancel=cancel)
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
    replay: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
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
        replay: ``(image, labels)`` pairs of the base model's training data, if available.
        progress: called with a :class:`FinetuneProgress` after every step and evaluation.
        cancel: a callable returning True, or a ``threading.Event``, to stop at once.

    Returns:
        :class:`FinetuneResult` with the best held-out model and a card for it (no file
        written; see :func:`run_finetune`).

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
    units = corrected_units(images, labels, card, previous)
    train_idx, hold_idx = _split(len(units), cfg.holdout_fraction, rng)
    train_units = [units[i] for i in train_idx]
    hold_units = [units[i] for i in hold_idx]
    device = resolve_device(cfg.device)

    def report(step: int, loss: float | None, d: float | None, phase: str) -> None:
        if progress is not None:
            progress(
                FinetuneProgress(step, cfg.max_steps, loss, d, time.perf_counter() - t0, phase)
            )

    fmt = memory_format(device, card.spatial_dims)  # channels-last: faster on CPU and CUDA
    net = copy.deepcopy(model).to(device, memory_format=fmt)
    before = holdout_dice(net, card, hold_units, str(device), cancelled)
    report(0, None, before, "before")
    if cancelled():
        raise Cancelled("fine-tuning was cancelled; the previous model stays active")

    prep = [_working(img, lab, card) for img, lab in train_units]
    rep = [_working(img, lab, card) for img, lab in (replay or [])]
    patch = _patch_size(cfg, card, [y.shape for _, y in prep], device.type)
    loss_fn = _loss_fn(card)
    params = trainable_parameters(net, cfg.trainable)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_state = copy.deepcopy(net.state_dict())
    best = before if before is not None else -math.inf
    history: list[dict[str, float]] = []
    stale, stopped, step = 0, "max_steps", 0
    net.train()
    _freeze_norm_stats(net)
    for step in range(1, cfg.max_steps + 1):
        if cancelled():
            raise Cancelled("fine-tuning was cancelled; the previous model stays active")
        xs, ys = [], []
        for b in range(cfg.batch_size):
            pool = rep if rep and rng.random() < cfg.replay_fraction else prep
            x, y = pool[int(rng.integers(len(pool)))]
            px, py = _sample_patch(
                x, y, patch, b < math.ceil(cfg.batch_size * cfg.fg_fraction), rng
            )
            xs.append(px)
            ys.append(py)
        xb, yb = _augment(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), gen)
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
        if hold_units and (step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time):
            d = holdout_dice(net, card, hold_units, str(device), cancelled)
            _freeze_norm_stats(net)
            history[-1]["holdout_dice"] = d
            report(step, lv, d, "eval")
            if d is not None and d > best:
                best, stale = d, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    stopped = "early_stopping"
                    break
        if out_of_time:
            stopped = "time_budget"
            break
    if hold_units:
        net.load_state_dict(best_state)
        after = holdout_dice(net, card, hold_units, str(device), cancelled)
    else:
        after = None
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    net = net.to(memory_format=torch.contiguous_format)  # checkpoints store plain layouts
    seconds = time.perf_counter() - t0
    report(step, None, after, "done")
    new_card = dataclasses.replace(
        card,
        parent_hash=card.weights_sha256,
        weights_sha256=None,
        created=None,
        metrics={
            **card.metrics,
            "finetune_holdout": {"dice_before": before, "dice_after": after, "n": len(hold_units)},
        },
        training={
            "finetuned_from": card.name,
            "parent_training": card.training,
            "config": dataclasses.asdict(cfg),
            "data": [
                {
                    "image_sha256": array_sha256(np.asarray(i)),
                    "labels_sha256": array_sha256(np.asarray(l)),
                }
                for i, l in zip(images, labels)
            ],
            "n_train_units": len(train_units),
            "n_holdout_units": len(hold_units),
            "steps": step,
            "stopped": stopped,
            "seconds": round(seconds, 2),
            "device": str(device),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return FinetuneResult(
        net.cpu(),
        new_card,
        before,
        after,
        step,
        seconds,
        stopped,
        len(train_units),
        len(hold_units),
        history,
    )


def _working(img: np.ndarray, lab: np.ndarray, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """A training unit as the network sees it at inference: normalised ``(C, *S)`` and
    integer labels, resized to the card's ``input_size`` when the model was trained on
    resized images (the inference engine resizes every image to it)."""
    from .inference.resample import card_input_size

    x = prepare(img, card.in_channels, card.spatial_dims, card.normalization)[0]
    y = np.asarray(lab).astype(np.int64)
    size = card_input_size(card)
    if size is not None and tuple(y.shape) != tuple(size):
        import torch

        from .inference.resample import resize

        x = resize(torch.from_numpy(np.ascontiguousarray(x))[None], size)[0].numpy()
        y = resize(torch.from_numpy(y)[None, None].float(), size, labels=True)[0, 0]
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
    replay: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    activate: str = "if_better",
    progress: Callable[[FinetuneProgress], None] | None = None,
    cancel: Any = None,
) -> tuple[FinetuneResult, str]:
    """Fine-tune ``parent`` (bundled name, checkpoint path or store version id) and save
    the result as a new version in ``store``.

    The corrections are written first (so a crash never loses them); the checkpoint lands
    in a new version folder only when complete. ``activate``: ``"if_better"`` (regression
    guard: keep the parent active when held-out Dice got worse), ``"always"`` or ``"never"``.

    Returns:
        ``(result, version_id)``.
    """
    from .checkpoint import load

    store = store or ModelStore()
    if activate not in ("if_better", "always", "never"):
        raise InputError("activate must be 'if_better', 'always' or 'never'")
    parent_path = _parent_path(parent, store)
    model, card = load(parent_path)
    if card.weights_sha256 is None and Path(parent_path).suffix == ".safetensors":
        card.weights_sha256 = file_sha256(parent_path)
    base = card.name
    with store.staging(base) as (vid, stage):
        store.save_corrections(
            stage / "corrections", list(images), list(labels), {"parent": str(parent)}
        )
        result = finetune(
            model,
            card,
            images,
            labels,
            config=config,
            previous=previous,
            replay=replay,
            progress=progress,
            cancel=cancel,
        )
        if _cancel_check(cancel)():  # cancelled during the final evaluation: keep nothing
            from .inference import Cancelled

            raise Cancelled("fine-tuning was cancelled; the previous model stays active")
        result.card.name = vid
        save(result.model, stage / "model", result.card)
        run = {
            "parent": str(parent),
            "parent_hash": card.weights_sha256,
            "dice_before": result.dice_before,
            "dice_after": result.dice_after,
            "improved": result.improved,
            "steps": result.steps,
            "seconds": result.seconds,
            "stopped": result.stopped,
        }
        atomic_write_json(stage / "run.json", run)
    if activate == "always" or (activate == "if_better" and result.improved is not False):
        store.activate(vid)
    return result, vid


def _parent_path(parent: str | Path, store: ModelStore) -> str:
    if (store.root / str(parent) / "model.safetensors").exists():
        return str(store.root / str(parent) / "model.safetensors")
    return str(resolve(parent))
