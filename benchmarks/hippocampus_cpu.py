"""CPU speed of the 3D model through the engine (issue 15): a hippocampus crop and a
512x512x128 volume, the bundled ``hippocampus_prosma`` ("before") against the issue-15
recipe's network and card ("after": ProSMA-UNet small, instance norm, 48x64x48 tile,
percentile normalisation; *random weights*, since no trained weights of it came back —
speed does not depend on the weights' values).

    python benchmarks/hippocampus_cpu.py --threads 2 --out benchmarks/results/hippocampus_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def models():  # type: ignore[no-untyped-def]
    from napari_prosma.checkpoint import load
    from napari_prosma.train import TrainConfig, _build

    old, old_card = load(ROOT / "models/hippocampus_prosma", device="cpu")
    new, new_card = _build(TrainConfig.from_toml(ROOT / "training/recipes/hippocampus_prosma.toml"))
    return {
        "before (bundled)": (old, old_card),
        "after (issue-15 recipe, random weights)": (new, new_card),
    }


def main() -> None:
    import torch

    from napari_prosma.datasets import read_dataset
    from napari_prosma.inference import predict

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--big", action="store_true", help="also the 512x512x128 volume")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    crop = read_dataset("hippocampus", ids=["hippocampus_001"]).images[0]
    big = np.random.default_rng(0).uniform(0, 1000, (128, 512, 512)).astype(np.float32)
    out = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": a.threads,
        "torch": torch.__version__,
        "note": (
            "2-core machine shared with other agents' processes; engine defaults (auto precision)"
        ),
        "rows": [],
    }
    for name, (m, card) in models().items():
        m.eval()
        predict(crop, m, card, device="cpu")  # warm-up
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            predict(crop, m, card, device="cpu")
            t.append(time.perf_counter() - t0)
        row = {
            "model": name,
            "tile": card.patch_size,
            "norm": card.arch_kwargs.get("norm"),
            "crop_shape": list(crop.shape),
            "crop_s_median_of_3": float(np.median(t)),
        }
        if a.big:
            t0 = time.perf_counter()
            predict(big, m, card, device="cpu")
            row["volume_512x512x128_s"] = time.perf_counter() - t0
        out["rows"].append(row)
        print(row, flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
