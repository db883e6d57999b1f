"""Train several arms of one recipe and seed together, one process, one GPU
(:func:`napari_prosma.train.train_many`): Table 3's gate ablations, the dead-gate remedy and
the MONAI baselines, on the leak-free split of the seed.

    python training/stack.py --seed 0 --arms prosma,gate_exact --epochs 200 \
        --out-root _device/runs --data-root _device/data --time-limit 500

A run is named ``{prefix}_{arm}_s{seed}`` and lives in ``OUT_ROOT/NAME``; giving the same
command again resumes unfinished runs and passes over finished ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.train import TrainConfig, overrides_from_strings, train_many  # noqa: E402

#: Arm name -> recipe overrides.
ARMS: dict[str, dict] = {
    "gate_none": {"gate": "none"},
    "gate_spatial": {"gate": "spatial"},
    "gate_channel": {"gate": "channel"},
    "prosma": {},
    "gate_exact": {"gate": "exact"},
    "prosma_dead01": {"dead_slope": 0.1},
    # issue 14: normal scans (empty masks) drawn to a quarter of every epoch
    "gate_exact_normal25": {"gate": "exact", "empty_share": 0.25},
    "prosma_normal25": {"empty_share": 0.25},
    # issue 14, session 10: an image-level "nothing here" loss term for empty masks, alone,
    # with the normal scans drawn to 25 %, and with lesion-free crops (train.negatives)
    "gate_exact_emptyloss": {"gate": "exact", "loss": "bce_dice_empty"},
    "gate_exact_emptyloss_normal25": {
        "gate": "exact",
        "loss": "bce_dice_empty",
        "empty_share": 0.25,
    },
    "gate_exact_emptyloss_crops25": {
        "gate": "exact",
        "loss": "bce_dice_empty",
        "negative_crops": 1,
        "empty_share": 0.25,
    },
    "monai_unet": {"arch": "monai_unet"},
    "monai_attention_unet": {"arch": "monai_attention_unet"},
    # issue 15 (hippocampus): the schedule chosen on val, for ProSMA and the MONAI U-Net
    "prosma_poly": {"lr_schedule": "poly"},
    "prosma_cosine": {"lr_schedule": "cosine"},
    "monai_unet_poly": {"arch": "monai_unet", "lr_schedule": "poly"},
    "monai_unet_cosine": {"arch": "monai_unet", "lr_schedule": "cosine"},
}


def configs(args: argparse.Namespace) -> list[TrainConfig]:
    """The recipes of the stack."""
    out = []
    for arm in args.arms.split(","):
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
        name = f"{args.prefix}_{arm}_s{args.seed}"
        over = {
            **ARMS[arm],
            "name": name,
            "seed": args.seed,
            "split": args.split.format(seed=args.seed),
            "out_dir": str(Path(args.out_root) / name),
            "epochs": args.epochs,
            **overrides_from_strings(args.set),
        }
        if args.data_root:
            over["data_root"] = args.data_root
        out.append(TrainConfig.from_toml(args.recipe, over))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "training/recipes/busi_prosma.toml"))
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--split", default="training/splits/busi_leakfree_seed{seed}.json")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--prefix", default="busi")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--out-root", default="_device/runs")
    ap.add_argument("--data-root")
    ap.add_argument("--time-limit", type=float)
    ap.add_argument(
        "--finish-reserve",
        type=float,
        default=0.0,
        help="seconds kept for the final evaluation: the last epoch waits for a call with room",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfgs = configs(args)
    cmd = "python training/stack.py " + " ".join(sys.argv[1:])
    results = train_many(
        cfgs,
        log=lambda s: print(s, flush=True),
        command=cmd,
        time_limit=args.time_limit,
        finish_reserve=args.finish_reserve,
    )
    for cfg, r in zip(cfgs, results):
        print(f"{cfg.name}: {r.status} (epoch {r.epoch}/{cfg.epochs})", flush=True)
    print(f"stack of {len(cfgs)} done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
