"""The ``prosma`` command line: ``predict``, ``train``, ``finetune``, ``evaluate``, ``info``,
``demo``, ``export``.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``; heavy imports (torch) happen inside ``run`` so ``--help`` is instant.
Errors a user can fix are printed as one line on stderr with a non-zero exit code, never
as a traceback (set ``PROSMA_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .. import __version__

#: Subcommand name -> module (relative to this package), in ``--help`` order.
COMMANDS = {
    "predict": ".predict",
    "train": ".train",
    "finetune": ".finetune",
    "evaluate": ".evaluate",
    "info": ".info",
    "demo": ".demo",
    "export": ".export",
}


class UserError(Exception):
    """An error whose message is meant for the user as it stands."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prosma",
        description="ProSMA-UNet segmentation with inspectable sparse skip gates.",
    )
    parser.add_argument("--version", action="version", version=f"napari-prosma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in COMMANDS.items():
        mod = importlib.import_module(module, __name__)
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prosma`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.environ.get("PROSMA_DEBUG"):
        # libraries' own log lines (tifffile on a corrupt file) would add to the one line
        # per error this command prints; PROSMA_DEBUG=1 shows them
        quiet = logging.getLogger("tifffile")
        if not any(isinstance(h, logging.NullHandler) for h in quiet.handlers):
            quiet.addHandler(logging.NullHandler())
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("prosma: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing: one line, no traceback
        if os.environ.get("PROSMA_DEBUG"):
            raise
        from ..errors import user_message

        print(f"prosma {args.command}: error: {user_message(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
