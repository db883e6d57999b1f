"""What the widgets tell a clinician, in plain words (Qt-free, numpy only).

- which model fits a layer (:func:`image_kind`, :func:`model_fit`);
- class names and colours of labels layers (:func:`class_colours`, :func:`legend_rows`);
- sizes per class in mm² / mL from the voxel spacing (:func:`measure_classes`);
- whether a scan looks like CT in Hounsfield units and which window to show it in
  (:func:`looks_like_ct`, :func:`ct_window`);
- a readable model card (:func:`card_summary`, :func:`card_modality`);
- (before a run, how far the model is from the image and how long the run may take:
  :mod:`napari_prosma.preflight`);
- where a result came from (:func:`provenance`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------- model fit

KINDS = ("rgb", "grey", "volume")


def image_kind(ndim: int, rgb: bool) -> str:
    """``"rgb"``, ``"grey"`` or ``"volume"`` for a layer of ``ndim`` spatial dimensions."""
    if ndim >= 3 and not rgb:
        return "volume"
    return "rgb" if rgb else "grey"


def model_fit(card: Any, kind: str) -> str:
    """Why a model does not fit an image of ``kind`` ("" when it fits).

    A 2D model on a volume fits (it runs slice by slice); a 3D model on a 2D image, or a
    model for other colour channels, does not.
    """
    dims, ch = card.spatial_dims, card.in_channels
    if kind == "volume":
        return "" if ch == 1 else f"needs {ch}-channel images, this is a grey volume"
    if dims == 3:
        return "segments 3D volumes, this is a 2D image"
    want = 3 if kind == "rgb" else 1
    if ch != want:
        return f"needs {'colour' if ch == 3 else 'greyscale'} images, this is {kind_words(kind)}"
    return ""


def kind_words(kind: str) -> str:
    return {"rgb": "a colour image", "grey": "a greyscale image", "volume": "a volume"}[kind]


# ---------------------------------------------------------------------------- colours

#: Colours of predicted classes 1, 2, ... (warm) and of ground truth / corrections (cool).
PREDICTION_COLOURS = ((1.0, 0.55, 0.0), (1.0, 0.2, 0.6), (1.0, 0.9, 0.1), (0.85, 0.3, 0.1))
TRUTH_COLOURS = ((0.0, 0.85, 0.4), (0.2, 0.6, 1.0), (0.6, 0.4, 1.0), (0.0, 0.9, 0.9))


def class_colours(n_classes: int, role: str = "prediction") -> dict[int, tuple[float, ...]]:
    """RGBA per label 0..n-1 (0 transparent): warm colours for a prediction, cool ones for
    ground truth or corrections (``role`` ``"truth"``), so the two never share a colour."""
    palette = TRUTH_COLOURS if role == "truth" else PREDICTION_COLOURS
    out: dict[int, tuple[float, ...]] = {0: (0.0, 0.0, 0.0, 0.0)}
    for k in range(1, max(int(n_classes), 2)):
        out[k] = (*palette[(k - 1) % len(palette)], 1.0)
    return out


def class_names_for(names: Sequence[str], n: int) -> list[str]:
    """``n`` class names, background first (``"class k"`` where the card names none)."""
    return [names[k] if k < len(names) and names[k] else f"class {k}" for k in range(n)]


def label_features(names: Sequence[str]) -> dict[str, list[Any]]:
    """A labels layer's ``features`` so hovering shows the class name, not a number."""
    return {"index": list(range(len(names))), "class": list(names)}


def hex_colour(rgba: Sequence[float]) -> str:
    return "#" + "".join(f"{round(float(v) * 255):02x}" for v in rgba[:3])


# ---------------------------------------------------------------------------- sizes


@dataclass
class ClassMeasure:
    """One class of a labels array: its pixel/voxel count and physical size.

    ``size`` is in ``unit`` (``"mm²"`` for 2D, ``"mL"`` for 3D) or None when the spacing is
    unknown (then only ``count`` is known).
    """

    label: int
    name: str
    count: int
    size: float | None
    unit: str


