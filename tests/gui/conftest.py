"""GUI tests: skipped as a whole, with the reason, where napari or Qt can't be imported or
there is no display.

Run them through ``bash scripts/test.sh``: pytest-xvfb starts an Xvfb server. Don't set
QT_QPA_PLATFORM=offscreen (no OpenGL there; together with Xvfb, screenshots come out black).

The skip happens per test module (not with a module-level ``pytest.importorskip`` here,
which crashes pytest when this folder is named on the command line). It is decided at
collection time, after pytest-xvfb has set DISPLAY.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import pytest


@functools.cache
def _skip_reason() -> str | None:
    for module in ("qtpy", "PyQt6.QtWidgets", "napari"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            return (
                f"{module} can't be imported ({type(exc).__name__}: {exc}); "
                "the GUI tests need `pip install -e .[gui]`"
            )
    # Without a display Qt aborts the whole pytest process instead of raising.
    if (
        sys.platform.startswith("linux")
        and not os.environ.get("DISPLAY")
        and not os.environ.get("WAYLAND_DISPLAY")
        and os.environ.get("QT_QPA_PLATFORM", "") not in ("offscreen", "minimal")
    ):
        return "no display: install Xvfb (scripts/setup.sh does) so that pytest-xvfb starts one"
    return None


class _SkippedModule(pytest.Module):
    def collect(self):
        pytest.skip(_skip_reason(), allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if _skip_reason() is not None:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(autouse=True)
def _answer_before_run_questions(monkeypatch):
    """The Segment widget asks before a mismatched or long run (a modal question that would
    hang a test): answered "go on" here; tests of the question set ``widget.confirm``."""
    try:
        from napari_prosma._widgets.segment import SegmentWidget
    except Exception:  # the module is skipped anyway
        return
    monkeypatch.setattr(SegmentWidget, "confirm", lambda self, text: True)
