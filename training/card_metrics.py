"""Put the test metrics of a ``prosma evaluate --json`` result into a shipped model's card
(``models/NAME.json``; the weights are not touched, so their sha256 stays valid). The
training-time evaluation is kept as ``metrics["test_at_training"]``.

    python training/card_metrics.py NAME EVAL_JSON "how it was run"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from napari_prosma.checkpoint import load, seal_card
from napari_prosma.train.support import _json_safe

ROOT = Path(__file__).resolve().parents[1]

name, eval_json, how = sys.argv[1], Path(sys.argv[2]).resolve(), sys.argv[3]
card_path = ROOT / "models" / f"{name}.json"
card = json.loads(card_path.read_text())
ev = json.loads(eval_json.read_text())
s = ev["summary"]
old = card["metrics"].get("test", {})
card["metrics"] = {
    "test": {
        "split": old.get("split"),
        "n_cases": s["n_cases"],
        "dice_mean": s["mean_dice"],
        "iou_mean": s["mean_iou"],
        "hd95_mean": s.get("mean_hd95"),
        "per_class": s["per_class"],
        "how": f"{ev['engine']}: {how}; per-case mean ± std, pooled (dataset-level) beside it",
        "weights": card.get("weights_dtype"),
        "raw": str(eval_json.relative_to(ROOT)),
    },
    "test_at_training": old,
}
card_path.write_text(json.dumps(_json_safe(card), indent=2, allow_nan=False) + "\n")
seal_card(card_path)  # an edit on purpose: the card hash is renewed
load(ROOT / "models" / name)
print(f"{card_path}: dice {s['mean_dice']:.4f} iou {s['mean_iou']:.4f}")
