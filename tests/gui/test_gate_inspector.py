"""The Gate inspector under Xvfb: ψ layers per stage, sparsity numbers and plots, the
training-range warning, following the current slice."""

from __future__ import annotations

import numpy as np
import pytest
from test_segment_widget import (  # tests/gui is on sys.path under pytest
    errors_since,
    n_records,
    open_sample,
    save_tiny,
    segment_widget,
)

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSMA_MODEL_DIR", str(tmp_path / "store"))


def inspector(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-prosma", "Gate inspector")
    return widget


def warnings_since(n: int) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [
        str(r.message)
        for r in notification_manager.records[n:]
        if r.severity == NotificationSeverity.WARNING
    ]


def test_inspector_before_any_result(make_napari_viewer):
    viewer = make_napari_viewer()
    gates = inspector(viewer)
    assert gates.result is None
    assert gates.table.rowCount() == 0
    assert "Segment" in gates.summary_label.text()


def test_gate_layers_numbers_and_plots_2d(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "tiny2d")
    viewer = make_napari_viewer()
    viewer.open_sample("napari-prosma", "busi_benign")
    image = viewer.layers[0]
    image.scale, image.translate = (0.5, 0.25), (4.0, 2.0)
    gates = inspector(viewer)  # opened first: it must pick up the result when it comes
    seg = segment_widget(viewer, ckpt)
    seg.run(sync=True)

    assert gates.result is not None
    n_stages = len(gates.result.gates)
    assert n_stages == 2  # three levels: two gated decoder stages
    assert gates.result_combo.count() == 1
    assert gates.table.rowCount() == n_stages
    assert gates.table.item(0, 1).text().endswith("%")  # exact zeros over the scan
    assert "Stage 1 (full res.)" in gates.summary_label.text()
    assert "exactly zero" in gates.summary_label.text()
    # plots: sparsity per stage, then c and λ per stage (λ with a twin axis of zeros)
    titles = [ax.get_title() for ax in gates.figure.axes]
    assert "How much each skip gate removes" in titles
    assert sum("c per channel" in t for t in titles) == n_stages
    assert sum("λ per latent channel" in t for t in titles) == n_stages
    bars = gates.figure.axes[0].patches
    assert len(bars) == n_stages

    gates.psi_checks[1].setChecked(True)
    gates.zero_checks[2].setChecked(True)

    psi = viewer.layers[f"{image.name} ψ stage 1"]
    zeros = viewer.layers[f"{image.name} zeros stage 2"]
    for layer in (psi, zeros):
        assert layer.data.shape == image.data.shape
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    assert 0.0 < float(psi.data.min()) and float(psi.data.max()) < 1.0
    assert viewer.layers[-1].name.endswith("labels")  # labels stay on top
    n_layers = len(viewer.layers)

    seg.run(sync=True)  # again: the gate layers are updated, not added

    assert len(viewer.layers) == n_layers
    gates.psi_checks[1].setChecked(False)
    assert not viewer.layers[f"{image.name} ψ stage 1"].visible


def test_sparsity_outside_training_range_warns(make_napari_viewer, tmp_path):
    ckpt = save_tiny(
        tmp_path,
        "ranged",
        gate_sparsity_range={"stage1": [0.0, 0.001], "stage2": [0.0, 1.0]},
    )
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).random((48, 48)).astype(np.float32), name="x")
    gates = inspector(viewer)
    seg = segment_widget(viewer, ckpt)
    assert "exact-zero range on training data" in seg.model.card_text.toPlainText()
    n = n_records()

    seg.run(sync=True)

    assert gates.result.gates[0].zero_frac_mean > 0.001  # random weights: many zeros
    warns = warnings_since(n)
    assert any(
        "stage 1" in w.lower() and "unlike what the model was trained on" in w for w in warns
    )
    assert "stage 1" in gates.warning_label.text()
    assert "stage 2" not in gates.warning_label.text()
    assert gates.table.item(0, 3).text() == "0.0–0.1%"
    assert not errors_since(n)


