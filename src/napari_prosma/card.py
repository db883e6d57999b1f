"""Model cards: what a checkpoint is (architecture, classes, normalisation, lineage,
metrics), their validation, and their hash (Qt-free, no torch).

Two hashes tie a checkpoint together, and both are required:

- ``weights_sha256`` (in the card): the sha256 of the weights file;
- ``card_sha256`` (in the card): the sha256 of the card's canonical JSON without this
  field (:func:`card_digest`: keys sorted, no spaces, ASCII). It covers every other field,
  ``weights_sha256`` included, so one check covers the card and, through it, the weights.

:func:`~napari_prosma.checkpoint.read_card` and
:func:`~napari_prosma.checkpoint.load` refuse a card whose ``card_sha256`` is missing or does
not match (normalisation or class names edited by hand would otherwise change every
answer silently) and a ``.safetensors`` checkpoint whose card lacks ``weights_sha256``.
A card edited on purpose is sealed again with
:func:`~napari_prosma.checkpoint.seal_card`. Fine-tuned versions in
the model store also record both hashes in their ``run.json`` (see
:mod:`napari_prosma.versions`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CheckpointError  # lives in errors.py; re-exported here

CARD_FORMAT = 1

#: Card fields without which a checkpoint cannot be rebuilt.
REQUIRED_FIELDS = ("format_version", "architecture", "arch_kwargs")


@dataclass
class ModelCard:
    """Everything needed to rebuild, run and judge a model (saved as ``NAME.json``).

    Attributes:
        architecture: ``"prosma_unet"``, ``"unet"`` or ``"attention_unet"``.
        arch_kwargs: keyword arguments of :func:`napari_prosma.nets.build_model`
            (``spatial_dims``, ``in_channels``, ``out_channels``, ``widths``, ``gate``, ...).
        name: short name of the model.
        class_names: one name per output class, background first.
        normalization: intensity normalisation (see :mod:`napari_prosma.preprocess`), e.g.
            ``{"mode": "zscore"}``, ``{"mode": "ct_window", "window": [-160, 240]}`` or
            ``{"mode": "fixed", "scale": 255, "mean": [...], "std": [...]}``.
        patch_size: training patch (spatial) size; inference tiles default to it.
        spacing: training voxel spacing (z, y, x) in mm, or None (2D / not resampled).
        training: data, split, seed, epochs, command, ...
        metrics: evaluation results, e.g. ``{"test": {"dice": 0.9}}``.
        gate_sparsity_range: per-stage range of the exact-zero fraction of z* seen on the
            training data (used to warn on unfamiliar scans).
        intended_use: plain-words statement of what the model is for.
        limitations: what it is not for.
        parent_hash: sha256 of the parent checkpoint's weights (fine-tuning lineage).
        weights_sha256: sha256 of the weights file, filled in by :func:`save`.
        card_sha256: sha256 of this card's canonical JSON without this field
            (:func:`card_digest`), filled in by :func:`save` and :func:`seal_card`.
    """

    architecture: str
    arch_kwargs: dict[str, Any]
    name: str = "model"
    class_names: list[str] = field(default_factory=list)
    normalization: dict[str, Any] = field(default_factory=lambda: {"mode": "zscore"})
    patch_size: list[int] | None = None
    spacing: list[float] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    gate_sparsity_range: dict[str, Any] | None = None
    intended_use: str = ""
    limitations: str = ""
    parent_hash: str | None = None
    weights_sha256: str | None = None
    weights_dtype: str = "float32"
    package_version: str = __version__
    torch_version: str | None = None
    created: str | None = None
    format_version: int = CARD_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    card_sha256: str | None = None

    @property
    def spatial_dims(self) -> int:
        return int(self.arch_kwargs.get("spatial_dims", 2))

    @property
    def in_channels(self) -> int:
        return int(self.arch_kwargs.get("in_channels", 1))

    @property
    def out_channels(self) -> int:
        return int(self.arch_kwargs.get("out_channels", 2))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model card") -> ModelCard:
        """Build a card from parsed JSON, naming any missing or malformed field."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source} is not a JSON object")
        missing = [f for f in REQUIRED_FIELDS if f not in data]
        if missing:
            raise CheckpointError(f"{source} lacks required field(s): {', '.join(missing)}")
        version = data["format_version"]
        if isinstance(version, bool) or not isinstance(version, int | float | str):
            raise CheckpointError(f"{source}: 'format_version' must be a number, not {version!r}")
        try:
            version = int(version)
        except ValueError:
            raise CheckpointError(
                f"{source}: 'format_version' must be a number, not {version!r}"
            ) from None
        if version > CARD_FORMAT:
            raise CheckpointError(
                f"{source} has format version {data['format_version']}; this napari-prosma "
                f"({__version__}) reads up to {CARD_FORMAT}: please update the plugin"
            )
        if not isinstance(data["arch_kwargs"], Mapping):
            raise CheckpointError(f"{source}: 'arch_kwargs' must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known}
        _check_fields(kwargs, source)
        card = cls(**kwargs)
        card.extra = {**card.extra, **unknown}
        return card

    def summary(self) -> str:
        """A few human-readable lines: what the model is, what it was trained on, how good."""
        ak = self.arch_kwargs
        lines = [
            f"Model      {self.name} ({self.architecture}, {self.spatial_dims}D, "
            f"gate={ak.get('gate', '?')}, widths={ak.get('widths', '?')})",
            f"Input      {self.in_channels} channel(s), normalisation {self.normalization}",
            f"Classes    {', '.join(self.class_names) or self.out_channels}",
        ]
        if self.spacing:
            lines.append(f"Spacing    {self.spacing} mm")
        if self.patch_size:
            lines.append(f"Patch      {self.patch_size}")
        if self.training:
            data = self.training.get("data", "?")
            lines.append(f"Trained on {data}")
        if self.metrics:
            lines.append(f"Metrics    {json.dumps(self.metrics)}")
        if self.intended_use:
            lines.append(f"Use        {self.intended_use}")
        if self.limitations:
            lines.append(f"Limits     {self.limitations}")
        if self.parent_hash:
            lines.append(f"Parent     {self.parent_hash[:16]}")
        if self.weights_sha256:
            lines.append(f"Weights    sha256 {self.weights_sha256[:16]}")
        return "\n".join(lines)


def _check_fields(data: dict[str, Any], source: str) -> None:
    """Refuse card fields of the wrong type with a message that names the field (a card
    edited by hand or damaged would otherwise fail later, deep inside inference)."""
    import numpy as np

    from .preprocess import InputError, normalize

    def bad(name: str, what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {name!r} must be {what}, not {data[name]!r}")

    def numbers(v: Any, positive: bool = False) -> bool:
        return isinstance(v, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) and (x > 0 or not positive)
            for x in v
        )

    for name in ("name", "intended_use", "limitations"):
        if name in data and not isinstance(data[name], str):
            raise bad(name, "text")
    for name in ("parent_hash", "weights_sha256", "card_sha256", "created"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise bad(name, "text or null")
    for name in ("training", "metrics", "extra"):
        if name in data and not isinstance(data[name], Mapping):
            raise bad(name, "an object")
    names = data.get("class_names", [])
    if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise bad("class_names", "a list of names")
    if data.get("patch_size") is not None and not (
        numbers(data["patch_size"], positive=True)
        and all(isinstance(x, int) for x in data["patch_size"])
    ):
        raise bad("patch_size", "a list of positive whole numbers or null")
    if data.get("spacing") is not None and not numbers(data["spacing"], positive=True):
        raise bad("spacing", "a list of positive numbers (mm) or null")
    if "normalization" in data:
        norm = data["normalization"]
        if not isinstance(norm, Mapping):
            raise bad("normalization", 'an object such as {"mode": "zscore"}')
        try:  # the spec must work on an image of the card's channel count
            c = int(data["arch_kwargs"].get("in_channels", 1))
            normalize(np.zeros((max(c, 1), 2, 2), np.float32), norm)
        except (InputError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: 'normalization' cannot be used: {e}") from None


def card_digest(data: Mapping[str, Any]) -> str:
    """sha256 of a card's canonical JSON without its ``card_sha256`` field (keys sorted,
    ``","``/``":"`` separators, ASCII): the same for any formatting of the same card."""
    body = {k: v for k, v in data.items() if k != "card_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _card_text(data: dict[str, Any]) -> bytes:
    """A card's file content, sealed: ``card_sha256`` set to :func:`card_digest`."""
    sealed = {**{k: v for k, v in data.items() if k != "card_sha256"}}
    sealed["card_sha256"] = card_digest(sealed)
    return (json.dumps(sealed, indent=2) + "\n").encode()


def _check_card_hash(data: Mapping[str, Any], card_path: Path) -> None:
    """Refuse a card without ``card_sha256`` or whose content does not match it."""
    fix = (
        "restore the file (or the model) as it was written; if you edited it on purpose, "
        f"seal it again: napari_prosma.checkpoint.seal_card({str(card_path)!r})"
    )
    stored = data.get("card_sha256")
    if not stored:
        raise CheckpointError(
            f"model card {card_path.name} carries no card_sha256, so a change to it could not "
            f"be detected (a card written by hand, or before cards were hashed): {fix}"
        )
    digest = card_digest(data)
    if digest != stored:
        raise CheckpointError(
            f"model card {card_path.name} was changed after it was written (sha256 "
            f"{digest[:12]}… instead of {str(stored)[:12]}…): its normalisation, classes or "
            f"other fields may no longer be those the model was trained with; {fix}"
        )
