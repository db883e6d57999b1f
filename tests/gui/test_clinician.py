"""A clinician's day (issue 16): the model that fits the image, readable results and card,
warnings before a long or mismatched run, CT windows, the labels' colours and names."""

from __future__ import annotations

import numpy as np
import pytest

from test_segment_widget import save_tiny, segment_widget  # tests/gui is on sys.path

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSMA_MODEL_DIR", str(tmp_path / "store"))


def _item(chooser, spec):
    return chooser.combo.findData(spec)


def test_chooser_picks_the_model_that_fits_the_layer(make_napari_viewer):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    widget = segment_widget(viewer)
    chooser = widget.model
    viewer.add_image(np.zeros((40, 50, 3), np.uint8), rgb=True, name="photo")
    assert chooser.current_spec() == "kvasir_prosma"
    i = _item(chooser, "hippocampus_prosma")
    assert chooser.combo.itemText(i).endswith("✗")
    assert "3D volumes" in chooser.combo.itemData(i, Qt.ItemDataRole.ToolTipRole)
    viewer.add_image(np.zeros((40, 50), np.float32), name="echo")
    widget.image_combo.setCurrentIndex(widget.image_combo.findData("echo"))
    assert chooser.current_spec() == "busi_prosma"
    assert chooser.combo.itemText(_item(chooser, "kvasir_prosma")).endswith("✗")
    assert not chooser.combo.itemText(_item(chooser, "busi_prosma")).endswith("✗")
    viewer.add_image(np.zeros((8, 40, 50), np.float32), name="mri")
    widget.image_combo.setCurrentIndex(widget.image_combo.findData("mri"))
    assert chooser.current_spec() == "hippocampus_prosma"
    assert not chooser.combo.itemText(_item(chooser, "hippocampus_prosma")).endswith("✗")
    # a model the user picks and that fits is kept when the image changes
    chooser.combo.setCurrentIndex(_item(chooser, "busi_prosma"))
    chooser.combo.activated.emit(chooser.combo.currentIndex())
    widget.image_combo.setCurrentIndex(widget.image_combo.findData("echo"))
    assert chooser.current_spec() == "busi_prosma"
    # ... but one that cannot run on it is not
    widget.image_combo.setCurrentIndex(widget.image_combo.findData("photo"))
    assert chooser.current_spec() == "kvasir_prosma"


def test_card_summary_is_readable_with_the_full_card_one_click_away(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = segment_widget(viewer)
    viewer.add_image(np.zeros((40, 50), np.float32), name="echo")
    text = widget.model.card_text.toPlainText()
    assert "Modality: ultrasound" in text
    assert "Test Dice: lesion 0.81 ± 0.23 (n=129)" in text
    assert "Trained on: BUSI" in text and "Limits:" in text
    assert "{" not in text  # no raw JSON in the summary
    widget.model.full_card_button.click()
    dialog = widget.model.card_dialog
    assert dialog.isVisible() and '"weights_sha256"' in dialog.view.toPlainText()
    dialog.close()
