"""Gate inspector: what the ProSMA skip gates did in the last segmentation (paper §2.2).

For each decoder stage s (1 = finest, full resolution; s = 4 works at 1/8):

- ψ, the spatial gate in (0, 1): *where* the skip passes information. Shown as an Image
  layer on the input's grid (one toggle per stage).
- the exact-zero sparsity of z* = prox_λ‖·‖₁(u): *how much* of the compatibility field the
  proximal step removed, over the whole scan and on the current slice (table and plot); an
  optional layer shows the fraction of zero latent channels per pixel.
- c, the decoder-conditioned channel gate: *which* skip channels pass (bar charts).
- λ = softplus(θ) per latent channel: the learned thresholds (bar charts), with each
  channel's exact-zero fraction.

For a volume segmented slice by slice with a 2D model, c and the sparsity follow the
current slice. A 3D model's channel gate pools over each 3D tile, so c is one vector for
the whole volume (the plot says so); the sparsity still follows the slice (from the
exact-zero map). When the model card records ``gate_sparsity_range`` (see
:mod:`napari_prosma.inference.gates`), a scan outside it is flagged.

The results come from the viewer's hub (``result_ready``, :meth:`Hub.result_of`): this
widget never asks the Segment widget for anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHeaderView,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..inference.gates import (
    GateStage,
    fmt_range,
    parse_sparsity_range,
    slice_sparsity,
    sparsity_warnings,
)
from ..inference.plan import SegResult
from ..report import GATE_WORDS, gate_line, gate_passes
from . import _layers, _placing, _plots
from ._common import HeldResult, compact_combo, guarded, heading, hub_for
from ._tooltips import GATE_COLUMN_TIPS, GATE_COLUMNS, GATES_NO_MAPS, GATES_NONE

COLUMNS, TOOLTIPS = GATE_COLUMNS, GATE_COLUMN_TIPS
#: Text colour of a number outside the training range (readable on light and dark themes).
OUT_OF_RANGE = "#ff8c3a"
#: px: the height the inspector keeps when docked under another widget.
MIN_HEIGHT = 340


class GateInspectorWidget(QWidget):
    """Inspect ψ, exact-zero sparsity, c and λ of the last segmentation.

    Attributes (the controls, for scripting and tests):
        result_combo: which result (a labels layer made by the Segment widget).
        table: one row per decoder stage.
        psi_checks, zero_checks: ``{stage: QCheckBox}`` that show/hide the ψ and
            exact-zero layers of a stage.
        summary_label: plain-words summary; warning_label: sparsity out of training range.
        note_label: whether c follows the slice or is per volume.
        figure, canvas: the matplotlib figure (sparsity per stage, c and λ per stage).
        slice_index: the slice the slice-dependent numbers refer to (volumes), or None.
    """

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.hub = hub_for(napari_viewer)
        self.psi_checks: dict[int, QCheckBox] = {}
        self.zero_checks: dict[int, QCheckBox] = {}
        self.slice_index: int | None = None
        self._layer: Any = None  # the labels layer whose result is shown
        self._build()
        self.result_combo.currentIndexChanged.connect(self._on_choice)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_results)
        events.removed.connect(self._refresh_results)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self.viewer.dims.events.order.connect(self._on_step)
        self.hub.result_ready.connect(self._on_result)
        self._refresh_results()

    def _build(self) -> None:
        self.result_combo = compact_combo(QComboBox())
        self.result_combo.setToolTip("A segmentation made by the Segment widget")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        for col, tip in enumerate(TOOLTIPS):
            self.table.horizontalHeaderItem(col).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        header = self.table.horizontalHeader()
        header.setMinimumSectionSize(24)
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        for col in (5, 6):  # the check boxes: narrow, so the numbers are not clipped
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.Fixed)
            header.resizeSection(col, 28)
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Minimum)
        self.summary_label = QLabel(GATES_NONE)
        self.summary_label.setWordWrap(True)
        self.summary_label.setToolTip("\n".join(GATE_WORDS.values()))
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet(f"color: {OUT_OF_RANGE};")
        self.note_label = QLabel("")
        self.note_label.setWordWrap(True)
        self.figure, self.canvas = _plots.plot_canvas((4.2, 6.0), min_height=420)

        form = QFormLayout()
        form.addRow("Result", self.result_combo)
        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.addLayout(form)
        for w in (
            self.summary_label,
            self.warning_label,
            heading("Per decoder stage"),
            self.table,
            heading("Sparsity, channel gates c and thresholds λ"),
            self.note_label,
        ):
            lay.addWidget(w)
        lay.addWidget(self.canvas, 1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(380)
        # docked under another widget, the dock area gives it no more than its minimum:
        # enough for the summary, the table and the top of the plot
        self.setMinimumHeight(MIN_HEIGHT)

    # ------------------------------------------------------------------ which result
    @property
    def held(self) -> HeldResult | None:
        """The shown result with its card and model, or None."""
        if self._layer is None or _layers.uid(self._layer) not in {
            _layers.uid(layer) for layer in self.viewer.layers
        }:
            return None
        return self.hub.result_of(self._layer)

    @property
    def info(self) -> dict[str, Any] | None:
        """The shown labels layer's plugin metadata (``source``, ``model``...), or None."""
        return None if self.held is None else _layers.info_of(self._layer)

    @property
    def result(self) -> SegResult | None:
        held = self.held
        return None if held is None else held.result

    def _ranges(self) -> dict[int, tuple[float, float]]:
        held = self.held
        return parse_sparsity_range(getattr(held and held.card, "gate_sparsity_range", None))

    def _refresh_results(self, *_: Any) -> None:
        layers = self.hub.result_layers(self.viewer)
        uids = [_layers.uid(layer) for layer in layers]
        current = None if self._layer is None else _layers.uid(self._layer)
        keep = current if current in uids else (uids[-1] if uids else None)
        self.result_combo.blockSignals(True)
        self.result_combo.clear()
        for layer in layers:
            self.result_combo.addItem(layer.name, _layers.uid(layer))
        if keep is not None:
            self.result_combo.setCurrentIndex(uids.index(keep))
        self.result_combo.blockSignals(False)
        if keep != current or keep is None:
            self.show_result(None if keep is None else layers[uids.index(keep)])

    @guarded("Showing the result")
    def _on_choice(self, index: int) -> None:
        layers = self.hub.result_layers(self.viewer)
        self.show_result(layers[index] if 0 <= index < len(layers) else None)

    @guarded("Showing the new result")
    def _on_result(self, layer: Any) -> None:
        """A new or updated result: show it, and refresh the gate layers already shown."""
        self._refresh_results()
        index = self.result_combo.findData(_layers.uid(layer))
        if index >= 0:
            self.result_combo.blockSignals(True)
            self.result_combo.setCurrentIndex(index)
            self.result_combo.blockSignals(False)
        self.show_result(layer)

    # ------------------------------------------------------------------ display
    def show_result(self, layer: Any) -> None:
        """Show the gates of the result held by ``layer`` (a labels layer with a result)."""
        self._layer = layer
        result = self.result
        self._build_rows(result)
        if result is None:
            self.summary_label.setText(GATES_NONE)
            self.warning_label.setText("")
            self.note_label.setText("")
            self.figure.clear()
            self.canvas.draw_idle()
            return
        self.summary_label.setText(GATES_NO_MAPS)
        card = self.held.card
        warnings = sparsity_warnings(getattr(card, "gate_sparsity_range", None), result.gates)
        self.warning_label.setText("\n".join(f"⚠ {w}" for w in warnings))
        self.slice_index = self._current_slice()
        source_id = (self.info or {}).get("source_id")
        for g in result.gates:  # refresh the layers of this result already shown
            for kind in ("psi", "zeros"):
                if _placing.gate_layer(self.viewer, kind, g.stage, source_id) is not None:
                    self._show_layer(kind, g.stage, True)
        self._update_numbers()

    def _build_rows(self, result: SegResult | None) -> None:
        gates = result.gates if result is not None else []
        self.table.setRowCount(len(gates))
        self.psi_checks.clear()
        self.zero_checks.clear()
        source_id = (self.info or {}).get("source_id")
        for row, g in enumerate(gates):
            item = QTableWidgetItem(f"{g.stage} (1/{g.scale})")
            item.setToolTip(
                "full resolution" if g.scale == 1 else f"1/{g.scale} of the input resolution"
            )
            self.table.setItem(row, 0, item)
            for col, kind, store, avail in (
                (5, "psi", self.psi_checks, g.psi is not None),
                (6, "zeros", self.zero_checks, g.zero_map is not None),
            ):
                shown = _placing.gate_layer(self.viewer, kind, g.stage, source_id)
                box = QCheckBox()
                box.setEnabled(avail)
                box.setChecked(avail and shown is not None and shown.visible)
                box.setToolTip(
                    f"Show the {'ψ' if kind == 'psi' else 'exact-zero'} map of stage {g.stage} "
                    "as a layer on the image"
                )
                box.toggled.connect(lambda on, k=kind, s=g.stage: self._show_layer(k, s, on))
                cell = QWidget()
                cl = QVBoxLayout(cell)
                cl.setContentsMargins(0, 0, 0, 0)
                cl.addWidget(box, alignment=Qt.AlignmentFlag.AlignCenter)
                self.table.setCellWidget(row, col, cell)
                store[g.stage] = box
        self.table.resizeRowsToContents()
        self.table.setFixedHeight(
            self.table.horizontalHeader().sizeHint().height()
            + sum(self.table.rowHeight(r) for r in range(len(gates)))
            + 2 * self.table.frameWidth()
            + 2
        )

    def _update_numbers(self) -> None:
        result = self.result
        if result is None:
            return
        if result.gates:  # plain words, following the current slice
            axis, idx = self._volume_axis(), self.slice_index
            self.summary_label.setText("\n".join(gate_line(g, axis, idx) for g in result.gates))
        ranges = self._ranges()
        for row, g in enumerate(result.gates):
            sl = self._slice_value(g)
            rng = ranges.get(g.stage)
            psi, c = gate_passes(g, self._volume_axis(), self.slice_index)
            passed = None if psi is None and c is None else (psi or 1.0) * (c or 1.0)
            cells = [
                "–" if g.zero_frac_mean is None else f"{g.zero_frac_mean:.0%}",
                "–" if sl is None else f"{sl:.0%}",
                "–" if rng is None else fmt_range(*rng).replace("%–", "–"),
                "–" if passed is None else f"{passed:.0%}",
            ]
            tips = [
                "" if g.zero_frac_mean is None else f"{g.zero_frac_mean:.2%} of z* exactly zero",
                "" if sl is None else f"{sl:.2%} of z* exactly zero on slice {self.slice_index}",
                "not recorded in the model card"
                if rng is None
                else f"training images: {fmt_range(*rng)}",
                "" if passed is None else gate_line(g, self._volume_axis(), self.slice_index),
            ]
            for col, (text, tip) in enumerate(zip(cells, tips), start=1):
                item = QTableWidgetItem(text)
                item.setToolTip(tip)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                if (
                    col == 1
                    and rng is not None
                    and g.zero_frac_mean is not None
                    and not (rng[0] <= g.zero_frac_mean <= rng[1])
                ):
                    item.setForeground(QColor(OUT_OF_RANGE))
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                self.table.setItem(row, col, item)
        self._draw()

    # ------------------------------------------------------------------ slices
    def _volume_axis(self) -> int | None:
        """The volume axis the current slice is taken along (None for 2D results)."""
        result = self.result
        if result is None or len(result.plan.grid) != 3:
            return None
        if result.plan.slice_axis is not None:
            return result.plan.slice_axis
        return _layers.slicing_axis(self.viewer, self._layer.ndim)

    def _current_slice(self) -> int | None:
        axis = self._volume_axis()
        if axis is None:
            return None
        plan = self.result.plan
        if plan.mode == "slice":
            return plan.slice_index
        point = _layers.current_point(self.viewer, self._layer)
        return int(np.clip(round(float(point[axis])), 0, plan.grid[axis] - 1))

    def _slice_value(self, g: GateStage) -> float | None:
        axis = self._volume_axis()
        if axis is None or self.slice_index is None:
            return None
        if self.result.plan.mode == "slice":
            return g.zero_frac_mean
        return slice_sparsity(g, axis, self.slice_index)

    @guarded("Following the slice")
    def _on_step(self, *_: Any) -> None:
        if self.result is None:
            return
        idx = self._current_slice()
        if idx != self.slice_index:
            self.slice_index = idx
            self._update_numbers()

    # ------------------------------------------------------------------ layers
    @guarded("Showing the gate layer")
    def _show_layer(self, kind: str, stage: int, on: bool) -> None:
        """Add/update (``on``) or hide the ψ or exact-zero layer of one stage."""
        layer = _placing.gate_layer(self.viewer, kind, stage, (self.info or {}).get("source_id"))
        if not on:
            if layer is not None:
                layer.visible = False
            return
        result = self.result
        g = None if result is None else next((g for g in result.gates if g.stage == stage), None)
        values = None if g is None else (g.psi if kind == "psi" else g.zero_map)
        if values is None:
            return
        _placing.show_gate_layer(self.viewer, self._layer, result.plan, kind, stage, values)
        box = (self.psi_checks if kind == "psi" else self.zero_checks).get(stage)
        if box is not None and not box.isChecked():
            box.blockSignals(True)
            box.setChecked(True)
            box.blockSignals(False)

    # ------------------------------------------------------------------ plot
    def _draw(self) -> None:
        result = self.result
        gates = [] if result is None else list(result.gates)
        per_slice = _plots.draw_gates(
            self.figure,
            gates,
            mode="image" if result is None else result.plan.mode,
            slice_index=self.slice_index,
            slice_values=[self._slice_value(g) for g in gates],
            ranges=self._ranges(),
            colours=_plots.theme_colours(self.viewer),
        )
        self.note_label.setText(_plots.c_note(result, per_slice) if gates else "")
        self.note_label.setVisible(bool(self.note_label.text()))
        if gates:
            self.canvas.setMinimumHeight(150 * (len(gates) + 1))
        self.canvas.draw_idle()
