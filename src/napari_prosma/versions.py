"""A user's model versions: where fine-tuned checkpoints live, their lineage, which is active.

Layout of the store (default: the user's data folder, or ``$PROSMA_MODEL_DIR``)::

    ROOT/
      active.json                       {"model": "<version id or bundled name>"}
      <version id>/                     one fine-tuning run, never written twice
        model.safetensors + model.json  the checkpoint (card: parent hash, data hashes, ...)
        corrections/                    the user's corrected labels, saved BEFORE training
        run.json                        what was asked, what happened (before/after Dice),
                                        and the card and weights hashes as saved

A version folder is created under a short temporary name (``ROOT/.stage-<hex>``, whose
``owner.json`` records the process and the version id it reserved) and renamed into place
only when the checkpoint is complete, so a cancelled or crashed run leaves no version
behind (its saved corrections stay in ``ROOT/.incoming`` and are reported, not deleted).

Two runs into one store at once (two napari windows, a CLI run beside the widget) never
meet: the store is locked across processes (:meth:`ModelStore.lock`, an ``flock`` on
the folder) while a version id is reserved, while a finished run is renamed into place,
while the active model is switched and while dead runs are tidied up — milliseconds each,
never during training.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError, ModelCard, read_card
from .fs import (  # the one writer and the array hash live in fs.py; re-exported here
    array_sha256,
    atomic_write_bytes,
    atomic_write_json,
)
from .locking import alive, lock_folder
from .locking import host as this_host

_OWNER = "owner.json"  # in a staging folder: the process that is writing it, the id it holds
_STAGE = ".stage-"  # prefix of staging folders: short, so long model names still fit
_BASE_MAX = 80  # characters of a model name kept in a version id
STALE_TMP_S = 3600  # a temporary file this old in the store folder was left by a killed write


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")


def default_store_dir() -> Path:
    """``$PROSMA_MODEL_DIR`` or the platform's user data folder (``.../napari-prosma/models``)."""
    env = os.environ.get("PROSMA_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-prosma", appauthor=False)) / "models"


def correction_hashes(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray]
) -> list[dict[str, str]]:
    """``{"image_sha256", "labels_sha256"}`` of each corrected pair: the one place the
    corrections are hashed (their index in the store and the new model's card)."""
    return [
        {
            "image_sha256": array_sha256(np.asarray(i)),
            "labels_sha256": array_sha256(np.asarray(lab)),
        }
        for i, lab in zip(images, labels)
    ]


@dataclass
class Version:
    """One fine-tuned model in the store."""

    id: str
    path: Path
    card: ModelCard
    run: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def created(self) -> str:
        return self.card.created or ""

    @property
    def parent(self) -> str | None:
        return self.run.get("parent")

    def describe(self) -> str:
        before, after = self.run.get("dice_before"), self.run.get("dice_after")
        if before is None or after is None:
            return f"{self.id}  (parent {self.parent})"
        return f"{self.id}  held-out Dice {before:.3f} → {after:.3f}  (parent {self.parent})"


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
    label: str | None = None  # the user's words for the version (run.json)
    task: str | None = None

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
        rows.append(
            VersionRow(
                id=v.id,
                parent=v.parent,
                dice_before=run.get("dice_before"),
                dice_after=run.get("dice_after"),
                date=(v.created or run.get("date") or "")[:16].replace("T", " "),
                active=active == v.id,
                improved=run.get("improved"),
                label=run.get("label"),
                task=run.get("task") or v.card.intended_use,
            )
        )
    return rows[::-1]


