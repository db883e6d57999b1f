"""Tables of ``training/RESULTS.md`` from the raw run JSONs in ``training/runs``.

    python training/summarize.py [--json training/runs/summary.json]

Reads every ``training/runs/{dataset}_{arch}_s{seed}.json`` (the ``result.json`` that
``prosma train`` writes) and prints, per dataset and architecture, the per-seed test
metrics (mean over test images) and the mean ± std over the seeds found (sample std,
``ddof=1``, as the paper's ± over 3 seeds; "–" with one seed). Nothing is typed in by hand:
a run that did not finish has no JSON here and does not appear. ``glasofficial`` is GlaS on
its official split (train 85 / testA + testB 80); ``gate_*`` are the Table 3 ablation rows
(ProSMA-UNet with ``gate=none|spatial|channel``; ``prosma`` is the full gate).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "runs"
NAME = re.compile(
    r"^(?P<data>busi|kvasir|glasofficial|glas|hippocampus)_(?P<arch>.+)_s(?P<seed>\d)$"
)
PAPER = {  # Table 1 of the paper (IoU, F1), ProSMA-UNet / U-Net / Attention U-Net
    ("busi", "prosma"): (66.24, 79.29),
    ("busi", "unet"): (57.22, 71.91),
    ("busi", "attention_unet"): (55.18, 70.22),
    ("glas", "prosma"): (88.76, 94.04),
    ("glas", "unet"): (86.66, 92.79),
    ("glas", "attention_unet"): (86.84, 92.89),
    ("kvasir", "prosma"): (66.23, 85.43),
    ("kvasir", "unet"): (54.58, 79.59),
    ("kvasir", "attention_unet"): (62.75, 83.36),
}


def _row(path: Path) -> tuple[dict, dict[str, float]] | None:
    """One run's table row, and its per-image Dice (first class) by image id."""
    m = NAME.match(path.stem)
    if not m:
        return None
    res = json.loads(path.read_text())
    summ = res["evaluation"]["summary"]
    classes = summ["per_class"]
    cfg = res["config"]
    row = {
        "run": path.stem,
        "dataset": m["data"],
        "arch": m["arch"],
        "seed": int(m["seed"]),
        "epochs": cfg["epochs"],
        "epochs_done": len(res["history"]),
        "device": res["device"],
        "train_seconds": round(res["train_seconds"], 1),
        "engine": res["evaluation"].get("engine"),
        "n_test": summ["n_cases"],
        "iou": 100 * summ["mean_iou"],
        "dice": 100 * summ["mean_dice"],
        "hd95": summ.get("mean_hd95"),
        "per_class": {
            k: {
                "dice": 100 * v["dice"]["mean"],
                "iou": 100 * v["iou"]["mean"],
                "hd95": (v.get("hd95") or {}).get("mean"),
            }
            for k, v in classes.items()
        },
    }
    cases = {}
    for c in res["evaluation"]["cases"]:
        cls = next(v for k, v in c.items() if k != "id")
        cases[c["id"]] = 100 * cls["dice"]
    return row, cases


def _ms(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def paired(
    a: str, b: str, cases: dict[str, dict[str, float]], n_boot: int = 10_000, seed: int = 0
) -> dict | None:
    """Mean per-image Dice difference ``a - b`` on the test images both runs share (the same
    split), with a 95 % paired bootstrap interval over images. None where a run is missing.
    ``cases``: per-image Dice by run name (from :func:`_row`)."""
    import numpy as np

    if a not in cases or b not in cases:
        return None
    ca, cb = cases[a], cases[b]
    ids = sorted(set(ca) & set(cb))
    d = np.array([ca[i] - cb[i] for i in ids])
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"a": a, "b": b, "n": len(ids), "diff": float(d.mean()), "ci95": [float(lo), float(hi)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=RUNS / "summary.json")
    args = ap.parse_args()
    loaded = [r for p in sorted(RUNS.glob("*.json")) if (r := _row(p))]
    rows = [row for row, _ in loaded]
    cases = {row["run"]: c for row, c in loaded}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["arch"]), []).append(r)

    print("| dataset | model | seeds | IoU | F1/Dice | HD95 | paper IoU | paper F1 | card |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    table = []
    for (data, arch), rs in sorted(groups.items()):
        if data == "hippocampus":
            continue
        rs.sort(key=lambda r: r["seed"])
        p = PAPER.get((data, arch), (None, None))
        entry = {
            "dataset": data,
            "arch": arch,
            "seeds": [r["seed"] for r in rs],
            "iou": [r["iou"] for r in rs],
            "dice": [r["dice"] for r in rs],
            "hd95": [r["hd95"] for r in rs],
            "paper": p,
        }
        table.append(entry)
        cards = ", ".join(sorted({r["device"] for r in rs}))
        print(
            f"| {data} | {arch} | {','.join(map(str, entry['seeds']))} | {_ms(entry['iou'])} | "
            f"{_ms(entry['dice'])} | {_ms(entry['hd95'])} | {p[0] or '–'} | {p[1] or '–'} "
            f"| {cards} |"
        )
    print()
    print("| run | epochs | train s | device | IoU | Dice | HD95 |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['run']} | {r['epochs_done']}/{r['epochs']} | {r['train_seconds']:.0f} | "
            f"{r['device']} | {r['iou']:.2f} | {r['dice']:.2f} | {r['hd95']:.2f} |"
        )
    for r in rows:
        if r["dataset"] == "hippocampus":
            pc = "; ".join(
                f"{k} Dice {v['dice']:.2f} HD95 {v['hd95']:.2f}" for k, v in r["per_class"].items()
            )
            print(f"\n{r['run']}: {pc}")
    pairs = [(f"busi_gate_{g}_s0", "busi_prosma_s0") for g in ("none", "spatial", "channel")]
    for data in ("busi", "glas", "kvasir", "glasofficial"):
        for seed in range(3):
            for base in ("unet", "attention_unet"):
                pairs.append((f"{data}_prosma_s{seed}", f"{data}_{base}_s{seed}"))
    diffs = [d for a, b in pairs if (d := paired(a, b, cases))]
    print("\nPaired per-image Dice differences (same split, same test images; 95 % bootstrap CI):")
    print("\n| A | B | images | Dice A − B | 95 % CI |")
    print("|---|---|---:|---:|---|")
    for d in diffs:
        print(
            f"| {d['a']} | {d['b']} | {d['n']} | {d['diff']:+.2f} | "
            f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] |"
        )
    args.json.write_text(
        json.dumps({"table1": table, "runs": rows, "paired": diffs}, indent=1) + "\n"
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
