"""The training loop behind :func:`napari_prosma.train.train`, for one run or a stack of runs.

A *stack* trains several recipes (seeds, ablation arms) in one process on one GPU: each run
keeps its own model, optimiser, data, resume files and output folder, and on CUDA its own
stream and CUDA graph; every step replays the graphs of all runs on their streams, so the
GPU overlaps runs whose kernels alone leave it mostly idle (a BUSI-sized network at batch 8
fills a fraction of an H200). With one recipe this is the ordinary single run (or DDP).

Per epoch and run: the mean loss, the learning rate, the thresholds lambda = softplus(theta)
per gate stage (mean, min, max; every epoch) and, every ``val_every`` epochs, the validation metrics
(:func:`~napari_prosma.train.support.quick_validate` on the split's ``val`` part, never
the test part). ``select="best_val"`` keeps the weights of the epoch with the best
validation Dice (``best.safetensors``) and ships those; the test part is evaluated once, at
the end, on the shipped file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import ModelCard


@dataclass
class Run:
    """One recipe's training state (see the module docstring)."""

    cfg: Any
    out: Path
    model: Any
    card: ModelCard
    opt: Any
    data: Any
    train_ds: Any
    val_ds: Any
    test_ds: Any
    split_desc: dict[str, Any]
    steps: int
    bsz: int
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"epoch", "score"} of best.safetensors
    stop_at: int = 0
    done: int = 0  # epochs completed so far
    static_idx: Any = None
    static_rand: Any = None
    loss_acc: Any = None
    graph: Any = None
    stream: Any = None
    eager_step: Callable[[], None] | None = None
    net: Any = None
    perm: Any = None
    rand: Any = None
    empty_idx: Any = None  # 2D: indices of training images with an empty mask
    n_crops: int = 0  # 2D: lesion-free crops appended to the training images (negatives)


def lambdas(model: Any) -> list[list[float]]:
    """``[[mean, min, max], ...]`` of lambda = softplus(theta) per gate stage (finest first);
    empty for models without sparse gates."""
    import torch.nn.functional as F

    out = []
    for g in getattr(model, "gates", []):
        if getattr(g, "sparse", False):
            lam = F.softplus(g.theta.detach().float())
            out.append([float(lam.mean()), float(lam.min()), float(lam.max())])
    return out


def build_step(run: Run, loss_fn: Any, amp: bool, use_cl: bool, device: Any) -> None:
    """Give ``run`` its static batch buffers and eager training step (2D: the batch index and
    the augmentation draws are static tensors filled before every step, so a CUDA graph of
    the step holds no random number generation)."""
    import torch

    cfg = run.cfg
    run.static_idx = torch.zeros(run.bsz, dtype=torch.long, device=device)
    run.static_rand = torch.zeros(run.bsz, 3, device=device)
    run.loss_acc = torch.zeros((), device=device)
    cl_format = torch.channels_last if cfg.dims == 2 else torch.channels_last_3d

    def body() -> Any:
        if cfg.dims == 2:
            x, y = run.data.batch(run.static_idx, True, use_cl, rand=run.static_rand)
        else:
            x, y = run.data.batch(run.bsz)
            if use_cl:
                x = x.contiguous(memory_format=cl_format)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = run.net(x)
        return loss_fn(logits, y)

    def eager_step() -> None:
        run.opt.zero_grad(set_to_none=True)
        loss = body()
        loss.backward()
        run.opt.step()
        run.loss_acc.add_(loss.detach())

    run.eager_step = eager_step
    run.body = body  # type: ignore[attr-defined]


def empty_indices(labels: Any) -> Any:
    """Indices (int64 tensor) of the images whose mask is empty; ``labels (N, H, W)``."""
    import torch

    lab = np.asarray(labels)
    return torch.from_numpy(np.flatnonzero(lab.reshape(len(lab), -1).max(axis=1) == 0))


def epoch_draws_per_pass(n: int, n_empty: int, share: float) -> int:
    """How many images one epoch draws: ``n``, or with ``share`` > 0 every image with a
    lesion once plus empty-mask images making up ``share`` of the draws."""
    if share <= 0 or n_empty == 0:
        return n
    return (n - n_empty) + math.ceil((n - n_empty) * share / (1 - share))


def epoch_order(n: int, empty_idx: Any, share: float, gen: Any) -> Any:
    """One epoch's image order: a permutation of ``range(n)``, or with ``share`` > 0 every
    image with a lesion once and the empty-mask images ``empty_idx`` repeated (a fresh
    permutation of them each round) to ``share`` of the draws, shuffled together."""
    import torch

    if share <= 0 or empty_idx is None or len(empty_idx) == 0:
        return torch.randperm(n, generator=gen)
    is_empty = torch.zeros(n, dtype=torch.bool)
    is_empty[empty_idx] = True
    other = torch.nonzero(~is_empty).flatten()
    k = epoch_draws_per_pass(n, len(empty_idx), share) - len(other)
    rounds = [
        empty_idx[torch.randperm(len(empty_idx), generator=gen)]
        for _ in range(max(math.ceil(k / len(empty_idx)), 1))
    ]
    drawn = torch.cat([other, torch.cat(rounds)[:k]])
    return drawn[torch.randperm(len(drawn), generator=gen)]


