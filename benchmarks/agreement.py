"""Do the engine and the plain path agree on REAL data? (CPU is enough: small volumes.)

The GPU benchmark (benchmarks/inference.py) times a large synthetic volume, on which a
trained model predicts almost no foreground, so its engine-vs-plain Dice says little.
Here both paths segment the held-out MSD hippocampus volumes (split seed 0) with the bundled
``hippocampus_prosma`` model; we report per-volume Dice between the two label maps and each
path's Dice against the manual labels.

    python benchmarks/agreement.py [--limit N] [--out benchmarks/results/agreement_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inference import plain_labels  # noqa: E402

from napari_prosma.datasets import read_hippocampus, read_split  # noqa: E402
from napari_prosma.inference import load_model, predict  # noqa: E402
from napari_prosma.metrics import dice  # noqa: E402


def mean_class_dice(a: np.ndarray, b: np.ndarray, classes=(1, 2)) -> float:
    return float(np.mean([dice(a == c, b == c) for c in classes]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    model, card = load_model("hippocampus_prosma", device="cpu")
    split = read_split(ROOT / "training" / "splits" / "hippocampus_seed0.json")
    ds = read_hippocampus(args.data_root)
    test = [i for i, s in enumerate(ds.ids) if s in set(split["test"])][: args.limit]
    rows = []
    t0 = time.perf_counter()
    for i in test:
        img, gt = ds.images[i], ds.labels[i]
        eng = predict(img, model, card, device="cpu", precision="fp32").labels
        (pl,) = plain_labels(model, card, [img], torch.device("cpu"))
        rows.append(
            {
                "id": ds.ids[i],
                "dice_engine_vs_plain": mean_class_dice(eng, pl),
                "dice_engine_vs_gt": mean_class_dice(eng, gt),
                "dice_plain_vs_gt": mean_class_dice(pl, gt),
            }
        )
    keys = ["dice_engine_vs_plain", "dice_engine_vs_gt", "dice_plain_vs_gt"]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    summary["min_engine_vs_plain"] = float(min(r["dice_engine_vs_plain"] for r in rows))
    print(f"{len(rows)} held-out hippocampus volumes, CPU ({platform.processor() or 'x86_64'})")
    for k, v in summary.items():
        print(f"  {k:24s} {v:.4f}")
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "cases": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
