"""The Segment widget end to end under Xvfb, with tiny random-init models saved to tmp_path.

Random weights give meaningless labels; where a test needs foreground it biases the head
so every pixel is class 1 (``foreground=True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "napari_prosma" / "_samples"


def save_tiny(
    folder: Path, name: str, *, spatial_dims: int = 2, in_channels: int = 1,
    out_channels: int = 2, foreground: bool = False, **card_kw,
) -> Path:
    """A tiny random-init ProSMA-UNet checkpoint (3 levels, widths 4-8-16)."""
    import torch

    from napari_prosma.checkpoint import ModelCard, save
    from napari_prosma.nets import build_model

    net = build_model(
        "prosma_unet", spatial_dims=spatial_dims, in_channels=in_channels,
        out_channels=out_channels, widths=[4, 8, 16],
    ).eval()
    if foreground:
        with torch.no_grad():
            net.head.bias[:] = torch.tensor([-20.0] + [20.0] * (out_channels - 1))
            net.head.weight.zero_()
    card_kw.setdefault("class_names", ["background"] + [f"c{k}" for k in range(1, out_channels)])
    card = ModelCard(architecture="prosma_unet", arch_kwargs=net.config, name=name, **card_kw)
    return save(net, folder / name, card)


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    """Keep the user's model store (active model, versions) out of the tests."""
    monkeypatch.setenv("PROSMA_MODEL_DIR", str(tmp_path / "store"))


@pytest.fixture
def tiny2d(tmp_path) -> Path:
    return save_tiny(tmp_path, "tiny2d")


@pytest.fixture
def tiny2d_fg(tmp_path) -> Path:
    return save_tiny(tmp_path, "tiny2d_fg", foreground=True)


def errors_since(n: int) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [
        str(r.message) for r in notification_manager.records[n:]
        if r.severity == NotificationSeverity.ERROR
    ]


def n_records() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def segment_widget(viewer, checkpoint: Path | None = None, device: str = "cpu"):
    _, widget = viewer.window.add_plugin_dock_widget("napari-prosma", "Segment")
    if checkpoint is not None:
        widget.model.add_checkpoint(checkpoint)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData(device))
    return widget


def open_sample(viewer, name: str):
    """Open a shipped sample file through this plugin's reader."""
    return viewer.open(str(SAMPLES / name), plugin="napari-prosma")[0]


# ---------------------------------------------------------------------------- reader


def test_reader_opens_ct_sample_with_geometry(make_napari_viewer):
    import nibabel as nib

    viewer = make_napari_viewer()
    layer = open_sample(viewer, "spleen_ct.nii.gz")
    affine = nib.load(str(SAMPLES / "spleen_ct.nii.gz")).affine
    assert layer.data.shape == (26, 166, 164)  # (k, j, i)
    np.testing.assert_allclose(layer.scale, np.diag(affine)[:3][::-1], rtol=1e-6)
    np.testing.assert_allclose(layer.translate, affine[:3, 3][::-1], rtol=1e-6)
    assert layer.metadata["affine"].shape == (4, 4)
    assert layer.metadata["prosma_io"]["source_affine"] is not None
    labels = open_sample(viewer, "spleen_ct_label.nii.gz")
    assert labels.__class__.__name__ == "Labels"
    np.testing.assert_allclose(labels.scale, layer.scale)