def test_follows_the_current_slice_of_a_volume(make_napari_viewer, tmp_path):
    """A 2D model on every slice: c and the sparsity are known per slice and followed."""
    ckpt = save_tiny(tmp_path, "tiny2d")
    viewer = make_napari_viewer()
    image = open_sample(viewer, "hippocampus_mri.nii.gz")
    seg = segment_widget(viewer, ckpt)
    gates = inspector(viewer)
    seg.run(sync=True)

    viewer.dims.set_current_step(0, 3)
    assert gates.slice_index == 3
    first = gates.table.item(0, 2).text()
    titles = [ax.get_title() for ax in gates.figure.axes]
    assert any("c per channel (slice 3)" in t for t in titles)
    assert "follow the current slice" in gates.note_label.text()

    viewer.dims.set_current_step(0, image.data.shape[0] // 2)

    assert gates.slice_index == image.data.shape[0] // 2
    stage = gates.result.gates[0]
    expected = f"{stage.zero_frac_slices[gates.slice_index]:.0%}"
    assert gates.table.item(0, 2).text() == expected
    assert first.endswith("%")
    titles = [ax.get_title() for ax in gates.figure.axes]
    assert any(f"(slice {gates.slice_index})" in t for t in titles)


def test_readable_at_the_dock_width(make_napari_viewer, tmp_path):
    """Issue 16: docked under Segment at the width it asks for, no number of the table is
    clipped, the inspector keeps room for its table, the legend does not cover the bars,
    and out-of-range numbers are in a colour readable on the dark theme."""
    from qtpy.QtWidgets import QApplication

    from napari_prosma._widgets.gates import MIN_HEIGHT, OUT_OF_RANGE

    ckpt = save_tiny(tmp_path, "ranged", gate_sparsity_range={"stage1": [0.0, 0.001]})
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.random.default_rng(1).random((48, 48)).astype(np.float32), name="x")
    seg = segment_widget(viewer, ckpt)
    gates = inspector(viewer)
    seg.run(sync=True)
    QApplication.processEvents()

    assert gates.height() >= MIN_HEIGHT  # not squashed under the Segment widget
    table = gates.table
    metrics = table.fontMetrics()
    for row in range(table.rowCount()):
        for col in range(5):
            text = table.item(row, col).text()
            assert table.columnWidth(col) >= metrics.horizontalAdvance(text) + 4, (col, text)
    assert table.item(0, 1).foreground().color().name() == OUT_OF_RANGE
    fig = gates.figure
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    for bar in ax.patches:
        assert not legend.overlaps(bar.get_window_extent())
    assert legend.y0 >= ax.get_window_extent().y1 - 1  # above the plot area


def test_gate_layers_keep_the_scan_readable(make_napari_viewer, tmp_path):
    """Issue 16: a ψ layer is see-through where ψ is low (the scan shows), coloured where
    it is high, with contrast limits over its values; limits the user set are kept."""
    from napari_prosma._widgets._placing import gate_limits

    ckpt = save_tiny(tmp_path, "tiny2d")
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).random((48, 48)).astype(np.float32), name="x")
    seg = segment_widget(viewer, ckpt)
    gates = inspector(viewer)
    seg.run(sync=True)
    gates.psi_checks[1].setChecked(True)

    psi = viewer.layers["x ψ stage 1"]
    assert psi.blending == "translucent"
    rgba = psi.colormap.map(np.array([0.0, 1.0]))
    assert rgba[0, 3] == 0.0 and rgba[1, 3] > 0.3  # clear at the bottom, coloured on top
    lo, hi = psi.contrast_limits
    assert 0.0 <= lo < hi <= 1.0 and hi - lo >= 0.1 - 1e-6
    assert lo >= float(psi.data.min()) - 0.05 and hi <= float(psi.data.max()) + 0.05
    psi.contrast_limits = (0.0, 1.0)  # the user's choice

    seg.run(sync=True)  # updated: the user's limits stay

    assert tuple(viewer.layers["x ψ stage 1"].contrast_limits) == (0.0, 1.0)
    assert gate_limits(np.full((4, 4), 0.5)) == pytest.approx((0.45, 0.55))
    assert gate_limits(np.zeros((4, 4))) == (0.0, 0.1)
    assert gate_limits(np.ones((4, 4))) == pytest.approx((0.9, 1.0))
