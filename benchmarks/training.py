"""Training throughput: the project's pipeline against the plain path, on one GPU.

Measured in one process, on the same card, the same data (BUSI, 256x256 grey, the 518
training images of split seed 0) and the same network (ProSMA-UNet, "small" widths):

- ``plain``: the network in eager float32, NCHW, fed by a standard ``torch.utils.data``
  ``DataLoader`` (numpy flips/rot90 + normalisation in 4 worker processes, pinned memory,
  batch 8, shuffle, drop_last): what a user would write first.
- ``pipeline``: ``napari_prosma.train.train`` as it trains: the data on the GPU as uint8,
  augmentation on GPU batches, bf16 autocast, channels-last, one CUDA graph per step.
- ``pipeline_eager``: the same without the CUDA graph; ``pipeline_fp32``: without bf16,
  channels-last and the graph (the data still on the GPU), to show where the time goes.

Images/s are the median over timed epochs after a warm-up epoch. With ``--full-run`` it
also trains the 400-epoch BUSI recipe (``training/recipes/busi_prosma.toml``) end to end
and reports its wall time (data loading, graph capture, 400 epochs, final evaluation).

    python benchmarks/training.py --data-root _device/data --out results.json [--full-run DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.datasets import read_dataset, read_split  # noqa: E402
from napari_prosma.losses import bce_dice_loss  # noqa: E402
from napari_prosma.nets import build_model  # noqa: E402
from napari_prosma.train import NORMALIZATION, TrainConfig, train  # noqa: E402

SPLIT = ROOT / "training" / "splits" / "busi_seed0.json"
RECIPE = ROOT / "training" / "recipes" / "busi_prosma.toml"


class PlainDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, masks: np.ndarray, mean: float, std: float):
        self.images, self.masks, self.mean, self.std = images, masks, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        rng = np.random.default_rng()
        x = self.images[i].astype(np.float32) / 255.0  # (1, H, W)
        y = self.masks[i][None].astype(np.float32)
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, (1, 2)), np.rot90(y, k, (1, 2))
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, :, ::-1]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        x = (x - self.mean) / self.std
        return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def plain_images_per_s(train_ds, epochs: int = 3, workers: int = 4) -> dict:  # type: ignore[no-untyped-def]
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    norm = NORMALIZATION["busi"]
    ds = PlainDataset(train_ds.images, train_ds.labels, norm["mean"][0], norm["std"][0])
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=8,
        shuffle=True,
        num_workers=workers,
        pin_memory=True,
        drop_last=True,
        persistent_workers=True,
    )
    model = build_model(
        "prosma_unet", spatial_dims=2, in_channels=1, out_channels=1, widths="small"
    ).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    rates = []
    for ep in range(epochs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        for x, y in dl:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = bce_dice_loss(model(x), y)
            loss.backward()
            opt.step()
            n += x.shape[0]
        torch.cuda.synchronize()
        if ep:  # epoch 0 is the warm-up
            rates.append(n / (time.perf_counter() - t0))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {"images_per_s": statistics.median(rates), "epochs": rates, "workers": workers}


def pipeline_images_per_s(data_root: str | None, epochs: int = 6, **over) -> dict:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_toml(
            RECIPE,
            {
                "data_root": data_root,
                "dataset": "busi",  # the same 518 images as the plain path (the recipe's
                "split": str(SPLIT),  # leak-free split has 498 training images)
                "epochs": epochs,
                "out_dir": tmp,
                "final_eval": False,
                "val_every": 0,
                "checkpoint_every": 0,
                "resume": False,
                **over,
            },
        )
        res = train(cfg, log=None, max_epochs=epochs)
        hist = res.result.get("history") or []
        if not hist:  # stopped runs don't return history; read the card
            from napari_prosma.checkpoint import read_card

            hist = read_card(Path(tmp) / "last").training["history"]
    rates = [h["images_per_s"] for h in hist[1:]]
    return {"images_per_s": statistics.median(rates), "epochs": rates, "settings": over}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-root")
    ap.add_argument("--out", default="benchmarks/results/training_latest.json")
    ap.add_argument("--full-run", help="also train the 400-epoch BUSI recipe into this folder")
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/training.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    ds = read_dataset("busi", args.data_root)
    train_ds = ds.subset(read_split(SPLIT)["train"])
    res: dict = {
        "card": card,
        "torch": torch.__version__,
        "data": f"BUSI 256x256, {len(train_ds)} training images (split seed 0)",
        "model": "prosma_unet widths=small (batch 8)",
    }
    res["pipeline"] = pipeline_images_per_s(args.data_root, args.epochs)
    print(
        f"pipeline (GPU data, bf16, channels-last, CUDA graph): "
        f"{res['pipeline']['images_per_s']:.0f} img/s",
        flush=True,
    )
    res["pipeline_eager"] = pipeline_images_per_s(args.data_root, args.epochs, cuda_graphs=False)
    print(
        f"pipeline without CUDA graph: {res['pipeline_eager']['images_per_s']:.0f} img/s",
        flush=True,
    )
    res["pipeline_fp32"] = pipeline_images_per_s(
        args.data_root, args.epochs, cuda_graphs=False, amp="none", channels_last=False
    )
    print(f"GPU data, eager fp32: {res['pipeline_fp32']['images_per_s']:.0f} img/s", flush=True)
    res["plain"] = plain_images_per_s(train_ds, epochs=3)
    print(f"plain (DataLoader, eager fp32): {res['plain']['images_per_s']:.0f} img/s", flush=True)
    res["speedup"] = res["pipeline"]["images_per_s"] / res["plain"]["images_per_s"]
    print(f"speed-up {res['speedup']:.2f}x on {card}", flush=True)
    if args.full_run:
        t0 = time.perf_counter()
        cfg = TrainConfig.from_toml(RECIPE, {"data_root": args.data_root, "out_dir": args.full_run})
        out = train(
            cfg,
            log=lambda s: print(s, flush=True),
            command=f"python benchmarks/training.py --full-run {args.full_run}",
        )
        wall = time.perf_counter() - t0
        res["full_run"] = {
            "recipe": str(RECIPE.relative_to(ROOT)),
            "status": out.status,
            "wall_seconds": wall,
            "train_seconds": out.result.get("train_seconds"),
            "test": (out.result.get("card") or {})
            .get("metrics", {})
            .get("test", {})
            .get("dice_mean"),
        }
        print(f"full 400-epoch BUSI run: {wall:.0f} s wall on {card}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