def measure_classes(
    labels: np.ndarray, names: Sequence[str], spacing: Sequence[float] | None
) -> list[ClassMeasure]:
    """Size of every foreground class of ``labels`` (``(*S)`` integers, 2D or 3D).

    Args:
        names: class names, background first.
        spacing: pixel/voxel size per axis in mm, or None when unknown.
    """
    a = np.asarray(labels)
    nd = a.ndim
    known = spacing is not None and len(spacing) == nd and all(float(s) > 0 for s in spacing)
    cell = math.prod(float(s) for s in spacing) if known else None
    counts = np.bincount(a.ravel().astype(np.int64, copy=False)) if a.size else np.zeros(1)
    n = max(len(names), len(counts))
    out = []
    for k, name in enumerate(class_names_for(names, n)):
        if k == 0:
            continue
        c = int(counts[k]) if k < len(counts) else 0
        size = None if cell is None else c * cell / (1000.0 if nd == 3 else 1.0)
        out.append(ClassMeasure(k, name, c, size, "mL" if nd == 3 else "mm²"))
    return out


def measure_text(m: ClassMeasure) -> str:
    """``"lesion: 132.4 mm² (5,296 pixels)"``, or the count alone without spacing."""
    what = ("voxel" if m.unit == "mL" else "pixel") + ("" if m.count == 1 else "s")
    if m.size is None:
        return f"{m.name}: {m.count:,} {what}"
    digits = 2 if m.unit == "mL" else 1
    return f"{m.name}: {m.size:,.{digits}f} {m.unit} ({m.count:,} {what})"


def measures_summary(measures: Sequence[ClassMeasure]) -> str:
    """All classes on one line, and a note when the spacing is unknown."""
    text = "; ".join(measure_text(m) for m in measures) or "no classes"
    if measures and measures[0].size is None:
        text += " (pixel spacing unknown, so no mm² / mL)"
    return text


# ---------------------------------------------------------------------------- CT window

#: Soft-tissue window (level 40 HU, width 400 HU).
CT_SOFT_TISSUE = (-160.0, 240.0)


