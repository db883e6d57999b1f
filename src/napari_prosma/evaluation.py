"""Evaluate a model on labelled images the way inference sees them.

Each test image goes through :func:`napari_prosma.inference.predict` (float32), the
one inference path the plugin and ``prosma predict`` use: channel layout and normalisation
from the model card, the resize to the card's ``input_size`` when the model was trained on
resized images (Kvasir-SEG), a whole-image pass or Gaussian-blended tiles, ``sigmoid > 0.5``
(one output channel) or ``argmax`` (several), and labels back at the image's own size.
Metrics come from :mod:`napari_prosma.metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .checkpoint import ModelCard
from .datasets import Dataset
from .metrics import case_metrics, report, summarize

#: What :func:`evaluate` records as its ``engine``.
ENGINE = "napari_prosma.inference.predict"


def evaluate(
    model: Any,
    card: ModelCard,
    data: Dataset,
    device: str = "cpu",
    with_hd95: bool = True,
    progress: Callable[[int, int], None] | None = None,
    tta: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on every case of ``data`` through :func:`napari_prosma.inference.predict`
    (``tta``: averaged over all axis flips, as the engine's ``tta``).

    Returns:
        ``{"summary": metrics.summarize(...) (every case), "report": metrics.report(...)
        (target cases apart from cases with nothing to find, failure rates, U-KAN's pooled
        convention), "cases": [{"id", "dice", "iou", "hd95"}...], "seconds", "engine"}``;
        for binary models the single foreground class is ``1``.
    """
    from .inference import predict

    classes = list(range(1, max(card.out_channels, 2)))
    names = (card.class_names or [])[1:] or [str(c) for c in classes]
    model.eval()
    cases, rows = [], []
    t0 = time.perf_counter()
    n = len(data)
    for i in range(n):
        gt, spacing = data.labels[i], data.spacing_of(i)
        out = predict(
            data.image(i), model, card, spacing=spacing, device=device, precision="fp32", tta=tta
        )
        pred = np.asarray(out.labels)
        m = case_metrics(pred, gt, classes, spacing, with_hd95)
        m["size"] = int(np.asarray(gt).size)
        cases.append(m)
        row: dict[str, Any] = {"id": data.ids[i]}
        for name, (_lab, v) in zip(names, m["per_class"].items()):
            row[name] = {k: v[k] for k in ("dice", "iou", "hd95") if k in v}
        rows.append(row)
        if progress:
            progress(i + 1, n)
    return {
        "summary": summarize(cases, names),
        "report": report(cases, names),
        "cases": rows,
        "seconds": time.perf_counter() - t0,
        "engine": ENGINE + (" (flip TTA)" if tta else ""),
        "protocol": (
            "per-case metrics at the training resolution (Kvasir-SEG: images and masks "
            "resized to 256x256 as in U-KAN); sigmoid > 0.5 / argmax; per-case mean ± std "
            "headline, pooled (dataset-level) beside it"
        ),
    }
