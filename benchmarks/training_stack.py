"""Throughput of K training runs stacked in one process on one GPU (``train_many``).

Trains K BUSI arms (the Table 3 arms and the MONAI baselines, batch 8, 256x256) for a few
epochs, together, and reports the epoch time after warm-up: per run and in aggregate
images/s, for each K. Every K is measured in one process, one after another.

    python benchmarks/training_stack.py --data-root _device/data --k 1 4 8 --json OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "training"))

from stack import ARMS  # noqa: E402

from napari_prosma.train import TrainConfig, train_many  # noqa: E402

RECIPE = ROOT / "training" / "recipes" / "busi_prosma.toml"


def measure(k: int, data_root: str | None, epochs: int, tmp: Path) -> dict:
    """Train ``k`` arms for ``epochs`` epochs together; epoch times after the first two."""
    arms = list(ARMS)
    cfgs = []
    for i in range(k):
        arm = arms[i % len(arms)]
        over = {
            **ARMS[arm],
            "name": f"bench{k}_{i}",
            "out_dir": str(tmp / f"k{k}_{i}"),
            "epochs": epochs,
            "final_eval": False,
            "val_every": 0,
            "checkpoint_every": 0,
            "sparsity_images": 1,
            "resume": False,
            "seed": i,
        }
        if data_root:
            over["data_root"] = data_root
        cfgs.append(TrainConfig.from_toml(RECIPE, over))
    t0 = time.perf_counter()
    res = train_many(cfgs, log=None)
    wall = time.perf_counter() - t0
    hist = res[0].result["history"]
    secs = [h["seconds"] for h in hist[2:]] or [hist[-1]["seconds"]]
    per_epoch = statistics.median(secs)
    first = [r.result["history"][0] for r in res]
    n_img = sum(h["images_per_s"] * h["seconds"] for h in first)
    return {
        "k": k,
        "arms": [c.name for c in cfgs],
        "epoch_seconds": per_epoch,
        "images_per_epoch_all_runs": n_img,
        "aggregate_images_per_s": n_img / per_epoch,
        "per_run_images_per_s": n_img / per_epoch / k,
        "wall_seconds": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for k in args.k:
            rows.append(measure(k, args.data_root, args.epochs, Path(d)))
            r = rows[-1]
            print(
                f"K={k}: epoch {r['epoch_seconds']:.3f} s, aggregate "
                f"{r['aggregate_images_per_s']:.0f} img/s, per run "
                f"{r['per_run_images_per_s']:.0f} img/s (wall {r['wall_seconds']:.0f} s)",
                flush=True,
            )
    out["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
