"""``prosma finetune``: fine-tune a model on corrected labels."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on corrected labels",
        description="Fine-tune a model on corrected labels. (Not available in this version yet.)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from . import UserError

    raise UserError("'prosma finetune' is not available in this version yet")
