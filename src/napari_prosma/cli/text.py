"""Text that reaches the terminal: control characters escaped.

A model card, a file name or an error message can carry terminal escape codes (clear the
screen, move the cursor, rewrite a line) or invisible direction overrides; printed raw they
would act on the user's terminal instead of being read. Every line the ``prosma`` command
prints from such a source goes through :func:`printable`.
"""

from __future__ import annotations

import unicodedata
from typing import Any

#: Unicode categories escaped: controls, format characters (bidi overrides, zero-width),
#: line and paragraph separators, surrogates and unassigned code points.
_ESCAPED = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def printable(text: Any, keep_newlines: bool = False) -> str:
    r"""``text`` with every control or invisible format character written as an escape
    (``\x1b``, ``\t``, ``\u202e``); newlines kept when ``keep_newlines``."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif unicodedata.category(ch) in _ESCAPED:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def escape_tree(obj: Any) -> Any:
    """A copy of JSON-like data (dicts, lists, strings, numbers) with every string (keys
    too) passed through :func:`printable`, so that no value can add a line of its own."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {escape_tree(k): escape_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(escape_tree(v) for v in obj)
    return obj
