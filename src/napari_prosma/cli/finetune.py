"""``prosma finetune IMAGES LABELS --model M -o DIR``: fine-tune on corrected labels."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on corrected labels",
        description="Fine-tune a model on corrected labels. IMAGES and LABELS are files or "
        "folders (paired by file name: case1.png with case1.png, case1_mask.png, "
        "case1_label(s).png or case1_seg.png; unmatched or ambiguous files are refused, "
        "never paired by order). The new model is saved "
        "as a new version in DIR (never over its parent); the corrections are saved next "
        "to it before training starts. A quarter of the corrected images (or slices) is held "
        "out: with 4 or more held out, half of them choose the state kept (early stopping) "
        "and the other half measure Dice before and after; with fewer, the same ones do "
        "both and the reported Dice is optimistic. If that Dice got worse, the parent stays "
        "active (see --activate). A few of the base model's training images are replayed "
        "in every batch when they are on this computer (see --replay), to limit forgetting.",
    )
    p.add_argument("images", type=Path, help="image file or folder")
    p.add_argument("labels", type=Path, help="corrected label file or folder")
    p.add_argument(
        "--model", "-m", required=True, help="parent: bundled name, checkpoint or version id"
    )
    p.add_argument(
        "-o", "--out", type=Path, default=None, help="model store folder (default: user data dir)"
    )
    p.add_argument(
        "--trainable", choices=["all", "decoder_gates", "gates"], default="decoder_gates"
    )
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds (0: no limit)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--min-improvement", type=float, default=0.005, help="held-out Dice gain")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.25,
        help="share of the corrected images (or slices) held out to choose and judge the "
        "result (default 0.25; 0: train on all, keep the last state, nothing measured)",
    )
    p.add_argument(
        "--activate",
        choices=["if_better", "always", "never"],
        default="if_better",
        help="make the new version active (default: only if held-out Dice did not drop)",
    )
    p.add_argument(
        "--replay",
        default="auto",
        metavar="PATH|auto|none",
        help="base-model training samples mixed into every batch to limit forgetting: "
        "'auto' (default) = the data set the model card names, when it is on this computer "
        "($PROSMA_DATA or ../shared/data; the train part of the card's split); a data set "
        "name (busi, kvasir, glas, hippocampus); a folder with images/ and masks/ (or "
        "labels/) paired by file name; or 'none'",
    )
    p.add_argument(
        "--replay-fraction",
        type=float,
        default=0.25,
        help="share of each batch taken from the replay samples (default 0.25)",
    )
    p.add_argument(
        "--slice-axis",
        type=int,
        choices=[0, 1, 2],
        default=0,
        help="for volumes: the axis along which corrected slices are found (default 0, "
        "the first array axis; NIfTI volumes are read in (k, j, i) order)",
    )
    _add_naming(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress on stderr (only the result)"
    )
    return p


def _add_naming(p: argparse.ArgumentParser) -> None:
    """--task, --class-names, --label: what the new version is for."""
    p.add_argument(
        "--task",
        default=None,
        help="what the new version segments, in words (default: the parent's task); shown "
        "on its card and in the versions list",
    )
    p.add_argument(
        "--class-names",
        default=None,
        metavar="NAME[,NAME...]",
        help="the new version's class names, comma-separated: what it finds (e.g. 'spleen'), "
        "or all of them with the background first (default: the parent's)",
    )
    p.add_argument(
        "--label",
        default=None,
        help="a few words naming the new version (kept in the store and in its id; "
        "default: the first words of --task)",
    )


def _files(path: Path) -> list[Path]:
    from ..io import is_supported

    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and is_supported(p))
    return [path]


def _pair(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """Images and label files paired by name; two files named on the command line pair
    as they are; one folder for both holds ``case1.png`` beside ``case1_mask.png``."""
    from ..pairing import pair_by_stem, split_folder

    if args.images.is_file() and args.labels.is_file():
        return [(args.images, args.labels)]
    images, labels = _files(args.images), _files(args.labels)
    if args.images.is_dir() and args.images.resolve() == args.labels.resolve():
        images, labels = split_folder(images)
    return pair_by_stem(images, labels)


class _Progress:
    """Fine-tuning progress on stderr: the held-out Dice at every evaluation, and steps
    done with the time left at most every ``every_s`` seconds between them."""

    def __init__(self, budget_s: float | None, every_s: float = 5.0):
        self.budget_s, self.every_s, self.last = budget_s, every_s, -math.inf

    def left(self, p: Any) -> float:
        """Seconds left: the steps to go at the pace so far, capped by the time budget."""
        rate = p.elapsed_s / max(p.step, 1)
        left = (p.max_steps - p.step) * rate
        if self.budget_s:
            left = min(left, max(self.budget_s - p.elapsed_s, 0.0))
        return left

    def __call__(self, p: Any) -> None:
        if p.phase == "before":
            text = "measuring the model before training"
            if p.holdout_dice is not None:
                text += f": held-out Dice {p.holdout_dice:.3f}"
        elif p.phase == "whole":
            text = (
                "segmenting your whole images with the parent (before training)"
                if p.step == 0
                else "segmenting your whole images with the new model"
            )
        elif p.phase == "done":
            text = f"done: step {p.step}, {p.elapsed_s:.0f} s"
            if p.holdout_dice is not None:
                text += f", held-out Dice of the state kept {p.holdout_dice:.3f}"
        elif p.phase == "eval" or p.elapsed_s - self.last >= self.every_s:
            text = f"step {p.step}/{p.max_steps}"
            if p.loss is not None:
                text += f", loss {p.loss:.3f}"
            if p.holdout_dice is not None:
                text += f", held-out Dice {p.holdout_dice:.3f}"
            text += f", {p.elapsed_s:.0f} s, about {self.left(p):.0f} s left"
            self.last = p.elapsed_s
        else:
            return
        print(f"  [{p.phase:6s}] {text}", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace) -> Any:
    from ..finetune import FinetuneConfig

    return FinetuneConfig(
        trainable=args.trainable,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget or None,
        lr=args.lr,
        min_improvement=args.min_improvement,
        batch_size=args.batch_size,
        replay_fraction=args.replay_fraction,
        holdout_fraction=args.holdout_fraction,
        slice_axis=args.slice_axis,
        device=args.device,
        seed=args.seed,
    )


def _read(pairs: list[tuple[Path, Path]]) -> tuple[list[Any], list[Any], list[Any]]:
    """Images, labels (values as stored: checked by ``finetune.check_labels``) and
    spacings (mm, volumes only) of the pairs."""
    from ..io import read_image

    images, labels, spacing = [], [], []
    for ip, lp in pairs:
        img = read_image(ip)
        images.append(img.data)
        spacing.append(img.spacing if img.kind == "volume" and img.unit == "mm" else None)
        lab = read_image(lp).data
        if lab.ndim == 3 and lab.shape[-1] in (3, 4) and images[-1].ndim == 2:
            lab = lab[..., 0]
        labels.append(lab)
    return images, labels, spacing


def run(args: argparse.Namespace) -> int:
    from ..finetune import run_finetune
    from ..versions import ModelStore
    from . import UserError

    pairs = _pair(args)
    if not pairs:
        raise UserError("no images found")
    images, labels, spacing = _read(pairs)
    cfg = _config(args)
    store = ModelStore(args.out)
    if not args.quiet:
        print(f"Fine-tuning {args.model} on {len(pairs)} image(s) ...", file=sys.stderr)
    try:
        result, vid = run_finetune(
            args.model,
            images,
            labels,
            store=store,
            config=cfg,
            spacing=spacing,
            replay=None if args.replay == "none" else args.replay,
            activate=args.activate,
            progress=None if args.quiet else _Progress(cfg.time_budget_s),
            task=args.task,
            class_names=_names(args.class_names),
            label=args.label,
        )
    except KeyboardInterrupt as e:  # Ctrl-C: the corrections were moved to .incoming
        kept = getattr(e, "kept_corrections", None)
        if kept is not None:
            print(f"prosma finetune: your corrections are kept in {kept}", file=sys.stderr)
        raise
    _report(result, vid, store, args.activate)
    return 0


def _names(text: str | None) -> list[str] | None:
    """``--class-names`` as a list (None: not given)."""
    if text is None:
        return None
    return [n.strip() for n in text.split(",")]


def curve_text(curve: list[tuple[int, float]]) -> str:
    """The held-out Dice as it went, one ``step:dice`` per evaluation."""
    return ", ".join(f"{s}:{d:.3f}" for s, d in curve)


def _report(result: Any, vid: str, store: Any, activate: str) -> None:
    """What the run did, on stdout."""
    from ..finetune.whole import describe_whole

    b, a = result.dice_before, result.dice_after
    print(f"New version {vid} in {store.root}")
    card = result.card
    print(f"  task: {card.intended_use or '?'}; classes: {', '.join(card.class_names[1:])}")
    print(
        f"  steps {result.steps} ({result.stopped}), {result.seconds:.1f} s, "
        f"{result.n_train} training / {result.n_holdout} held-out unit(s)"
    )
    for note in result.notes:
        print(f"  note: {note}")
    if b is not None and a is not None:
        part = (
            f"on {result.n_report} held-out unit(s) not used to choose the state kept"
            if result.independent_report
            else "optimistic: the same units chose the state kept"
        )
        print(f"  held-out Dice {b:.3f} -> {a:.3f} ({part})")
        if a < b:
            print(
                "  held-out Dice got worse: the parent model stays active"
                + (" (overridden: --activate always)" if activate == "always" else "")
            )
    if result.curve:
        print(
            f"  held-out Dice as it went, on the part that chose the state kept (step:Dice): "
            f"{curve_text(result.curve)}"
        )
    for line in describe_whole(result.whole, "image(s)/slice(s)"):
        print(f"  {line}")
    print(f"  active model: {store.active()}")
