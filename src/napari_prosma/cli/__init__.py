"""The ``prosma`` command line: ``predict``, ``train``, ``finetune``, ``evaluate``, ``info``,
``demo``, ``export``.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``; heavy imports (torch) happen inside ``run`` so ``--help`` is instant.
Errors a user can fix are printed as one line on stderr with a non-zero exit code, never
as a traceback (set ``PROSMA_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from .. import __version__
from ..errors import UserError  # noqa: F401  (lives in errors.py; re-exported)

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


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: handled like Ctrl-C (the work in progress is undone)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """While the body runs, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread,
    so a ``kill`` (or a closed terminal, a batch system's time limit) cleans up exactly as
    Ctrl-C does instead of leaving half a set of outputs and temporary files. Once one has
    arrived, further ones are ignored until the cleanup is done. The previous handlers are
    restored afterwards (``main`` is also called in-process, by tests and scripts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    nums = [getattr(signal, n) for n in names]

    def handler(signum: int, frame: Any) -> None:
        for n in nums:
            signal.signal(n, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {n: signal.signal(n, handler) for n in nums}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(n, h)


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
        with _signals_as_interrupt():
            return int(args._run(args) or 0)
    except Terminated as e:
        name = signal.Signals(e.signum).name
        print(f"prosma: stopped by {name}; the file in progress was not kept", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("prosma: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing: one line, no traceback
        if os.environ.get("PROSMA_DEBUG"):
            raise
        from ..errors import user_message
        from .text import printable

        print(f"prosma {args.command}: error: {printable(user_message(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
