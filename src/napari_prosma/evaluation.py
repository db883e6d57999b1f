"""Evaluate a model on labelled images the way inference sees them.

Each test image goes through the same steps a user's image does: channel layout and
normalisation from the model card (:func:`napari_prosma.preprocess.prepare`), a resize to
the card's ``input_size`` when the model was trained on resized images (Kvasir-SEG), a
whole-image forward pass when the image fits the training patch and a sliding window
(MONAI's ``sliding_window_inference``, Gaussian blending, overlap 0.5) when it does not,
then ``sigmoid > 0.5`` (one output channel) or ``argmax`` (several), and labels resized back
to the image's own size. Metrics come from :mod:`napari_prosma.metrics`.

``engine="auto"`` uses the project's inference engine (``napari_prosma.inference.predict``)
once it exists; ``"internal"`` always uses the path above.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .checkpoint import ModelCard
from .datasets import Dataset2D, Dataset3D, resize_image, resize_mask
from .metrics import case_metrics, report, summarize
from .preprocess import prepare


def _engine() -> Callable[..., Any] | None:
    try:
        from .inference import predict  # type: ignore[attr-defined]
    except Exception:
        return None
    return predict


def sliding_window(predictor: Callable[[Any], Any], x: Any, roi: Sequence[int], overlap=0.5):  # type: ignore[no-untyped-def]
    """Sliding-window logits of ``x`` ``(1, C, *S)``: MONAI's with Gaussian blending where
    MONAI is installed, else a plain average of overlapping windows."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return _sliding_window_plain(predictor, x, roi, overlap)
    return sliding_window_inference(
        x, tuple(roi), sw_batch_size=8, predictor=predictor, overlap=overlap, mode="gaussian"
    )


def _sliding_window_plain(predictor, x, roi, overlap):  # type: ignore[no-untyped-def]
    import itertools

    import torch
    import torch.nn.functional as F

    size = x.shape[2:]
    pad = []
    for s, r in zip(reversed(size), reversed(roi)):
        pad += [0, max(r - s, 0)]
    xp = F.pad(x, pad)
    full = xp.shape[2:]
    starts = []
    for s, r in zip(full, roi):
        step = max(int(r * (1 - overlap)), 1)
        st = list(range(0, max(s - r, 0) + 1, step))
        if st[-1] != max(s - r, 0):
            st.append(s - r)
        starts.append(st)
    out = None
    count = torch.zeros((1, 1, *full), device=x.device)
    for corner in itertools.product(*starts):
        sl = (..., *(slice(c, c + r) for c, r in zip(corner, roi)))
        y = predictor(xp[sl]).float()
        if out is None:
            out = torch.zeros((1, y.shape[1], *full), device=x.device)
        out[sl] += y
        count[sl] += 1
    assert out is not None
    out = out / count
    return out[(..., *(slice(0, s) for s in size))]


def predict_labels(
    model: Any,
    card: ModelCard,
    image: np.ndarray,
    device: str = "cpu",
    channel_axis: int | None = None,
    engine: str = "internal",
    spacing: Sequence[float] | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Integer labels of one image (2D ``(H, W[, C])`` or a volume) as inference makes them.

    ``engine="auto"`` runs :func:`napari_prosma.inference.predict` (float32; all axis flips
    averaged with ``tta``) when it is importable, the internal path otherwise (no TTA)."""
    import torch

    if engine == "auto":
        predict = _engine()
        if predict is not None:
            kw: dict[str, Any] = {"device": device, "precision": "fp32", "tta": tta}
            if spacing is not None:
                kw["spacing"] = spacing
            return np.asarray(predict(image, model, card, **kw).labels)
    dims = card.spatial_dims
    a = np.asarray(image)
    orig = a.shape if channel_axis is None else np.delete(a.shape, channel_axis)
    input_size = card.extra.get("input_size")
    resized = False
    if dims == 2 and input_size and tuple(orig[:2]) != tuple(input_size):
        if channel_axis not in (None, 2, -1):
            a = np.moveaxis(a, channel_axis, -1)
            channel_axis = None
        a = resize_image(a, input_size)
        resized = True
    x, _ = prepare(a, card.in_channels, dims, card.normalization, channel_axis)
    t = torch.from_numpy(np.ascontiguousarray(x))[None].to(device)
    roi = card.patch_size
    with torch.inference_mode():
        if roi is None or all(s <= r for s, r in zip(t.shape[2:], roi)):
            logits = model(t)
        else:
            logits = sliding_window(model, t, roi)
        logits = logits.float()[0]
        if logits.shape[0] == 1:
            labels = (logits[0] > 0).to(torch.uint8)  # sigmoid > 0.5
        else:
            labels = logits.argmax(0).to(torch.uint8)
    out = labels.cpu().numpy()
    if resized:
        out = resize_mask(out, tuple(orig[:2]))
    return out


def evaluate(
    model: Any,
    card: ModelCard,
    data: Dataset2D | Dataset3D,
    device: str = "cpu",
    with_hd95: bool = True,
    engine: str = "internal",
    progress: Callable[[int, int], None] | None = None,
    tta: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on every case of ``data`` (``tta``: through the engine, averaged
    over all axis flips).

    Returns:
        ``{"summary": metrics.summarize(...) (every case), "report": metrics.report(...)
        (target cases apart from cases with nothing to find, failure rates, U-KAN's pooled
        convention), "cases": [{"id", "dice", "iou", "hd95"}...], "seconds", "engine"}``;
        for binary models the single foreground class is ``1``.
    """
    classes = list(range(1, max(card.out_channels, 2)))
    names = (card.class_names or [])[1:] or [str(c) for c in classes]
    model.eval()
    cases, rows = [], []
    t0 = time.perf_counter()
    n = len(data)
    for i in range(n):
        if isinstance(data, Dataset2D):
            img = data.images[i]
            img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
            gt = data.masks[i]
            spacing = None
        else:
            img, gt = data.images[i], data.labels[i]
            spacing = data.spacing[i] if data.spacing else None
        pred = predict_labels(
            model, card, img, device=device, engine=engine, spacing=spacing, tta=tta
        )
        m = case_metrics(pred, gt, classes, spacing, with_hd95)
        m["size"] = int(np.asarray(gt).size)
        cases.append(m)
        row: dict[str, Any] = {"id": data.ids[i]}
        for name, (_lab, v) in zip(names, m["per_class"].items()):
            row[name] = {k: v[k] for k in ("dice", "iou", "hd95") if k in v}
        rows.append(row)
        if progress:
            progress(i + 1, n)
    used = "internal"
    if engine == "auto" and _engine() is not None:
        used = "napari_prosma.inference.predict" + (" (flip TTA)" if tta else "")
    return {
        "summary": summarize(cases, names),
        "report": report(cases, names),
        "cases": rows,
        "seconds": time.perf_counter() - t0,
        "engine": used,
        "protocol": (
            "per-case metrics at the training resolution (Kvasir-SEG: images and masks "
            "resized to 256x256 as in U-KAN); sigmoid > 0.5 / argmax; per-case mean ± std "
            "headline, pooled (dataset-level) beside it"
        ),
    }
