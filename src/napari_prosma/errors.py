"""Every exception of napari-prosma, the plain-words message for each, and the cancel adapter.

All errors written for the user derive from :class:`ProsmaError`; each also keeps the
built-in base it had before (``ValueError``, ``OSError``), so ``except ValueError`` in a
caller still catches an :class:`InputError`. CLI and GUI share :func:`user_message`.
Qt-free and torch-free.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

__all__ = [
    "CancelFlag",
    "Cancelled",
    "CheckpointError",
    "InputError",
    "ProsmaError",
    "UserError",
    "WriteError",
    "cancel_check",
    "user_message",
]


class ProsmaError(Exception):
    """Base of every napari-prosma error; its message is meant for the user as it stands."""


class UserError(ProsmaError):
    """An error whose message is meant for the user as it stands (CLI usage, a refused run)."""


class InputError(ProsmaError, ValueError):
    """An image the model cannot take; the message is meant for the user as it stands."""


class CheckpointError(ProsmaError, ValueError):
    """A checkpoint that cannot be used; the message says which file and what is wrong."""


class WriteError(ProsmaError, OSError):
    """A file could not be written in full (a writer library reported a short write, as
    on a full disk or past a file size limit); the message is meant for the user."""


class Cancelled(ProsmaError):
    """The run was cancelled by the user; nothing was produced or written."""

    def __init__(self, message: str = "the segmentation was cancelled; nothing was changed"):
        super().__init__(message)


# ---------------------------------------------------------------------------- messages

#: What a failed write means, by errno, and what to do about it.
_DISK_ERRORS = {
    errno.ENOSPC: "the disk is full; free some space or choose another output folder",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another output folder",
    errno.EFBIG: "the file grew larger than this system allows (disk full or a size limit); "
    "free some space or choose another output folder",
    errno.EROFS: "the folder is on a read-only disk; choose another output folder",
}


def _user_facing(exc: BaseException) -> bool:
    """Whether ``exc``'s own text is the whole message: any :class:`ProsmaError`, and a
    plain ``ValueError`` (exactly that type: a library's subclass such as
    ``JSONDecodeError`` keeps its type name as a hint)."""
    return isinstance(exc, ProsmaError) or type(exc) is ValueError


def user_message(exc: BaseException) -> str:
    """One line that says what went wrong and, where possible, what to do.

    Known error types keep their own (already user-facing) message; running out of memory
    (GPU or host), a full or read-only disk and missing files get a hint; anything else is
    named by its type and text.
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or text}"
    if isinstance(exc, FileExistsError):
        return text or "the output exists already and is never overwritten"
    if isinstance(exc, PermissionError) or (
        isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)
    ):
        return f"permission denied: {exc.filename or text}"
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
        where = f" ({exc.filename})" if exc.filename else ""
        return _DISK_ERRORS[exc.errno].replace(";", f"{where};", 1)
    if isinstance(exc, MemoryError) or "can't allocate memory" in text.lower():
        return (
            "not enough memory for this image: close other programs, crop the image or use "
            "smaller tiles"
        )
    if _user_facing(exc):
        return text or name
    if "out of memory" in text.lower():
        return "the GPU ran out of memory; try the CPU or smaller tiles"
    return f"{text} ({name})" if text else name


# ---------------------------------------------------------------------------- cancel

#: What a long job accepts as its cancel flag: a callable returning True to stop, a
#: ``threading.Event`` (or anything with ``is_set``), or None (never cancelled).
CancelFlag = Callable[[], bool] | threading.Event | None


def cancel_check(cancel: CancelFlag) -> Callable[[], bool]:
    """The one cancel adapter: ``cancel`` as a function that returns True once cancelled.

    Raises:
        TypeError: ``cancel`` is neither None, an event nor a callable.
    """
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError("cancel must be a callable or a threading.Event")
