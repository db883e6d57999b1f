"""Safe checkpoints: ``NAME.safetensors`` weights + ``NAME.json`` model card.

Nothing here unpickles: weights are safetensors; a legacy ``.pt``/``.pth`` file is opened
only with ``torch.load(weights_only=True)`` and still needs its JSON card beside it. Every
write goes to a temporary file in the target folder and is then renamed into place, so a
crash never leaves a half-written checkpoint, and an existing checkpoint is never
overwritten unless asked.

Both hashes (``weights_sha256``, ``card_sha256``) are described in
:mod:`napari_prosma.card`; both are required.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .card import (  # noqa: F401  (re-exported: the card lives in card.py)
    CARD_FORMAT,
    REQUIRED_FIELDS,
    CheckpointError,
    ModelCard,
    _card_text,
    _check_card_hash,
    card_digest,
)
from .fs import (  # noqa: F401  (re-exported: the one atomic writer lives in fs.py)
    TEMP_NAME_MAX,
    atomic_write_bytes,
    write_temp,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


# ---------------------------------------------------------------------------- card hash


def seal_card(path: str | os.PathLike[str]) -> str:
    """Seal a card edited on purpose: (re)write its ``card_sha256``; returns it.

    The card must still be valid (:meth:`ModelCard.from_dict`). This is the one way to make
    a hand-edited card load again; do it only for an edit you meant.
    """
    _, card_path = checkpoint_paths(path)
    data = _parse_card(card_path)
    ModelCard.from_dict(data, source=f"model card {card_path.name}")
    text = _card_text(data)
    atomic_write_bytes(card_path, text)
    return json.loads(text)["card_sha256"]


# ---------------------------------------------------------------------------- paths


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Map any of ``NAME``, ``NAME.safetensors``, ``NAME.json``, ``NAME.pt`` or a folder
    holding ``model.safetensors`` + ``config.json`` to ``(weights, card)`` paths."""
    p = Path(path).expanduser()
    if p.is_dir():
        for w, c in (("model.safetensors", "config.json"), ("model.pt", "config.json")):
            if (p / w).exists():
                return p / w, p / c
        raise CheckpointError(f"folder {p} holds no model.safetensors")
    if p.suffix == ".json":
        for suf in WEIGHT_SUFFIXES:
            if p.with_suffix(suf).exists():
                return p.with_suffix(suf), p
        return p.with_suffix(".safetensors"), p
    if p.suffix in WEIGHT_SUFFIXES:
        return p, p.with_suffix(".json")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- save


