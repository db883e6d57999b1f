"""``prosma train RECIPE``: train (or resume) a model from a TOML recipe.

Log lines (every ``log_every`` epochs) go to stdout; progress (epochs done, time spent and
left) to stderr, at most every few seconds; ``-q`` keeps only the final lines.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a model from a recipe",
        description="Train a model from a TOML recipe (training/recipes/*.toml). Running the "
        "same command again resumes from the last checkpoint in the output folder. Runs "
        "under torchrun too (DistributedDataParallel, one process per GPU).",
    )
    p.add_argument("recipe", help="TOML recipe file")
    p.add_argument("--seed", type=int, help="random seed (also picks the 80/20 split)")
    p.add_argument("--split", help="split JSON file (overrides the recipe)")
    p.add_argument("--data-root", help="data folder (default: $PROSMA_DATA or ../shared/data)")
    p.add_argument("--out", help="output folder (default: the recipe's out_dir)")
    p.add_argument("--epochs", type=int, help="number of epochs (overrides the recipe)")
    p.add_argument(
        "--max-epochs", type=int, help="stop after this many epochs in this call (resume later)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        help="stop with a resume checkpoint before this many seconds have passed",
    )
    p.add_argument("--device", help="auto, cuda, cpu, ...")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the final lines (no log lines, no progress on stderr)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from ..train import TrainConfig, overrides_from_strings, train
    from .progress import Progress

    over = overrides_from_strings(args.set)
    for key, val in (
        ("seed", args.seed),
        ("split", args.split),
        ("data_root", args.data_root),
        ("out_dir", args.out),
        ("epochs", args.epochs),
        ("device", args.device),
    ):
        if val is not None:
            over[key] = val
    if args.no_resume:
        over["resume"] = False
    cfg = TrainConfig.from_toml(args.recipe, over)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    # under torchrun every rank reports; rank 0 speaks for all
    rank0 = os.environ.get("RANK", "0") == "0"
    bar = Progress("training", "epochs", quiet=args.quiet or not rank0)
    try:
        res = train(
            cfg,
            log=log,
            progress=lambda p: bar(p.epoch, p.epochs),
            command="prosma " + " ".join(sys.argv[1:]),
            max_epochs=args.max_epochs,
            time_limit=args.time_limit,
        )
    finally:
        bar.close()
    print(f"{res.status}: {res.out_dir} (epoch {res.epoch}/{cfg.epochs})", flush=True)
    return 0 if res.status in ("finished", "already finished", "stopped") else 1
