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
    # a model set from a script that fits stays chosen when a layer is added (a result)
    widget.image_combo.setCurrentIndex(widget.image_combo.findData("mri"))
    chooser.combo.setCurrentIndex(_item(chooser, "busi_prosma"))
    viewer.add_labels(np.zeros((8, 40, 50), np.uint8), name="mri labels")
    assert chooser.current_spec() == "busi_prosma"


def test_card_summary_is_readable_with_the_full_card_one_click_away(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = segment_widget(viewer)
    viewer.add_image(np.zeros((40, 50), np.float32), name="echo")
    text = widget.model.card_text.toPlainText()
    assert "Modality: ultrasound" in text
    # the test Dice line is the card's own (the reshipped card's numbers, not typed here)
    from napari_prosma.models import read_model_card
    from napari_prosma.report import card_summary

    line = next(
        t
        for t in card_summary(read_model_card("busi_prosma")).splitlines()
        if t.startswith("Test Dice: lesion ")
    )
    assert " ± " in line and "(n=" in line and line in text
    assert "Trained on: BUSI" in text and "Limits:" in text
    assert "{" not in text  # no raw JSON in the summary
    widget.model.full_card_button.click()
    dialog = widget.model.card_dialog
    assert dialog.isVisible() and '"weights_sha256"' in dialog.view.toPlainText()
    dialog.close()


def _gt_layer(viewer, shape):
    return viewer.add_labels(np.zeros(shape, np.uint8), name="truth")


def test_labels_carry_class_names_colours_sizes_and_provenance(make_napari_viewer, tmp_path):
    from napari_prosma.report import class_colours

    ckpt = save_tiny(tmp_path, "tinyfg", foreground=True, class_names=["background", "lesion"])
    viewer = make_napari_viewer()
    widget = segment_widget(viewer, ckpt)
    image = viewer.add_image(
        np.random.default_rng(0).random((32, 40)).astype(np.float32), name="scan"
    )
    image.scale = (0.5, 0.25)
    image.units = ("mm", "mm")
    widget.image_combo.setCurrentIndex(widget.image_combo.findData("scan"))
    widget.model.select(str(ckpt))
    widget.run(sync=True)
    labels = widget.last_labels
    assert list(labels.features["class"]) == ["background", "lesion"]
    assert np.allclose(labels.colormap.map(1), class_colours(2)[1])
    assert tuple(str(u) for u in labels.units) == ("millimeter", "millimeter")
    made = labels.metadata["prosma"]["made_by"]
    assert made["model_name"] == "tinyfg" and made["weights_sha256"] and made["date"]
    # 32×40 pixels of 0.5×0.25 mm are all "lesion": 160 mm²
    assert "lesion: 160.0 mm² (1,280 pixels)" in widget.status_label.text()
    legend = widget.legend_label.text()
    assert "lesion" in legend and "ground truth" in legend and "made by tinyfg" in legend
    # the user edits it, runs again: the kept layer turns to the ground-truth colours
    labels.data_setitem((np.array([0]), np.array([0])), 0)
    widget.run(sync=True)
    kept = viewer.layers["scan labels"]
    assert kept.metadata["prosma"]["role"] == "corrected"
    assert not np.allclose(kept.colormap.map(1), widget.last_labels.colormap.map(1))


def test_sizes_in_pixels_when_the_spacing_is_unknown(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "tinyfg", foreground=True, class_names=["background", "lesion"])
    viewer = make_napari_viewer()
    widget = segment_widget(viewer, ckpt)
    viewer.add_image(np.random.default_rng(0).random((10, 12)).astype(np.float32), name="scan")
    widget.run(sync=True)
    text = widget.status_label.text()
    assert "lesion: 120 pixels" in text and "spacing unknown" in text


def test_far_spacing_asks_before_running_and_cancel_runs_nothing(make_napari_viewer, tmp_path):
    ckpt = save_tiny(
        tmp_path, "tiny3d", spatial_dims=3, spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16]
    )
    viewer = make_napari_viewer()
    widget = segment_widget(viewer, ckpt)
    vol = np.random.default_rng(0).integers(-1024, 1200, (6, 40, 40)).astype(np.int16)
    viewer.add_image(vol, name="ct", scale=(5.0, 0.8, 0.8), units=("mm",) * 3)
    widget.image_combo.setCurrentIndex(widget.image_combo.findData("ct"))
    widget.model.select(str(ckpt))
    asked = []
    widget.confirm = lambda text: asked.append(text) or False
    n = len(viewer.layers)
    assert widget.run(sync=True) is None
    assert len(asked) == 1 and "looks like CT" not in asked[0]  # the model's modality is unknown
    assert "6×40×40 → 30×32×32" in asked[0] and "Expected time about" in asked[0]
    assert len(viewer.layers) == n and widget.status_label.text().startswith("Not run:")
    widget.confirm = lambda text: True
    assert widget.run(sync=True) is not None
    assert len(viewer.layers) == n + 1


def test_progress_line_says_what_is_happening(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "tiny2d")
    viewer = make_napari_viewer()
    widget = segment_widget(viewer, ckpt)
    viewer.add_image(np.random.default_rng(0).random((10, 12)).astype(np.float32), name="scan")
    widget.worker = object()  # as while a run is in progress
    widget._t0 -= 10
    widget._on_progress(2, 8)
    assert "tile batch 2/8" in widget.status_label.text() and "left" in widget.status_label.text()
    widget._on_progress(8, 8)
    assert "stitching" in widget.status_label.text()
    widget.worker = None


