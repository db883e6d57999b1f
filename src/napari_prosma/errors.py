"""Plain-words messages for errors a clinician may meet (CLI and GUI share them)."""

from __future__ import annotations


def user_message(exc: BaseException) -> str:
    """One line that says what went wrong and, where possible, what to do.

    Known error types keep their own (already user-facing) message; CUDA out-of-memory
    and missing files get a hint; anything else is named by its type and text.
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if "out of memory" in text.lower():
        return "the GPU ran out of memory; try the CPU or smaller tiles"
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or text}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or text}"
    if isinstance(exc, FileExistsError):
        return text or "the output exists already and is never overwritten"
    if name in ("UserError", "CheckpointError", "InputError", "ValueError", "Cancelled"):
        return text or name
    return f"{text} ({name})" if text else name
