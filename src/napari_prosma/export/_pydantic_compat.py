"""Let bioimageio.spec 0.5.x serialise under pydantic >= 2.14, for the duration of a call.

bioimageio.spec's wrap serialisers call ``handler(value, info)``: they pass pydantic's
``SerializationInfo`` where pydantic expects an ``index_key`` (an int or a str). pydantic
tolerated that until 2.14, which raises ``TypeError`` for it (pydantic#13506), so every
bioimage.io model description fails to build, save or even load. (Measured here:
bioimageio.spec 0.5.12.0 with pydantic 2.14.4; with pydantic 2.13.5 the same code passes.)

:func:`bioimageio_compat` recompiles the three serialisers that do this with ``handler(value)``
(what pydantic's documentation means) and puts the original code back on exit. It touches
nothing when pydantic is older than 2.14, or when a serialiser no longer passes ``info``
(a fixed bioimageio.spec). Remove this module once bioimageio.spec is fixed upstream (or
pin ``pydantic<2.14`` where bioimageio is used).
"""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from types import FunctionType

#: (module, function or method, class or None) of the serialisers that pass ``info``.
_SITES = (
    ("bioimageio.spec._internal.io_packaging", "package_file_descr_serializer", None),
    ("bioimageio.spec.model.v0_4", "package_weights", None),
    (
        "bioimageio.spec._internal.validated_string_with_inner_node",
        "_serialize",
        "ValidatedStringWithInnerNode",
    ),
)
_PASSES_INFO = re.compile(r"handler\(\s*(value|self),\s*info,[^\n]*\n\s*\)")


def needed() -> bool:
    """Whether the installed pydantic rejects ``SerializationInfo`` as an index key."""
    import pydantic

    major, minor = (int(v) for v in pydantic.VERSION.split(".")[:2])
    return (major, minor) >= (2, 14)


def _function(module: str, name: str, cls: str | None) -> FunctionType:
    mod = importlib.import_module(module)
    obj = mod.__dict__[name] if cls is None else mod.__dict__[cls].__dict__[name]
    obj = getattr(obj, "wrapped", obj)  # pydantic's decorator proxy
    return getattr(obj, "__func__", obj)


def _fixed_code(f: FunctionType):
    """The function's code with ``handler(x, info)`` made ``handler(x)``, or None."""
    src = textwrap.dedent(inspect.getsource(f))
    fixed = _PASSES_INFO.sub(r"handler(\1)", src)
    if fixed == src:
        return None
    body = re.sub(r"\A(\s*@[^\n]*\n)+", "", fixed)  # the decorators were applied already
    scope: dict[str, object] = {}
    exec(compile(body, inspect.getsourcefile(f) or "<bioimageio>", "exec"), f.__globals__, scope)
    return scope[f.__name__].__code__


@contextmanager
def bioimageio_compat() -> Iterator[int]:
    """Within this block bioimageio.spec serialises under pydantic >= 2.14.

    Yields:
        How many serialisers were patched (0 when nothing needed it).
    """
    saved: list[tuple[FunctionType, object]] = []
    try:
        if needed():
            for site in _SITES:
                f = _function(*site)
                code = _fixed_code(f)
                if code is not None:
                    saved.append((f, f.__code__))
                    f.__code__ = code
        yield len(saved)
    finally:
        for f, code in saved:
            f.__code__ = code