def test_ct_from_nifti_opens_in_a_soft_tissue_window(make_napari_viewer, tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(1).integers(-1024, 1400, (20, 24, 8)).astype(np.int16)
    path = tmp_path / "abdomen.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 5.0, 1.0])), str(path))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-prosma")
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)
    assert all(str(u) == "millimeter" for u in layer.units)
    # a CT model's card window replaces the preset (not a window the user set)
    ckpt = save_tiny(
        tmp_path, "ct3d", spatial_dims=3, normalization={"mode": "ct_window", "window": [-100, 200]}
    )
    widget = segment_widget(viewer, ckpt)
    widget.model.select(str(ckpt))
    assert tuple(layer.contrast_limits) == (-100.0, 200.0)


def test_gate_words_follow_the_slice_and_do_not_contradict(make_napari_viewer, tmp_path):
    from test_segment_widget import open_sample

    from napari_prosma.report import gate_passes

    ckpt = save_tiny(tmp_path, "tiny2d")
    viewer = make_napari_viewer()
    open_sample(viewer, "hippocampus_mri.nii.gz")
    seg = segment_widget(viewer, ckpt)
    _, gates = viewer.window.add_plugin_dock_widget("napari-prosma", "Gate inspector")
    seg.run(sync=True)
    stage = gates.result.gates[0]
    assert stage.psi is not None and stage.psi.ndim == 3
    seen = {}
    for k in (2, 10):
        viewer.dims.set_current_step(0, k)
        psi, c = gate_passes(stage, 0, k)
        assert psi == pytest.approx(float(stage.psi[k].mean()))
        seen[k] = gates.table.item(0, 4).text()
        assert seen[k] == f"{psi * c:.0%}"
        text = gates.summary_label.text()
        assert f"on slice {k}" in text and "the skip passes" in text and "ψ>½" not in text
    assert "z*" in gates.table.horizontalHeaderItem(1).toolTip()
    assert "where in the image" in gates.table.horizontalHeaderItem(4).toolTip()
    assert "latent channel" in gates.table.horizontalHeaderItem(6).toolTip()
    assert "λ (threshold)" in gates.summary_label.toolTip()


def test_finetune_status_stays_in_view_under_segment(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1000, 640)
    segment_widget(viewer)
    _, ft = viewer.window.add_plugin_dock_widget("napari-prosma", "Fine-tune")
    qtbot.wait(100)
    for w in (ft.status_label, ft.progress_bar, ft.run_button, ft.canvas):
        assert w.isVisible() and not w.visibleRegion().isEmpty(), w


def test_second_finetune_defaults_to_the_labels_just_corrected(make_napari_viewer):
    from napari_prosma._widgets import _layers

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((8, 8), np.float32), name="img")
    pred = np.zeros((8, 8), np.uint8)
    src = {"source": "img", "source_id": _layers.uid(image)}
    old = viewer.add_labels(pred.copy(), name="img corrected")
    old.metadata["prosma"] = {"role": "corrected", **src, "prediction": pred}
    new = viewer.add_labels(pred.copy(), name="img labels")
    new.metadata["prosma"] = {"role": "labels", **src, "prediction": pred.copy()}
    assert _layers.labels_for(viewer, image).name == "img corrected"  # nothing new yet
    new.data_setitem((np.array([1]), np.array([1])), 1)  # the user corrects the new result
    assert _layers.labels_for(viewer, image).name == "img labels"
    _, ft = viewer.window.add_plugin_dock_widget("napari-prosma", "Fine-tune")
    assert ft.labels_combo.currentData() == "img labels"


def test_label_files_open_as_labels_and_labels_save_as_png(make_napari_viewer, tmp_path):
    import imageio.v3 as iio
    import nibabel as nib
    from napari.layers import Image, Labels

    rng = np.random.default_rng(0)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:15] = 255
    iio.imwrite(tmp_path / "case7.png", mask)  # named like an image: known by its content
    iio.imwrite(tmp_path / "scan.png", rng.integers(0, 255, (20, 30)).astype(np.uint8))
    (tmp_path / "labelsTr").mkdir()
    nib.save(
        nib.Nifti1Image(np.zeros((6, 7, 8), np.uint8), np.eye(4)),
        tmp_path / "labelsTr" / "spleen_1.nii.gz",
    )
    viewer = make_napari_viewer()
    (m,) = viewer.open(str(tmp_path / "case7.png"), plugin="napari-prosma")
    (s,) = viewer.open(str(tmp_path / "scan.png"), plugin="napari-prosma")
    (t,) = viewer.open(str(tmp_path / "labelsTr" / "spleen_1.nii.gz"), plugin="napari-prosma")
    assert isinstance(m, Labels) and isinstance(t, Labels) and isinstance(s, Image)
    out = tmp_path / "saved.png"
    viewer.layers.selection = {m}
    written = viewer.layers.save(str(out), selected=True, plugin="napari-prosma")
    assert written == [str(out)]
    np.testing.assert_array_equal(iio.imread(out), mask)
    # a volume cannot go into a PNG: nothing is written, and the user is told why (napari's
    # own warning does not say it)
    from napari.utils.notifications import notification_manager

    viewer.layers.selection = {t}
    n = len(notification_manager.records)
    with pytest.warns(UserWarning, match="did not return any written paths"):
        viewer.layers.save(str(tmp_path / "vol.png"), selected=True, plugin="napari-prosma")
    assert not (tmp_path / "vol.png").exists()
    said = [str(r.message) for r in notification_manager.records[n:]]
    assert any("was not saved to vol.png: a PNG holds one 2D image" in m for m in said), said
