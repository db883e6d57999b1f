"""``prosma predict``: segment images or volumes with a model."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="segment images or volumes with a model",
        description="Segment images or volumes with a model. (Not available in this version yet.)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from . import UserError

    raise UserError("'prosma predict' is not available in this version yet")
