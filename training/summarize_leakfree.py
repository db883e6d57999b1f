"""Tables of the leak-free BUSI protocol (issue 14) from the raw run JSONs.

    python training/summarize_leakfree.py [--json training/runs/leakfree/summary.json]

Reads ``training/runs/leakfree/busi_{arm}_s{seed}.json`` (the ``result.json`` that
``prosma train`` / ``training/stack.py`` write) and prints, per arm, over the seeds found:

- lesion images (test part, ground truth not empty): per-image mean Dice and IoU (mean ±
  sample std over seeds), U-KAN's batch-pooled F1/IoU beside them, the failure rate (share
  of lesion images with Dice = 0 and with Dice < 0.5), HD95 (mean over the images where it
  is defined) and how many images it leaves out;
- normal images (no lesion): the share on which the model paints more than 0.5 % of the
  image;
- the epoch kept (best on validation) and the validation score;
- paired comparisons against the full gate: per seed, the mean per-image Dice difference on
  the same lesion images with a 95 % paired bootstrap interval (10,000 resamples), and over
  the three seeds pooled, the same with a Wilcoxon signed-rank p-value.

Nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import numpy as np

RUNS = Path(__file__).resolve().parent / "runs" / "leakfree"
#: Table 1's Kvasir-SEG and GlaS runs (``--dataset kvasir|glas``).
RUNS_TABLE1 = Path(__file__).resolve().parent / "runs" / "table1"
CLASS = {"busi": "lesion", "kvasir": "polyp", "glas": "gland"}
ORDER = [
    "gate_none",
    "gate_spatial",
    "gate_channel",
    "prosma",
    "gate_exact",
    "gate_exact_normal25",
    "gate_exact_emptyloss",
    "gate_exact_emptyloss_normal25",
    "gate_exact_emptyloss_crops25",
    "prosma_dead01",
    "monai_unet",
    "monai_attention_unet",
]
TITLE = {
    "gate_none": "none (plain skip)",
    "gate_spatial": "spatial sparse only",
    "gate_channel": "channel gate only",
    "prosma": "full (ProSMA, paper's form)",
    "gate_exact": "full + exact removal",
    "gate_exact_normal25": "full + exact removal, normal scans 25 % of draws",
    "gate_exact_emptyloss": "full + exact removal, 'nothing here' loss on empty masks",
    "gate_exact_emptyloss_normal25": "… + 'nothing here' loss, normal scans 25 % of draws",
    "gate_exact_emptyloss_crops25": "… + 'nothing here' loss, lesion-free crops, 25 % empty",
    "prosma_dead01": "full + dead-gate remedy",
    "monai_unet": "U-Net (MONAI)",
    "monai_attention_unet": "Attention U-Net (MONAI)",
}


def load_runs(dataset: str = "busi") -> dict[tuple[str, int], dict]:
    """``{(arm, seed): row}`` with the table numbers and the per-image target Dice."""
    out = {}
    name = re.compile(rf"^{dataset}_(?P<arm>.+)_s(?P<seed>\d)$")
    cls = CLASS[dataset]
    for path in sorted((RUNS if dataset == "busi" else RUNS_TABLE1).glob(f"{dataset}_*_s*.json")):
        m = name.match(path.stem)
        if not m:
            continue
        res = json.loads(path.read_text())
        rep = res["evaluation"]["report"]["per_class"][cls]
        rep.setdefault("no_target", {"fp_share": 0.0, "n": 0})
        sel = res["card"]["training"]["selected"]
        per_image = {
            c["id"]: c[cls]["dice"]
            for c in res["evaluation"]["cases"]
            if not c["id"].startswith("normal")
        }
        out[(m["arm"], int(m["seed"]))] = {
            "run": path.stem,
            "dice": 100 * rep["dice"]["mean"],
            "iou": 100 * rep["iou"]["mean"],
            "dice_median": 100 * rep["dice"]["median"],
            "ukan_f1": 100 * rep["ukan_pooled"]["dice"],
            "ukan_iou": 100 * rep["ukan_pooled"]["iou"],
            "fail0": 100 * rep["failures"]["dice_0"],
            "fail05": 100 * rep["failures"]["dice_below_0.5"],
            "hd95": rep["hd95"]["mean"],
            "hd95_left_out": rep["hd95"]["n_left_out"],
            "n_lesion": rep["n_target"],
            "normal_fp": 100 * rep["no_target"]["fp_share"],
            "n_normal": rep["no_target"]["n"],
            "epoch": sel["epoch"],
            "val": 100 * sel.get("score", float("nan")),
            "epochs": res["config"]["epochs"],
            "train_seconds": res["train_seconds"],
            "device": res["device"],
            "per_image": per_image,
        }
    return out


def _ms(v: list[float], digits: int = 2) -> str:
    if len(v) < 2:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def _boot(diff: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def table3(runs: dict) -> list[str]:
    seeds = sorted({s for _, s in runs})
    lines = [
        "| skip gate | seeds | Dice (per image) | IoU (per image) | U-KAN pooled F1 / IoU | "
        "Dice = 0 | Dice < 0.5 | HD95 px (left out) | normal images painted | epoch kept |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ORDER:
        rows = [runs[(arm, s)] for s in seeds if (arm, s) in runs]
        if not rows:
            continue

        def col(k: str, rows: list = rows) -> list:
            return [r[k] for r in rows]

        lo = sum(col("hd95_left_out"))
        fp = sum(r["normal_fp"] * r["n_normal"] / 100 for r in rows)
        nn = sum(r["n_normal"] for r in rows)
        painted = f"{fp:.0f}/{nn} = {100 * fp / nn:.0f} %" if nn else "–"
        lines.append(
            f"| {TITLE[arm]} | {len(rows)} | {_ms(col('dice'))} | {_ms(col('iou'))} | "
            f"{_ms(col('ukan_f1'))} / {_ms(col('ukan_iou'))} | {_ms(col('fail0'), 1)} % | "
            f"{_ms(col('fail05'), 1)} % | {_ms(col('hd95'), 1)} ({lo}) | "
            f"{painted} | {', '.join(str(e) for e in col('epoch'))} |"
        )
    return lines


def paired(runs: dict, ref: str = "prosma") -> list[str]:
    from scipy.stats import wilcoxon

    seeds = sorted({s for _, s in runs})
    lines = [
        f"| arm − {ref} | "
        + " | ".join(f"seed {s}: Δ Dice [95 % CI]" for s in seeds)
        + f" | {len(seeds)} seed(s) pooled: Δ [95 % CI], Wilcoxon p |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for arm in ORDER:
        if arm == ref or not any((arm, s) in runs for s in seeds):
            continue
        cells, pooled = [], []
        for s in seeds:
            if (arm, s) not in runs or (ref, s) not in runs:
                cells.append("–")
                continue
            a, b = runs[(arm, s)]["per_image"], runs[(ref, s)]["per_image"]
            ids = sorted(set(a) & set(b))
            d = 100 * (np.array([a[i] for i in ids]) - np.array([b[i] for i in ids]))
            pooled.append(d)
            lo, hi = _boot(d)
            cells.append(f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] (n={len(d)})")
        if pooled:
            d = np.concatenate(pooled)
            lo, hi = _boot(d)
            p = wilcoxon(d[d != 0]).pvalue if np.any(d != 0) else 1.0
            cells.append(f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}], p = {p:.2f}")
        lines.append(f"| {TITLE[arm]} | " + " | ".join(cells) + " |")
    return lines


def per_run(runs: dict) -> list[str]:
    lines = [
        "| run | epochs | kept (val Dice) | lesion Dice | IoU | median | U-KAN F1 | Dice=0 | "
        "<0.5 | HD95 (left out) | normal painted | train s (stacked) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _, r in sorted(runs.items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1])):
        lines.append(
            f"| {r['run']} | {r['epochs']} | {r['epoch']} ({r['val']:.1f}) | {r['dice']:.2f} | "
            f"{r['iou']:.2f} | {r['dice_median']:.1f} | {r['ukan_f1']:.2f} | {r['fail0']:.1f} % | "
            f"{r['fail05']:.1f} % | {r['hd95']:.1f} ({r['hd95_left_out']}) | "
            + (
                f"{r['normal_fp'] * r['n_normal'] / 100:.0f}/{r['n_normal']}"
                if r["n_normal"]
                else "–"
            )
            + " | "
            f"{r['train_seconds']:.0f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dataset", default="busi", choices=sorted(CLASS))
    args = ap.parse_args()
    runs = load_runs(args.dataset)
    print("\n".join(table3(runs)), "\n")
    print("\n".join(paired(runs)), "\n")
    print("\n".join(per_run(runs)))
    if args.json:
        slim = {
            f"{a}_s{s}": {k: v for k, v in r.items() if k != "per_image"}
            for (a, s), r in runs.items()
        }
        args.json.write_text(json.dumps(slim, indent=1) + "\n")


if __name__ == "__main__":
    main()
