"""What fine-tuning changed on the user's whole images, and the new model's gate range
(Qt-free; torch only through the inference engine).

The held-out Dice of :mod:`.loop` rests on a few slices or images; a clinician wants to
know what the new model does on the *whole* images and volumes they gave: every slice,
including those they left empty (a model that marks something on every slice of a CT has
false positives there that no held-out slice shows). :func:`whole_pass` segments each
labelled image or volume whole, as the Segment widget does (a 2D model slice by slice along
``slice_axis``, a 3D model on the volume at its spacing), and :func:`whole_report` compares
the parent's pass with the new model's. Most of these images were trained on, so this is
no independent test; the report says so.

The same pass of the new model gives its gate-sparsity range (the numbers are those
:func:`~napari_prosma.inference.gate_sparsity_range` takes, computed as training computes
them: fp32, the engine's ``zero_frac_mean`` per image or slice), on the user's images and on
the replay samples, so the drift warning describes the fine-tuned model and its new data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checkpoint import ModelCard
from .units import Unit

#: Replay samples the gate range is also measured on (the source domain the model keeps).
RANGE_REPLAY = 16


@contextmanager
def _fine_tuning_words() -> Iterator[None]:
    """A cancel inside the engine says what a cancelled fine-tuning run leaves."""
    from ..inference import Cancelled
    from .config import CANCEL_MESSAGE

    try:
        yield
    except Cancelled:
        raise Cancelled(CANCEL_MESSAGE) from None


@dataclass
class WholeImage:
    """One labelled image or volume of the user's, whole."""

    image: np.ndarray
    labels: np.ndarray  # int64 class numbers on the image's grid
    spacing: tuple[float, ...] | None
    volume: bool


@dataclass
class Pass:
    """One model's labels on every whole image, and the gate predictions it made."""

    labels: list[np.ndarray]
    gate_preds: list[Any] = field(default_factory=list)


def whole_images(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    card: ModelCard,
    previous: Sequence[np.ndarray | None] | None,
    spacing: Sequence[Sequence[float] | None] | None,
) -> list[WholeImage]:
    """The images the report covers: volumes with any label, 2D images with any label or
    whose prediction the user erased (``previous`` given: "nothing here" is a correction)."""
    from .units import check_labels

    previous = list(previous) if previous is not None else [None] * len(images)
    spacing = list(spacing) if spacing is not None else [None] * len(images)
    out = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        lab = check_labels(np.asarray(lab), card)[0]
        if card.out_channels == 1:
            lab = (lab > 0).astype(np.int64)
        volume = lab.ndim == 3
        prev = previous[k] if k < len(previous) else None
        if not np.any(lab > 0) and (volume or prev is None):
            continue
        sp = spacing[k] if k < len(spacing) else None
        out.append(
            WholeImage(np.asarray(img), lab, tuple(float(s) for s in sp) if sp else None, volume)
        )
    return out


def whole_pass(
    model: Any,
    card: ModelCard,
    items: Sequence[WholeImage],
    axis: int,
    device: str,
    cancel: Any = None,
    gates: bool = False,
) -> Pass:
    """Segment every item whole (fp32); with ``gates``, keep the predictions' gate numbers
    (one per 2D image, per slice of a volume under a 2D model, per volume under a 3D one)."""
    kw: dict[str, Any] = {"device": device, "cancel": cancel, "precision": "fp32"}
    if gates:
        kw["return_gates"] = "stats"
    out = Pass([])
    with _fine_tuning_words():
        for it in items:
            _segment(it, model, card, axis, kw, out, gates)
    return out


def _segment(
    it: WholeImage, model: Any, card: ModelCard, axis: int, kw: dict, out: Pass, gates: bool
) -> None:
    """One item whole, its labels (and predictions, with ``gates``) added to ``out``."""
    from ..inference import predict, predict_batch

    if it.volume and card.spatial_dims == 2:
        slices = [np.take(it.image, z, axis=axis) for z in range(it.image.shape[axis])]
        plane = None
        if it.spacing is not None:
            plane = tuple(s for a, s in enumerate(it.spacing) if a != axis)
        preds = predict_batch(slices, model, card, spacing=plane, **kw)
        out.labels.append(np.stack([p.labels for p in preds], axis=axis))
    else:
        sp = {"spacing": it.spacing} if it.spacing is not None else {}
        preds = [predict(it.image, model, card, **sp, **kw)]
        out.labels.append(preds[0].labels)
    if gates:
        out.gate_preds += preds


def _counts(pred: np.ndarray, lab: np.ndarray, card: ModelCard, axis: int) -> dict[str, Any]:
    """Dice (mean over the classes present), foreground voxels right and wrong, and those
    on slices (volumes) the user left empty."""
    from ..metrics import dice

    classes = range(1, max(card.out_channels, 2))
    per = [dice(pred == c, lab == c) for c in classes if np.any(lab == c)]
    if not per:
        per = [1.0 if not np.any(pred > 0) else 0.0]
    fg, truth = pred > 0, lab > 0
    hit = (pred == lab) & truth
    out = {
        "dice": float(np.mean(per)),
        "true_positive": int(hit.sum()),
        "false_positive": int((fg & ~(pred == lab)).sum()),
        "false_negative": int((truth & ~hit).sum()),
    }
    if lab.ndim == 3:
        others = tuple(a for a in range(3) if a != axis)
        empty = ~np.any(truth, axis=others)
        out["empty_slices"] = int(empty.sum())
        out["false_positive_on_empty"] = int(np.take(fg, np.flatnonzero(empty), axis=axis).sum())
        out["empty_slices_marked"] = int(np.any(fg, axis=others)[empty].sum())
    else:
        out["empty_slices"] = 0 if np.any(truth) else 1
        out["false_positive_on_empty"] = 0 if np.any(truth) else int(fg.sum())
        out["empty_slices_marked"] = int(not np.any(truth) and bool(np.any(fg)))
    return out


