"""Record in a model card the range of gate sparsity seen on its training images.

For every decoder stage, the mean exact-zero fraction of z* over each training image (or
volume) is computed through the inference engine; the card's ``gate_sparsity_range`` gets
``{"stageN": [min, max]}`` over those images, and ``extra.gate_sparsity_range_from`` says
how many images of which split were used. The plugin warns when a scan falls outside.

    python training/gate_ranges.py MODEL DATASET --split training/splits/X.json [--limit N]

Only the card (JSON) is rewritten, atomically; the weights and their hash are unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.checkpoint import (  # noqa: E402
    atomic_write_bytes,
    checkpoint_paths,
    resolve,
    seal_card,
)
from napari_prosma.datasets import read_dataset, read_split  # noqa: E402
from napari_prosma.inference import gate_sparsity_range, load_model, predict  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("--split", required=True)
    p.add_argument("--limit", type=int, default=100, help="training images to use (evenly spaced)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args()

    model, card = load_model(args.model, device="cpu")
    split = read_split(args.split)
    ds = read_dataset(args.dataset, args.data_root)
    train = set(split["train"])
    idx = [i for i, s in enumerate(ds.ids) if s in train]
    if args.limit and len(idx) > args.limit:
        idx = [idx[round(j)] for j in np.linspace(0, len(idx) - 1, args.limit)]
    t0 = time.perf_counter()
    preds = []
    for i in idx:
        # "stats": the same zero fractions as the maps, without stitching them (test_train)
        preds.append(predict(ds.image(i), model, card, device="cpu", return_gates="stats"))
    rng = gate_sparsity_range(preds)
    _weights, card_path = checkpoint_paths(resolve(args.model))
    data = json.loads(card_path.read_text())
    data["gate_sparsity_range"] = rng
    data.setdefault("extra", {})["gate_sparsity_range_from"] = {
        "split": args.split,
        "part": "train",
        "n_images": len(idx),
        "statistic": "per-image mean exact-zero fraction of z* per decoder stage; [min, max]",
    }
    atomic_write_bytes(card_path, (json.dumps(data, indent=2) + "\n").encode())
    seal_card(card_path)  # an edit on purpose: the card hash is renewed
    print(f"{card_path.name}: {len(idx)} training images in {time.perf_counter() - t0:.0f} s")
    for k, (lo, hi) in rng.items():
        print(f"  {k}: {lo:.3f} .. {hi:.3f}")


if __name__ == "__main__":
    main()