def epoch_draws(run: Run, epoch: int, rank: int, world: int, device: Any) -> None:
    """This epoch's image order (the seed's permutation, this rank's share) and, in 2D, the
    augmentation draws of every step, both made outside any graph."""
    import torch

    cfg, n, need = run.cfg, run.data.n, run.steps * run.bsz
    if cfg.dims != 2:
        return
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    perm = epoch_order(n, run.empty_idx, cfg.empty_share, gen)[rank::world][:need]
    if len(perm) < need:  # iters_per_epoch beyond one pass
        perm = perm.repeat(math.ceil(need / max(len(perm), 1)))
    run.perm = perm[:need].to(device)
    aug = torch.Generator().manual_seed(cfg.seed * 7_919 + 1_000_003 * rank + epoch + 1)
    run.rand = torch.rand(run.steps, run.bsz, 3, generator=aug).to(device)


def run_epoch(runs: Sequence[Run], device: Any, cancelled: Callable[[], bool]) -> None:
    """One epoch of every run in ``runs``: step ``s`` of each run in turn, each run on its
    own CUDA stream (graph replays overlap), then wait for all of them."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        main = torch.cuda.current_stream(device)
        for r in runs:
            r.stream.wait_stream(main)
    for s in range(max(r.steps for r in runs)):
        if cancelled():
            raise KeyboardInterrupt  # turned into Cancelled by the caller
        for r in runs:
            if s >= r.steps:
                continue
            ctx = torch.cuda.stream(r.stream) if cuda else _null()
            with ctx:
                if r.cfg.dims == 2:
                    r.static_idx.copy_(r.perm[s * r.bsz : (s + 1) * r.bsz], non_blocking=True)
                    r.static_rand.copy_(r.rand[s], non_blocking=True)
                if r.graph is not None:
                    r.graph.replay()
                else:
                    r.eager_step()
    if cuda:
        for r in runs:
            main.wait_stream(r.stream)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def after_epoch(
    run: Run,
    epoch: int,
    lr: float,
    dt: float,
    n_stack: int,
    device: Any,
    amp: bool,
    world: int,
    rank: int,
) -> dict[str, Any]:
    """Record epoch ``epoch`` (0-based) of ``run``: loss, lambda per stage, validation
    every ``val_every`` epochs and after the last, best weights when the validation score
    improves. Returns the history entry."""
    from .support import quick_validate, save_best

    cfg = run.cfg
    mean_loss = float(run.loss_acc) / run.steps  # synchronises
    if world > 1:
        import torch
        import torch.distributed as dist

        t = torch.tensor([mean_loss], device=device)
        dist.all_reduce(t)
        mean_loss = float(t) / world
    n_img = run.steps * run.bsz * world
    entry: dict[str, Any] = {
        "epoch": epoch + 1,
        "loss": mean_loss,
        "lr": lr,
        "seconds": dt,
        "images_per_s": n_img / dt,
    }
    if n_stack > 1:
        entry["stacked_runs"] = n_stack
    last = epoch + 1 == cfg.epochs
    lam = lambdas(run.model)  # every epoch: a few numbers, one synchronisation
    if lam:
        entry["lambda"] = lam
    val_due = cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or last)
    if rank == 0 and run.val_ds is not None and len(run.val_ds) and val_due:
        entry["val"] = quick_validate(run.model, run.val_ds, run.card, device, amp)
        score = entry["val"]["dice"]
        if run.best is None or score > run.best["score"]:
            run.best = {"epoch": epoch + 1, "score": score}
            save_best(run.out, run.model, run.card, run.best)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"{run.out.name}: loss became {mean_loss} at epoch {epoch + 1}")
    run.history.append(entry)
    return entry


def log_line(entry: dict[str, Any], epochs: int, name: str, n_stack: int) -> str:
    """The progress line of one history entry."""
    v = entry.get("val")
    vs = f" val dice {v['dice']:.4f} (lesion {v.get('dice_target', float('nan')):.4f})" if v else ""
    lam = entry.get("lambda")
    ls = " lambda " + "/".join(f"{m:.3f}" for m, _, _ in lam) if lam else ""
    who = f"[{name}] " if n_stack > 1 else ""
    return (
        f"{who}epoch {entry['epoch']}/{epochs} loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
        f"{entry['images_per_s']:.0f} img/s{vs}{ls}"
    )


def mean_over(values: Sequence[float]) -> float:
    """Mean of ``values`` (NaN when empty)."""
    return float(np.mean(values)) if len(values) else float("nan")
