"""The Fine-tune widget end to end under Xvfb: a tiny random-init 2D model, a stack of
bright discs (an easy task it gets wrong), the user's corrections = the true discs.

Each test runs a few dozen optimiser steps on 48x48 slices: seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from test_segment_widget import (  # tests/gui is on sys.path under pytest
    errors_since,
    n_records,
    save_tiny,
    segment_widget,
)

from napari_prosma.report import version_label

pytestmark = pytest.mark.gui

FAST = {"lr": 3e-3, "eval_every": 10, "patience": 10, "batch_size": 4}


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSMA_MODEL_DIR", str(tmp_path / "store"))


def store():
    from napari_prosma.versions import ModelStore

    return ModelStore(os.environ["PROSMA_MODEL_DIR"])


def disc_stack(n: int = 8, size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(Z, Y, X)`` bright discs on noise, and their labels."""
    from hardening_support import disc_images

    imgs, labs = disc_images(n, size, seed, margin=14, radius=(6, 11))
    return np.stack(imgs), np.stack(labs)


def warnings_since(n: int) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [
        str(r.message)
        for r in notification_manager.records[n:]
        if r.severity == NotificationSeverity.WARNING
    ]


def finetune_widget(viewer, checkpoint=None, steps: int = 30, **config):
    _, widget = viewer.window.add_plugin_dock_widget("napari-prosma", "Fine-tune")
    if checkpoint is not None:
        widget.model.add_checkpoint(checkpoint)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    widget.trainable_combo.setCurrentIndex(widget.trainable_combo.findData("all"))
    widget.steps_spin.setValue(steps)
    widget.time_spin.setValue(0)  # no time limit: the steps decide
    widget.extra_config = {**FAST, **config}
    return widget


@pytest.fixture
def corrected(make_napari_viewer, tmp_path):
    """A viewer with the disc stack segmented by the tiny model, and its labels layer
    corrected in place (as painting does) to the true discs."""
    import torch

    torch.manual_seed(3)  # a start that gets the discs wrong (held-out Dice 0)
    ckpt = save_tiny(tmp_path, "discs", out_channels=2)
    viewer = make_napari_viewer()
    vol, truth = disc_stack()
    viewer.add_image(vol, name="discs")
    seg = segment_widget(viewer, ckpt)
    seg.run(sync=True)
    labels = seg.last_labels
    prediction = labels.metadata["prosma"]["prediction"].copy()
    assert not np.array_equal(prediction, truth)  # the random model is wrong
    labels.data[:] = truth  # the user's corrections, painted into the layer
    labels.refresh()
    # the Segment widget keeps its prediction apart from the layer the user paints on
    np.testing.assert_array_equal(labels.metadata["prosma"]["prediction"], prediction)
    return SimpleNamespace(viewer=viewer, ckpt=ckpt, labels=labels, truth=truth, seg=seg)


def test_finetune_end_to_end(corrected, qtbot):
    c = corrected
    viewer, ckpt, labels, truth, seg = c.viewer, c.ckpt, c.labels, c.truth, c.seg
    widget = finetune_widget(viewer, ckpt, steps=20)
    assert widget.current_image().name == "discs"
    assert widget.current_labels().unique_id == labels.unique_id  # found by itself
    n = n_records()

    worker = widget.run()

    assert worker is not None and widget.is_running and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=60_000)
    assert not errors_since(n), errors_since(n)
    versions = store().versions()
    assert len(versions) == 1
    vid = versions[0].id
    assert store().active() == vid  # held-out Dice did not drop: the new model is active
    result = widget.last_result
    assert result.n_train == 6 and result.n_holdout == 2  # 8 corrected slices
    assert result.dice_after > result.dice_before + 0.5, (result.dice_before, result.dice_after)
    spec = str(versions[0].checkpoint)
    assert widget.model.current_spec() == spec
    assert seg.model.current_spec() == spec  # every chooser follows
    # the image was segmented again with the new model, into a fresh labels layer ...
    # (by Fine-tune itself: no Segment widget is driven, none is hidden in it)
    from napari_prosma._widgets.segment import SegmentWidget

    assert not widget.findChildren(SegmentWidget)
    assert seg.last_labels.unique_id == labels.unique_id  # the Segment widget was not used
    new = viewer.layers["discs labels"]
    assert new.unique_id != labels.unique_id
    assert new.metadata["prosma"]["model"] == spec
    assert new.name == "discs labels"

    def dice(a, b):
        return 2 * np.sum((a > 0) & (b > 0)) / max(np.sum(a > 0) + np.sum(b > 0), 1)

    old_prediction = labels.metadata["prosma"]["prediction"]
    assert dice(new.data, truth) > dice(old_prediction, truth) + 0.3
    # ... and the corrections are untouched, kept under a plain name
    np.testing.assert_array_equal(labels.data, truth)
    assert labels.name == "discs corrected"
    assert labels.metadata["prosma"]["role"] == "corrected"
    assert labels.unique_id in {layer.unique_id for layer in viewer.layers}
    # the live plot has the loss of every step and the held-out Dice points
    assert len(widget.loss_line.get_xdata()) == result.steps
    assert len(widget.dice_line.get_xdata()) == 3  # before, then every 10 steps
    assert len(widget.best_marker.get_xdata()) == 1
    assert {p.phase for p in widget.history} >= {"before", "train", "eval", "done"}
    assert widget.progress_bar.value() == 100
    # the versions list
    assert widget.versions_table.rowCount() == 1
    assert widget.versions_table.item(0, 0).text() == f"★ {version_label(vid)}"
    assert widget.versions_table.item(0, 0).toolTip().startswith(vid)
    assert "→" in widget.versions_table.item(0, 1).text()
    # the corrections were saved with the version
    _, saved = store().load_corrections(versions[0].path / "corrections")
    np.testing.assert_array_equal(saved[0], truth)
    assert "active" in widget.status_label.text()
    assert "segmented again" in widget.status_label.text()


