"""Replay: a few of the base model's own training samples, mixed into fine-tuning (Qt-free).

Fine-tuning on a new domain alone makes a model forget its old one. When the base model's
training data are on this computer, :func:`load_replay` reads a few of them and
:func:`napari_prosma.finetune.finetune` mixes them into every batch
(``FinetuneConfig.replay_fraction``, default a quarter of the patches).

Where replay samples come from (``spec``):

- ``"auto"``: the data set the model card names (``training["dataset"]``, following
  ``parent_training`` for a fine-tuned version), read with :mod:`napari_prosma.datasets`
  from ``$PROSMA_DATA`` or ``../shared/data``. Only the *train* part of the card's split is
  used when its split file is found (``training/splits/...`` in a source checkout), so test
  images never leak into training; otherwise any image of the set may be drawn (the
  message says so).
- a data set name (``"busi"``, ``"kvasir"``, ``"glas"``, ``"hippocampus"``): the same,
  whatever the card says.
- a folder: ``images/`` with ``masks/`` (or ``labels/``) beside it, paired by file stem
  (read with :func:`napari_prosma.io.read_image`), or a corrections folder of the model
  store (``index.json``).
- ``None`` or ``"none"``: no replay.

When ``"auto"`` finds nothing, the result is an empty :class:`ReplaySet` whose ``message``
says why in plain words; fine-tuning goes on without replay. A folder or data set named
explicitly that cannot be read raises :class:`~napari_prosma.preprocess.InputError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import ModelCard
from ..preprocess import InputError

#: Replay samples read by default (a few; they only have to remind the model).
DEFAULT_SAMPLES = 32


@dataclass
class ReplaySet:
    """Samples of the base model's training data, ready for :func:`finetune`.

    Attributes:
        units: ``(image, labels, spacing)`` triples in napari layout (2D grey ``(H, W)``,
            RGB ``(H, W, 3)``, volumes ``(Z, Y, X)``; labels on the same grid; spacing in mm
            or None).
        source: where they came from, in words (None when nothing was found).
        message: one plain sentence for the user: what is replayed, or why nothing is.
        ids: the samples' ids (file stems).
        guard: ``(image, labels, spacing)`` triples of the *validation* part of the
            parent's split, for the forgetting guard (never trained on; empty when not
            asked for or the split has no validation part).
        guard_ids: their ids.
    """

    units: list[tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]] = field(
        default_factory=list
    )
    source: str | None = None
    message: str = "replay is off"
    ids: list[str] = field(default_factory=list)
    guard: list[tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]] = field(
        default_factory=list
    )
    guard_ids: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.units)

    def record(self) -> dict[str, Any]:
        """What a model card records about the replay (count, source, ids)."""
        return {
            "used": self.found,
            "n_samples": len(self.units),
            "source": self.source,
            "ids": list(self.ids),
            "message": self.message,
            **({"guard_ids": list(self.guard_ids)} if self.guard else {}),
        }


def card_dataset(card: ModelCard) -> str | None:
    """The data set a model (or, for a fine-tuned version, its first ancestor that names
    one) was trained on, as the card says; None when it names none."""
    training: Any = card.training
    for _ in range(32):  # lineage depth; guards against a cyclic card
        if not isinstance(training, dict):
            return None
        name = training.get("dataset")
        if isinstance(name, str) and name:
            return name
        training = training.get("parent_training")
    return None


def _card_split(card: ModelCard) -> dict[str, Any] | None:
    training: Any = card.training
    for _ in range(32):
        if not isinstance(training, dict):
            return None
        if isinstance(training.get("split"), dict):
            return training["split"]
        training = training.get("parent_training")
    return None


def replay_status(
    card: ModelCard | None,
    spec: str | os.PathLike[str] | None = "auto",
    data_root: str | os.PathLike[str] | None = None,
) -> tuple[bool, str]:
    """Whether replay samples can be found for ``card``, without reading them.

    Returns:
        ``(available, plain-words sentence)``.
    """
    if spec is None or str(spec) == "none":
        return False, "replay is off"
    if card is None:
        return False, "no model chosen"
    if str(spec) == "auto" or _is_dataset_name(spec):
        name = card_dataset(card) if str(spec) == "auto" else str(spec)
        reason = _dataset_problem(name, card, data_root)
        if reason:
            return False, reason
        return True, f"the {name} training images were found: a few are replayed"
    folder = Path(spec).expanduser()
    if not folder.exists():
        return False, f"the replay folder {folder} does not exist"
    return True, f"replay samples from {folder}"


def load_replay(
    card: ModelCard,
    spec: str | os.PathLike[str] | None = "auto",
    *,
    n: int = DEFAULT_SAMPLES,
    seed: int = 0,
    data_root: str | os.PathLike[str] | None = None,
    n_guard: int = 0,
) -> ReplaySet:
    """Read up to ``n`` replay samples for ``card`` (see the module docstring for ``spec``).

    Args:
        card: the base model's card (channels, dimensions, classes, training data).
        spec: ``"auto"``, a data set name, a folder, or None/``"none"``.
        n: samples at most (a seeded random pick).
        seed: seed of the pick.
        data_root: where the data sets lie (default :func:`datasets.default_data_root`).
        n_guard: images of the validation part of the card's split to read as well, for the
            forgetting guard (``ReplaySet.guard``; only from a data set whose split file is
            found and has a validation part).

    Returns:
        A :class:`ReplaySet`; empty, with the reason in ``message``, when ``"auto"`` finds
        nothing.

    Raises:
        InputError: a folder or data set named explicitly that cannot be used.
    """
    if spec is None or str(spec) == "none" or n <= 0:
        return ReplaySet(message="replay is off")
    if str(spec) == "auto" or _is_dataset_name(spec):
        name = card_dataset(card) if str(spec) == "auto" else str(spec)
        reason = _dataset_problem(name, card, data_root)
        if reason:
            if str(spec) == "auto":
                return ReplaySet(message=f"no replay: {reason}")
            raise InputError(f"cannot replay {name}: {reason}")
        assert name is not None
        return _from_dataset(name, card, n, seed, data_root, n_guard)
    return _from_folder(Path(spec).expanduser(), card, n, seed)


# ---------------------------------------------------------------------------- data sets


def _is_dataset_name(spec: Any) -> bool:
    from ..datasets import DATASETS

    return isinstance(spec, str) and spec in DATASETS


def _dataset_problem(
    name: str | None, card: ModelCard, data_root: str | os.PathLike[str] | None
) -> str | None:
    """Why the data set ``name`` cannot be replayed for ``card`` (None: it can)."""
    from ..datasets import _FOLDER, DATASETS, default_data_root

    if not name:
        return "the model card does not name the data set the model was trained on"
    if name not in DATASETS:
        return f"the model was trained on '{name}', which this plugin cannot read"
    info = DATASETS[name]
    if info["dims"] != card.spatial_dims or info["channels"] != card.in_channels:
        return (
            f"the {name} images ({info['dims']}D, {info['channels']} channel(s)) do not fit "
            f"this model ({card.spatial_dims}D, {card.in_channels} channel(s))"
        )
    root = Path(data_root) if data_root is not None else default_data_root()
    if not (root / f"{name}.npz").exists() and not (root / _FOLDER[name]).is_dir():
        return (
            f"the {name} training images are not on this computer (looked in {root}; "
            "set PROSMA_DATA to the folder that holds them)"
        )
    return None


def _split_file(card: ModelCard, name: str) -> tuple[Path, dict[str, Any]] | None:
    """The card's split file, looked up beside a source checkout and the working folder,
    and its content."""
    split = _card_split(card) or {}
    rel = split.get("file")
    if not isinstance(rel, str) or not rel:
        return None
    repo = Path(__file__).resolve().parents[3]  # src/napari_prosma/finetune/replay.py
    for base in (repo, Path.cwd()):
        p = base / rel
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if data.get("dataset", name) == name and data.get("train"):
                return p, data
    return None


def _all_ids(name: str, root: Path) -> list[str]:
    from ..datasets import _FOLDER, load_packed

    if (root / f"{name}.npz").exists():
        return list(load_packed(root / f"{name}.npz").ids)
    folder = root / _FOLDER[name]
    if name == "hippocampus":
        return sorted(p.name[: -len(".nii.gz")] for p in (folder / "imagesTr").glob("*.nii.gz"))
    suffix = ".png" if name == "busi" else ".jpg"
    return sorted(p.stem for p in (folder / "images").glob(f"*{suffix}"))


def _from_dataset(
    name: str,
    card: ModelCard,
    n: int,
    seed: int,
    data_root: str | os.PathLike[str] | None,
    n_guard: int = 0,
) -> ReplaySet:
    from ..datasets import default_data_root

    root = Path(data_root) if data_root is not None else default_data_root()
    found = _split_file(card, name)
    split_path, split = found if found is not None else (None, {})
    if split_path is not None:
        candidates = sorted(split["train"])
        part = f"train part of {split_path.name}"
    else:
        candidates = _all_ids(name, root)
        part = "the card's split file was not found, so any image of the set may be drawn"
    if not candidates:
        return ReplaySet(message=f"no replay: no {name} images were found in {root}")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(candidates, size=min(n, len(candidates)), replace=False).tolist())
    units, ids = _read_units(name, root, pick, card)
    out = ReplaySet(
        units, f"{name} ({part})", f"replaying {len(units)} {name} training images ({part})", ids
    )
    val = sorted(split.get("val") or [])
    if n_guard > 0 and val:
        gpick = sorted(rng.choice(val, size=min(n_guard, len(val)), replace=False).tolist())
        out.guard, out.guard_ids = _read_units(name, root, gpick, card)
        out.message += (
            f"; the forgetting guard measures {len(out.guard)} images of the validation part "
            f"of {split_path.name} (never trained on)"
        )
    return out


def _read_units(
    name: str, root: Path, ids: list[str], card: ModelCard
) -> tuple[list[tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]], list[str]]:
    """``(image, labels, spacing)`` triples of ``ids`` of data set ``name``, fitted to the
    card's classes, and their ids."""
    from ..datasets import read_dataset

    ds = read_dataset(name, root, ids=ids)
    units: list[tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]] = []
    for i in range(len(ds)):
        s = ds.spacing_of(i)
        units.append((np.ascontiguousarray(ds.image(i)), ds.labels[i], tuple(s) if s else None))
    return _fit_classes(units, card), list(ds.ids)


