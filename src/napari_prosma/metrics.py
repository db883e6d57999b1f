"""Segmentation metrics as the paper reports them: IoU, F1 (= Dice for a binary mask) and HD95.

Conventions (the same on CPU, numpy and GPU, torch):

- Per case, per foreground class: ``dice = 2|P∩G| / (|P| + |G|)``, ``iou = |P∩G| / |P∪G|``;
  a case where prediction and ground truth are both empty scores 1, one empty scores 0.
- ``hd95`` follows medpy's ``binary.hd95`` (used by U-KAN): the 95th percentile of the
  distances from each surface voxel of one mask to the nearest surface voxel of the other,
  both directions pooled, in the units of ``spacing`` (pixels by default); it is undefined
  (NaN, counted apart) when either mask is empty.
- :func:`summarize` reports the per-case mean ± std (the headline number: U-KAN and the
  paper average per image) and the dataset-level (pooled TP/FP/FN) Dice and IoU beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def overlap_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of two boolean masks."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    tp = int(np.count_nonzero(pred & gt))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    d = 2 * tp + fp + fn
    return 1.0 if d == 0 else 2 * tp / d


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    d = tp + fp + fn
    return 1.0 if d == 0 else tp / d


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice (= F1) of two boolean masks."""
    return dice_from_counts(*overlap_counts(pred, gt))


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two boolean masks."""
    return iou_from_counts(*overlap_counts(pred, gt))


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Distances from each surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    from scipy import ndimage

    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    sa, sb = _surface(a), _surface(b)
    dt = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return dt[sa]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance (medpy's definition); NaN if either
    mask is empty."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if not pred.any() or not gt.any():
        return float("nan")
    d = np.concatenate([surface_distances(pred, gt, spacing), surface_distances(gt, pred, spacing)])
    return float(np.percentile(d, 95))


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Sequence[int] = (1,),
    spacing: Sequence[float] | None = None,
    with_hd95: bool = True,
) -> dict[str, Any]:
    """Metrics of one case for each foreground label in ``classes``.

    Args:
        pred, gt: integer label images of the same shape (a binary mask is labels {0, 1}).

    Returns:
        ``{"per_class": {label: {"dice", "iou", "hd95", "tp", "fp", "fn"}}}``.
    """
    out: dict[str, Any] = {"per_class": {}}
    for c in classes:
        p, g = np.asarray(pred) == c, np.asarray(gt) == c
        tp, fp, fn = overlap_counts(p, g)
        m = {
            "dice": dice_from_counts(tp, fp, fn),
            "iou": iou_from_counts(tp, fp, fn),
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }
        if with_hd95:
            m["hd95"] = hd95(p, g, spacing)
        out["per_class"][str(c)] = m
    return out


def _mean_std(values: Sequence[float]) -> dict[str, float | int]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    n_undefined = len(values) - v.size
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "n_undefined": n_undefined}
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "n": int(v.size),
        "n_undefined": int(n_undefined),
    }


def summarize(
    cases: Sequence[dict[str, Any]], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Aggregate :func:`case_metrics` results.

    Returns:
        ``{"per_class": {name: {"dice": {mean, std, n}, "iou": ..., "hd95": ...,
        "dice_dataset", "iou_dataset"}}, "mean_dice", "mean_iou", "mean_hd95", "n_cases"}``
        where the ``mean_*`` values average the per-case means over the foreground classes.
    """
    if not cases:
        raise ValueError("no cases to summarize")
    labels = list(cases[0]["per_class"])
    per_class: dict[str, Any] = {}
    for i, lab in enumerate(labels):
        rows = [c["per_class"][lab] for c in cases]
        name = class_names[i] if class_names and i < len(class_names) else lab
        tp = sum(r["tp"] for r in rows)
        fp = sum(r["fp"] for r in rows)
        fn = sum(r["fn"] for r in rows)
        entry: dict[str, Any] = {
            "label": int(lab),
            "dice": _mean_std([r["dice"] for r in rows]),
            "iou": _mean_std([r["iou"] for r in rows]),
            "dice_dataset": dice_from_counts(tp, fp, fn),
            "iou_dataset": iou_from_counts(tp, fp, fn),
        }
        if "hd95" in rows[0]:
            entry["hd95"] = _mean_std([r["hd95"] for r in rows])
        per_class[name] = entry
    out: dict[str, Any] = {
        "n_cases": len(cases),
        "per_class": per_class,
        "mean_dice": float(np.mean([e["dice"]["mean"] for e in per_class.values()])),
        "mean_iou": float(np.mean([e["iou"]["mean"] for e in per_class.values()])),
    }
    if all("hd95" in e for e in per_class.values()):
        hd = [e["hd95"]["mean"] for e in per_class.values() if np.isfinite(e["hd95"]["mean"])]
        out["mean_hd95"] = float(np.mean(hd)) if hd else float("nan")
    return out


# ---------------------------------------------------------------------------- torch (GPU)


def batch_dice_iou(pred, gt):  # type: ignore[no-untyped-def]
    """Per-case Dice and IoU of boolean torch tensors ``(N, *S)``, same empty conventions;
    returns ``(dice, iou, tp, fp, fn)`` as float tensors ``(N,)`` on the input's device."""
    p = pred.flatten(1).float()
    g = gt.flatten(1).float()
    tp = (p * g).sum(1)
    fp = p.sum(1) - tp
    fn = g.sum(1) - tp
    d = 2 * tp + fp + fn
    u = tp + fp + fn
    one = torch_ones_like(tp)
    dice_v = (2 * tp / d.clamp_min(1)).where(d > 0, one)
    iou_v = (tp / u.clamp_min(1)).where(u > 0, one)
    return dice_v, iou_v, tp, fp, fn


def torch_ones_like(t):  # type: ignore[no-untyped-def]
    import torch

    return torch.ones_like(t)