def test_cancel_mid_run_keeps_the_parent(corrected, qtbot):
    c = corrected
    viewer, ckpt, labels, truth, seg = c.viewer, c.ckpt, c.labels, c.truth, c.seg
    widget = finetune_widget(viewer, ckpt, steps=5000)
    parent_spec = widget.model.current_spec()
    names = [layer.name for layer in viewer.layers]

    widget.run()
    qtbot.waitUntil(lambda: sum(p.phase == "train" for p in widget.history) >= 2, timeout=60_000)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=60_000)

    assert store().versions() == []
    assert store().active() is None  # nothing was activated
    assert widget.model.current_spec() == parent_spec
    assert seg.model.current_spec() == parent_spec
    assert "ancel" in widget.status_label.text()
    qtbot.wait(200)  # progress reports still queued must not bring the old step back
    assert "step" not in widget.status_label.text() and widget.progress_bar.value() == 0
    assert [layer.name for layer in viewer.layers] == names  # nothing re-segmented
    np.testing.assert_array_equal(labels.data, truth)
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    # no partial version; the corrections survive for the user
    assert list((store().root / ".incoming").glob("*/index.json"))


def test_regression_guard_warns_and_keeps_the_parent(corrected, qtbot, monkeypatch):
    import napari_prosma.finetune.loop as ft

    c = corrected
    viewer, ckpt, labels, truth, seg = c.viewer, c.ckpt, c.labels, c.truth, c.seg
    # before 0.5, better at the evaluation (a trained state is kept), measured again: worse
    scores = iter([0.5, 0.8] + [0.4] * 20)
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    widget = finetune_widget(viewer, ckpt, steps=10)
    parent_spec = widget.model.current_spec()
    n = n_records()

    widget.run()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=60_000)

    warns = warnings_since(n)
    assert warns and "worse" in warns[-1] and "previous model stays active" in warns[-1]
    assert not errors_since(n)
    (version,) = store().versions()
    assert version.run["improved"] is False
    assert store().active() is None
    assert widget.model.current_spec() == parent_spec and seg.model.current_spec() == parent_spec
    assert not widget.activate_anyway_button.isHidden()
    assert labels.name == "discs labels"  # not re-segmented, not renamed
    assert "⚠" in widget.versions_table.item(0, 1).text()

    widget.activate_anyway_button.click()
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=60_000)

    assert store().active() == version.id
    assert seg.model.current_spec() == str(version.checkpoint)
    assert viewer.layers["discs labels"].metadata["prosma"]["model"] == str(version.checkpoint)
    np.testing.assert_array_equal(labels.data, truth)
    assert widget.activate_anyway_button.isHidden()


