"""File-system helpers shared by every writer: atomic writes, array hashes, suffixes, stems.

Every write goes to a temporary file in the target folder that is flushed to the disk and
then moved into place (nothing half-written is ever left). This is the one atomic writer:
:func:`atomic_write` (a callable writes the file), :func:`atomic_write_bytes` and
:func:`atomic_write_json` are thin faces of it, and :func:`write_temp` is its first half
for a caller that renames several files together (:func:`napari_prosma.checkpoint.save`).
Qt-free and torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import WriteError

__all__ = [
    "TEMP_NAME_MAX",
    "WriteError",
    "array_sha256",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "stem_of",
    "suffix_of",
    "write_temp",
]

#: Longest file name (bytes) kept readable in a temporary name (see ``_temp_prefix``).
TEMP_NAME_MAX = 120


def suffix_of(path: str | os.PathLike[str]) -> str:
    """Lower-case suffix, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | os.PathLike[str]) -> str:
    """File name without its (possibly double, ``.nii.gz``) suffix."""
    name = Path(path).name
    suf = suffix_of(path)
    return name[: len(name) - len(suf)] if suf else name


def array_sha256(a: np.ndarray) -> str:
    """Hash of an array's dtype, shape and bytes (identifies training images and labels)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _temp_prefix(name: str) -> str:
    """``.NAME.`` for a temporary file beside ``NAME``, or ``.<hash>.`` when ``NAME`` is
    long: file names are limited to 255 bytes, and the temporary name adds 14."""
    if len(name.encode()) <= TEMP_NAME_MAX:
        return f".{name}."
    return f".{hashlib.sha256(name.encode()).hexdigest()[:16]}."


def write_temp(
    path: str | os.PathLike[str], write: Callable[[Path], None], keep_suffix: bool = False
) -> Path:
    """Run ``write(tmp)`` on a new temporary file beside ``path`` and flush it to the disk.

    Args:
        path: the final file name (its folder is created).
        write: writes the whole file to the path it is given.
        keep_suffix: end the temporary name in ``path``'s suffix (``.tmp.nii.gz``) for
            writers that choose the format by it; otherwise it ends in ``.tmp``.

    Returns:
        The temporary file, readable as the umask allows (``mkstemp`` makes it private);
        on any failure it is removed again.

    Raises:
        WriteError: ``write`` reported a short write without an errno (a writer library's
            own error, as on a full disk); an error with an errno is raised as it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_suffix:
        prefix, suffix = _temp_prefix(stem_of(path)), ".tmp" + suffix_of(path)
    else:
        prefix, suffix = _temp_prefix(path.name), ".tmp"
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            write(tmp)
        except OSError as e:
            if e.errno is not None:  # the system's own error says what happened
                raise
            detail = str(e).strip() or type(e).__name__
            raise WriteError(
                f"{path.name} could not be written in full ({detail}): the disk may be full "
                "or the file too large; nothing was kept"
            ) from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (also one that appeared meanwhile)."""
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile: never clobber
    except FileExistsError:
        raise FileExistsError(f"{path} appeared while writing; left untouched") from None
    except OSError:  # no hard links on this file system
        if path.exists():
            raise FileExistsError(f"{path} exists already; left untouched") from None
        os.replace(tmp, path)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then move it into place.

    Args:
        path: final file name.
        write: writes the whole file to the path it is given (same suffix as ``path``).
        overwrite: replace an existing file; otherwise an existing ``path`` is an error and
            a file that appears meanwhile is never clobbered.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        WriteError: see :func:`write_temp`.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists already; it is never overwritten (choose another output or "
            "pass overwrite / --overwrite)"
        )
    tmp = write_temp(path, write, keep_suffix=True)
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            _no_clobber(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, then rename
    (an existing file is replaced: for files the package owns, such as cards and records)."""
    path = Path(path)
    tmp = write_temp(path, lambda t: t.write_bytes(data))
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """:func:`atomic_write_bytes` of ``data`` as indented JSON (unknown types as text)."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())