def looks_like_ct(data: Any, sample: int = 200_000) -> bool:
    """True when grey values look like Hounsfield units: air near −1000 (the lowest values
    in [−1100, −900]), bone or contrast above +300, and mostly whole numbers."""
    a = np.asarray(data)
    if a.size == 0 or a.dtype.kind not in "iuf":
        return False
    flat = a.ravel()
    if flat.size > sample:
        flat = flat[:: flat.size // sample]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return False
    lo, hi = (float(v) for v in np.percentile(flat, [0.5, 99.9]))
    whole = flat.dtype.kind in "iu" or float(np.mean(flat == np.round(flat))) > 0.99
    return -1100.0 <= lo <= -900.0 and hi >= 300.0 and whole


def ct_window(card: Any = None) -> tuple[float, float]:
    """The display window of a CT: the model card's CT normalisation window, else the
    soft-tissue preset :data:`CT_SOFT_TISSUE`."""
    norm = getattr(card, "normalization", None) or {}
    win = norm.get("window") if isinstance(norm, Mapping) else None
    if norm.get("mode") == "ct_window" and isinstance(win, Sequence) and len(win) == 2:
        lo, hi = float(win[0]), float(win[1])
        if hi > lo:
            return lo, hi
    return CT_SOFT_TISSUE


# ---------------------------------------------------------------------------- the card

_MODALITY_WORDS = (
    ("ultrasound", "ultrasound"),
    ("mri", "MRI"),
    ("t1", "MRI"),
    ("ct ", "CT"),
    ("computed tomography", "CT"),
    ("colonoscopy", "colonoscopy (colour video)"),
    ("endoscop", "endoscopy (colour video)"),
    ("histolog", "histology (colour)"),
)


def card_modality(card: Any) -> str:
    """The imaging modality a model was trained on (``"CT"``, ``"MRI"``, ...; "" unknown):
    the card's own ``modality`` when it has one, else from its normalisation and texts."""
    for src in (card.extra, card.training):
        if isinstance(src, Mapping) and isinstance(src.get("modality"), str):
            return src["modality"]
    if (card.normalization or {}).get("mode") == "ct_window":
        return "CT"
    text = " ".join(
        str(s) for s in (card.intended_use, (card.training or {}).get("data", ""), card.name)
    ).lower()
    text = text.replace(",", " ").replace("(", " ") + " "
    for word, modality in _MODALITY_WORDS:
        if word in text:
            return modality
    return ""


def _split_sizes(card: Any) -> str:
    """``"; split: 700 train / 100 validation / 200 test"`` from the card's split, or ``""``:
    the data line names the whole set, of which the model trained on one part only."""
    split = (card.training or {}).get("split")
    if not isinstance(split, dict):
        return ""
    parts = [
        f"{split[k]} {name}"
        for k, name in (("n_train", "train"), ("n_val", "validation"), ("n_test", "test"))
        if isinstance(split.get(k), int)
    ]
    return f"; split: {' / '.join(parts)}" if parts else ""


def _test_dice(card: Any, key: str = "test") -> list[str]:
    """Per class ``"lesion 0.81 ± 0.23 (n=129)"`` and a failure rate when the card has it
    (``key``: ``"parent_test"`` for a fine-tuned version's parent)."""
    test = (card.metrics or {}).get(key)
    if not isinstance(test, Mapping):
        return []
    out = []
    for name, pc in (test.get("per_class") or {}).items():
        d = pc.get("dice") if isinstance(pc, Mapping) else None
        if isinstance(d, Mapping) and isinstance(d.get("mean"), int | float):
            spread = f" ± {d['std']:.2f}" if isinstance(d.get("std"), int | float) else ""
            n = f" (n={d['n']})" if d.get("n") else ""
            out.append(f"{name} {d['mean']:.2f}{spread}{n}")
    if not out and isinstance(test.get("dice_mean"), int | float):
        out.append(f"{test['dice_mean']:.2f}")
    for key in ("failure_rate", "fail_rate"):
        rate = test.get(key)
        if isinstance(rate, int | float):
            below = test.get("failure_below", test.get("failure_threshold"))
            cut = f" (Dice < {below:g})" if isinstance(below, int | float) else ""
            out.append(f"failures{cut}: {rate:.0%} of test cases")
    return out


def card_summary(card: Any) -> str:
    """A few plain lines: task, modality, input, classes, training data, test Dice with its
    spread (and failure rate when the card records one), limits."""
    dims = f"{card.spatial_dims}D"
    ch = "colour" if card.in_channels == 3 else ("grey" if card.in_channels == 1 else "")
    lines = [f"Task: {card.intended_use or card.name}"]
    modality = card_modality(card)
    lines.append(f"Modality: {modality or 'not stated'}; input {dims} {ch}".rstrip())
    if card.spacing:
        lines[-1] += f", {' × '.join(f'{s:g}' for s in card.spacing)} mm voxels"
    names = class_names_for(card.class_names, max(len(card.class_names), card.out_channels, 2))[1:]
    lines.append(f"Classes: {', '.join(names)}")
    data = (card.training or {}).get("data")
    if isinstance(data, str) and data:
        lines.append(f"Trained on: {data}{_split_sizes(card)}")
    elif isinstance(data, list) and data:  # a fine-tuned version: the corrections
        lines.append(f"Fine-tuned on: {len(data)} corrected image(s) or volume(s)")
    dice, parent = _test_dice(card), _test_dice(card, "parent_test")
    if dice:
        lines.append("Test Dice: " + "; ".join(dice))
    elif parent:  # a fine-tuned version: no test set of its own
        lines.append(
            "Test Dice: not measured for this version (its parent's, on the "
            "parent's test set: " + "; ".join(parent) + ")"
        )
    else:
        lines.append("Test Dice: not recorded")
    if not card.metrics and not card.training:
        lines.append("Note: no training record or metrics: results may be meaningless")
    if card.limitations:
        lines.append(f"Limits: {card.limitations}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- provenance


def provenance(card: Any, spec: str, version: str | None) -> dict[str, Any]:
    """Plain data naming what made a result: model name, spec, store version id, weights
    and card hashes, and the date (UTC, ISO)."""
    return {
        "model_name": card.name,
        "model": spec,
        "version": version,
        "weights_sha256": card.weights_sha256,
        "card_sha256": card.card_sha256,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def provenance_text(p: Mapping[str, Any]) -> str:
    """``"made by busi_prosma (weights 1a2b3c4d), 2026-12-01 21:40 UTC"``."""
    who = p.get("version") or p.get("model_name") or "?"
    sha = p.get("weights_sha256")
    date = str(p.get("date") or "")[:16].replace("T", " ")
    return (
        f"made by {who}"
        + (f" (weights {sha[:8]})" if sha else "")
        + (f", {date} UTC" if date else "")
    )


# ---------------------------------------------------------------------------- gates

#: The paper's symbols in plain words (tooltips of the Gate inspector).
GATE_WORDS = {
    "z*": "z* (the sparse code): what the gate computes from the skip and the decoder; the "
    "proximal step sets most of its values to exactly zero, so only the parts where skip "
    "and decoder agree survive",
    "ψ": "ψ (spatial gate, 0–1): where in the image the skip connection passes detail to "
    "the decoder; 1 = passes everything there, 0 = blocks it",
    "c": "c (channel gate, 0–1): how much of each feature channel of the skip is passed",
    "λ": "λ (threshold): per latent channel, how large a value must be to survive; larger "
    "λ = more exact zeros",
    "latent channel": "latent channel: one of the feature channels of z*, the gate's "
    "internal code (each has its own threshold λ)",
}


def gate_passes(
    g: Any, axis: int | None = None, index: int | None = None
) -> tuple[float | None, float | None]:
    """``(mean ψ, mean c)`` of one decoder stage, over the whole result or on slice
    ``index`` along ``axis`` of a volume (where ψ and c are known per slice)."""
    psi = None
    if g.psi is not None and np.size(g.psi):
        p = np.asarray(g.psi)
        if axis is not None and index is not None and p.ndim == 3:
            p = np.take(p, int(np.clip(index, 0, p.shape[axis] - 1)), axis=axis)
        psi = float(p.mean())
    c = getattr(g, "c", None)
    per_slice = getattr(g, "c_slices", None)
    if index is not None and per_slice is not None and 0 <= index < len(per_slice):
        c = per_slice[index]
    return psi, (None if c is None else float(np.mean(c)))


def gate_line(g: Any, axis: int | None = None, index: int | None = None) -> str:
    """One plain line per stage: how much of its detail the skip passes (mean ψ·c) and
    how much of the sparse code z* is exactly zero (never a 0 %/100 % threshold count)."""
    res = "full res." if g.scale == 1 else f"1/{g.scale} res."
    psi, c = gate_passes(g, axis, index)
    parts = []
    if psi is not None or c is not None:
        passed = (1.0 if psi is None else psi) * (1.0 if c is None else c)
        how = " × ".join(
            s
            for s in (
                None if psi is None else f"where ψ {psi:.2f}",
                None if c is None else f"channels c {c:.2f}",
            )
            if s
        )
        parts.append(f"the skip passes {passed:.0%} of its detail ({how})")
    if g.zero_frac_mean is not None:
        parts.append(f"{g.zero_frac_mean:.0%} of the sparse code z* is exactly zero")
        if g.zero_frac_mean >= 0.999:
            parts[-1] += " (so ψ here does not depend on the image: it is the gate's bias)"
    where = "" if index is None else f" on slice {index}"
    return f"Stage {g.stage} ({res}){where}: " + ("; ".join(parts) or "no gate")


# ---------------------------------------------------------------------------- versions


def version_label(vid: str) -> str:
    """A store version id in words: ``busi_prosma-ft-20261201-214019`` →
    ``"busi_prosma, tuned 2026-12-01 21:40"`` (other ids as they are)."""
    import re

    m = re.fullmatch(r"(.+?)-ft-(\d{4})(\d{2})(\d{2})-(\d{2})(\d{2})\d{2}(.*)", vid)
    if m is None:
        return vid
    base, y, mo, d, h, mi, rest = m.groups()
    return f"{base}, tuned {y}-{mo}-{d} {h}:{mi}{rest.replace('-', ' ')}"