def test_resegmenting_never_writes_into_an_edited_layer(corrected, monkeypatch):
    """Issue 12.1, Fine-tune side: fine-tuning on a hand-drawn layer, then segmenting again
    with the new model, leaves the edited Segment labels layer as the user left it."""
    import napari_prosma.finetune.loop as ft

    c = corrected
    scores = iter([0.1] + [0.9] * 20)  # it improves: the new model is activated
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    c.viewer.add_labels(c.truth.copy(), name="mine")
    widget = finetune_widget(c.viewer, c.ckpt, steps=3)
    widget.labels_combo.setCurrentIndex(widget.labels_combo.findData("mine"))
    n = n_records()

    _, vid = widget.run(sync=True)

    assert store().active() == vid
    np.testing.assert_array_equal(c.labels.data, c.truth)  # the edits are kept
    assert c.labels.metadata["prosma"]["role"] == "corrected"
    new = c.viewer.layers["discs labels [1]"]
    assert new.metadata["prosma"]["model"] == str(store().get(vid).checkpoint)
    from napari.utils.notifications import notification_manager

    assert any("holds your edits" in str(r.message) for r in notification_manager.records[n:])


def _improving(monkeypatch) -> None:
    """Held-out Dice 0.2 before training, 0.5 after: a few steps on a random model need
    not beat it, and then nothing is saved (issue 20)."""
    import napari_prosma.finetune.loop as ft

    scores = iter([0.2] + [0.5] * 50)
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))


def test_other_corrected_images_join_in(make_napari_viewer, tmp_path, monkeypatch):
    """Four 2D images segmented, three of them corrected: those three are learnt from."""
    import torch

    _improving(monkeypatch)

    torch.manual_seed(3)
    ckpt = save_tiny(tmp_path, "discs")
    viewer = make_napari_viewer()
    vol, truth = disc_stack(4)
    seg = segment_widget(viewer, ckpt)
    for k in range(4):
        viewer.add_image(vol[k], name=f"img{k}")
        seg.image_combo.setCurrentIndex(seg.image_combo.findData(f"img{k}"))
        seg.run(sync=True)
        if k < 3:  # img3 stays as the model left it: nothing to learn there
            seg.last_labels.data[:] = truth[k]
    widget = finetune_widget(viewer, ckpt, steps=3)
    widget.image_combo.setCurrentIndex(widget.image_combo.findData("img0"))
    assert widget.current_labels().name == "img0 labels"

    widget.others_check.setChecked(True)
    result, vid = widget.run(sync=True)

    assert result.n_train + result.n_holdout == 3 and result.n_holdout == 1
    assert len(store().get(vid).card.training["data"]) == 3
    assert viewer.layers["img0 labels"].metadata["prosma"]["model"] == str(  # img0 again
        store().get(vid).checkpoint
    )
    np.testing.assert_array_equal(viewer.layers["img0 corrected"].data, truth[0])


def test_slice_axis_and_replay_controls(make_napari_viewer, tmp_path, monkeypatch):
    """Corrections drawn on sagittal slices (axis 2) of a volume: with the viewer stepping
    through axis 2 ('the viewer's slicing axis') or with axis 2 chosen, those slices are
    learnt from. The replay line says plainly that this model has nothing to replay."""
    _improving(monkeypatch)
    ckpt = save_tiny(tmp_path, "discs")
    viewer = make_napari_viewer()
    vol, _ = disc_stack(6)
    layer = viewer.add_image(vol, name="vol")
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:5, 10:20, 30] = 1  # sagittal slices x = 30 and x = 31
    lab[1:5, 10:20, 31] = 1
    viewer.add_labels(lab, name="mine")
    widget = finetune_widget(viewer, ckpt, steps=2)

    assert widget.replay_check.isChecked()
    assert widget.replay_label.text().startswith("No replay: the model card does not name")
    widget.replay_check.setChecked(False)
    assert widget.replay_label.text().startswith("Replay is off")
    widget.replay_check.setChecked(True)

    assert widget.axis_combo.currentData() == "auto"
    assert widget.slice_axis(layer) == 0  # the viewer shows (y, x): it steps through z
    viewer.dims.order = (2, 0, 1)  # now it steps through x
    assert widget.slice_axis(layer) == 2
    result, vid = widget.run(sync=True)

    assert result.n_train + result.n_holdout == 2  # the two sagittal slices
    card = store().get(vid).card
    assert card.training["config"]["slice_axis"] == 2
    assert card.training["replay"]["used"] is False
    assert "no replay" in widget.status_label.text()

    viewer.dims.order = (0, 1, 2)
    widget.axis_combo.setCurrentIndex(widget.axis_combo.findData(2))  # chosen, not viewed
    assert widget.slice_axis(layer) == 2


