"""``prosma evaluate``: evaluate a model on a labelled dataset."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a model on a labelled dataset",
        description="Evaluate a model on a labelled dataset. (Not available in this version yet.)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from . import UserError

    raise UserError("'prosma evaluate' is not available in this version yet")
