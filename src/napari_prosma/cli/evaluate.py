"""``prosma evaluate MODEL DATA``: metrics of a model on a labelled dataset."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="measure a model's Dice, IoU and HD95 on labelled data",
        description="Evaluate MODEL (a bundled model's name, a checkpoint path, a fine-tuned "
        "version id or version folder) on DATA: a "
        "dataset name (busi, kvasir, glas, hippocampus) read from --data-root, or a packed "
        ".npz. Images go through the same preparation as inference. With --split only its "
        "test cases are used.",
    )
    p.add_argument(
        "model", help="bundled name, checkpoint path, fine-tuned version id or version folder"
    )
    p.add_argument(
        "--store",
        metavar="DIR",
        help="model store holding fine-tuned versions (default: $PROSMA_MODEL_DIR or the "
        "user data folder)",
    )
    p.add_argument("data", help="dataset name or packed .npz file")
    p.add_argument("--data-root", help="data folder (default: $PROSMA_DATA or ../shared/data)")
    p.add_argument("--split", help="split JSON; its 'test' ids are evaluated")
    p.add_argument("--subset", default="test", choices=("test", "train"), help="split part")
    p.add_argument("--limit", type=int, help="evaluate only the first N cases")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    p.add_argument("--json", dest="json_out", help="write the full result (per case) here")
    return p


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from ..checkpoint import load
    from ..datasets import DATASETS, load_packed, read_dataset, read_split
    from ..evaluation import evaluate
    from ..fs import atomic_write_bytes
    from ..models import resolve_model
    from . import UserError
    from .text import printable

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, card = load(resolve_model(args.model, args.store), device=device)
    if args.data.endswith(".npz"):
        ds = load_packed(args.data)
    elif args.data in DATASETS:
        ds = read_dataset(args.data, args.data_root)
    else:
        raise UserError(f"DATA must be one of {list(DATASETS)} or a packed .npz, not {args.data}")
    if args.split:
        ds = ds.subset(read_split(args.split)[args.subset])
    if args.limit:
        ds = ds.subset(ds.ids[: args.limit])
    res = evaluate(model, card, ds, device=device, with_hd95=not args.no_hd95, engine="auto")
    s = res["summary"]
    print(
        f"{printable(card.name)} on {ds.name}: {s['n_cases']} cases, {res['seconds']:.1f} s "
        f"({device}, {res.get('engine', 'inference engine')})"
    )
    for name, e in s["per_class"].items():
        line = (
            f"  {printable(name):12s} dice {e['dice']['mean']:.4f} ± {e['dice']['std']:.4f}  "
            f"iou {e['iou']['mean']:.4f} ± {e['iou']['std']:.4f}"
        )
        if "hd95" in e:
            line += f"  hd95 {e['hd95']['mean']:.2f}"
        line += f"  (dataset-level dice {e['dice_dataset']:.4f} iou {e['iou_dataset']:.4f})"
        print(line)
    if args.json_out:
        res["model"] = str(args.model)
        res["data"] = args.data
        from ..train.support import _json_safe

        text = json.dumps(_json_safe(res), indent=1, allow_nan=False) + "\n"
        atomic_write_bytes(Path(args.json_out), text.encode())
    return 0
