"""The Qt-free model list and cache, version rows and fine-tune messages of the widgets.

What to segment, running it and placing results back live in
:mod:`napari_prosma.inference.plan`; the gates and their sparsity range in
:mod:`napari_prosma.inference.gates`. What is left here moves on: the model list and cache
to ``napari_prosma.models``, the version rows and the fine-tune outcome to the model store
and ``napari_prosma.finetune``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover

    pass


from ..models import (  # noqa: F401  (moved to models.py; re-exported)
    _MODEL_CACHE,
    ModelChoice,
    get_model,
    model_choices,
    read_model_card,
)

# ---------------------------------------------------------------------------- fine-tuning


@dataclass
class VersionRow:
    """One fine-tuned version as the versions list shows it."""

    id: str
    parent: str | None
    dice_before: float | None
    dice_after: float | None
    date: str
    active: bool
    improved: bool | None

    def dice_text(self) -> str:
        if self.dice_before is None or self.dice_after is None:
            return "–"
        return f"{self.dice_before:.3f} → {self.dice_after:.3f}"

    def parent_text(self) -> str:
        p = self.parent or "?"
        return os.path.basename(p) if os.sep in p or "/" in p else p


def version_rows(store: Any) -> list[VersionRow]:
    """The store's versions, newest first, with their held-out Dice and date."""
    active = store.active()
    rows = []
    for v in store.versions():
        run = v.run or {}
        date = (v.created or run.get("date") or "")[:16].replace("T", " ")
        rows.append(
            VersionRow(
                id=v.id,
                parent=v.parent,
                dice_before=run.get("dice_before"),
                dice_after=run.get("dice_after"),
                date=date,
                active=active == v.id,
                improved=run.get("improved"),
            )
        )
    return rows[::-1]


def finetune_outcome(
    dice_before: float | None,
    dice_after: float | None,
    version: str,
    activated: bool,
    independent: bool = True,
) -> tuple[str, str]:
    """``(level, text)`` that tells the user what a finished fine-tuning run did; level is
    ``"info"`` or ``"warning"``. ``independent``: the held-out Dice was measured on
    corrections that did not also choose the state kept (else it is called optimistic)."""
    if dice_before is None or dice_after is None:
        measured = (
            "there was no held-out part of your corrections to measure it on (correct more "
            "images or slices for that)"
        )
    else:
        measured = f"held-out Dice {dice_before:.3f} → {dice_after:.3f}"
        if not independent:
            measured += (
                " (optimistic: the same held-out images chose the state kept; with 14 or "
                "more corrected images or slices, half the held-out ones check it "
                "independently)"
            )
    if activated:
        return "info", f"the new model {version} is active: {measured}"
    if dice_before is not None and dice_after is not None and dice_after < dice_before:
        return "warning", (
            f"the new model {version} did worse on the held-out part of your corrections "
            f"({measured}), so the previous model stays active; it is kept in the list of "
            "versions and can be activated anyway"
        )
    return "info", f"the new model {version} was saved but not activated: {measured}"
