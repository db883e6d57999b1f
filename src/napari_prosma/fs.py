"""File-system helpers shared by every writer: atomic writes, suffixes and stems.

Every write goes to a temporary file in the target folder that is then moved into place
(nothing half-written is ever left), and an existing file is never replaced unless
``overwrite=True``. Qt-free and torch-free.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import WriteError

__all__ = ["WriteError", "atomic_write", "stem_of", "suffix_of"]


def suffix_of(path: str | os.PathLike[str]) -> str:
    """Lower-case suffix, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | os.PathLike[str]) -> str:
    """File name without its (possibly double, ``.nii.gz``) suffix."""
    name = Path(path).name
    suf = suffix_of(path)
    return name[: len(name) - len(suf)] if suf else name


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
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists already; it is never overwritten (choose another output or "
            "pass overwrite / --overwrite)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{stem_of(path)}.", suffix=".tmp" + suffix_of(path), dir=path.parent
    )
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
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobber
            except FileExistsError:
                raise FileExistsError(f"{path} appeared while writing; left untouched") from None
            except OSError:  # no hard links on this file system
                if path.exists():
                    raise FileExistsError(f"{path} exists already; left untouched") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