def test_sample_menu_opens_image_and_ground_truth(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-prosma", "busi_benign")
    kinds = [type(layer).__name__ for layer in viewer.layers]
    assert kinds == ["Image", "Labels"]


# ---------------------------------------------------------------------------- segmenting


def test_segment_sync_2d_geometry_and_rerun_updates(make_napari_viewer, tiny2d_fg):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-prosma", "busi_benign")
    image = viewer.layers[0]
    image.scale, image.translate = (0.5, 0.25), (10.0, -3.0)
    widget = segment_widget(viewer, tiny2d_fg)
    widget.image_combo.setCurrentIndex(widget.image_combo.findData(image.name))
    assert widget.model.current_card().name == "tiny2d_fg"
    assert "tiny2d_fg" in widget.model.card_text.toPlainText()

    result = widget.run(sync=True)

    assert result is not None
    labels = widget.last_labels
    assert labels.data.shape == image.data.shape
    assert labels.data.min() == 1  # the biased head: all foreground
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    assert viewer.layers.selection.active.name == labels.name  # ready for corrections
    n_layers = len(viewer.layers)

    widget.run(sync=True)  # the layer was not edited: it is updated

    assert len(viewer.layers) == n_layers  # updated, not piled up
    # (napari hands plugin widgets proxies of its objects: compare by id, not identity)
    assert widget.last_labels.unique_id == labels.unique_id
    assert labels.data.min() == 1
    assert viewer.layers[-1].unique_id == labels.unique_id  # labels on top


def info_since(n: int) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [
        str(r.message) for r in notification_manager.records[n:]
        if r.severity == NotificationSeverity.INFO
    ]


def paint_stroke(layer, n: int = 1000, value: int = 2) -> tuple[np.ndarray, ...]:
    """Paint ``n`` pixels of a 2D labels layer as napari's brush does (one undo step)."""
    ys, xs = np.divmod(np.arange(n), 40)
    where = (ys + 10, xs + 10)
    with layer.block_history():
        layer.data_setitem(where, value)
    return where


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_run_again_keeps_the_users_edits(make_napari_viewer, tiny2d_fg, tta):
    """Issue 12.1: a labels layer the user painted on is never overwritten; the new result
    goes to a new layer, and the status and a notification say so."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-prosma", "busi_benign")
    image = viewer.layers[0]
    widget = segment_widget(viewer, tiny2d_fg)
    widget.run(sync=True)
    mine = widget.last_labels
    where = paint_stroke(mine)
    edited = np.array(mine.data, copy=True)
    assert np.all(edited[where] == 2)
    n_layers = len(viewer.layers)
    widget.tta_check.setChecked(tta)
    n = n_records()

    widget.run(sync=True)

    np.testing.assert_array_equal(mine.data, edited)  # the stroke is kept
    new = widget.last_labels
    assert new.unique_id != mine.unique_id and len(viewer.layers) == n_layers + 1
    assert new.name == f"{image.name} labels [1]" and new.data.min() == 1
    assert mine.metadata["prosma"]["role"] == "corrected"  # Fine-tune finds it
    notes = info_since(n)
    assert any("holds your edits" in t and new.name in t for t in notes), notes
    assert "holds your edits" in widget.status_label.text()
    assert not errors_since(n)
    mine.undo()  # the user's own undo history is intact
    assert not np.any(mine.data[where] == 2)

    widget.run(sync=True)  # the new layer is unedited: updated in place

    assert widget.last_labels.unique_id == new.unique_id
    assert len(viewer.layers) == n_layers + 1


def test_updating_an_unedited_layer_can_be_undone(make_napari_viewer, tiny2d, tiny2d_fg):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((64, 64)).astype(np.float32), name="x")
    widget = segment_widget(viewer, tiny2d)
    widget.run(sync=True)
    labels = widget.last_labels
    first = np.array(labels.data, copy=True)
    assert first.min() == 0  # random weights: not all foreground
    widget.model.add_checkpoint(tiny2d_fg)

    widget.run(sync=True)

    assert widget.last_labels.unique_id == labels.unique_id
    assert labels.data.min() == 1
    labels.undo()
    np.testing.assert_array_equal(labels.data, first)


def test_refused_run_replaces_the_done_status(make_napari_viewer, tmp_path, tiny2d):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="grey")
    widget = segment_widget(viewer, tiny2d)
    widget.run(sync=True)
    assert widget.status_label.text().startswith("Done")
    widget.model.add_checkpoint(save_tiny(tmp_path, "vol", spatial_dims=3))

    assert widget.run(sync=True) is None

    assert widget.status_label.text().startswith("Failed")
    assert "3d" in widget.status_label.text().lower()


def test_segment_rgb_probabilities_and_uncertainty(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "tiny_rgb", in_channels=3, out_channels=3,
                     class_names=["background", "polyp", "rim"])
    viewer = make_napari_viewer()
    viewer.open_sample("napari-prosma", "kvasir_polyp")
    image = viewer.layers[0]
    assert image.rgb
    widget = segment_widget(viewer, ckpt)
    widget.prob_check.setChecked(True)
    widget.unc_check.setChecked(True)
    assert widget.tta_check.isChecked()  # uncertainty needs TTA

    widget.run(sync=True)

    names = [layer.name for layer in viewer.layers]
    base = image.name
    for name in (f"{base} labels", f"{base} P(polyp)", f"{base} P(rim)", f"{base} uncertainty"):
        assert name in names
        layer = viewer.layers[name]
        assert layer.data.shape == image.data.shape[:2]
        np.testing.assert_allclose(layer.scale, image.scale)
    n = len(viewer.layers)
    widget.unc_check.setChecked(False)

    widget.run(sync=True)

    names = [layer.name for layer in viewer.layers]
    assert f"{base} uncertainty" not in names  # not asked for: the stale map goes
    assert len(viewer.layers) == n - 1


def test_segment_volume_through_worker(make_napari_viewer, qtbot, tiny2d):
    """A 2D model on a volume: every slice, in the worker, with progress."""
    viewer = make_napari_viewer()
    image = open_sample(viewer, "hippocampus_mri.nii.gz")
    widget = segment_widget(viewer, tiny2d)
    seen = []
    widget._relay.progress.connect(lambda d, t: seen.append((d, t)))

    worker = widget.run()

    assert worker is not None and widget.is_running
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=60_000)
    labels = widget.last_labels
    assert labels is not None and labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    assert seen and seen[-1][0] == seen[-1][1]
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    bar = widget.progress_bar
    assert bar.value() == bar.maximum() > bar.minimum()  # a finished run shows a full bar
    assert len(widget.last_result.gates[0].c_slices) == image.data.shape[0]
    assert labels.metadata["prosma_io"]["source_affine"] is not None  # for the writer


def test_current_slice_fills_only_that_slice(make_napari_viewer, tiny2d_fg):
    viewer = make_napari_viewer()
    image = open_sample(viewer, "hippocampus_mri.nii.gz")
    widget = segment_widget(viewer, tiny2d_fg)
    widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("slice"))
    viewer.dims.set_current_step(0, 7)

    widget.run(sync=True)
    viewer.dims.set_current_step(0, 9)
    widget.run(sync=True)

    labels = widget.last_labels.data
    assert labels.shape == image.data.shape
    filled = sorted(np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1)))
    assert filled == [7, 9]  # the second run kept the first slice

    # the gates of the last run (slice 9), placed into the volume's grid
    _, gates = viewer.window.add_plugin_dock_widget("napari-prosma", "Gate inspector")
    assert gates.slice_index == 9
    assert "slice 9" in gates.note_label.text()
    gates.psi_checks[1].setChecked(True)
    psi = viewer.layers[f"{image.name} ψ stage 1"].data
    assert psi.shape == image.data.shape
    assert sorted(np.flatnonzero(psi.reshape(psi.shape[0], -1).any(1))) == [9]


def test_cancel_leaves_layers_untouched(make_napari_viewer, qtbot, tiny2d):
    viewer = make_napari_viewer()
    open_sample(viewer, "spleen_ct.nii.gz")
    widget = segment_widget(viewer, tiny2d)
    widget.tta_check.setChecked(True)
    before = [layer.name for layer in viewer.layers]

    widget.run()
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=60_000)

    assert [layer.name for layer in viewer.layers] == before
    assert "ancel" in widget.status_label.text()
    assert widget.last_result is None
    assert widget.progress_bar.value() == widget.progress_bar.minimum()  # not shown as done


# ---------------------------------------------------------------------------- errors


def test_no_image_layer_is_a_notification(make_napari_viewer, tiny2d):
    viewer = make_napari_viewer()
    widget = segment_widget(viewer, tiny2d)
    n = n_records()

    assert widget.run(sync=True) is None

    errs = errors_since(n)
    assert errs and "no image layer" in errs[-1]
    assert len(viewer.layers) == 0


def _assert_error_keeps_layers(viewer, widget, expect: str) -> None:
    snapshot = {layer.name: np.array(layer.data, copy=True) for layer in viewer.layers}
    n = n_records()
    assert widget.run(sync=True) is None
    errs = errors_since(n)
    assert errs, "no error notification"
    assert expect in errs[-1].lower(), errs[-1]
    assert "Traceback" not in errs[-1]
    assert list(snapshot) == [layer.name for layer in viewer.layers]
    for layer in viewer.layers:
        np.testing.assert_array_equal(layer.data, snapshot[layer.name])


def test_nan_image_is_refused_and_layers_kept(make_napari_viewer, tiny2d_fg):
    viewer = make_napari_viewer()
    data = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    image = viewer.add_image(data, name="scan")
    widget = segment_widget(viewer, tiny2d_fg)
    widget.run(sync=True)  # a first, good result
    assert widget.last_labels.data.max() == 1
    image.data = np.where(data > 0.99, np.nan, data).astype(np.float32)

    _assert_error_keeps_layers(viewer, widget, "nan")


def test_wrong_channel_count_is_refused(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "needs_rgb", in_channels=3)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="grey")
    widget = segment_widget(viewer, ckpt)
    _assert_error_keeps_layers(viewer, widget, "channel")


def test_3d_model_on_2d_image_is_refused(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "vol", spatial_dims=3)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="grey")
    widget = segment_widget(viewer, ckpt)
    _assert_error_keeps_layers(viewer, widget, "3d")


def test_missing_gpu_is_a_notification(make_napari_viewer, tiny2d):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="grey")
    widget = segment_widget(viewer, tiny2d, device="cuda")
    _assert_error_keeps_layers(viewer, widget, "cuda")


def test_broken_checkpoint_file_is_a_notification(make_napari_viewer, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    viewer = make_napari_viewer()
    widget = segment_widget(viewer)
    n = n_records()

    widget.model.add_checkpoint(bad)

    errs = errors_since(n)
    assert errs and "model card" in errs[-1].lower()
    assert widget.model.combo.findData(str(bad)) == -1


# ---------------------------------------------------------------------------- models, start-up


def test_chooser_lists_store_versions_and_selects_the_active_one(make_napari_viewer, tmp_path):
    import os

    from napari_prosma.versions import ModelStore

    store = ModelStore(os.environ["PROSMA_MODEL_DIR"])
    save_tiny(store.root / "busi-ft-1", "model")
    save_tiny(store.root / "busi-ft-2", "model")
    store.activate("busi-ft-2")
    viewer = make_napari_viewer()
    widget = segment_widget(viewer)

    combo = widget.model.combo
    labels = [combo.itemText(i) for i in range(combo.count())]
    assert any("busi-ft-1" in t and "fine-tuned" in t for t in labels)
    assert "busi-ft-2" in combo.currentText() and "active" in combo.currentText()
    assert widget.model.current_spec() == str(store.root / "busi-ft-2" / "model.safetensors")
    assert widget.model.current_card() is not None


def test_plugin_modules_do_not_import_torch():
    """napari starts fast: torch (and matplotlib) load only when a widget needs them."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import napari_prosma._reader, napari_prosma._writer, napari_prosma._samples\n"
        "import napari_prosma._widgets.segment, napari_prosma._widgets.gates\n"
        "bad = [m for m in ('torch', 'monai', 'matplotlib') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_plain_skip_model_has_no_gates_to_show(make_napari_viewer, tmp_path):
    from napari_prosma.checkpoint import ModelCard, save
    from napari_prosma.nets import build_model

    net = build_model("unet", spatial_dims=2, in_channels=1, out_channels=2, widths=[4, 8, 16])
    card = ModelCard(architecture="unet", arch_kwargs=net.config, name="plain")
    ckpt = save(net, tmp_path / "plain", card)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="grey")
    _, gates = viewer.window.add_plugin_dock_widget("napari-prosma", "Gate inspector")
    widget = segment_widget(viewer, ckpt)
    n = n_records()

    assert widget.run(sync=True) is not None

    assert not errors_since(n)
    assert gates.result is not None and gates.result.gates == []
    assert "no gate maps" in gates.summary_label.text()
    assert gates.table.rowCount() == 0


def test_worker_error_is_a_notification_and_layers_kept(make_napari_viewer, qtbot, tiny2d):
    viewer = make_napari_viewer()
    data = np.ones((40, 40), np.float32)
    data[3, 4] = np.inf
    viewer.add_image(data, name="bad")
    widget = segment_widget(viewer, tiny2d)
    n = n_records()

    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=60_000)

    errs = errors_since(n)
    assert errs and "infinite" in errs[-1].lower()
    assert [layer.name for layer in viewer.layers] == ["bad"]
    assert widget.status_label.text().startswith("Failed")
    assert widget.run_button.isEnabled()

