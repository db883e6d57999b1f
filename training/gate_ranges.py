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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.checkpoint import (  # noqa: E402
    atomic_write_bytes,
    checkpoint_paths,
    resolve,
    seal_card,
)
from napari_prosma.datasets import read_dataset, read_split  # noqa: E402
from napari_prosma.inference import load_model  # noqa: E402
from napari_prosma.train.support import sparsity_range  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("--split", required=True)
    p.add_argument(
        "--limit", type=int, default=0, help="training images to use (evenly spaced; 0: all)"
    )
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args()

    model, card = load_model(args.model, device="cpu")
    split = read_split(args.split)
    ds = read_dataset(args.dataset, args.data_root)
    train = ds.subset([s for s in ds.ids if s in set(split["train"])])
    t0 = time.perf_counter()
    # the function the trainer writes the range with (one writer, one reader)
    rng, how = sparsity_range(model, card, train, "cpu", args.limit)
    _weights, card_path = checkpoint_paths(resolve(args.model))
    data = json.loads(card_path.read_text())
    data["gate_sparsity_range"] = rng
    data.setdefault("extra", {})["gate_sparsity_range_from"] = {"split": args.split, **how}
    atomic_write_bytes(card_path, (json.dumps(data, indent=2) + "\n").encode())
    seal_card(card_path)  # an edit on purpose: the card hash is renewed
    took = time.perf_counter() - t0
    print(f"{card_path.name}: {how['n_images']} training images in {took:.0f} s")
    for k, (lo, hi) in rng.items():
        print(f"  {k}: {lo:.3f} .. {hi:.3f}")


if __name__ == "__main__":
    main()