class ModelStore:
    """Versions of fine-tuned models in one folder; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).expanduser() if root is not None else default_store_dir()

    # ------------------------------------------------------------------ listing
    def versions(self) -> list[Version]:
        """All complete versions, oldest first. Folders without a valid card are skipped,
        and so is a version whose card hash differs from the one its ``run.json`` recorded
        when the run saved it (a card edited and sealed again is no longer that run's)."""
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or d.name.startswith(".") or not (d / "model.json").exists():
                continue
            try:
                card = read_card(d / "model")
            except CheckpointError:
                continue
            run = {}
            if (d / "run.json").exists():
                try:
                    run = json.loads((d / "run.json").read_text())
                except json.JSONDecodeError:
                    run = {}
            if not isinstance(run, dict):
                run = {}
            if run.get("card_sha256") not in (None, card.card_sha256):
                continue  # the card was edited and sealed again: not this run's model
            out.append(Version(d.name, d, card, run))
        out.sort(key=lambda v: (v.created, v.id))
        return out

    def get(self, version_id: str) -> Version:
        for v in self.versions():
            if v.id == version_id:
                return v
        raise KeyError(f"no model version {version_id!r} in {self.root}")

    # ------------------------------------------------------------------ active model
    def active(self) -> str | None:
        """The active model: a version id, a bundled model name, a path — or None."""
        f = self.root / "active.json"
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text()).get("model")
        except (json.JSONDecodeError, AttributeError):
            return None

    def active_checkpoint(self) -> str | None:
        """What :func:`napari_prosma.checkpoint.load` should open for the active model."""
        a = self.active()
        if a is None:
            return None
        return self.checkpoint_of(a) or a

    # ------------------------------------------------------------------ identity
    def version_of(self, spec: str | os.PathLike[str]) -> str | None:
        """The version id that ``spec`` names in this store — a version id, its folder or
        its checkpoint (``<id>/model.safetensors`` / ``.json``) — or None."""
        text = str(spec)
        if _ID.match(text) and (self.root / text / "model.safetensors").is_file():
            return text
        p = Path(text).expanduser()
        folder = p.parent if p.name in ("model.safetensors", "model.json") else p
        try:
            if folder.parent.resolve() != self.root.resolve():
                return None
        except OSError:
            return None
        return folder.name if (folder / "model.safetensors").is_file() else None

    def checkpoint_of(self, spec: str | os.PathLike[str]) -> str | None:
        """The checkpoint of the version ``spec`` names (see :meth:`version_of`), or None."""
        vid = self.version_of(spec)
        return None if vid is None else str(self.root / vid / "model.safetensors")

    def activate(self, model: str) -> None:
        """Make a version id (or a bundled name / checkpoint path) the active model."""
        with self.lock():
            atomic_write_json(self.root / "active.json", {"model": model})

    # ------------------------------------------------------------------ locking
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's cross-process lock (keep the body short: milliseconds).

        Not re-entrant: a body must not call :meth:`activate`, :meth:`recover` or enter
        :meth:`staging` (each takes the lock itself).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with lock_folder(self.root):
            yield

    # ------------------------------------------------------------------ new versions
    def _stages(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """Staging folders (``ROOT/.<...>.<...>`` or ``ROOT/.stage-<hex>``) and their owner
        records (None when missing or unreadable)."""
        out: list[tuple[Path, dict[str, Any] | None]] = []
        if not self.root.is_dir():
            return out
        for stage in sorted(self.root.glob(".*")):
            if not stage.is_dir() or stage.name == ".incoming":
                continue
            if not (stage.name.startswith(_STAGE) or "." in stage.name[1:]):
                continue
            try:
                info = json.loads((stage / _OWNER).read_text())
                out.append((stage, info if isinstance(info, dict) else None))
            except (OSError, ValueError):
                out.append((stage, None))
        return out

    def new_id(self, base: str) -> str:
        """A version id not used by a version or reserved by a run in progress."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.")[:_BASE_MAX] or "model"
        taken = {str((info or {}).get("id")) for _, info in self._stages()}
        vid = f"{base}-ft-{stamp}"
        n = 1
        while (self.root / vid).exists() or vid in taken:
            n += 1
            vid = f"{base}-ft-{stamp}-{n}"
        return vid

    @contextmanager
    def staging(self, base: str) -> Iterator[tuple[str, Path]]:
        """A private folder for a run in progress; renamed to ``ROOT/<id>`` on success.

        Yields ``(version_id, staging_dir)``. The id is reserved (under :meth:`lock`) when
        the folder is made, so runs at the same time get different ids. If the body raises
        (cancel, crash), the staging folder's corrections are kept under
        ``ROOT/.incoming/<id>`` (the exception's ``kept_corrections`` attribute says
        where) and everything else is removed;
        no version appears in :meth:`versions`.
        """
        with self.lock():
            vid = self.new_id(base)
            stage = Path(tempfile.mkdtemp(prefix=_STAGE, dir=self.root))
            owner = {"pid": os.getpid(), "host": this_host(), "id": vid}
            (stage / _OWNER).write_text(json.dumps(owner))
        try:
            yield vid, stage
        except BaseException as exc:
            kept = self._abandon(stage, vid)
            if kept is not None:  # the caller says where (e.g. in its message)
                exc.kept_corrections = kept  # type: ignore[attr-defined]
            raise
        if not (stage / "model.safetensors").exists():
            shutil.rmtree(stage, ignore_errors=True)
            raise RuntimeError("the run finished without writing a checkpoint")
        with self.lock():
            os.replace(stage, self.root / vid)

    def recover(self) -> list[str]:
        """Clean up after runs whose process died (killed, power cut) while training.

        A staging folder whose owning process, on this computer, is no longer running is
        handled as a cancelled run would have been: its saved corrections move to
        ``ROOT/.incoming/<id>`` and the rest (a half-written checkpoint) is removed.
        Staging folders of live runs, of other computers sharing the folder, or without an
        owner record are left alone. Temporary files of an interrupted atomic write in the
        store folder itself (``ROOT/.<hash>.<random>.tmp``) are removed once they are an
        hour old (a live write takes milliseconds).

        Returns:
            The version ids whose corrections were recovered into ``.incoming``.
        """
        recovered: list[str] = []
        if not self.root.is_dir():
            return recovered
        with self.lock():
            for tmp in self.root.glob(".*.tmp"):
                try:
                    if tmp.is_file() and time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                        tmp.unlink()
                except OSError:
                    pass
            for stage, info in self._stages():
                try:
                    pid, host = int(info["pid"]), str(info["host"])  # type: ignore[index]
                except (ValueError, KeyError, TypeError):
                    continue
                if host != this_host() or alive(pid):
                    continue
                vid = str(info.get("id") or stage.name[1:].rsplit(".", 1)[0])  # type: ignore[union-attr]
                if self._abandon(stage, vid) is not None:
                    recovered.append(vid)
        return recovered

    def _abandon(self, stage: Path, vid: str) -> Path | None:
        """Move a failed run's saved corrections to ``ROOT/.incoming/<id>`` (a free name),
        then remove its staging folder. Returns where they were kept (None: there were
        none)."""
        corr = stage / "corrections"
        keep = None
        if corr.is_dir() and any(corr.iterdir()):
            keep = self.root / ".incoming" / vid
            n = 1
            while keep.exists():
                n += 1
                keep = self.root / ".incoming" / f"{vid}-{n}"
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(corr), str(keep))
        shutil.rmtree(stage, ignore_errors=True)
        return keep

    @staticmethod
    def save_corrections(
        folder: Path, images: list[np.ndarray], labels: list[np.ndarray], meta: dict | None = None
    ) -> list[dict[str, str]]:
        """Save the user's images and corrected labels (atomically) before training starts.

        Returns one ``{"image_sha256", "labels_sha256", "file"}`` entry per pair.
        """
        import io as _io

        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, (img, lab, hashes) in enumerate(
            zip(images, labels, correction_hashes(images, labels))
        ):
            buf = _io.BytesIO()
            np.savez_compressed(buf, image=img, labels=lab)
            name = f"pair_{i:03d}.npz"
            atomic_write_bytes(folder / name, buf.getvalue())
            entries.append({"file": name, **hashes})
        atomic_write_json(folder / "index.json", {"pairs": entries, **(meta or {})})
        return entries

    @staticmethod
    def load_corrections(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Read back what :meth:`save_corrections` wrote (no pickles)."""
        index = json.loads((folder / "index.json").read_text())
        images, labels = [], []
        for e in index["pairs"]:
            with np.load(folder / e["file"], allow_pickle=False) as z:
                images.append(z["image"])
                labels.append(z["labels"])
        return images, labels