def save(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    card: ModelCard,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Save ``model`` as ``NAME.safetensors`` + ``NAME.json``.

    Args:
        model: the network (its floating-point tensors are stored as ``dtype``).
        path: ``NAME``, ``NAME.safetensors`` or ``NAME.json``.
        card: the model card; ``weights_sha256``, ``weights_dtype``, ``torch_version``,
            ``package_version`` and ``created`` are filled in here.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for floating-point tensors.
        overwrite: replace an existing checkpoint (never the default).

    Returns:
        Path of the weights file.
    """
    import torch
    from safetensors.torch import save as st_save

    weights, card_path = checkpoint_paths(path)
    weights = weights.with_suffix(".safetensors")
    if not overwrite and (weights.exists() or card_path.exists()):
        raise FileExistsError(
            f"{weights.name} already exists in {weights.parent}; choose another name "
            "(checkpoints are never overwritten)"
        )
    target = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in target:
        raise ValueError(f"dtype must be one of {list(target)}")
    tensors = {
        k: (v.detach().to(target[dtype]) if v.is_floating_point() else v.detach())
        .contiguous()
        .cpu()
        for k, v in model.state_dict().items()
    }
    blob = st_save(tensors, metadata={"format": "pt", "napari_prosma": __version__})
    card = dataclasses.replace(
        card,
        weights_sha256=hashlib.sha256(blob).hexdigest(),
        weights_dtype=dtype,
        torch_version=torch.__version__,
        package_version=__version__,
        created=card.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    # both files are complete on disk before either is renamed into place: a crash while
    # writing leaves the earlier checkpoint as it was (only the two renames could be cut
    # apart, which load() detects by the card's weights_sha256)
    text = _card_text(card.to_dict())
    temps: list[tuple[Path, Path]] = []
    try:
        temps.append((write_temp(weights, lambda t: t.write_bytes(blob)), weights))
        temps.append((write_temp(card_path, lambda t: t.write_bytes(text)), card_path))
        for tmp, target in temps:
            os.replace(tmp, target)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    return weights


# ---------------------------------------------------------------------------- load


def read_card(path: str | os.PathLike[str], verify_hash: bool = True) -> ModelCard:
    """Read and validate the model card of a checkpoint (no weights loaded).

    Args:
        path: any form :func:`checkpoint_paths` takes.
        verify_hash: refuse a card whose ``card_sha256`` is missing or does not match.

    Raises:
        CheckpointError: a missing, unreadable, malformed or changed card.
    """
    _, card_path = checkpoint_paths(path)
    return _read_card_file(card_path, verify_hash)


def _parse_card(card_path: Path) -> Any:
    if not card_path.exists():
        raise CheckpointError(
            f"model card {card_path.name} is missing next to the weights: without it the "
            "architecture is unknown"
        )
    try:
        return json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"model card {card_path.name} is not valid JSON ({e})") from None


def _read_card_file(card_path: Path, verify_hash: bool = True) -> ModelCard:
    data = _parse_card(card_path)
    card = ModelCard.from_dict(data, source=f"model card {card_path.name}")
    if verify_hash:  # after the fields: a broken field is named as such
        _check_card_hash(data, card_path)
    return card


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    import torch

    if not weights.exists():
        raise CheckpointError(f"weights file {weights} does not exist")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load as st_load

        try:
            return st_load(weights.read_bytes())
        except Exception as e:
            raise CheckpointError(
                f"weights file {weights.name} is corrupt or truncated ({type(e).__name__}: {e})"
            ) from None
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{weights.name} could not be read safely: it is corrupt, or it holds Python "
            f"objects other than tensors, which are never executed ({type(e).__name__})"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{weights.name} does not hold a state dict of tensors")
    return dict(obj)


def _check_weights_hash(weights: Path, card: ModelCard) -> None:
    """Refuse weights whose card names no hash, or another one."""
    if not card.weights_sha256:
        raise CheckpointError(
            f"the model card of {weights.name} carries no weights_sha256, so the weights "
            "cannot be checked (they may have been replaced); this checkpoint is refused"
        )
    digest = file_sha256(weights)
    if digest != card.weights_sha256:
        raise CheckpointError(
            f"weights file {weights.name} does not match its model card (sha256 "
            f"{digest[:12]}… instead of {card.weights_sha256[:12]}…): it was changed or "
            "only partly written"
        )


def load(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", verify_hash: bool = True
) -> tuple[torch.nn.Module, ModelCard]:
    """Load a checkpoint safely and rebuild its network (in eval mode, float32).

    Args:
        path: ``NAME``, ``NAME.safetensors``, ``NAME.json``, ``NAME.pt``/``.pth`` or a folder
            with ``model.safetensors`` + ``config.json``; a bundled model's name is resolved
            by :func:`resolve`.
        device: where to put the model.
        verify_hash: check the card against its ``card_sha256`` and ``.safetensors``
            weights against its ``weights_sha256`` (both required).

    Raises:
        CheckpointError: missing/corrupt files, a card without required fields, or weights
            that do not fit the card's architecture (the message names the tensor and shapes).
    """
    from .nets import build_model

    weights, card_path = checkpoint_paths(resolve(path))
    data = _parse_card(card_path)
    card = ModelCard.from_dict(data, source=f"model card {card_path.name}")
    if verify_hash and weights.suffix == ".safetensors" and weights.exists():
        _check_weights_hash(weights, card)
    try:
        model = build_model(card.architecture, **card.arch_kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"model card {card_path.name} describes no valid network: {e}"
        ) from None
    state = _checked_state(model, _read_tensors(weights), weights.name)
    if verify_hash:  # after the structure: an unusable field or tensor is named as such
        _check_card_hash(data, card_path)
    model.load_state_dict(state)
    model.eval()
    return model.to(device), card


def _checked_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """``state`` as the model's dtypes, refusing missing, unexpected, misshapen or
    non-finite tensors (the message names the tensor)."""
    import torch

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise CheckpointError(
            f"weights file {name} does not fit the card's architecture: tensors "
            + " and ".join(parts)
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"weights file {name}: tensor {k!r} has shape {tuple(state[k].shape)} "
                f"but the card's architecture needs {tuple(v.shape)}"
            )
        if v.is_floating_point():
            state[k] = state[k].to(v.dtype)
            if not bool(torch.isfinite(state[k]).all()):
                raise CheckpointError(
                    f"weights file {name}: tensor {k!r} holds NaN or infinite values "
                    "(the training that made it diverged); this model cannot be used"
                )
    return state


# ---------------------------------------------------------------------------- bundled


def bundled_dir() -> Path:
    """Folder of the bundled models: inside the wheel, or ``models/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "_models"
    if packaged.is_dir():
        return packaged
    return here.parents[1] / "models"


def list_bundled() -> list[str]:
    """Names of the bundled models (those with both weights and card)."""
    d = bundled_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.safetensors") if p.with_suffix(".json").exists())


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a bundled model's name or a path into a checkpoint path.

    Raises:
        CheckpointError: neither a bundled name nor an existing checkpoint.
    """
    p = Path(name_or_path).expanduser()
    weights, card = checkpoint_paths(p) if not p.is_dir() else (p, p)
    if p.exists() or weights.exists() or card.exists():
        return p
    if str(name_or_path) in list_bundled():
        return bundled_dir() / f"{name_or_path}.safetensors"
    names = ", ".join(list_bundled()) or "none installed"
    raise CheckpointError(
        f"no checkpoint at {name_or_path!s} and no bundled model of that name ({names})"
    )
