"""The ``io/`` package of the redesign (issue 13 part 5): Qt- and torch-free rooms, today's
names still importable from their old homes, small files and functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import napari_prosma

PKG = Path(napari_prosma.__file__).resolve().parent
MODULES = [
    "napari_prosma.fs",
    "napari_prosma.io",
    "napari_prosma.io.image",
    "napari_prosma.io.checks",
    "napari_prosma.io.tiff",
    "napari_prosma.io.nifti",
    "napari_prosma.io.read",
    "napari_prosma.io.write",
    "napari_prosma.io.layers",
    "napari_prosma._reader",
    "napari_prosma._writer",
    "napari_prosma.preprocess",
]


@pytest.mark.parametrize("module", MODULES)
def test_imports_without_qt_napari_or_torch(module):
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('torch', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'napari') "
        "if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_old_names_still_work():
    from napari_prosma import _reader, errors, fs, io
    from napari_prosma.io import layers, read

    assert io.atomic_write is fs.atomic_write
    assert io.suffix_of is fs.suffix_of and io.stem_of is fs.stem_of
    assert io.WriteError is errors.WriteError is fs.WriteError
    assert issubclass(io.WriteError, OSError)
    for name in (
        "IO_KEY",
        "source_metadata",
        "image_data_from_layer",
        "_from_source_file",
        "_header",
    ):
        assert getattr(_reader, name) is getattr(layers, name)
    assert _reader.READ_SUFFIXES is read.READ_SUFFIXES
    for name in io.__all__:
        assert getattr(io, name) is not None


def _sources() -> list[Path]:
    return [
        *sorted((PKG / "io").glob("*.py")),
        PKG / "fs.py",
        PKG / "_reader.py",
        PKG / "_writer.py",
        PKG / "preprocess.py",
    ]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.name)
def test_files_and_functions_are_small(path):
    text = path.read_text()
    assert text.count("\n") < 400
    long = [
        (n.name, n.end_lineno - n.lineno + 1)
        for n in ast.walk(ast.parse(text))
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno >= 80
    ]
    assert long == []
