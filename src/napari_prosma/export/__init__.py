"""Models others can run: a plugin model as a bioimage.io package or as ONNX.

``export_model(MODEL, "bioimageio" | "onnx", OUT)`` loads a bundled model or a checkpoint
(hash-checked safetensors + card: the plugin's own format, unchanged), writes the export into
a new folder ``OUT`` (built beside it, renamed into place when complete; an existing ``OUT``
is never touched) and returns what was checked.

bioimageio.core / bioimageio.spec (extra ``export``) and onnx are imported only here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..preprocess import InputError

FORMATS = ("bioimageio", "onnx")


@dataclass
class ExportResult:
    """Where the export went and what was verified."""

    path: Path
    notes: list[str] = field(default_factory=list)


def export_model(
    model: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    license_id: str | None = None,
    check: bool = True,
) -> ExportResult:
    """Export a model.

    Args:
        model: bundled model name or checkpoint path.
        fmt: ``"bioimageio"`` (a model package folder with ``rdf.yaml``) or ``"onnx"``.
        out: the folder to create.
        license_id: SPDX licence of a bioimage.io package (default: the card's
            ``extra.license``, else the plugin's BSD-3-Clause).
        check: test a bioimage.io package with bioimageio.core before keeping it.

    Raises:
        InputError: an unknown format, a missing optional dependency, a model that cannot be
            exported or an export that fails its check (nothing is left behind).
        FileExistsError: ``out`` exists.
    """
    from ._common import atomic_folder, load_for_export

    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _require(fmt)
    net, card = load_for_export(model)
    notes: list[str] = []
    if fmt == "bioimageio":
        from ._bioimageio import write_bioimageio
        from ._pydantic_compat import bioimageio_compat

        def build(tmp: Path) -> None:
            with bioimageio_compat():
                notes.extend(write_bioimageio(net, card, tmp, license_id, check))
    else:
        from ._onnx import write_onnx

        def build(tmp: Path) -> None:
            notes.extend(write_onnx(net, card, tmp))

    return ExportResult(atomic_folder(out, build), notes)


def _require(fmt: str) -> None:
    import importlib.util

    needs = {"bioimageio": ("bioimageio.core", "bioimageio.spec"), "onnx": ("onnx",)}[fmt]
    missing = [
        m
        for m in needs
        if importlib.util.find_spec(m.split(".")[0]) is None or importlib.util.find_spec(m) is None
    ]
    if missing:
        raise InputError(
            f"--format {fmt} needs {', '.join(missing)}: pip install 'napari-prosma[export]'"
        )