# ---------------------------------------------------------------------------- folders


def _from_folder(folder: Path, card: ModelCard, n: int, seed: int) -> ReplaySet:
    if not folder.is_dir():
        raise InputError(f"the replay folder {folder} does not exist")
    if (folder / "index.json").exists():
        from ..versions import ModelStore

        images, labels = ModelStore.load_corrections(folder)
        ids = [f"pair_{k:03d}" for k in range(len(images))]
        spacings: list[Any] = [None] * len(images)
    else:
        images, labels, ids, spacings = _read_pairs(folder)
    if not images:
        raise InputError(
            f"no replay samples in {folder}: expected images/ and masks/ (or labels/) "
            "folders with files of the same names, or a saved corrections folder"
        )
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(images), size=min(n, len(images)), replace=False).tolist())
    units = [(images[k], np.asarray(labels[k]).astype(np.int64), spacings[k]) for k in keep]
    units = _fit_classes(units, card)
    return ReplaySet(
        units,
        str(folder),
        f"replaying {len(units)} samples from {folder}",
        [ids[k] for k in keep],
    )


def _read_pairs(
    folder: Path,
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], list[Any]]:
    from ..io import is_supported, read_image, stem_of
    from ..pairing import pair_by_stem

    img_dir = folder / "images"
    lab_dir = next((folder / d for d in ("masks", "labels") if (folder / d).is_dir()), None)
    if not img_dir.is_dir() or lab_dir is None:
        return [], [], [], []

    def files(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and is_supported(p))

    images, labels, ids, spacings = [], [], [], []
    for p, lab_path in pair_by_stem(files(img_dir), files(lab_dir), strict=False):
        im = read_image(p)
        lab = np.asarray(read_image(lab_path).data)
        if lab.ndim == im.data.ndim and im.kind == "rgb":
            lab = lab[..., 0]
        images.append(im.data)
        labels.append(lab)
        ids.append(stem_of(p))
        spacings.append(tuple(im.spacing) if im.kind == "volume" and im.unit == "mm" else None)
    return images, labels, ids, spacings


def _fit_classes(
    units: Sequence[tuple[np.ndarray, np.ndarray, Any]], card: ModelCard
) -> list[tuple[np.ndarray, np.ndarray, Any]]:
    """Labels as the model's classes: binary models learn foreground vs background; a
    multi-class model refuses labels beyond its classes."""
    from .units import check_labels

    out = []
    for img, lab, sp in units:
        lab = np.asarray(lab)
        if card.out_channels == 1 and lab.dtype.kind in "biu":
            lab = (lab > 0).astype(np.int64)
        else:
            lab = check_labels(lab, card, "the replay labels")[0]  # 0/255: 0/1 if binary
        out.append((img, lab, sp))
    return out
