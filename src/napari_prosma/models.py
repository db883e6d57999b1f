"""Which model: bundled models, the user's fine-tuned versions and checkpoint files.

One resolver, :func:`resolve_model`, turns whatever names a model — a bundled model's name,
a path to ``NAME.safetensors`` / ``NAME.json`` / ``NAME.pt``, a version id of the model store
(:class:`~napari_prosma.versions.ModelStore`) or a version's folder — into the checkpoint
path that :func:`napari_prosma.checkpoint.load` opens. ``prosma predict``, ``info``,
``evaluate`` and ``finetune`` and the widgets all go through it, so a model that one of them
names is accepted by every other. :func:`version_id_of` goes the other way (a checkpoint
path inside the store to its version id).

Also here: the bundled model that suits an image (:func:`default_model_name`), the entries
of the widgets' model chooser (:func:`model_choices`) and the cached loader
(:func:`get_model`). Nothing here imports Qt; torch only when a model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .checkpoint import ModelCard
    from .versions import ModelStore

Spec = str | os.PathLike[str]

#: Preferred bundled models per image kind, best first.
PREFERRED = {
    "rgb": ("kvasir_prosma",),
    "grey": ("busi_prosma",),
    "volume": ("hippocampus_prosma", "hippocampus_prosma_3d"),
}

#: The checkpoint inside a store version's folder (``ROOT/<id>/model.safetensors + model.json``).
VERSION_WEIGHTS = "model.safetensors"
VERSION_CARD = "model.json"


# ---------------------------------------------------------------------------- resolver


def _store(store: ModelStore | str | os.PathLike[str] | None) -> ModelStore:
    from .versions import ModelStore

    return store if isinstance(store, ModelStore) else ModelStore(store)


def _version_folder(p: Path) -> Path | None:
    """``p/model.safetensors`` when ``p`` is a store version's folder (weights + card)."""
    if p.is_dir() and (p / VERSION_CARD).is_file():
        return p / VERSION_WEIGHTS
    return None


def _is_plain_name(text: str) -> bool:
    return bool(text) and Path(text).name == text and text not in (".", "..")


def resolve_model(spec: Spec, store: ModelStore | str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint path of a model, however it is named.

    Tried in this order: an existing path (a checkpoint file, its card, ``NAME`` beside
    ``NAME.safetensors``, a store version's folder, a folder with ``model.safetensors`` +
    ``config.json``); a bundled model's name; a version id in ``store``.

    Args:
        spec: bundled name, path, version id or version folder.
        store: the model store for version ids (default: ``$PROSMA_MODEL_DIR`` or the
            user's data folder), or its folder.

    Returns:
        A path that :func:`napari_prosma.checkpoint.load` and ``read_card`` accept.

    Raises:
        CheckpointError: nothing of that name (the message lists what was looked for).
    """
    from .checkpoint import CheckpointError, bundled_dir, checkpoint_paths, list_bundled

    text = os.fspath(spec)
    p = Path(text).expanduser()
    in_version = _version_folder(p)
    if in_version is not None:
        return in_version
    if p.is_dir() or p.exists():
        return p
    weights, card = checkpoint_paths(p)
    if weights.exists() or card.exists():
        return p
    bundled = list_bundled()
    if text in bundled:
        return bundled_dir() / f"{text}.safetensors"
    root = _store(store).root
    if _is_plain_name(text):
        in_store = _version_folder(root / text)
        if in_store is not None:
            return in_store
    raise CheckpointError(
        f"no checkpoint at {text} and no bundled model of that name "
        f"({', '.join(bundled) or 'none installed'}) or fine-tuned version in {root}"
    )


def version_id_of(
    spec: Spec, store: ModelStore | str | os.PathLike[str] | None = None
) -> str | None:
    """The store version id of a model spec (an id, a version folder or its checkpoint),
    or None when the model is not a version of ``store``."""
    root = _store(store).root
    try:
        path = resolve_model(spec, root)
        folder = path if path.is_dir() else path.parent
        if folder.parent.resolve() == root.resolve() and _version_folder(folder) is not None:
            return folder.name
    except (OSError, ValueError):
        pass
    return None


def read_model_card(spec: Spec) -> ModelCard:
    """The card of a model (any spec :func:`resolve_model` takes), without loading weights."""
    from .checkpoint import read_card

    return read_card(resolve_model(spec))


# ---------------------------------------------------------------------------- loading

_MODEL_CACHE: dict[tuple[str, float, str], tuple[Any, Any]] = {}


def get_model(spec: Spec, device: str = "auto") -> tuple[torch.nn.Module, ModelCard]:
    """Load (and cache, per file and device) a model; safe to call from a worker thread."""
    from .checkpoint import checkpoint_paths
    from .inference import load_model, resolve_device

    path = resolve_model(spec)
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


# ---------------------------------------------------------------------------- bundled


def default_model_name(kind: str) -> str | None:
    """The bundled model for a ``"grey"``, ``"rgb"`` or ``"volume"`` image, or None.

    A preferred name wins; otherwise the first bundled card whose dimensions and channel
    count fit the kind.
    """
    from .checkpoint import CheckpointError, bundled_dir, list_bundled, read_card

    names = list_bundled()
    for n in PREFERRED.get(kind, ()):
        if n in names:
            return n
    dims, channels = (3, 1) if kind == "volume" else (2, 3 if kind == "rgb" else 1)
    for n in names:
        try:
            card = read_card(bundled_dir() / n)
        except CheckpointError:
            continue
        if card.spatial_dims == dims and card.in_channels == channels:
            return n
    return None


# ---------------------------------------------------------------------------- chooser


@dataclass
class ModelChoice:
    """An entry of the model chooser: a bundled name, a store version or a file."""

    label: str
    spec: str
    kind: str  # "bundled", "version", "file"


def model_choices(extra_files: Iterable[str] = ()) -> tuple[list[ModelChoice], str | None]:
    """Bundled models, the user's fine-tuned versions and added files; and the spec of the
    active model (from :class:`~napari_prosma.versions.ModelStore`), if any."""
    from .checkpoint import list_bundled
    from .versions import ModelStore

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
            choices.append(ModelChoice(_file_label(f), f, "file"))
    if active_spec is not None:
        for c in choices:
            if c.spec == active_spec:
                c.label += "  ★ active"
    return choices, active_spec


def _file_label(f: str) -> str:
    """``"<card name>  (file <base>)"``, or ``"<base>  (file)"`` when the card is unreadable
    (the file is shown as unusable once selected)."""
    try:
        name = read_model_card(f).name
    except Exception:
        name = ""
    base = os.path.basename(f)
    return f"{name}  (file {base})" if name and name != base else f"{base}  (file)"
