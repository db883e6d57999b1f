"""Measure the 3D stack's speed on the GPU and choose the plan of issue 15's runs.

    python training/s5_bench3d.py --train-seconds 1150 --json OUT.json --plan _device/plan.env

Times stacks of the hippocampus recipe (``training/stack.py`` arms, CUDA graphs, bf16) for
2 epochs of 30 iterations each, the second epoch timed (graph capture and cuDNN's autotune
fall in the first), then picks, in this order of preference, the first plan whose
iterations at 90 % of the measured speed fill ``--train-seconds`` with >= 50k iterations:
4 arms (ProSMA and MONAI U-Net, poly and cosine: the schedule chosen on val) at batch 2;
2 arms (poly only) at batch 4; 2 arms at batch 2; else 2 arms at batch 2 with the
iterations that fit (fewer than 50k, said so). Iterations are capped at 150k.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from stack import configs  # noqa: E402

from napari_prosma.train import train_many  # noqa: E402

ARMS4 = "prosma_poly,prosma_cosine,monai_unet_poly,monai_unet_cosine"
ARMS2 = "prosma_poly,monai_unet_poly"
ITERS = 250  # iterations per epoch of the real runs


def measure(arms: str, batch: int, data_root: str | None) -> float:
    """Stack iterations per second (every arm one step) of the second epoch."""
    args = argparse.Namespace(
        recipe=str(HERE / "recipes/hippocampus_prosma.toml"),
        seed=0,
        split="training/splits/hippocampus_tvt_seed0.json",
        arms=arms,
        prefix="bench",
        epochs=100,
        out_root=f"/tmp/bench3d_{batch}_{len(arms.split(','))}",
        data_root=data_root,
        set=[f"batch_size={batch}", "iters_per_epoch=30", "val_every=0", "resume=false"],
    )
    seen: list[float] = []
    t0 = time.perf_counter()
    train_many(
        configs(args), progress=lambda p: seen.append(p.images_per_s), log=None, max_epochs=2
    )
    k = len(arms.split(","))
    ips = seen[-1] / batch  # every run of the stack reports the stack's epoch time
    print(
        f"{k} arms, batch {batch}: {ips:.1f} stack it/s ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return ips


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-seconds", type=float, required=True)
    ap.add_argument("--data-root", default="_device/data")
    ap.add_argument("--json", required=True)
    ap.add_argument("--plan", required=True)
    a = ap.parse_args()
    cands = [(ARMS4, 2), (ARMS2, 4), (ARMS2, 2)]
    speed = {f"{len(arms.split(','))}x{b}": measure(arms, b, a.data_root) for arms, b in cands}
    plan = None
    for arms, b in cands:
        it = 0.9 * speed[f"{len(arms.split(','))}x{b}"] * a.train_seconds
        if it >= 50_000:
            plan = (arms, b, it)
            break
    if plan is None:
        plan = (ARMS2, 2, 0.9 * speed["2x2"] * a.train_seconds)
    arms, b, it = plan
    epochs = int(min(it, 150_000) // ITERS)
    Path(a.json).write_text(
        json.dumps(
            {
                "stack_it_per_s": speed,
                "train_seconds": a.train_seconds,
                "arms": arms,
                "batch": b,
                "epochs": epochs,
                "iters_per_epoch": ITERS,
            },
            indent=1,
        )
    )
    Path(a.plan).write_text(f"ARMS={arms}\nBATCH={b}\nEPOCHS={epochs}\n")
    print(f"plan: {arms} batch {b}, {epochs} epochs x {ITERS} = {epochs * ITERS} iterations")


if __name__ == "__main__":
    main()