def test_volume_spacing_reaches_the_engine(make_napari_viewer, tmp_path, monkeypatch):
    """A 3D model trained at 1 mm, a volume at 2 mm slices: the widget hands the layer's
    spacing on, so training resamples the volume as Segment does."""
    import napari_prosma.finetune.units as ft

    ckpt = save_tiny(
        tmp_path,
        "blobs3d",
        spatial_dims=3,
        spacing=[1.0, 1.0, 1.0],
        normalization={"mode": "zscore"},
    )
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(6, 20, 20)).astype(np.float32)
    lab = np.zeros(vol.shape, np.uint8)
    lab[2:4, 5:12, 5:12] = 1
    viewer.add_image(vol + 2 * lab, name="vol", scale=(2.0, 1.0, 1.0), metadata={"unit": "mm"})
    viewer.add_labels(lab, name="mine", scale=(2.0, 1.0, 1.0))
    shapes = []
    real = ft._sample_patch
    monkeypatch.setattr(
        ft, "_sample_patch", lambda x, y, *a, **k: (shapes.append(y.shape), real(x, y, *a, **k))[1]
    )
    widget = finetune_widget(viewer, ckpt, steps=1, batch_size=1)
    widget.replay_check.setChecked(False)

    _, vid = widget.run(sync=True)

    assert store().get(vid).card.training["data"][0]["spacing"] == [2.0, 1.0, 1.0]
    assert set(shapes) == {(4, 20, 20)}  # the 2-slice slab at 2 mm is 4 slices at 1 mm


@pytest.mark.data
def test_replay_line_finds_the_bundled_models_data(make_napari_viewer, shared_data, monkeypatch):
    monkeypatch.setenv("PROSMA_DATA", str(shared_data))
    viewer = make_napari_viewer()
    widget = finetune_widget(viewer)
    widget.model.refresh(select="busi_prosma")
    assert widget.model.current_spec() == "busi_prosma"
    assert widget.replay_label.text().startswith(
        "Replay: the busi_with_normal training images were found"  # busi_prosma since issue 14
    )


def _fake_version(root, vid: str, parent: str, before: float, after: float):
    save_tiny(root / vid, "model")
    run = {
        "parent": parent,
        "dice_before": before,
        "dice_after": after,
        "improved": after >= before,
    }
    (root / vid / "run.json").write_text(json.dumps(run))


def test_versions_list_activate_and_revert(make_napari_viewer, tmp_path):
    parent = save_tiny(tmp_path, "parent")
    root = store().root
    _fake_version(root, "parent-ft-1", str(parent), 0.40, 0.70)
    _fake_version(root, "parent-ft-2", "parent-ft-1", 0.70, 0.65)
    viewer = make_napari_viewer()
    seg = segment_widget(viewer)
    widget = finetune_widget(viewer)
    table = widget.versions_table
    assert table.rowCount() == 2
    ids = [table.item(r, 0).toolTip() for r in range(2)]
    assert set(ids) == {"parent-ft-1", "parent-ft-2"}  # nothing active yet
    assert widget.store_label.text().endswith(str(root))

    widget.select_version("parent-ft-2")
    widget.activate_button.click()

    assert store().active() == "parent-ft-2"
    ckpt2 = str(root / "parent-ft-2" / "model.safetensors")
    assert widget.model.current_spec() == ckpt2 and seg.model.current_spec() == ckpt2
    row = next(r for r in range(2) if "parent-ft-2" in table.item(r, 0).text())
    assert table.item(row, 0).text().startswith("★")
    assert table.item(row, 3).text() == "parent-ft-1"

    widget.versions_table.clearSelection()
    widget.revert_button.click()  # the active version's parent

    assert store().active() == "parent-ft-1"
    assert seg.model.current_spec() == str(root / "parent-ft-1" / "model.safetensors")

    widget.revert_to_parent("parent-ft-1")  # back to the original file

    assert store().active() == str(parent)
    assert widget.model.current_spec() == str(parent)
    assert seg.model.current_spec() == str(parent)

    # a parent that is gone: a plain message, nothing changes
    _fake_version(root, "gone-ft-1", str(tmp_path / "deleted.safetensors"), 0.1, 0.2)
    store().activate("gone-ft-1")
    n = n_records()
    widget.revert_to_parent("gone-ft-1")
    errs = errors_since(n)
    assert errs and "not available any more" in errs[-1]
    assert store().active() == "gone-ft-1"


