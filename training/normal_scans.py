"""What a BUSI model paints on scans without a lesion, and a "nothing here" rule chosen on
validation (issue 14).

    python training/normal_scans.py MODEL [MODEL ...] --seeds 0 [1 2] \
        [--data ../shared/data] [--json training/runs/leakfree/normal_scans.json]

For each model (a bundled name or a ``.safetensors`` path, one per seed, in the order of
``--seeds``) every image of the val and test parts of ``training/splits/busi_leakfree_seedN.json``
goes once through :func:`napari_prosma.inference.predict` (fp32, the plugin's path) and
the script records per image: the predicted area (share of the image), the area of each
connected component, and the per-image Dice on lesion images.

The rule: remove every connected component smaller than ``a`` of the image or whose peak
probability is below ``t`` (``a = t = 0`` keeps the model as it is). ``(a, t)`` is chosen
on the **val** part only, from a fixed grid: among the rules whose val lesion Dice is not
more than 0.5 points below the model's own (so lesion Dice is not traded away), the one
painting the fewest val normal scans (ties: the mildest). The test part
is then reported once with that ``a``: lesion Dice (mean, Dice = 0 / < 0.5 rates) and the
share of normal scans painted (> 0.5 % of the image, the protocol's definition), before and
after. Nothing is chosen on test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

#: Candidate minimum component areas (share of the image) and minimum peak probabilities
#: of a component; (0, 0) = the model as it is.
GRID_A = [0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05]
GRID_T = [0.0, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
GRID = [(a, t) for a in GRID_A for t in GRID_T]
PAINTED = 0.005  # the protocol's "painted a lesion": > 0.5 % of the image
MAX_LOSS = 0.005  # the rule may cost at most 0.5 Dice points on val lesion images


def image_rows(model, card, data) -> list[dict]:
    """Per image: ``{"id", "gt": bool mask, "comp": label image of the prediction's
    connected components, "areas": their shares of the image, "peak": their peak
    foreground probabilities}``."""
    from scipy import ndimage

    from napari_prosma.inference import predict

    rows = []
    for i in range(len(data)):
        gt = np.asarray(data.labels[i]) > 0
        out = predict(
            data.image(i), model, card, device="cpu", precision="fp32", return_probabilities=True
        )
        pred, prob = np.asarray(out.labels), np.asarray(out.probabilities)[1]
        comp, n = ndimage.label(pred > 0)
        areas = np.bincount(comp.ravel(), minlength=n + 1)[1:] / pred.size
        peak = ndimage.maximum(prob, comp, index=np.arange(1, n + 1)) if n else np.zeros(0)
        rows.append({"id": data.ids[i], "gt": gt, "comp": comp, "areas": areas, "peak": peak})
    return rows


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return 1.0 if s == 0 else float(2 * (pred & gt).sum() / s)


def apply_rule(row: dict, a: float, t: float = 0.0) -> np.ndarray:
    """The prediction with components below ``a`` of the image, or whose peak probability
    is below ``t``, removed."""
    keep = np.flatnonzero((row["areas"] >= a) & (np.asarray(row["peak"]) >= t)) + 1
    return np.isin(row["comp"], keep)


def score(rows: list[dict], a: float, t: float) -> dict:
    lesion, painted = [], []
    for r in rows:
        p = apply_rule(r, a, t)
        if r["gt"].any():
            lesion.append(dice(p, r["gt"]))
        else:
            painted.append(bool(p.mean() > PAINTED))
    les = np.array(lesion)
    return {
        "a": a,
        "t": t,
        "lesion_dice": float(les.mean()),
        "dice0": float((les == 0).mean()),
        "below_half": float((les < 0.5).mean()),
        "n_lesion": len(les),
        "normal_painted": int(sum(painted)),
        "n_normal": len(painted),
    }


def choose(val: list[dict]) -> tuple[float, float]:
    """The rule ``(a, t)`` from val scores (see the module docstring); ties go to the
    mildest rule (smallest ``t``, then smallest ``a``)."""
    ref = val[0]["lesion_dice"]
    ok = [s for s in val if s["lesion_dice"] >= ref - MAX_LOSS]
    best = min(s["normal_painted"] for s in ok)
    s = min((s for s in ok if s["normal_painted"] == best), key=lambda s: (s["t"], s["a"]))
    return s["a"], s["t"]


def main() -> None:
    from napari_prosma.checkpoint import load
    from napari_prosma.datasets import read_dataset, read_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if len(args.models) != len(args.seeds):
        raise SystemExit("give one model per seed")
    ds = read_dataset("busi_with_normal", args.data)
    out = []
    for path, seed in zip(args.models, args.seeds):
        model, card = load(path)
        split = read_split(ROOT / f"training/splits/busi_leakfree_seed{seed}.json")
        res = {"model": card.name, "seed": seed}
        for part in ("val", "test"):
            rows = image_rows(model, card, ds.subset(split[part]))
            res[part] = [score(rows, a, t) for a, t in GRID]
        a, th = choose(res["val"])
        res["chosen"] = {"a": a, "t": th}
        res["test_before"], res["test_after"] = (
            res["test"][0],
            next(s for s in res["test"] if (s["a"], s["t"]) == (a, th)),
        )
        b, t = res["test_before"], res["test_after"]
        print(
            f"{card.name} (seed {seed}): a = {a:.2%}, t = {th} chosen on val; test lesion Dice "
            f"{b['lesion_dice']:.4f} -> {t['lesion_dice']:.4f}, Dice=0 {b['dice0']:.1%} -> "
            f"{t['dice0']:.1%}, normal scans painted {b['normal_painted']}/{b['n_normal']} -> "
            f"{t['normal_painted']}/{t['n_normal']}",
            flush=True,
        )
        out.append(res)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
