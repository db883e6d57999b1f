"""Can an image-level "is there a lesion at all" score, read from the segmentation model's
own bottleneck, stop ``busi_prosma`` painting lesions on normal scans (issue 14)?

    python training/presence_check.py [MODEL] [--seed 0] [--data ../shared/data] \
        [--json training/runs/leakfree/presence_check.json]

Features per image (one 256² window: BUSI images come at 256²): the global mean and max
of the deepest encoder stage's activations (2 × 256), read with a forward hook while the
plugin's engine (fp32, CPU) segments the image. A logistic regression (L2, numpy) on these
features predicts "the image has a lesion". Everything is chosen on the **train + val**
parts of ``training/splits/busi_leakfree_seedN.json`` by 5-fold cross-validation there
(out-of-fold scores): the L2 weight from a fixed grid (best out-of-fold log loss), then the
threshold ``t`` (the mask is emptied when the score is below ``t``): among thresholds
whose out-of-fold lesion Dice loss is at most 0.5 points, the one emptying the most normal
scans. The **test** part is scored once, before and after. Caveat: the segmentation model
was trained on the train part (its features there are "easy"), so the out-of-fold choice is
optimistic; val is the only part the model never saw, and it holds few normal scans.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "training"))

from normal_scans import PAINTED, dice  # noqa: E402

L2_GRID = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
MAX_LOSS = 0.005


def features(model, card, data) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(N, 512)`` bottleneck mean/max features and the N predicted masks."""
    from napari_prosma.inference import predict

    grabbed: list = []
    hook = model.encoder[-1].register_forward_hook(lambda m, i, o: grabbed.append(o.detach()))
    feats, preds = [], []
    try:
        for i in range(len(data)):
            grabbed.clear()
            out = predict(data.image(i), model, card, device="cpu", precision="fp32")
            f = grabbed[-1].float()  # (B, 256, h, w)
            feats.append(
                np.concatenate([f.mean(dim=(0, 2, 3)).numpy(), f.amax(dim=(0, 2, 3)).numpy()])
            )
            preds.append(np.asarray(out.labels) > 0)
    finally:
        hook.remove()
    return np.stack(feats), preds


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 500) -> np.ndarray:
    """Weights ``(D + 1,)`` of an L2 logistic regression (Newton steps, bias unpenalised)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    reg = np.full(xb.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-xb @ w))
        g = xb.T @ (p - y) / len(y) + reg * w
        h = (xb * (p * (1 - p))[:, None]).T @ xb / len(y) + np.diag(reg + 1e-9)
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def score(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(np.hstack([x, np.ones((len(x), 1))]) @ w)))


def oof_scores(x, y, l2, k=5, seed=0) -> np.ndarray:
    idx = np.random.default_rng(seed).permutation(len(y))
    out = np.zeros(len(y))
    for f in range(k):
        te = idx[f::k]
        tr = np.setdiff1d(idx, te)
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        w = fit_logreg((x[tr] - mu) / sd, y[tr], l2)
        out[te] = score((x[te] - mu) / sd, w)
    return out


def held_scores(mode, x, y, parts, l2) -> np.ndarray:
    """Scores of the images the threshold is chosen on: out-of-fold on train + val, or
    val scored by a regression fitted on train."""
    if mode == "oof":
        return oof_scores(x, y, l2)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    return score((parts["val"][0] - mu) / sd, fit_logreg((x - mu) / sd, y, l2))


def outcome(s, t, preds, gts) -> dict:
    lesion, painted = [], []
    for si, p, g in zip(s, preds, gts):
        p = p if si >= t else np.zeros_like(p)
        if g.any():
            lesion.append(dice(p, g))
        else:
            painted.append(bool(p.mean() > PAINTED))
    les = np.array(lesion)
    return {
        "t": float(t),
        "lesion_dice": float(les.mean()),
        "dice0": float((les == 0).mean()),
        "n_lesion": len(les),
        "normal_painted": int(sum(painted)),
        "n_normal": len(painted),
    }


def main() -> None:
    from napari_prosma.checkpoint import load
    from napari_prosma.datasets import read_dataset, read_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="busi_prosma")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--choose-on",
        choices=["oof", "val"],
        default="oof",
        help="oof: fit and choose on train + val by 5-fold CV; val: fit on train, choose "
        "the threshold on val (the part the segmentation model never saw)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    model, card = load(args.model)
    ds = read_dataset("busi_with_normal", args.data)
    split = read_split(ROOT / f"training/splits/busi_leakfree_seed{args.seed}.json")
    parts = {}
    for part in ("train", "val", "test"):
        sub = ds.subset(split[part])
        x, preds = features(model, card, sub)
        gts = [np.asarray(sub.labels[i]) > 0 for i in range(len(sub))]
        parts[part] = (x, preds, gts)
        print(f"{part}: {len(gts)} images, {sum(not g.any() for g in gts)} normal", flush=True)
    fit_parts = ["train", "val"] if args.choose_on == "oof" else ["train"]
    x = np.vstack([parts[p][0] for p in fit_parts])
    y = np.array([g.any() for p in fit_parts for g in parts[p][2]], float)
    if args.choose_on == "oof":
        preds, gts = parts["train"][1] + parts["val"][1], parts["train"][2] + parts["val"][2]
        yc = y
    else:
        preds, gts = parts["val"][1], parts["val"][2]
        yc = np.array([g.any() for g in gts], float)
    ll = {}
    for l2 in L2_GRID:
        s = np.clip(held_scores(args.choose_on, x, y, parts, l2), 1e-6, 1 - 1e-6)
        ll[l2] = float(-(yc * np.log(s) + (1 - yc) * np.log(1 - s)).mean())
    l2 = min(ll, key=ll.get)
    s = held_scores(args.choose_on, x, y, parts, l2)
    cands = [outcome(s, t, preds, gts) for t in [0.0, *np.linspace(0.02, 0.98, 49)]]
    ref = cands[0]["lesion_dice"]
    ok = [c for c in cands if c["lesion_dice"] >= ref - MAX_LOSS]
    t = min(ok, key=lambda c: (c["normal_painted"], c["t"]))["t"]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = fit_logreg((x - mu) / sd, y, l2)
    xt, pt, gt = parts["test"]
    st = score((xt - mu) / sd, w)
    res = {
        "model": card.name,
        "seed": args.seed,
        "choose_on": args.choose_on,
        "l2_oof_logloss": ll,
        "l2": l2,
        "t": t,
        "chosen_before": cands[0],
        "chosen_after": outcome(s, t, preds, gts),
        "val_before": outcome(np.ones(len(parts["val"][2])), 0.0, *parts["val"][1:]),
        "test_before": outcome(st, 0.0, pt, gt),
        "test_after": outcome(st, t, pt, gt),
        "test_scores_normal": [float(v) for v, g in zip(st, gt) if not g.any()],
    }
    b, a = res["test_before"], res["test_after"]
    print(
        f"l2 {l2}, t {t:.2f} (chosen on {args.choose_on}); test lesion Dice "
        f"{b['lesion_dice']:.4f} -> {a['lesion_dice']:.4f}, Dice=0 {b['dice0']:.1%} -> "
        f"{a['dice0']:.1%}, normal painted {b['normal_painted']}/{b['n_normal']} -> "
        f"{a['normal_painted']}/{a['n_normal']}",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
