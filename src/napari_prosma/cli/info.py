"""``prosma info MODEL``: print a checkpoint's model card.

Card text is printed with control characters escaped (:func:`.text.printable`): a card is
a file from anywhere, and its fields must not drive the terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="print a checkpoint's model card",
        description="Print the model card of a model (a bundled model's name, a checkpoint "
        "path, a fine-tuned version id or version folder); with no MODEL, list the bundled "
        "models and the fine-tuned versions.",
    )
    p.add_argument(
        "model", nargs="?", help="bundled name, checkpoint path, version id or version folder"
    )
    p.add_argument(
        "--store",
        metavar="DIR",
        help="model store holding fine-tuned versions (default: $PROSMA_MODEL_DIR or the "
        "user data folder)",
    )
    p.add_argument("--json", action="store_true", help="print the whole card as JSON")
    p.add_argument("--check", action="store_true", help="also load the weights and verify them")
    return p


def escaped_card(card: Any) -> Any:
    """A copy of ``card`` whose every text (in nested fields too) is printable."""
    from .text import escape_tree

    return dataclasses.replace(
        card, **{f.name: escape_tree(getattr(card, f.name)) for f in dataclasses.fields(card)}
    )


def _list(store: str | None) -> None:
    from ..checkpoint import CheckpointError, bundled_dir, list_bundled, read_card
    from ..versions import ModelStore
    from .text import printable

    names = list_bundled()
    print(f"Bundled models in {printable(bundled_dir())}:")
    for n in names:
        try:
            card = escaped_card(read_card(bundled_dir() / n))
        except CheckpointError as e:
            print(f"  {printable(n):24s} unusable: {printable(e)}")
            continue
        print(f"  {printable(n):24s} {card.architecture} {card.spatial_dims}D  {card.intended_use}")
    if not names:
        print("  (none)")
    ms = ModelStore(store)
    versions = ms.versions()
    if versions:
        active = ms.active()
        print(f"Fine-tuned versions in {printable(ms.root)}:")
        for v in versions:
            star = "  ★ active" if v.id == active else ""
            print(f"  {printable(v.describe())}{star}")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load, read_card
    from ..models import resolve_model
    from .text import printable

    if not args.model:
        _list(args.store)
        return 0
    path = resolve_model(args.model, args.store)
    card = read_card(path)
    if args.check:
        model, card = load(path)
        n = sum(p.numel() for p in model.parameters())
        print(f"Weights OK: {n:,} parameters, sha256 verified")
    if args.json:  # json.dumps escapes every control character itself
        print(json.dumps(card.to_dict(), indent=2))
    else:
        print(printable(escaped_card(card).summary(), keep_newlines=True))
    return 0
