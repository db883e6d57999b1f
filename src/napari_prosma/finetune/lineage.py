"""The fine-tuned model's card: its parent, the data it learnt from, settings and metrics.

Built by the loop (:func:`napari_prosma.finetune.finetune` returns it with the model);
:func:`napari_prosma.finetune.run_finetune` hands in the hashes that the model store
computed when it saved the corrections, so they are hashed once.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..checkpoint import ModelCard
from .config import FinetuneConfig


def data_entries(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    spacing: Sequence[Sequence[float] | None] | None,
    hashes: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One ``{"image_sha256", "labels_sha256"[, "spacing"]}`` entry per corrected image.

    Args:
        images, labels: the user's images and labels as given.
        spacing: per image, its spacing in mm, or None.
        hashes: entries with the two hashes already computed (by
            :meth:`~napari_prosma.versions.ModelStore.save_corrections`), else computed
            here with :func:`~napari_prosma.versions.correction_hashes`.
    """
    from ..versions import correction_hashes

    if hashes is None:
        hashes = correction_hashes(images, labels)
    spacing = list(spacing) if spacing is not None else [None] * len(images)
    out = []
    for k, h in enumerate(hashes):
        entry: dict[str, Any] = {
            "image_sha256": h["image_sha256"],
            "labels_sha256": h["labels_sha256"],
        }
        sp = spacing[k] if k < len(spacing) else None
        if sp is not None:
            entry["spacing"] = [float(s) for s in sp]
        out.append(entry)
    return out


def child_card(
    card: ModelCard,
    cfg: FinetuneConfig,
    data: list[dict[str, Any]],
    holdout: dict[str, Any],
    run: dict[str, Any],
) -> ModelCard:
    """The new model's card: the parent's, with lineage, data hashes, settings, metrics
    (``weights_sha256`` and ``card_sha256`` are filled in when it is saved)."""
    return dataclasses.replace(
        card,
        parent_hash=card.weights_sha256,
        weights_sha256=None,
        card_sha256=None,
        created=None,
        metrics={**card.metrics, "finetune_holdout": holdout},
        training={
            "finetuned_from": card.name,
            "parent_training": card.training,
            "config": dataclasses.asdict(cfg),
            "data": data,
            **run,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