def whole_report(
    items: Sequence[WholeImage],
    before: Pass,
    after: Pass,
    card: ModelCard,
    axis: int,
    n_report: int,
    independent: bool,
) -> dict[str, Any]:
    """Before/after on the whole images: mean Dice, voxel counts summed over images, and
    what the held-out number rests on (the card records this dict)."""
    per = [
        {
            "before": _counts(b, it.labels, card, axis),
            "after": _counts(a, it.labels, card, axis),
            "volume": it.volume,
        }
        for it, b, a in zip(items, before.labels, after.labels)
    ]

    def total(side: str) -> dict[str, Any]:
        keys = ("true_positive", "false_positive", "false_negative", "false_positive_on_empty")
        t: dict[str, Any] = {k: sum(p[side][k] for p in per) for k in keys}
        t["dice"] = float(np.mean([p[side]["dice"] for p in per])) if per else None
        t["empty_slices_marked"] = sum(p[side]["empty_slices_marked"] for p in per)
        return t

    n_vol = sum(p["volume"] for p in per)
    return {
        "n_images": len(per) - n_vol,
        "n_volumes": n_vol,
        "empty_slices": sum(p["before"]["empty_slices"] for p in per if p["volume"]),
        "empty_images": sum(p["before"]["empty_slices"] for p in per if not p["volume"]),
        "unit": "voxels" if n_vol else "pixels",
        "before": total("before"),
        "after": total("after"),
        "per_image": [{"before": p["before"]["dice"], "after": p["after"]["dice"]} for p in per],
        "holdout_units": n_report,
        "holdout_independent": independent,
        "trained_on": True,
    }


def describe_whole(w: dict[str, Any] | None, unit_word: str = "image(s)/slice(s)") -> list[str]:
    """Plain sentences for the user from :func:`whole_report` (empty list: no report)."""
    if not w or w.get("before", {}).get("dice") is None:
        return []
    b, a, unit = w["before"], w["after"], w["unit"]
    what = []
    if w["n_images"]:
        what.append(f"{w['n_images']} image(s)")
    if w["n_volumes"]:
        what.append(f"{w['n_volumes']} volume(s)")
    lines = [
        f"on your {' and '.join(what)}, whole (most of it was trained on, so this is no "
        f"independent test): Dice {b['dice']:.3f} → {a['dice']:.3f}; "
        f"{b['true_positive']:,} → {a['true_positive']:,} {unit} found of "
        f"{b['true_positive'] + b['false_negative']:,}, false positives "
        f"{b['false_positive']:,} → {a['false_positive']:,} {unit}"
    ]
    n_empty = w["empty_slices"] + w["empty_images"]
    if n_empty:
        where = []
        if w["empty_slices"]:
            where.append(f"{w['empty_slices']} slice(s)")
        if w["empty_images"]:
            where.append(f"{w['empty_images']} image(s)")
        lines.append(
            f"on the {' and '.join(where)} you left empty the model marks "
            f"{b['false_positive_on_empty']:,} → {a['false_positive_on_empty']:,} {unit} "
            f"({b['empty_slices_marked']} → {a['empty_slices_marked']} of them marked at all)"
        )
    n = w.get("holdout_units", 0)
    if n:
        lines.append(
            f"the held-out Dice rests on {n} {unit_word}"
            + ("" if w.get("holdout_independent") else ", the same ones that chose the state kept")
        )
    return lines


def gate_range(
    model: Any,
    card: ModelCard,
    after: Pass,
    replay: Sequence[Unit],
    device: str,
    cancel: Any = None,
) -> tuple[dict[str, list[float]] | None, dict[str, Any] | None]:
    """The new model's ``gate_sparsity_range`` (as training records it) from its pass over
    the user's whole images and up to :data:`RANGE_REPLAY` replay samples; ``(None, None)``
    for a model without a sparse gate."""
    from ..inference import gate_sparsity_range, predict
    from ..nets import SPARSE_MODES

    if card.arch_kwargs.get("gate") not in SPARSE_MODES:
        return None, None
    preds = list(after.gate_preds)
    idx = np.unique(np.linspace(0, len(replay) - 1, min(RANGE_REPLAY, len(replay))).round())
    with _fine_tuning_words():
        for i in idx.astype(int) if replay else []:
            u = replay[i]
            sp = {"spacing": u.spacing} if u.spacing is not None else {}
            kw = {"device": device, "precision": "fp32", "return_gates": "stats"}
            preds.append(predict(u.image, model, card, cancel=cancel, **kw, **sp))
    rng = gate_sparsity_range(preds)
    if not rng:
        return None, None
    how = {
        "part": "fine-tuning: the user's whole images and replay samples",
        "n_images": len(preds),
        "n_user": len(after.gate_preds),
        "n_replay": len(preds) - len(after.gate_preds),
        "statistic": "per-image mean exact-zero fraction of z* per decoder stage; [min, max]",
        "by": "napari_prosma.inference.gate_sparsity_range (inference.predict, fp32)",
    }
    return rng, how
