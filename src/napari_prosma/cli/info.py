"""``prosma info MODEL``: print a checkpoint's model card."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="print a checkpoint's model card",
        description="Print the model card of a checkpoint (a bundled model's name or a path); "
        "with no MODEL, list the bundled models.",
    )
    p.add_argument("model", nargs="?", help="bundled model name or checkpoint path")
    p.add_argument("--json", action="store_true", help="print the whole card as JSON")
    p.add_argument("--check", action="store_true", help="also load the weights and verify them")
    return p


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import bundled_dir, list_bundled, load, read_card, resolve

    if not args.model:
        names = list_bundled()
        print(f"Bundled models in {bundled_dir()}:")
        for n in names:
            card = read_card(bundled_dir() / n)
            print(f"  {n:24s} {card.architecture} {card.spatial_dims}D  {card.intended_use}")
        if not names:
            print("  (none)")
        return 0
    path = resolve(args.model)
    card = read_card(path)
    if args.check:
        model, card = load(path)
        n = sum(p.numel() for p in model.parameters())
        print(f"Weights OK: {n:,} parameters, sha256 verified")
    if args.json:
        print(json.dumps(card.to_dict(), indent=2))
    else:
        print(card.summary())
    return 0
