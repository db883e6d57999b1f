"""The Qt-free model list and cache, version rows and fine-tune messages of the widgets.

What to segment, running it and placing results back live in
:mod:`napari_prosma.inference.plan`; the gates and their sparsity range in
:mod:`napari_prosma.inference.gates`. What is left here moves on: the model list and cache
to ``napari_prosma.models``, the version rows and the fine-tune outcome to the model store
and ``napari_prosma.finetune``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard


# ---------------------------------------------------------------------------- models


@dataclass
class ModelChoice:
    """An entry of the model chooser: a bundled name, a store version or a file."""

    label: str
    spec: str
    kind: str  # "bundled", "version", "file"


def model_choices(extra_files: Iterable[str] = ()) -> tuple[list[ModelChoice], str | None]:
    """Bundled models, the user's fine-tuned versions and added files; and the spec of the
    active model (from :class:`~napari_prosma.versions.ModelStore`), if any."""
    from ..checkpoint import list_bundled
    from ..versions import ModelStore

    choices = [ModelChoice(f"{n}  (bundled)", n, "bundled") for n in list_bundled()]
    active_spec = None
    try:
        store = ModelStore()
        versions = store.versions()
        active = store.active()
    except OSError:
        versions, active = [], None
    for v in versions:
        choices.append(ModelChoice(f"{v.id}  (fine-tuned)", str(v.checkpoint), "version"))
        if active == v.id:
            active_spec = str(v.checkpoint)
    if active_spec is None and active:
        if any(c.spec == active for c in choices):
            active_spec = active
    for f in extra_files:
        if not any(c.spec == f for c in choices):
            try:
                name = read_model_card(f).name
            except Exception:  # shown as unusable once selected
                name = ""
            base = os.path.basename(f)
            label = f"{name}  (file {base})" if name and name != base else f"{base}  (file)"
            choices.append(ModelChoice(label, f, "file"))
    if active_spec is not None:
        for c in choices:
            if c.spec == active_spec:
                c.label += "  ★ active"
    return choices, active_spec


_MODEL_CACHE: dict[tuple[str, float, str], tuple[Any, Any]] = {}


def get_model(spec: str, device: str = "auto") -> tuple[torch.nn.Module, ModelCard]:
    """Load (and cache, per file and device) a model; safe to call from a worker thread."""
    from ..checkpoint import checkpoint_paths, resolve
    from ..inference import load_model, resolve_device

    path = resolve(spec)
    weights, _ = checkpoint_paths(path)
    try:
        mtime = os.path.getmtime(weights)
    except OSError:
        mtime = 0.0
    key = (str(path), mtime, str(resolve_device(device)))
    if key not in _MODEL_CACHE:
        if len(_MODEL_CACHE) > 4:
            _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_model(path, device=device)
    return _MODEL_CACHE[key]


def read_model_card(spec: str) -> ModelCard:
    """The card of a model spec (bundled name or path), without loading weights."""
    from ..checkpoint import read_card, resolve

    return read_card(resolve(spec))


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
