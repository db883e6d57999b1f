"""The shared core rooms of the redesign (issue 13 part 1): one error hierarchy, one atomic
writer, the model card in ``card.py``; every core module importing with napari and Qt
blocked; and no source file or function over the size limits (allow-list below)."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

import napari_prosma

PKG = Path(napari_prosma.__file__).resolve().parent
SRC = PKG.parent

#: Top-level packages that the core must never need (napari and every Qt binding).
BLOCKED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt")

#: Core modules that must not import torch either when imported (it is imported lazily,
#: where a model runs): reading and writing files, choosing a model, the CLI's faces.
TORCH_FREE = (
    "napari_prosma.fs",
    "napari_prosma.errors",
    "napari_prosma.preprocess",
    "napari_prosma.models",
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
    "napari_prosma.inference",
    "napari_prosma.inference.engine",
    "napari_prosma.inference.window",
    "napari_prosma.inference.bundled",
    "napari_prosma.cli",
    "napari_prosma.cli.predict",
    "napari_prosma.cli.devices",
    "napari_prosma.cli.outputs",
    "napari_prosma.cli.progress",
    "napari_prosma.cli.text",
    "napari_prosma.cli.info",
    "napari_prosma.cli.evaluate",
    "napari_prosma.cli.train",
    "napari_prosma.train",
)


def _core_modules() -> list[str]:
    """Every module under ``src/napari_prosma`` except the Qt package ``_widgets/``."""
    names = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        if "_widgets" in rel.parts:
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.append(".".join(parts))
    return names


_IMPORT_BLOCKED = """
import importlib, sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: the core must import without it")
        return None
