"""Cross-process locks and process liveness for the model store (Qt-free, stdlib only).

:func:`lock_folder` locks a folder the way :class:`~napari_prosma.versions.ModelStore`
needs: held for milliseconds (an id reserved, a run renamed into place, the active model
switched), waited for by other processes and threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"  # locked instead where the folder itself cannot be (see lock_folder)


def host() -> str:
    import socket

    return socket.gethostname()


def alive(pid: int) -> bool:
    """Whether a process with this id runs on this computer (True when unsure)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextmanager
def lock_folder(root: Path) -> Iterator[None]:
    """An exclusive lock on the folder ``root`` that other processes (and threads) wait for.

    On POSIX the folder itself is locked (``flock`` on its descriptor), so the store holds
    no extra file; where a folder cannot be locked (some network file systems, Windows)
    the lock file ``root/.lock`` is locked instead.
    """
    if os.name != "nt":
        import fcntl

        fd = os.open(root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
        else:
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
    with open(root / LOCK_FILE, "a+b") as f:
        _lock_file(f)
        try:
            yield
        finally:
            _lock_file(f, unlock=True)


def _lock_file(f: Any, unlock: bool = False) -> None:
    """Lock (or unlock) an open file: ``fcntl.flock``, or ``msvcrt.locking`` on Windows."""
    if os.name != "nt":
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_UN if unlock else fcntl.LOCK_EX)
        return
    import msvcrt  # pragma: no cover - Windows

    f.seek(0)
    if unlock:
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        return
    while True:  # LK_LOCK gives up after 10 s; a run holds the lock for milliseconds
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
            return
        except OSError:
            continue
