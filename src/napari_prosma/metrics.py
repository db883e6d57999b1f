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


# ---------------------------------------------------------------------------- reports


def _pooled_ukan(rows: Sequence[dict[str, Any]], batch: int) -> dict[str, float]:
    """U-KAN's convention: IoU pooled over each batch of ``batch`` cases (in order), F1 =
    2·IoU/(1+IoU) of that, batches averaged weighted by their size."""
    ious, dices, sizes = [], [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        tp = sum(r["tp"] for r in chunk)
        union = sum(r["tp"] + r["fp"] + r["fn"] for r in chunk)
        iou_b = (tp + 1e-5) / (union + 1e-5)
        ious.append(iou_b)
        dices.append(2 * iou_b / (iou_b + 1))
        sizes.append(len(chunk))
    w = np.asarray(sizes, dtype=np.float64)
    return {
        "batch": batch,
        "iou": float(np.dot(ious, w) / w.sum()),
        "dice": float(np.dot(dices, w) / w.sum()),
    }


def _distribution(v: np.ndarray) -> dict[str, float]:
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "p05": float(q[0]),
        "p25": float(q[1]),
        "median": float(q[2]),
        "p75": float(q[3]),
        "p95": float(q[4]),
    }


def _target_report(tgt: Sequence[dict[str, Any]], ukan_batch: int) -> dict[str, Any]:
    """:func:`report`'s numbers over the target cases of one class (``tgt``, at least one)."""
    d = np.asarray([r["dice"] for r in tgt])
    u = np.asarray([r["iou"] for r in tgt])
    tp = sum(r["tp"] for r in tgt)
    fp = sum(r["fp"] for r in tgt)
    fn = sum(r["fn"] for r in tgt)
    out: dict[str, Any] = {
        "dice": _distribution(d),
        "iou": _distribution(u),
        "failures": {
            "dice_0": float((d == 0).mean()),
            "dice_below_0.5": float((d < 0.5).mean()),
            "n_dice_0": int((d == 0).sum()),
            "n_dice_below_0.5": int((d < 0.5).sum()),
        },
        "pooled": {"dice": dice_from_counts(tp, fp, fn), "iou": iou_from_counts(tp, fp, fn)},
        "ukan_pooled": _pooled_ukan(tgt, ukan_batch),
    }
    if "hd95" in tgt[0]:
        h = np.asarray([r["hd95"] for r in tgt], dtype=np.float64)
        ok = np.isfinite(h)
        out["hd95"] = {
            "mean": float(h[ok].mean()) if ok.any() else float("nan"),
            "median": float(np.median(h[ok])) if ok.any() else float("nan"),
            "n": int(ok.sum()),
            "n_left_out": int((~ok).sum()),
        }
    return out


def _no_target_report(empty: Sequence[tuple[dict[str, Any], int]], fp_area: float) -> dict:
    """:func:`report`'s numbers over the cases with nothing to find (``(row, size)``)."""
    area = np.asarray([(r["fp"] / s) if s else 0.0 for r, s in empty])
    return {
        "n": len(empty),
        "fp_share": float((area > fp_area).mean()),
        "n_fp": int((area > fp_area).sum()),
        "any_pixel_share": float((area > 0).mean()),
        "mean_area": float(area.mean()),
        "fp_area_threshold": fp_area,
    }


def report(
    cases: Sequence[dict[str, Any]],
    class_names: Sequence[str] | None = None,
    ukan_batch: int = 8,
    fp_area: float = 0.005,
) -> dict[str, Any]:
    """The protocol's report of :func:`case_metrics` results (each with ``"size"``, the
    number of pixels/voxels of the case), per foreground class.

    For the cases whose ground truth holds the class ("target cases"): the per-case mean
    Dice/IoU with its distribution, the failure rate (Dice = 0 and Dice < 0.5), HD95 with
    how many cases it leaves out (undefined where the prediction is empty), the pooled
    (dataset-level) Dice/IoU and U-KAN's batch-pooled convention (:func:`_pooled_ukan`, in
    the order given). For the cases with nothing to find: how many, and on what share the
    prediction covers more than ``fp_area`` of the image.

    Returns:
        ``{"per_class": {name: {...}}, "dice_mean", "iou_mean", "hd95_mean"}`` (the means
        over classes of the target-case means).
    """
    if not cases:
        raise ValueError("no cases to report")
    labels = list(cases[0]["per_class"])
    per_class: dict[str, Any] = {}
    for i, lab in enumerate(labels):
        name = class_names[i] if class_names and i < len(class_names) else lab
        rows = [c["per_class"][lab] for c in cases]
        sizes = [c.get("size", 0) for c in cases]
        has = [r["tp"] + r["fn"] > 0 for r in rows]
        tgt = [r for r, h in zip(rows, has) if h]
        entry: dict[str, Any] = {"n_target": len(tgt), "n_no_target": len(rows) - len(tgt)}
        if tgt:
            entry.update(_target_report(tgt, ukan_batch))
        empty = [(r, s) for r, s, h in zip(rows, sizes, has) if not h]
        if empty:
            entry["no_target"] = _no_target_report(empty, fp_area)
        per_class[name] = entry

    def mean_of(key: str) -> float:
        v = [e[key]["mean"] for e in per_class.values() if key in e]
        v = [x for x in v if np.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    return {
        "per_class": per_class,
        "dice_mean": mean_of("dice"),
        "iou_mean": mean_of("iou"),
        "hd95_mean": mean_of("hd95"),
        "conventions": (
            "per-case means over the cases whose ground truth holds the class; U-KAN's "
            f"batch-pooled IoU (batches of {ukan_batch} in id order, F1 = 2IoU/(1+IoU)); "
            f"false positive on a case with nothing to find = prediction > {fp_area:.1%} of it"
        ),
    }


def dice_distribution(values: Sequence[float], class_name: str) -> dict[str, Any]:
    """What a model card records of a test-set Dice distribution (for ``prosma demo`` and
    the card's reader): count, mean, quantiles, failure rates and every value, sorted.

    Args:
        values: per-case Dice of the cases whose ground truth holds the class.
        class_name: the foreground class they belong to.
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        raise ValueError("no Dice values")
    return {
        "class": class_name,
        "n": int(v.size),
        **_distribution(v),
        "dice_0": float((v == 0).mean()),
        "dice_below_0.5": float((v < 0.5).mean()),
        "dice_sorted": [round(float(x), 4) for x in v],
    }


def percentile_of(value: float, sorted_values: Sequence[float]) -> float:
    """Share (0–100) of ``sorted_values`` at or below ``value``."""
    v = np.asarray(sorted_values, dtype=np.float64)
    return float(100.0 * np.count_nonzero(v <= value) / max(v.size, 1))
