"""Training: one function for 2D and 3D, single GPU, CPU or ``torchrun`` (DDP).

``train(cfg)`` reads the dataset and split, keeps the training set on the device
(:mod:`napari_prosma.augment`), and runs ``cfg.epochs`` epochs of Adam with a per-epoch
cosine learning rate (``lr`` to ``min_lr``, as U-KAN's ``CosineAnnealingLR``), under bf16
autocast, channels-last (2D) and, on CUDA, one CUDA graph per step. Every
``checkpoint_every`` epochs it writes ``OUT/last.safetensors`` + ``last.json`` (float32,
:func:`napari_prosma.checkpoint.save`) and ``last_optim.safetensors`` (Adam moments, RNG
states): running the same config again resumes from there. At the end it writes
``OUT/model.safetensors`` + ``model.json`` (float16, the shippable model), evaluates that
file on the test split through :func:`napari_prosma.evaluation.evaluate`, puts the metrics in
the card and writes ``OUT/result.json`` (config, history, timings, metrics per case).

Nothing is ever half-written (every file goes through a temp file and a rename); ``cancel``
stops between steps and leaves the last complete checkpoint as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import ModelCard
from .errors import Cancelled
from .fs import atomic_write_bytes
from .train_support import (
    _capture,
    _json_safe,
    _read_resume,
    _write_resume,
    gate_sparsity,
    quick_validate,
)

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from .datasets import DATASETS, Dataset2D, random_split, read_dataset, read_split

#: Normalisation of each dataset (stored in the card; inference applies the same).
NORMALIZATION: dict[str, dict[str, Any]] = {
    "busi": {"mode": "fixed", "scale": 255.0, "mean": [0.449], "std": [0.226]},
    "kvasir": {
        "mode": "fixed",
        "scale": 255.0,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    },
    "glas": {
        "mode": "fixed",
        "scale": 255.0,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    },
    "hippocampus": {"mode": "zscore"},
}


@dataclass
class TrainConfig:
    """A training recipe (``training/recipes/*.toml`` holds these fields at top level)."""

    name: str = "run"
    dataset: str = "busi"
    data_root: str | None = None
    split: str | None = None  # split JSON; None: random 80/20 of ``split_seed``
    split_seed: int | None = None  # default: ``seed``
    seed: int = 0
    arch: str = "prosma_unet"
    widths: Any = "small"
    gate: str | None = None
    norm: str = "batch"
    epochs: int = 400
    batch_size: int = 8  # global (divided among DDP ranks)
    iters_per_epoch: int | None = None  # 3D: patches per epoch / batch; 2D: one pass
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    loss: str = "bce_dice"
    patch_size: list[int] | None = None  # 3D
    fg_fraction: float = 0.33
    permute_axes: bool = False
    amp: str = "bf16"  # "bf16" or "none"
    channels_last: bool = True
    cuda_graphs: bool = True
    compile: bool = False
    device: str = "auto"
    out_dir: str = "runs/run"
    val_every: int = 20
    checkpoint_every: int = 50
    log_every: int = 10
    resume: bool = True
    final_eval: bool = True
    hd95: bool = True
    eval_engine: str = "auto"  # the inference engine if importable, else the internal path
    limit: int | None = None  # read only this many cases (tests)
    size: int | None = None  # 2D: resize to this size instead of the dataset's (tests)
    intended_use: str = ""
    limitations: str = ""
    ship_dtype: str = "float16"

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        data.update(overrides or {})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recipe key(s): {', '.join(unknown)}")
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {list(DATASETS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.amp not in ("bf16", "none"):
            raise ValueError("amp must be 'bf16' or 'none'")
        if DATASETS[self.dataset]["dims"] == 3 and not self.patch_size:
            raise ValueError("a 3D recipe needs patch_size")

    @property
    def dims(self) -> int:
        return int(DATASETS[self.dataset]["dims"])


@dataclass
class TrainProgress:
    epoch: int
    epochs: int
    loss: float
    lr: float
    images_per_s: float
    val: dict[str, float] | None = None


@dataclass
class TrainResult:
    status: str  # "finished", "cancelled", "already finished", "stopped" (max_epochs reached)
    out_dir: Path
    epoch: int
    model_path: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- helpers


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Cosine annealing from ``lr`` (epoch 0) to ``min_lr`` (epoch ``epochs``)."""
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2


def load_data(cfg: TrainConfig) -> tuple[Any, Any, dict[str, Any]]:
    """The training and test subsets of ``cfg``'s dataset and a description of the split."""
    ds = read_dataset(cfg.dataset, cfg.data_root, cfg.limit)
    if cfg.split:
        split_path = Path(cfg.split)
        if not split_path.exists() and not split_path.is_absolute():
            repo = Path(__file__).resolve().parents[2]  # a source checkout
            if (repo / split_path).exists():
                split_path = repo / split_path
        s = read_split(split_path)
        split_desc = {"file": str(cfg.split), "seed": s.get("seed")}
        if cfg.limit:
            keep = set(ds.ids)
            s = {k: [i for i in s[k] if i in keep] for k in ("train", "test")}
    else:
        seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        s = random_split(ds.ids, seed)
        split_desc = {"file": None, "seed": seed, "rule": "datasets.random_split 80/20"}
    split_desc.update(n_train=len(s["train"]), n_test=len(s["test"]))
    if cfg.size and isinstance(ds, Dataset2D) and cfg.size != ds.images.shape[-1]:
        from .datasets import resize_image, resize_mask

        hwc = [np.ascontiguousarray(a.transpose(1, 2, 0)) for a in ds.images]
        imgs = [resize_image(a[..., 0] if a.shape[-1] == 1 else a, cfg.size) for a in hwc]
        imgs = [a if a.ndim == 3 else a[..., None] for a in imgs]
        ds.images = np.stack(imgs).transpose(0, 3, 1, 2).copy()
        ds.masks = np.stack([resize_mask(m, cfg.size) for m in ds.masks])
        ds.meta["size"] = cfg.size
    return ds.subset(s["train"]), ds.subset(s["test"]), split_desc


def _pick_device(name: str, local_rank: int) -> Any:
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def _build(cfg: TrainConfig) -> tuple[Any, ModelCard]:
    from .nets import build_model

    info = dict(DATASETS[cfg.dataset])
    if cfg.size:
        info["size"] = cfg.size
    n_classes = len(info["classes"])
    kwargs: dict[str, Any] = {
        "spatial_dims": info["dims"],
        "in_channels": info["channels"],
        "out_channels": 1 if n_classes == 2 else n_classes,
        "widths": cfg.widths,
        "norm": cfg.norm,
    }
    if cfg.gate:
        kwargs["gate"] = cfg.gate
    model = build_model(cfg.arch, **kwargs)
    card = ModelCard(
        architecture=cfg.arch,
        arch_kwargs=dict(model.config),
        name=cfg.name,
        class_names=list(info["classes"]),
        normalization=dict(NORMALIZATION[cfg.dataset]),
        patch_size=list(cfg.patch_size) if cfg.patch_size else [info["size"]] * 2,
        spacing=[1.0, 1.0, 1.0] if info["dims"] == 3 else None,
        intended_use=cfg.intended_use,
        limitations=cfg.limitations,
    )
    if info["dims"] == 2:
        card.extra["input_size"] = [info["size"], info["size"]]
        card.extra["input_size_note"] = (
            "trained on whole images resized to this size (bilinear, aspect ratio not kept): "
            "resize the whole image to it before inference and the labels back (nearest)"
        )
    else:
        card.extra["axis_order"] = "NIfTI array order as stored (nibabel dataobj)" + (
            "; trained with random axis transpositions, so any order works"
            if cfg.permute_axes
            else ""
        )
    return model, card


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


# ---------------------------------------------------------------------------- train


def train(
    cfg: TrainConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    cancel: Any = None,
    log: Callable[[str], None] | None = print,
    command: str | None = None,
    max_epochs: int | None = None,
    time_limit: float | None = None,
) -> TrainResult:
    """Train (or resume) ``cfg``.

    Args:
        progress: called after every epoch with a :class:`TrainProgress`.
        cancel: a ``threading.Event`` or a callable returning True to stop; checked between
            steps. A cancelled run returns ``status="cancelled"`` and writes nothing more.
        log: where progress lines go (rank 0 only); None for silence.
        command: the command line to record in the card.
        max_epochs: stop (with a resume checkpoint) after this many epochs in this call, so
            a long run can be split across time-limited sessions.
        time_limit: likewise, stop (with a resume checkpoint) at the end of the first epoch
            that would otherwise end more than this many seconds after the call began.
    """
    import torch
    import torch.nn.functional as F  # noqa: F401

    from .augment import Data2D, Data3D
    from .losses import LOSSES

    t_call = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world > 1
    device = _pick_device(cfg.device, local_rank)
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    say = (lambda s: log(s)) if (log and rank == 0) else (lambda s: None)

    out = Path(cfg.out_dir)
    if (out / "model.safetensors").exists() and (out / "result.json").exists() and cfg.resume:
        say(f"{out}: already finished")
        res = json.loads((out / "result.json").read_text())
        return TrainResult("already finished", out, cfg.epochs, out / "model.safetensors", res)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)  # noqa: F841 - reserved for CPU-side choices
    train_ds, test_ds, split_desc = load_data(cfg)
    model, card = _build(cfg)
    model.to(device)
    cl_format = torch.channels_last if cfg.dims == 2 else torch.channels_last_3d
    use_cl = cfg.channels_last and device.type == "cuda"
    if use_cl:
        model = model.to(memory_format=cl_format)
    amp = cfg.amp == "bf16" and device.type == "cuda"
    use_graph = cfg.cuda_graphs and device.type == "cuda" and not distributed and not cfg.compile
    lr_t = torch.tensor(cfg.lr, device=device) if device.type == "cuda" else cfg.lr
    opt = torch.optim.Adam(
        model.parameters(),
        lr=lr_t,
        weight_decay=cfg.weight_decay,
        capturable=device.type == "cuda",
        foreach=True,
    )
    loss_fn = LOSSES[cfg.loss]

    start_epoch, history = 0, []
    if cfg.resume and (out / "last.json").exists():
        start_epoch, old = _read_resume(out, model, opt, device)
        history = list(old.training.get("history", []))
        say(f"resumed {out} at epoch {start_epoch}")

    if cfg.dims == 2:
        data = Data2D(train_ds.images, train_ds.masks, card.normalization, device)
    else:
        data = Data3D(
            train_ds.images,
            train_ds.labels,
            card.normalization,
            cfg.patch_size,
            device,
            cfg.fg_fraction,
            cfg.permute_axes,
        )
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    bsz = cfg.batch_size // world
    if cfg.dims == 2:
        n_local = data.n // world
        steps = cfg.iters_per_epoch or n_local // bsz
        if steps < 1:
            raise ValueError(f"{data.n} training images are too few for batch {cfg.batch_size}")
    else:
        steps = cfg.iters_per_epoch or max(data.n // cfg.batch_size, 1)

    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    static_idx = torch.zeros(bsz, dtype=torch.long, device=device)
    loss_acc = torch.zeros((), device=device)

    def body() -> Any:
        if cfg.dims == 2:
            x, y = data.batch(static_idx, True, use_cl)
        else:
            x, y = data.batch(bsz)
            if use_cl:
                x = x.contiguous(memory_format=cl_format)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = net(x)
        return loss_fn(logits, y)

    def eager_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = body()
        loss.backward()
        opt.step()
        loss_acc.add_(loss.detach())

    if device.type == "cuda" and start_epoch == 0:  # different augmentation draws per rank
        torch.cuda.manual_seed(cfg.seed * 1000 + rank)
    graph = None
    if use_graph:
        try:
            graph = _capture(model, opt, body, eager_step, loss_acc, static_idx, data.n, device)
        except Exception as e:  # pragma: no cover - depends on the GPU stack
            say(f"CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly")
            graph = None
            opt.zero_grad(set_to_none=True)
    t_start = time.perf_counter()
    train_seconds = sum(h.get("seconds", 0.0) for h in history)
    images_seen = 0
    train_seconds_call = 0.0
    status = "finished"
    epoch = start_epoch
    model.train()
    stop_at = cfg.epochs if max_epochs is None else min(cfg.epochs, start_epoch + max_epochs)
    try:
        for epoch in range(start_epoch, stop_at):
            lr = lr_at(cfg, epoch)
            for g in opt.param_groups:
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
            if cfg.dims == 2:
                gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
                perm = torch.randperm(data.n, generator=gen)[rank::world][: steps * bsz]
                if len(perm) < steps * bsz:  # iters_per_epoch beyond one pass
                    perm = perm.repeat(math.ceil(steps * bsz / max(len(perm), 1)))
                perm = perm[: steps * bsz].to(device)
            loss_acc.zero_()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for s in range(steps):
                if _is_cancelled(cancel):
                    raise Cancelled
                if cfg.dims == 2:
                    static_idx.copy_(perm[s * bsz : (s + 1) * bsz])
                if graph is not None:
                    graph.replay()
                else:
                    eager_step()
            mean_loss = float(loss_acc) / steps  # synchronises
            if distributed:
                import torch.distributed as dist

                t = torch.tensor([mean_loss], device=device)
                dist.all_reduce(t)
                mean_loss = float(t) / world
            dt = time.perf_counter() - t0
            train_seconds += dt
            train_seconds_call += dt
            n_img = steps * bsz * world
            images_seen += n_img
            ips = n_img / dt
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": mean_loss,
                "lr": lr,
                "seconds": dt,
                "images_per_s": ips,
            }
            last = epoch + 1 == cfg.epochs
            if rank == 0 and (last or (cfg.val_every and (epoch + 1) % cfg.val_every == 0)):
                entry["val"] = quick_validate(model, test_ds, card, device, amp)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss} at epoch {epoch + 1}")
            history.append(entry)
            if (epoch + 1) % cfg.log_every == 0 or last or epoch == start_epoch:
                v = entry.get("val")
                vs = f" val dice {v['dice']:.4f} iou {v['iou']:.4f}" if v else ""
                say(
                    f"epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.4f} lr {lr:.2e} "
                    f"{ips:.0f} img/s{vs}"
                )
            if progress:
                progress(TrainProgress(epoch + 1, cfg.epochs, mean_loss, lr, ips, entry.get("val")))
            ckpt_due = cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0
            out_of_time = (
                time_limit is not None
                and not last
                and time.perf_counter() - t_call + 2 * dt + 10 > time_limit
            )
            if out_of_time:
                stop_at = epoch + 1
            # also after the last epoch: a failure in the final evaluation then resumes
            # straight into it (removed once result.json is written)
            if rank == 0 and (ckpt_due or epoch + 1 == stop_at):
                card.training = {"state": {"epoch": epoch + 1}, "history": history}
                _write_resume(out, model, opt, card, epoch + 1)
            if out_of_time:
                break
        epoch = stop_at
    except Cancelled:
        status = "cancelled"
        say(f"cancelled at epoch {epoch + 1}; the last complete checkpoint is kept")
    if status == "finished" and stop_at < cfg.epochs:
        status = "stopped"
        say(f"stopped after epoch {stop_at}; run again to resume")
    if status != "finished" or rank != 0:
        if distributed:
            import torch.distributed as dist

            dist.barrier()
        return TrainResult(status, out, epoch)

    # ---------------------------------------------------------------- final model + eval
    wall = time.perf_counter() - t_start
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = DATASETS[cfg.dataset]
    card.training = {
        "data": info["title"],
        "dataset": cfg.dataset,
        "split": split_desc,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "steps_per_epoch": steps,
        "optimizer": f"Adam lr {cfg.lr} cosine to {cfg.min_lr} per epoch, weight decay "
        f"{cfg.weight_decay}",
        "loss": cfg.loss,
        "augmentation": (
            "random flips + 90° rotations (dihedral group) per image"
            if cfg.dims == 2
            else f"patches {cfg.patch_size}, {cfg.fg_fraction:.0%} foreground-centred, random "
            "flips" + (" and axis transpositions" if cfg.permute_axes else "")
        ),
        "precision": "bf16 autocast" if amp else "float32",
        "device": device_name,
        "processes": world,
        "train_seconds": train_seconds,
        "command": command or " ".join(sys.argv),
    }
    card.gate_sparsity_range = gate_sparsity(model, train_ds, card, device)
    from .checkpoint import load, save

    model_path = save(model, out / "model", card, dtype=cfg.ship_dtype, overwrite=True)
    metrics: dict[str, Any] = {}
    evaluation = None
    if cfg.final_eval:
        shipped, shipped_card = load(model_path, device=device)
        evaluation = evaluate_shipped(shipped, shipped_card, test_ds, device, cfg)
        s = evaluation["summary"]
        metrics = {
            "test": {
                "split": split_desc,
                "n_cases": s["n_cases"],
                "dice_mean": s["mean_dice"],
                "iou_mean": s["mean_iou"],
                "hd95_mean": s.get("mean_hd95"),
                "per_class": s["per_class"],
                "how": evaluation["protocol"],
                "weights": cfg.ship_dtype,
            }
        }
        metrics = _json_safe(metrics)
        evaluation = _json_safe(evaluation)
        card.metrics = metrics
        model_path = save(model, out / "model", card, dtype=cfg.ship_dtype, overwrite=True)
    result = {
        "config": dataclasses.asdict(cfg),
        "card": json.loads((out / "model.json").read_text()),
        "history": history,
        "wall_seconds_this_call": wall,
        "train_seconds": train_seconds,
        "images_per_s_this_call": images_seen / max(train_seconds_call, 1e-9),
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "evaluation": evaluation,
    }
    atomic_write_bytes(out / "result.json", (json.dumps(result, indent=1) + "\n").encode())
    for f in ("last.safetensors", "last.json", "last_optim.safetensors"):
        (out / f).unlink(missing_ok=True)
    if metrics:
        t = metrics["test"]
        say(
            f"test ({t['n_cases']} cases): dice {t['dice_mean']:.4f} iou {t['iou_mean']:.4f} "
            f"hd95 {t['hd95_mean']}"
        )
    say(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    return TrainResult("finished", out, cfg.epochs, model_path, result)


def evaluate_shipped(model: Any, card: ModelCard, test: Any, device: Any, cfg: TrainConfig):  # type: ignore[no-untyped-def]
    """Evaluate the shipped (float16-stored) model file through the inference path."""
    from .evaluation import evaluate

    return evaluate(
        model, card, test, device=str(device), with_hd95=cfg.hd95, engine=cfg.eval_engine
    )


def overrides_from_strings(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` overrides; values are read as TOML (strings may be bare)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v
    return out
