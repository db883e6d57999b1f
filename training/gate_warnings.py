"""How often the gate-sparsity warning fires on held-out images of the model's own data.

    python training/gate_warnings.py MODEL DATASET --split training/splits/X.json [--json OUT]

Runs the inference engine (CPU) with gates on every *test* image of the split and counts the
images for which :func:`napari_prosma._widgets._core.sparsity_warnings` (what the Segment
widget and the Gate inspector show) warns, per stage. These images are like the training
data, so every warning here is a false alarm of the out-of-distribution check. 2D only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_prosma.datasets import read_dataset
from napari_prosma.inference import load_model, predict
from napari_prosma.inference.gates import _from_stage, sparsity_warnings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("dataset")
    ap.add_argument("--split", required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model, card = load_model(args.model, device="cpu")
    ids = json.loads(Path(args.split).read_text())["test"]
    data = read_dataset(args.dataset).subset(ids)
    per_stage: dict[str, int] = {}
    flagged = []
    for i, cid in enumerate(data.ids):
        pred = predict(data.image(i), model, card, device="cpu", return_gates=True)
        warns = sparsity_warnings(card.gate_sparsity_range, [_from_stage(g) for g in pred.gates])
        if warns:
            flagged.append(cid)
        for w in warns:
            stage = w.split(":")[0]
            per_stage[stage] = per_stage.get(stage, 0) + 1
    out = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "n_test_images": len(data),
        "n_warned": len(flagged),
        "per_stage": per_stage,
        "warned_ids": flagged,
        "range_from": card.extra.get("gate_sparsity_range_from"),
    }
    print(f"{args.model}: {len(flagged)} of {len(data)} held-out test images warned {per_stage}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