# ---------------------------------------------------------------------------- errors


def _assert_refused(viewer, widget, expect: str) -> None:
    snapshot = {layer.name: np.array(layer.data, copy=True) for layer in viewer.layers}
    n = n_records()
    assert widget.run() is None
    errs = errors_since(n)
    assert errs, "no error notification"
    assert expect in errs[-1].lower(), errs[-1]
    assert "Traceback" not in errs[-1]
    assert not widget.is_running
    assert [layer.name for layer in viewer.layers] == list(snapshot)
    for layer in viewer.layers:
        np.testing.assert_array_equal(layer.data, snapshot[layer.name])
    assert store().versions() == []


def test_no_labels_layer_is_a_notification(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "discs")
    viewer = make_napari_viewer()
    viewer.add_image(disc_stack(2)[0], name="discs")
    widget = finetune_widget(viewer, ckpt)
    _assert_refused(viewer, widget, "no labels layer")


def test_labels_of_another_shape_are_refused(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "discs")
    viewer = make_napari_viewer()
    vol, truth = disc_stack(2)
    viewer.add_image(vol, name="discs")
    viewer.add_labels(truth[:, :40], name="other")
    widget = finetune_widget(viewer, ckpt)
    _assert_refused(viewer, widget, "does not match")


def test_uncorrected_prediction_is_refused(corrected):
    labels = corrected.labels
    labels.data[:] = labels.metadata["prosma"]["prediction"]  # undo every correction
    widget = finetune_widget(corrected.viewer, corrected.ckpt)
    _assert_refused(corrected.viewer, widget, "exactly the model's prediction")


def test_empty_hand_drawn_labels_are_refused(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "discs")
    viewer = make_napari_viewer()
    vol, truth = disc_stack(2)
    viewer.add_image(vol, name="discs")
    viewer.add_labels(np.zeros_like(truth), name="mine")
    widget = finetune_widget(viewer, ckpt)
    _assert_refused(viewer, widget, "draw or correct labels first")


def test_finetune_module_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import napari_prosma._widgets.finetune\n"
        "bad = [m for m in ('torch', 'monai', 'matplotlib') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_new_version_is_named_and_the_report_covers_whole_images(corrected, qtbot, monkeypatch):
    """Issue 16: task, classes and a label typed in the widget reach the new version's card
    and the versions list (Date and Parent in full at the dock's width); the status gives
    the held-out curve and the whole volume before and after."""
    import napari_prosma.finetune.loop as ft

    c = corrected
    scores = iter([0.2, 0.4, 0.5, 0.45, 0.5] + [0.5] * 20)
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    widget = finetune_widget(c.viewer, c.ckpt, steps=8, eval_every=2)
    assert widget.task_edit.placeholderText() == ""  # the tiny card states no task
    assert widget.classes_edit.placeholderText().startswith("the parent's: ")
    widget.task_edit.setText("Discs in noise, second scanner")
    widget.classes_edit.setText("a, b, c")
    n = n_records()
    assert widget.run(sync=True) is None  # 2 classes, 3 names: refused before training
    assert "3 class name(s)" in errors_since(n)[-1] and store().versions() == []
    widget.classes_edit.setText("disc")
    widget.label_edit.setText("Scanner B")

    _, vid = widget.run(sync=True)

    assert vid.startswith("discs-scanner-b-ft-")
    card = store().get(vid).card
    assert card.intended_use == "Discs in noise, second scanner"
    assert card.class_names == ["background", "disc"]
    table = widget.versions_table
    assert table.item(0, 0).text() == "★ Scanner B"
    assert "Discs in noise, second scanner" in table.item(0, 0).toolTip()
    widget.resize(360, 900)
    widget.show()
    qtbot.wait(50)
    metrics = table.fontMetrics()
    for col in (2, 3):
        text = table.item(0, col).text()
        assert table.columnWidth(col) >= metrics.horizontalAdvance(text), (col, text)
        right = table.columnViewportPosition(col) + table.columnWidth(col)
        assert right <= table.viewport().width(), (col, right, table.viewport().width())
    status = widget.status_label.text()
    assert (
        "Held-out Dice as it went, on the part that chose the state kept (step: Dice): "
        "0: 0.20, 2: 0.40, 4: 0.50" in status
    )
    assert "On your 1 volume(s), whole" in status
    assert "The held-out Dice rests on 2 image(s)/slice(s)" in status
