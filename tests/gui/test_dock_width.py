"""The docked widgets fit a normal dock: nothing that cannot wrap or shrink (a long check box
label, a combo box sized to its longest item) may push their content wider than the dock,
where the horizontal scroll bar is off and the right edge would be cut off."""

from __future__ import annotations

import pytest

MAX_WIDTH = 360  # px: the width the widgets ask for (the Fine-tune dock clipped at 395)


@pytest.mark.parametrize("name", ["Segment", "Gate inspector", "Fine-tune"])
def test_dock_content_fits(make_napari_viewer, name):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-prosma", name)
    inner = widget
    from qtpy.QtWidgets import QScrollArea

    scrolls = widget.findChildren(QScrollArea)
    if scrolls:
        inner = scrolls[0].widget()
    width = inner.minimumSizeHint().width()
    assert width <= MAX_WIDTH, f"{name}: content needs {width} px"
