"""``prosma demo``: segment a bundled sample with the default model (the README's main job)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="segment a bundled sample with the default model (the README's main job)",
        description="Segment a bundled sample with the default model (the README's main job).",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from . import UserError

    raise UserError("'prosma demo' is not available in this version yet")
