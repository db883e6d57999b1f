"""Record a bundled model's test-set Dice distribution in its card, from an evaluation JSON
(``prosma evaluate ... --json``): ``metrics.test.distribution`` (every test case's Dice,
sorted, with quantiles and failure rates), which ``prosma demo`` prints beside its frame.

    python training/card_distribution.py MODEL EVAL_JSON CLASS

Only the card (JSON) is rewritten, atomically; the weights and their hash are unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.checkpoint import (  # noqa: E402
    atomic_write_bytes,
    checkpoint_paths,
    load,
    resolve,
    seal_card,
)
from napari_prosma.metrics import dice_distribution  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("eval_json", type=Path)
    ap.add_argument("cls")
    args = ap.parse_args()
    ev = json.loads(args.eval_json.read_text())
    values = [c[args.cls]["dice"] for c in ev["cases"]]
    dist = dice_distribution(values, args.cls)
    dist["from"] = (
        str(args.eval_json.relative_to(ROOT))
        if args.eval_json.is_absolute()
        else str(args.eval_json)
    )
    _weights, card_path = checkpoint_paths(resolve(args.model))
    data = json.loads(card_path.read_text())
    data.setdefault("metrics", {}).setdefault("test", {})["distribution"] = dist
    atomic_write_bytes(card_path, (json.dumps(data, indent=2) + "\n").encode())
    seal_card(card_path)  # an edit on purpose: the card hash is renewed
    load(args.model)  # still loads and verifies
    print(
        f"{card_path.name}: {dist['n']} cases, mean {dist['mean']:.3f}, median "
        f"{dist['median']:.3f}, Dice 0 on {dist['dice_0']:.1%}, "
        f"< 0.5 on {dist['dice_below_0.5']:.1%}"
    )


if __name__ == "__main__":
    main()