sys.meta_path.insert(0, Block())
importlib.import_module({module!r})
print(sorted(m for m in BLOCKED if m in sys.modules))
print("torch" in sys.modules)
"""


def test_core_module_list_is_complete():
    mods = _core_modules()
    # the rooms of part 1 and their neighbours are found (a broken walk would find few)
    for name in (
        "napari_prosma.errors",
        "napari_prosma.fs",
        "napari_prosma.card",
        "napari_prosma.checkpoint",
        "napari_prosma.io.read",
        "napari_prosma.cli",
    ):
        assert name in mods
    assert not [m for m in mods if "_widgets" in m]
    assert set(TORCH_FREE) <= set(mods)


@pytest.mark.parametrize("module", _core_modules())
def test_every_core_module_imports_with_napari_and_qt_blocked(module):
    """Every core module imports with napari and Qt blocked; those of :data:`TORCH_FREE`
    without importing torch."""
    code = _IMPORT_BLOCKED.format(blocked=BLOCKED, module=module)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded, torch_loaded = run.stdout.strip().splitlines()[-2:]
    assert loaded == "[]"
    if module in TORCH_FREE:
        assert torch_loaded == "False", f"{module} imports torch when imported"


# ---------------------------------------------------------------------------- errors


def test_one_error_hierarchy_keeps_the_old_bases_and_homes():
    from napari_prosma import card, checkpoint, cli, errors, inference, io, preprocess, train
    from napari_prosma.inference import types

    e = errors
    for cls, base in (
        (e.InputError, ValueError),
        (e.CheckpointError, ValueError),
        (e.WriteError, OSError),
        (e.UserError, Exception),
        (e.Cancelled, Exception),
    ):
        assert issubclass(cls, e.ProsmaError) and issubclass(cls, base), cls
    assert preprocess.InputError is io.InputError is e.InputError
    assert checkpoint.CheckpointError is card.CheckpointError is e.CheckpointError
    assert io.WriteError is e.WriteError and cli.UserError is e.UserError
    # one Cancelled: training's was a second class of the same name
    assert train.Cancelled is inference.Cancelled is types.Cancelled is e.Cancelled


def test_user_message_matches_by_isinstance():
    """A subclass of a user-facing error keeps its own message (matched by class, not by
    the class's name as it was)."""
    from napari_prosma.errors import InputError, ProsmaError, user_message

    class TooDark(InputError):
        pass

    class Custom(ProsmaError):
        pass

    assert user_message(TooDark("the image is black")) == "the image is black"
    assert user_message(Custom("plain words")) == "plain words"
    assert user_message(ValueError("bad value")) == "bad value"
    # a library's ValueError subclass is still named, as before
    import json

    with pytest.raises(json.JSONDecodeError) as info:
        json.loads("{")
    assert user_message(info.value).endswith("(JSONDecodeError)")
    assert user_message(KeyError("k")) == "'k' (KeyError)"


def test_one_cancel_adapter():
    import threading

    from napari_prosma.errors import cancel_check

    ev = threading.Event()
    check = cancel_check(ev)
    assert check() is False
    ev.set()
    assert check() is True
    assert cancel_check(None)() is False and cancel_check(lambda: 1)() is True
    with pytest.raises(TypeError):
        cancel_check(3)


# ---------------------------------------------------------------------------- fs


def test_one_atomic_writer_under_its_old_names():
    from napari_prosma import checkpoint, fs, io, versions

    assert checkpoint.atomic_write_bytes is versions.atomic_write_bytes is fs.atomic_write_bytes
    assert versions.atomic_write_json is fs.atomic_write_json
    assert versions.array_sha256 is fs.array_sha256
    assert io.atomic_write is fs.atomic_write
    assert checkpoint.TEMP_NAME_MAX == fs.TEMP_NAME_MAX


def test_atomic_write_keeps_a_long_name_within_the_file_name_limit(tmp_path):
    """A 247-character file name (the limit is 255 bytes) was refused by ``atomic_write``
    (its temporary name ``.STEM.<8>.tmp.nii.gz`` ran over); the writer now shares the
    short temporary names of the checkpoint writer."""
    from napari_prosma.fs import atomic_write

    path = tmp_path / ("a" * 240 + ".nii.gz")
    atomic_write(path, lambda t: t.write_bytes(b"x"))
    assert path.read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_write_bytes_and_json_replace_and_leave_no_temporary(tmp_path):
    from napari_prosma.fs import atomic_write_bytes, atomic_write_json

    atomic_write_bytes(tmp_path / "a.bin", b"1")
    atomic_write_bytes(tmp_path / "a.bin", b"2")
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": Path("p")})
    assert (tmp_path / "a.bin").read_bytes() == b"2"
    assert (tmp_path / "sub" / "b.json").read_text() == '{\n  "x": "p"\n}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.json", "sub"]


def test_the_card_lives_in_card_py():
    from napari_prosma import card, checkpoint

    for name in ("ModelCard", "CARD_FORMAT", "REQUIRED_FIELDS", "card_digest"):
        assert getattr(checkpoint, name) is getattr(card, name)
    assert checkpoint.ModelCard.__module__ == "napari_prosma.card"


# ---------------------------------------------------------------------------- size

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80

#: Paths (relative to ``src/``, ``fnmatch`` patterns) allowed over the limits FOR NOW, and
#: why; the lead tightens this list as the branches that hold them are merged.
ALLOWED = {
    # The exceptions that remain (issue 13), each with why; every other file is held to the
    # limits. Tighten this list, never widen it.
    # The stacked training loop (CUDA streams and graphs per run, DDP, resume at the
    # deadline): its split into setup / epochs / finish waits for a session with GPU time
    # to check the captured-graph path after it (session 5's device time went to issue 15).
    "napari_prosma/train/stack.py": "train_many() 106, finish_run() 87 lines",
}


def _allowed(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in ALLOWED)


def _over_limits(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    over = []
    lines = text.count("\n")
    if lines > MAX_FILE_LINES:
        over.append(f"{lines} lines")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                over.append(f"{node.name}() {n} lines")
    return over


def test_size_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    f = tmp_path / "long.py"
    f.write_text(f"def f():\n{body}\n")
    assert _over_limits(f) == [f"f() {MAX_FUNCTION_LINES + 1} lines"]


def test_no_source_file_or_function_over_the_limits():
    over = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if not _allowed(rel) and (found := _over_limits(path)):
            over[rel] = found
    assert over == {}


def test_every_exception_is_still_needed():
    """An allowed file that shrank within the limits (or is gone) leaves the list."""
    stale = [rel for rel in ALLOWED if not (SRC / rel).exists() or not _over_limits(SRC / rel)]
    assert stale == []
