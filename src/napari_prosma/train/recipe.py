"""Training: one function for 2D and 3D, single GPU, CPU or ``torchrun`` (DDP), and
:func:`train_many` for a stack of runs sharing one GPU (:mod:`napari_prosma.train.loop`).

``train(cfg)`` reads the dataset and split (train / val / test), keeps the training set on
the device (:mod:`napari_prosma.train.augment`), and runs ``cfg.epochs`` epochs of AdamW (no
weight decay on biases, norms and the gates' theta; :func:`~.support.make_optimizer`)
with a per-epoch cosine learning rate (``lr`` to ``min_lr``, as U-KAN's
``CosineAnnealingLR``), under bf16 autocast, channels-last (2D) and, on CUDA, one CUDA
graph per step. Validation runs on the split's ``val`` part only. Every
``checkpoint_every`` epochs it writes ``OUT/last.safetensors`` + ``last.json`` (float32,
:func:`napari_prosma.checkpoint.save`) and ``last_optim.safetensors`` (optimiser moments,
RNG states): running the same config again resumes from there. At the end it writes
``OUT/model.safetensors`` + ``model.json`` (float16, the shippable model: the best
validation epoch's weights with ``select="best_val"``), records the gate-sparsity range of
the training images in the card (the format the plugin reads), evaluates the shipped file
once on the test part through :func:`napari_prosma.evaluation.evaluate`, puts the metrics in
the card and writes ``OUT/result.json`` (config, history, timings, metrics per case).

Nothing is ever half-written (every file goes through a temp file and a rename); ``cancel``
stops between steps and leaves the last complete checkpoint as it was.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import ModelCard
from ..errors import Cancelled, cancel_check  # noqa: F401  (Cancelled: re-exported)

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from ..datasets import DATASETS, random_split, read_dataset, read_split

#: Normalisation of each dataset (stored in the card; inference applies the same).
NORMALIZATION: dict[str, dict[str, Any]] = {
    "busi": {"mode": "fixed", "scale": 255.0, "mean": [0.449], "std": [0.226]},
    "busi_with_normal": {"mode": "fixed", "scale": 255.0, "mean": [0.449], "std": [0.226]},
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
    # the stored intensities scaled by their range, the minimum (background) at 0, so
    # zero padding pads with the background (z-scoring padded with the mean intensity)
    "hippocampus": {"mode": "percentile", "lower": 0.0, "upper": 99.5},
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
    optimizer: str = "adamw"  # "adamw" (parameter groups) or "adam_l2" (the earlier recipe)
    weight_decay: float = 1e-4
    dead_slope: float = 0.0  # dead-gate remedy (nets.gate), 0: off
    select: str = "auto"  # "best_val", "last"; "auto": best_val when the split has val
    loss: str = "bce_dice"
    patch_size: list[int] | None = None  # 3D
    fg_fraction: float = 0.33
    # 2D: share of each epoch's draws taken from images with an empty mask (e.g. BUSI's
    # normal scans); every other image is still seen once per epoch, so the epoch grows
    # to n_other / (1 - empty_share) draws. 0: one plain pass over all images.
    empty_share: float = 0.0
    # 2D: lesion-free crops per image with a lesion, added to the training part as images
    # with an empty mask (train.negatives; drawn with the normal scans under empty_share)
    negative_crops: int = 0
    permute_axes: bool = False
    augment: str = "flips"  # 3D: "flips" or "nnunet" (augment3d: spatial + intensity)
    lr_schedule: str = "cosine"  # "cosine" or "poly" (nnU-Net's (1 - t)^0.9), per epoch
    tta: bool = False  # final test evaluation averages over all axis flips
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
    # training cases for the card's gate_sparsity_range (0: all). Measured reason: the
    # [min, max] of 64 frames made kvasir_prosma warn on 19 of its 200 test frames
    sparsity_images: int = 0
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
        if self.optimizer not in ("adamw", "adam_l2"):
            raise ValueError("optimizer must be 'adamw' or 'adam_l2'")
        if self.lr_schedule not in ("cosine", "poly"):
            raise ValueError("lr_schedule must be 'cosine' or 'poly'")
        if self.augment not in ("flips", "nnunet"):
            raise ValueError("augment must be 'flips' or 'nnunet'")
        if not 0.0 <= self.empty_share < 1.0:
            raise ValueError("empty_share must be in [0, 1)")
        if self.empty_share and self.dims != 2:
            raise ValueError("empty_share is for 2D recipes (3D draws patches by fg_fraction)")
        if self.negative_crops < 0:
            raise ValueError("negative_crops must be >= 0")
        if self.negative_crops and self.dims != 2:
            raise ValueError("negative_crops is for 2D recipes")
        from ..losses import LOSSES

        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {list(LOSSES)}")
        if self.select not in ("auto", "best_val", "last"):
            raise ValueError("select must be 'auto', 'best_val' or 'last'")

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
    """Cosine annealing (or, with ``lr_schedule="poly"``, nnU-Net's polynomial decay
    ``(1 - t) ** 0.9``) from ``lr`` (epoch 0) to ``min_lr`` (epoch ``epochs``)."""
    if cfg.lr_schedule == "poly":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - epoch / cfg.epochs) ** 0.9
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2


_READ_CACHE: dict[tuple[Any, ...], Any] = {}


def load_data(cfg: TrainConfig) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The training, validation (None when the split has no ``val`` part) and test subsets
    of ``cfg``'s dataset and a description of the split."""
    key = (cfg.dataset, cfg.data_root, cfg.limit)
    if key not in _READ_CACHE:  # a stack of runs reads its dataset once
        _READ_CACHE.clear()
        _READ_CACHE[key] = read_dataset(cfg.dataset, cfg.data_root, cfg.limit)
    ds = _READ_CACHE[key]
    if cfg.size:  # resized below, in place: work on a copy
        ds = ds.subset(ds.ids)
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
            s = {k: [i for i in s.get(k, []) if i in keep] for k in ("train", "val", "test")}
    else:
        seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        s = random_split(ds.ids, seed)
        split_desc = {"file": None, "seed": seed, "rule": "datasets.random_split 80/20"}
    split_desc.update(n_train=len(s["train"]), n_val=len(s.get("val") or []), n_test=len(s["test"]))
    if cfg.size and ds.dims == 2 and cfg.size != ds.images.shape[-1]:
        from ..datasets import resize_image, resize_mask

        hwc = [np.ascontiguousarray(a.transpose(1, 2, 0)) for a in ds.images]
        imgs = [resize_image(a[..., 0] if a.shape[-1] == 1 else a, cfg.size) for a in hwc]
        imgs = [a if a.ndim == 3 else a[..., None] for a in imgs]
        ds.images = np.stack(imgs).transpose(0, 3, 1, 2).copy()
        ds.labels = np.stack([resize_mask(m, cfg.size) for m in ds.labels])
        ds.meta["size"] = cfg.size
    val = ds.subset(s["val"]) if s.get("val") else None
    return ds.subset(s["train"]), val, ds.subset(s["test"]), split_desc


def _pick_device(name: str, local_rank: int) -> Any:
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def _build(cfg: TrainConfig) -> tuple[Any, ModelCard]:
    from ..nets import build_model

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
    if cfg.dead_slope:
        kwargs["dead_slope"] = cfg.dead_slope
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
    """Whether ``cancel`` (None, an event or a callable) says stop (the one adapter)."""
    return cancel_check(cancel)()


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
    from .stack import train_many

    return train_many([cfg], progress, cancel, log, command, max_epochs, time_limit)[0]


def evaluate_shipped(model: Any, card: ModelCard, test: Any, device: Any, cfg: TrainConfig):  # type: ignore[no-untyped-def]
    """Evaluate the shipped (float16-stored) model file through the inference path."""
    from ..evaluation import evaluate

    return evaluate(model, card, test, device=str(device), with_hd95=cfg.hd95, tta=cfg.tta)


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
