"""``prosma train``: train a model from a recipe."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a model from a recipe",
        description="Train a model from a recipe. (Not available in this version yet.)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from . import UserError

    raise UserError("'prosma train' is not available in this version yet")
