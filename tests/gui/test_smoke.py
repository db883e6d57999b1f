"""Smoke tests of the napari side: OpenGL renders under Xvfb, and our npe2 manifest is valid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.gui

MANIFEST = Path(__file__).resolve().parents[2] / "src" / "napari_prosma" / "napari.yaml"


def test_canvas_screenshot_is_not_black(make_napari_viewer):
    # Shown: the canvas of a hidden viewer (napari's default in tests) screenshots black.
    viewer = make_napari_viewer(show=True)
    yy, xx = np.mgrid[0:64, 0:64]
    viewer.add_image((xx + yy).astype(np.float32), name="ramp", colormap="gray")
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[16:48, 16:48] = 1
    viewer.add_labels(labels, name="square")

    shot = viewer.screenshot(canvas_only=True)

    assert shot.ndim == 3 and shot.shape[2] in (3, 4), shot.shape
    rgb = shot[..., :3]
    assert rgb.max() > 0, "canvas screenshot is all black: OpenGL does not render"
    # A grey ramp with a coloured square on top: many distinct colours, some not grey.
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10
    assert (rgb.max(axis=-1).astype(int) - rgb.min(axis=-1) > 30).any(), "labels not drawn"


def test_npe2_manifest_validates():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-prosma")  # via the entry point
    assert pm.name == "napari-prosma"
    assert pm.display_name == "ProSMA-UNet"
    pm.validate_imports()
    PluginManifest.from_file(MANIFEST)  # the file in this clone is valid too


def _python_names(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "python_name":
                yield value
            else:
                yield from _python_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _python_names(value)


def test_manifest_python_names_import():
    from npe2.manifest.utils import import_python_name

    names = list(_python_names(yaml.safe_load(MANIFEST.read_text())))
    failures = {}
    for name in names:
        try:
            import_python_name(name)
        except Exception as exc:  # report every broken name, not just the first
            failures[name] = f"{type(exc).__name__}: {exc}"
    assert not failures, failures
