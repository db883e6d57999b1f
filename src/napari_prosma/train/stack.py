""":func:`train_many`: set up, train and finish one run or a stack of runs (see
:mod:`napari_prosma.train.loop` for the loop and :mod:`napari_prosma.train.recipe` for the recipe).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..fs import atomic_write_bytes
from .ddp import any_rank, rank_streams, resumed_line
from .loop import (
    Run,
    after_epoch,
    build_step,
    empty_indices,
    epoch_draws,
    epoch_draws_per_pass,
    log_line,
    run_epoch,
)

RESUME_FILES = ("last.safetensors", "last.json", "last_optim.safetensors")
BEST_FILES = ("best.safetensors", "best.json")


def _select(cfg: Any, has_val: bool) -> str:
    if cfg.select == "auto":
        return "best_val" if has_val else "last"
    if cfg.select == "best_val" and not has_val:
        raise ValueError(f"{cfg.name}: select='best_val' needs a split with a 'val' part")
    return cfg.select


def setup_run(cfg: Any, device: Any, world: int, rank: int, say: Callable[[str], None]) -> Any:
    """Build ``cfg``'s run (data, model, optimiser, resume state); a :class:`TrainResult`
    instead when its folder holds a finished run."""
    import torch

    from .augment import Data2D, Data3D
    from .recipe import TrainResult, _build, load_data
    from .support import _read_resume, make_optimizer

    out = Path(cfg.out_dir)
    if (out / "model.safetensors").exists() and (out / "result.json").exists() and cfg.resume:
        say(f"{out}: already finished")
        res = json.loads((out / "result.json").read_text())
        return TrainResult("already finished", out, cfg.epochs, out / "model.safetensors", res)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_ds, val_ds, test_ds, split_desc = load_data(cfg)
    _select(cfg, val_ds is not None)
    model, card = _build(cfg)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        cl = torch.channels_last if cfg.dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=cl)
    lr0 = torch.tensor(cfg.lr, device=device) if device.type == "cuda" else cfg.lr
    opt = make_optimizer(model, cfg.optimizer, lr0, cfg.weight_decay, device)
    n_crops = 0
    if cfg.dims == 2:
        images, labels = train_ds.images, train_ds.labels
        if cfg.negative_crops:
            from .negatives import negative_crops

            crops, crop_masks, _ = negative_crops(images, labels, cfg.negative_crops, seed=cfg.seed)
            n_crops = len(crops)
            images = np.concatenate([images, crops])
            labels = np.concatenate([labels, crop_masks])
            say(f"{cfg.name}: {n_crops} lesion-free crops added as empty-mask images")
        data = Data2D(images, labels, card.normalization, device)
    else:
        data = Data3D(
            train_ds.images,
            train_ds.labels,
            card.normalization,
            cfg.patch_size,
            device,
            cfg.fg_fraction,
            cfg.permute_axes,
            cfg.augment,
        )
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    bsz = cfg.batch_size // world
    empty_idx = None
    if cfg.dims == 2:
        if cfg.empty_share:
            empty_idx = empty_indices(labels)
        n_empty = 0 if empty_idx is None else len(empty_idx)
        per_pass = epoch_draws_per_pass(data.n, n_empty, cfg.empty_share)
        steps = cfg.iters_per_epoch or (per_pass // world) // bsz
        if steps < 1:
            raise ValueError(f"{data.n} training images are too few for batch {cfg.batch_size}")
    else:
        steps = cfg.iters_per_epoch or max(data.n // cfg.batch_size, 1)
    run = Run(cfg, out, model, card, opt, data, train_ds, val_ds, test_ds, split_desc, steps, bsz)
    run.empty_idx = empty_idx
    run.n_crops = n_crops
    if cfg.resume and (out / "last.json").exists():
        run.start_epoch, old = _read_resume(out, model, opt, device)
        run.history = list(old.training.get("history", []))
        run.best = (old.training.get("state") or {}).get("best")
        run.done = run.start_epoch
        saved_by = (old.training.get("state") or {}).get("processes")
        say(resumed_line(out, run.start_epoch, saved_by, world))
    elif not cfg.resume:
        for f in BEST_FILES:
            (out / f).unlink(missing_ok=True)
    return run


def _prepare(runs: Sequence[Run], device: Any, world: int, rank: int, say: Any) -> None:
    """Loss function, eager step, DDP wrapper, CUDA stream and graph of every run."""
    import torch

    from ..losses import LOSSES
    from .support import _capture

    for r in runs:
        cfg = r.cfg
        amp = cfg.amp == "bf16" and device.type == "cuda"
        use_cl = cfg.channels_last and device.type == "cuda"
        r.net = r.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            r.net = DDP(r.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            r.net = torch.compile(r.net)
        build_step(r, LOSSES[cfg.loss], amp, use_cl, device)
        rank_streams(cfg.seed, r.start_epoch, rank, device)  # 3D: different draws per rank
        if device.type != "cuda":
            continue
        r.stream = torch.cuda.Stream(device)
        if cfg.cuda_graphs and world == 1 and not cfg.compile:
            try:
                r.graph = _capture(
                    r.model, r.opt, r.body, r.eager_step, r.loss_acc, r.static_idx, r.data.n, device
                )
            except Exception as e:  # pragma: no cover - depends on the GPU stack
                say(f"{r.out.name}: CUDA graph capture failed ({type(e).__name__}: {e}); eager")
                r.graph = None
                r.opt.zero_grad(set_to_none=True)


def _set_lr(run: Run, lr: float) -> None:
    import torch

    for g in run.opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def train_many(
    cfgs: Sequence[Any],
    progress: Callable[[Any], None] | None = None,
    cancel: Any = None,
    log: Callable[[str], None] | None = print,
    command: str | None = None,
    max_epochs: int | None = None,
    time_limit: float | None = None,
    finish_reserve: float = 0.0,
) -> list[Any]:
    """Train (or resume) every recipe of ``cfgs`` together, one process, one device.

    Arguments as :func:`napari_prosma.train.train`; the runs must share ``epochs`` and
    ``device``. ``finish_reserve``: seconds of ``time_limit`` kept for the final evaluation,
    so that the call which would train the last epoch stops before it unless the finish fits
    too. Returns one :class:`~napari_prosma.train.TrainResult` per recipe.
    """
    import torch

    from .recipe import TrainResult, _is_cancelled, _pick_device, lr_at

    t_call = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if len({c.epochs for c in cfgs}) > 1 or len({c.device for c in cfgs}) > 1:
        raise ValueError("the runs of one stack must share epochs and device")
    if world > 1 and len(cfgs) > 1:
        raise ValueError("a stack of runs cannot be distributed; run them one by one")
    device = _pick_device(cfgs[0].device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    say = (lambda s: log(s)) if (log and rank == 0) else (lambda s: None)
    results: list[Any] = [setup_run(c, device, world, rank, say) for c in cfgs]
    runs = [r for r in results if isinstance(r, Run)]
    _prepare(runs, device, world, rank, say)
    epochs = cfgs[0].epochs
    for r in runs:
        r.stop_at = epochs if max_epochs is None else min(epochs, r.start_epoch + max_epochs)
    status, n = "finished", len(runs)
    for r in runs:
        r.model.train()
    t_start = time.perf_counter()
    try:
        epoch = min((r.start_epoch for r in runs), default=epochs)
        while any(epoch < r.stop_at for r in runs):
            active = [r for r in runs if r.start_epoch <= epoch < r.stop_at]
            for r in active:
                _set_lr(r, lr_at(r.cfg, epoch))
                epoch_draws(r, epoch, rank, world, device)
                r.loss_acc.zero_()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            run_epoch(active, device, lambda: _is_cancelled(cancel))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            out_of_time = _out_of_time(
                time_limit,
                time.perf_counter() - t_call,
                dt,
                len(active),
                epoch,
                epochs,
                finish_reserve,
            )
            out_of_time = any_rank(out_of_time, device, world)  # all ranks stop together
            for r in active:
                _epoch_end(r, epoch, dt, len(active), device, world, rank, say, progress)
                if out_of_time:
                    r.stop_at = epoch + 1
                _maybe_checkpoint(r, epoch, rank, world)
            epoch += 1
    except KeyboardInterrupt:
        status = "cancelled"
        say("cancelled; the last complete checkpoint of every run is kept")
    wall = time.perf_counter() - t_start
    finished: list[Any] = []
    to_finish: list[tuple[int, Run]] = []
    for r in results:
        if not isinstance(r, Run):
            finished.append(r)
            continue
        st = status if status == "cancelled" else ("stopped" if r.stop_at < epochs else status)
        if st != "finished" or rank != 0:
            if st == "stopped":
                say(f"{r.out}: stopped after epoch {r.stop_at}; run again to resume")
            finished.append(TrainResult(st, r.out, r.stop_at if st == "stopped" else r.done))
            continue
        finished.append(None)
        to_finish.append((len(finished) - 1, r))
    # the final evaluations (engine on the GPU, HD95 on the CPU) of a stack overlap in threads
    workers = min(len(to_finish), 4 if device.type == "cuda" else 1) or 1
    with ThreadPoolExecutor(workers) as pool:
        jobs = [
            (k, pool.submit(finish_run, r, device, world, wall, command, say, n))
            for k, r in to_finish
        ]
        for k, job in jobs:
            finished[k] = job.result()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return finished


def _out_of_time(
    limit: float | None,
    elapsed: float,
    dt: float,
    n: int,
    epoch: int,
    epochs: int,
    finish_reserve: float = 0.0,
) -> bool:
    """Whether a stack that just trained ``epoch`` (``dt`` s, ``n`` runs) must stop now
    to keep ``limit``: the next epoch and the checkpoints must fit, and when the next epoch
    is the last, ``finish_reserve`` seconds for the final evaluation as well. Never after
    the last epoch (the finish follows it)."""
    if limit is None or epoch + 1 >= epochs:
        return False
    need = 2 * dt + 10 + 8 * n + (finish_reserve if epoch + 2 == epochs else 0.0)
    return elapsed + need > limit


def _epoch_end(run, epoch, dt, n, device, world, rank, say, progress):  # type: ignore[no-untyped-def]
    from .recipe import TrainProgress, lr_at

    cfg = run.cfg
    amp = cfg.amp == "bf16" and device.type == "cuda"
    entry = after_epoch(run, epoch, lr_at(cfg, epoch), dt, n, device, amp, world, rank)
    last = epoch + 1 == cfg.epochs
    if (epoch + 1) % cfg.log_every == 0 or last or epoch == run.start_epoch:
        say(log_line(entry, cfg.epochs, run.out.name, n))
    run.done = epoch + 1
    if progress:
        progress(
            TrainProgress(
                epoch + 1,
                cfg.epochs,
                entry["loss"],
                entry["lr"],
                entry["images_per_s"],
                entry.get("val"),
            )
        )


def _maybe_checkpoint(run: Run, epoch: int, rank: int, world: int = 1) -> None:
    from .support import _write_resume

    due = run.cfg.checkpoint_every and (epoch + 1) % run.cfg.checkpoint_every == 0
    # also after the last epoch of this call: a failure in the final evaluation then
    # resumes straight into it (removed once result.json is written)
    if rank == 0 and (due or epoch + 1 == run.stop_at):
        run.card.training = {
            "state": {"epoch": epoch + 1, "best": run.best, "processes": world},
            "history": run.history,
        }
        _write_resume(run.out, run.model, run.opt, run.card, epoch + 1)


def finish_run(run: Run, device: Any, world: int, wall: float, command: Any, say: Any, n: int):  # type: ignore[no-untyped-def]
    """Choose the weights to ship, record the sparsity range, save, evaluate on test once
    and write ``result.json``; returns the :class:`TrainResult`."""
    import torch

    from ..checkpoint import load, save
    from ..datasets import DATASETS
    from ..nets import ARCH_TITLES
    from .augment3d import DESCRIPTION as AUG3D_DESCRIPTION
    from .recipe import TrainResult, evaluate_shipped
    from .support import _json_safe, load_best, sparsity_range

    cfg, out, card = run.cfg, run.out, run.card
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rule = _select(cfg, run.val_ds is not None)
    chosen = {"rule": rule, "epoch": cfg.epochs}
    if rule == "best_val" and run.best and (out / "best.safetensors").exists():
        load_best(out, run.model, device)
        chosen = {"rule": rule, **run.best, "score_is": "mean per-image Dice on val"}
    train_seconds = sum(h.get("seconds", 0.0) for h in run.history)
    card.training = {
        "data": DATASETS[cfg.dataset]["title"],
        "dataset": cfg.dataset,
        "architecture": ARCH_TITLES.get(cfg.arch, cfg.arch),
        "split": run.split_desc,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "selected": chosen,
        "batch_size": cfg.batch_size,
        "steps_per_epoch": run.steps,
        "sampling": (
            f"every image with a lesion once per epoch; the {len(run.empty_idx)} training "
            f"images with an empty mask repeated to {cfg.empty_share:.0%} of the draws"
            if cfg.empty_share and run.empty_idx is not None and len(run.empty_idx)
            else "one pass over the training images per epoch"
        )
        + (
            f"; {run.n_crops} lesion-free crops of training images with a lesion, resized "
            "to the training size, added as images with an empty mask"
            if run.n_crops
            else ""
        ),
        "optimizer": _describe_optimizer(cfg),
        "loss": cfg.loss,
        "augmentation": (
            "random flips + 90° rotations (dihedral group) per image"
            if cfg.dims == 2
            else f"patches {cfg.patch_size}, {cfg.fg_fraction:.0%} foreground-centred, random "
            "flips"
            + (" and axis transpositions" if cfg.permute_axes else "")
            + (AUG3D_DESCRIPTION if cfg.augment == "nnunet" else "")
        ),
        "test_time_augmentation": "all axis flips averaged" if cfg.tta else "none",
        "precision": "bf16 autocast" if cfg.amp == "bf16" and device.type == "cuda" else "fp32",
        "device": device_name,
        "processes": world,
        "stacked_runs": n,
        "train_seconds": train_seconds,
        "command": command or " ".join(sys.argv),
    }
    run.model.eval()
    model_path = save(run.model, out / "model", card, dtype=cfg.ship_dtype, overwrite=True)
    # the range and the test metrics come from the shipped (rounded) weights, as the plugin
    # will run them: the in-memory float32 weights give slightly different zero fractions
    shipped, shipped_card = load(model_path, device=device)
    rng, how = sparsity_range(shipped, shipped_card, run.train_ds, device, cfg.sparsity_images)
    card.gate_sparsity_range = rng
    if how:
        card.extra["gate_sparsity_range_from"] = how
    model_path = save(run.model, out / "model", card, dtype=cfg.ship_dtype, overwrite=True)
    metrics: dict[str, Any] = {}
    evaluation = None
    if cfg.final_eval:
        evaluation = _json_safe(evaluate_shipped(shipped, shipped_card, run.test_ds, device, cfg))
        metrics = _json_safe({"test": _test_metrics(evaluation, run.split_desc, cfg)})
        card.metrics = metrics
        model_path = save(run.model, out / "model", card, dtype=cfg.ship_dtype, overwrite=True)
    result = {
        "config": dataclasses.asdict(cfg),
        "card": json.loads((out / "model.json").read_text()),
        "history": run.history,
        "wall_seconds_this_call": wall,
        "train_seconds": train_seconds,
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "evaluation": evaluation,
    }
    atomic_write_bytes(out / "result.json", (json.dumps(result, indent=1) + "\n").encode())
    for f in RESUME_FILES + BEST_FILES:
        (out / f).unlink(missing_ok=True)
    if metrics:
        t = metrics["test"]
        say(
            f"{out.name}: test ({t['n_cases']} cases, once, {rule} epoch {chosen['epoch']}): "
            f"dice {t['dice_mean']:.4f} iou {t['iou_mean']:.4f} hd95 {t['hd95_mean']}"
        )
    say(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")
    return TrainResult("finished", out, cfg.epochs, model_path, result)


def _describe_optimizer(cfg: Any) -> str:
    kind = "poly (1 - t)^0.9" if cfg.lr_schedule == "poly" else "cosine"
    sched = f"lr {cfg.lr} {kind} to {cfg.min_lr} per epoch"
    if cfg.optimizer == "adam_l2":
        return f"Adam {sched}, L2 weight decay {cfg.weight_decay} on every parameter"
    return (
        f"AdamW {sched}, decoupled weight decay {cfg.weight_decay} on conv/linear weights; "
        "none on biases, norm parameters and the gates' theta"
    )


def _test_metrics(evaluation: dict[str, Any], split_desc: dict[str, Any], cfg: Any) -> dict:
    s = evaluation["summary"]
    rep = evaluation.get("report") or {}
    return {
        "split": split_desc,
        "n_cases": s["n_cases"],
        "dice_mean": rep.get("dice_mean", s["mean_dice"]),
        "iou_mean": rep.get("iou_mean", s["mean_iou"]),
        "hd95_mean": rep.get("hd95_mean", s.get("mean_hd95")),
        "per_class": s["per_class"],
        "report": rep,
        "how": evaluation["protocol"],
        "weights": cfg.ship_dtype,
    }
