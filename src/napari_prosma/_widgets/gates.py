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
:mod:`._core`), a scan outside it is flagged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt
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

from . import _core
from ._common import (
    META,
    compact_combo,
    geometry_kwargs,
    guarded,
    heading,
    hub_for,
    plot_canvas,
    result_layers,
)

COLUMNS = ("Stage", "Zeros\nscan", "Zeros\nslice", "Train\nrange", "ψ>½", "ψ", "0s")
TOOLTIPS = (
    "Decoder stage: 1 works at full resolution, 2 at 1/2, ...",
    "Exact zeros of z* over the whole scan: how much of the compatibility field the "
    "proximal step removed",
    "Exact zeros of z* on the current slice (volumes)",
    "Range of the exact-zero fraction on the model's training images (from its card)",
    "Share of the image where ψ passes more than half of the skip signal",
    "Show ψ of this stage as a layer",
    "Show the exact-zero fraction of this stage as a layer",
)


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
        self.psi_checks: dict[int, QCheckBox] = {}
        self.zero_checks: dict[int, QCheckBox] = {}
        self.slice_index: int | None = None
        self._layer: Any = None  # the labels layer whose result is shown

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
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Minimum)
        self.summary_label = QLabel("Run the Segment widget: the gates of its result show here.")
        self.summary_label.setWordWrap(True)
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet("color: #ff8c3a;")
        self.note_label = QLabel("")
        self.note_label.setWordWrap(True)

        self.figure, self.canvas = plot_canvas((4.2, 6.0), min_height=420)

        form = QFormLayout()
        form.addRow("Result", self.result_combo)
        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.addLayout(form)
        lay.addWidget(self.summary_label)
        lay.addWidget(self.warning_label)
        lay.addWidget(heading("Per decoder stage"))
        lay.addWidget(self.table)
        lay.addWidget(heading("Sparsity, channel gates c and thresholds λ"))
        lay.addWidget(self.note_label)
        lay.addWidget(self.canvas, 1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(380)

        self.result_combo.currentIndexChanged.connect(self._on_choice)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_results)
        events.removed.connect(self._refresh_results)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self.viewer.dims.events.order.connect(self._on_step)
        hub_for(self.viewer).result_ready.connect(self._on_result)
        self._refresh_results()

    # ------------------------------------------------------------------ which result
    @property
    def info(self) -> dict[str, Any] | None:
        """The shown result's metadata (``result``, ``card``, ``source``...), or None."""
        if self._layer is None or _uid(self._layer) not in {
            _uid(layer) for layer in self.viewer.layers
        }:
            return None
        info = self._layer.metadata.get(META)
        return info if isinstance(info, dict) and "result" in info else None

    @property
    def result(self) -> _core.SegResult | None:
        info = self.info
        return None if info is None else info["result"]

    def _refresh_results(self, *_: Any) -> None:
        layers = result_layers(self.viewer)
        uids = [_uid(layer) for layer in layers]
        current = None if self._layer is None else _uid(self._layer)
        keep = current if current in uids else (uids[-1] if uids else None)
        self.result_combo.blockSignals(True)
        self.result_combo.clear()
        for layer in layers:
            self.result_combo.addItem(layer.name, _uid(layer))
        if keep is not None:
            self.result_combo.setCurrentIndex(uids.index(keep))
        self.result_combo.blockSignals(False)
        if keep != current or keep is None:
            self.show_result(None if keep is None else layers[uids.index(keep)])

    @guarded("Showing the result")
    def _on_choice(self, index: int) -> None:
        layers = result_layers(self.viewer)
        self.show_result(layers[index] if 0 <= index < len(layers) else None)

    @guarded("Showing the new result")
    def _on_result(self, layer: Any) -> None:
        """A new or updated result: show it, and refresh the gate layers already shown."""
        self._refresh_results()
        index = self.result_combo.findData(_uid(layer))
        if index >= 0:
            self.result_combo.blockSignals(True)
            self.result_combo.setCurrentIndex(index)
            self.result_combo.blockSignals(False)
        self.show_result(layer)

    # ------------------------------------------------------------------ display
    def show_result(self, layer: Any) -> None:
        """Show the gates of the result held by ``layer`` (a Segment widget labels layer)."""
        self._layer = layer
        result = self.result
        self._build_rows(result)
        if result is None:
            self.summary_label.setText(
                "Run the Segment widget: the gates of its result show here."
            )
            self.warning_label.setText("")
            self.note_label.setText("")
            self.figure.clear()
            self.canvas.draw_idle()
            return
        if not result.gates:
            self.summary_label.setText(
                "This result has no gate maps: the model has plain skips, or 'Keep gate maps' "
                "was off in the Segment widget."
            )
        else:
            self.summary_label.setText("\n".join(_core.describe_gates(result.gates)))
        card = self.info.get("card") if self.info else None
        warnings = _core.sparsity_warnings(getattr(card, "gate_sparsity_range", None),
                                           result.gates)
        self.warning_label.setText("\n".join(f"⚠ {w}" for w in warnings))
        self.slice_index = self._current_slice()
        for g in result.gates:  # refresh the layers of this result already shown
            for kind in ("psi", "zeros"):
                if self._gate_layer(kind, g.stage) is not None:
                    self._show_layer(kind, g.stage, True)
        self._update_numbers()

    def _build_rows(self, result: _core.SegResult | None) -> None:
        gates = result.gates if result is not None else []
        self.table.setRowCount(len(gates))
        self.psi_checks.clear()
        self.zero_checks.clear()
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
                box = QCheckBox()
                box.setEnabled(avail)
                box.setChecked(avail and self._gate_layer(kind, g.stage) is not None
                               and self._gate_layer(kind, g.stage).visible)
                box.setToolTip(
                    f"Show the {'ψ' if kind == 'psi' else 'exact-zero'} map of stage {g.stage} "
                    "as a layer on the image"
                )
                box.toggled.connect(
                    lambda on, k=kind, s=g.stage: self._show_layer(k, s, on)
                )
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
            + 2 * self.table.frameWidth() + 2
        )

    def _update_numbers(self) -> None:
        result = self.result
        if result is None:
            return
        card = self.info.get("card") if self.info else None
        ranges = _core.parse_sparsity_range(getattr(card, "gate_sparsity_range", None))
        for row, g in enumerate(result.gates):
            scan = "–" if g.zero_frac_mean is None else f"{g.zero_frac_mean:.0%}"
            sl = self._slice_value(g)
            rng = ranges.get(g.stage)
            rtext = "–" if rng is None else _core.fmt_range(*rng).replace("%–", "–")
            passed = g.psi_pass_fraction()
            cells = [scan, "–" if sl is None else f"{sl:.0%}", rtext,
                     "–" if passed is None else f"{passed:.0%}"]
            tips = [
                "" if g.zero_frac_mean is None else f"{g.zero_frac_mean:.2%} of z* exactly zero",
                "" if sl is None else f"{sl:.2%} of z* exactly zero on slice {self.slice_index}",
                "not recorded in the model card" if rng is None
                else f"training images: {_core.fmt_range(*rng)}",
                "",
            ]
            for col, (text, tip) in enumerate(zip(cells, tips), start=1):
                item = QTableWidgetItem(text)
                item.setToolTip(tip)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                if col == 1 and rng is not None and g.zero_frac_mean is not None and not (
                    rng[0] <= g.zero_frac_mean <= rng[1]
                ):
                    item.setForeground(Qt.GlobalColor.red)
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
        layer = self._layer
        offset = self.viewer.dims.ndim - layer.ndim
        hidden = [a - offset for a in self.viewer.dims.not_displayed if a >= offset]
        return hidden[-1] if hidden else 0

    def _current_slice(self) -> int | None:
        axis = self._volume_axis()
        if axis is None:
            return None
        result = self.result
        if result.plan.mode == "slice":
            return result.plan.slice_index
        layer = self._layer
        offset = self.viewer.dims.ndim - layer.ndim
        point = layer.world_to_data(self.viewer.dims.point[offset:])
        return int(np.clip(round(float(point[axis])), 0, result.plan.grid[axis] - 1))

    def _slice_value(self, g: _core.GateStage) -> float | None:
        axis = self._volume_axis()
        if axis is None or self.slice_index is None:
            return None
        if self.result.plan.mode == "slice":
            return g.zero_frac_mean
        return _core.slice_sparsity(g, axis, self.slice_index)

    @guarded("Following the slice")
    def _on_step(self, *_: Any) -> None:
        if self.result is None:
            return
        idx = self._current_slice()
        if idx != self.slice_index:
            self.slice_index = idx
            self._update_numbers()

    # ------------------------------------------------------------------ layers
    def _gate_layer(self, kind: str, stage: int) -> Any:
        info = self.info
        if info is None:
            return None
        for layer in self.viewer.layers:
            m = layer.metadata.get(META) if isinstance(layer.metadata, dict) else None
            if (
                isinstance(m, dict) and m.get("role") == kind and m.get("stage") == stage
                and m.get("source_id") == info.get("source_id")
            ):
                return layer
        return None

    @guarded("Showing the gate layer")
    def _show_layer(self, kind: str, stage: int, on: bool) -> None:
        """Add/update (``on``) or hide the ψ or exact-zero layer of one stage."""
        layer = self._gate_layer(kind, stage)
        result = self.result
        if not on:
            if layer is not None:
                layer.visible = False
            return
        if result is None:
            return
        g = next((g for g in result.gates if g.stage == stage), None)
        values = None if g is None else (g.psi if kind == "psi" else g.zero_map)
        if values is None:
            return
        arr = _core.place(result.plan, values.astype(np.float32),
                          None if layer is None else np.asarray(layer.data))
        info = self.info
        geo = geometry_kwargs(self._layer)
        meta = {**geo["metadata"], META: {
            "role": kind, "stage": stage, "source": info.get("source"),
            "source_id": info.get("source_id"),
        }}
        if layer is not None and layer.ndim == arr.ndim:
            layer.data = arr
            layer.scale, layer.translate = geo["scale"], geo["translate"]
            if geo.get("affine") is not None:
                layer.affine = geo["affine"]
            layer.visible = True
        else:
            if layer is not None:
                self.viewer.layers.remove(layer)
            symbol = "ψ" if kind == "psi" else "zeros"
            self.viewer.add_image(
                arr, name=f"{info.get('source')} {symbol} stage {stage}",
                colormap="magma" if kind == "psi" else "cividis", contrast_limits=(0.0, 1.0),
                opacity=0.7, blending="additive", scale=geo["scale"],
                translate=geo["translate"], affine=geo.get("affine"), metadata=meta,
            )
            # keep the labels on top
            labels = self._layer
            top = len(self.viewer.layers)
            self.viewer.layers.move(self.viewer.layers.index(labels), top)
        box = (self.psi_checks if kind == "psi" else self.zero_checks).get(stage)
        if box is not None and not box.isChecked():
            box.blockSignals(True)
            box.setChecked(True)
            box.blockSignals(False)

    # ------------------------------------------------------------------ plot
    def _draw(self) -> None:
        fig = self.figure
        fig.clear()
        result = self.result
        gates = [] if result is None else [g for g in result.gates]
        if not gates:
            self.canvas.draw_idle()
            return
        fg, bg = _theme_colours(self.viewer)
        fig.set_facecolor(bg)
        n = len(gates)
        grid = fig.add_gridspec(n + 1, 2, height_ratios=[1.3] + [1.0] * n, hspace=0.9,
                                wspace=0.35, left=0.12, right=0.97, top=0.93, bottom=0.06)
        ax = fig.add_subplot(grid[0, :])
        stages = [g.stage for g in gates]
        x = np.arange(n)
        scan = [np.nan if g.zero_frac_mean is None else g.zero_frac_mean * 100 for g in gates]
        slice_vals = [self._slice_value(g) for g in gates]
        has_slice = any(v is not None for v in slice_vals) and result.plan.mode != "slice"
        width = 0.38 if has_slice else 0.6
        ax.bar(x - (width / 2 if has_slice else 0), scan, width, color="#4c9be8",
               label="scan")
        if has_slice:
            ax.bar(x + width / 2, [np.nan if v is None else v * 100 for v in slice_vals], width,
                   color="#f2a541", label=f"slice {self.slice_index}")
        card = self.info.get("card") if self.info else None
        ranges = _core.parse_sparsity_range(getattr(card, "gate_sparsity_range", None))
        for i, g in enumerate(gates):
            if g.stage in ranges:
                lo, hi = ranges[g.stage]
                ax.plot([i, i], [lo * 100, hi * 100], color=fg, lw=2.5, alpha=0.8,
                        label="training range" if i == 0 else None)
        ax.set_xticks(x, [f"stage {s}" for s in stages])
        ax.set_ylim(0, 100)
        ax.set_ylabel("exact zeros of z* (%)", fontsize=8)
        ax.set_title("How much each skip gate removes", fontsize=9)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.4)
        _style(ax, fg, bg)
        c_note_slice = False
        for row, g in enumerate(gates, start=1):
            axc = fig.add_subplot(grid[row, 0])
            c, per_slice = _core.slice_channel_gate(g, self.slice_index)
            c_note_slice = c_note_slice or per_slice
            if c is not None:
                axc.bar(np.arange(len(c)), c, color="#58c48b", width=0.9)
                axc.set_ylim(0, 1)
                where = f"slice {self.slice_index}" if per_slice else (
                    "slice" if result.plan.mode == "slice" else "scan")
                axc.set_title(f"stage {g.stage}: c per channel ({where})", fontsize=8)
            else:
                axc.text(0.5, 0.5, "no channel gate", ha="center", va="center", fontsize=8,
                         color=fg, transform=axc.transAxes)
            axl = fig.add_subplot(grid[row, 1])
            if g.lam is not None:
                axl.bar(np.arange(len(g.lam)), g.lam, color="#c678dd", width=0.9)
                axl.set_title(f"stage {g.stage}: λ per latent channel", fontsize=8)
                if g.zero_frac is not None and len(g.zero_frac) == len(g.lam):
                    tw = axl.twinx()
                    tw.plot(np.arange(len(g.zero_frac)), g.zero_frac, "o", ms=2.5,
                            color="#f2a541")
                    tw.set_ylim(0, 1.05)
                    tw.tick_params(labelsize=6, colors=fg)
                    if row == 1:
                        tw.set_ylabel("zeros", fontsize=7, color="#f2a541")
                    for side in tw.spines.values():
                        side.set_color(fg)
            else:
                axl.text(0.5, 0.5, "no sparse gate", ha="center", va="center", fontsize=8,
                         color=fg, transform=axl.transAxes)
            for a in (axc, axl):
                _style(a, fg, bg)
        if len(result.plan.grid) == 3 and result.plan.mode == "image":
            self.note_label.setText(
                "c is one vector for the whole volume: a 3D model's channel gate pools over "
                "each 3D tile. The exact-zero numbers follow the current slice."
            )
        elif c_note_slice:
            self.note_label.setText("c and the exact zeros follow the current slice.")
        elif result.plan.mode == "slice":
            self.note_label.setText(f"Gates of slice {result.plan.slice_index} (the slice "
                                    "that was segmented).")
        else:
            self.note_label.setText("")
        self.note_label.setVisible(bool(self.note_label.text()))
        self.canvas.setMinimumHeight(150 * (n + 1))
        self.canvas.draw_idle()


def _uid(layer: Any) -> str:
    """A layer's lasting identity (napari hands plugins proxies: ``id()`` changes)."""
    return str(layer.unique_id)


def _theme_colours(viewer: Any) -> tuple[str, str]:
    try:
        from napari.utils.theme import get_theme

        theme = get_theme(viewer.theme)
        return theme.text.as_hex(), theme.background.as_hex()
    except Exception:  # any theme trouble: plain black on white
        return "#000000", "#ffffff"


def _style(ax: Any, fg: str, bg: str) -> None:
    ax.set_facecolor(bg)
    ax.tick_params(labelsize=6, colors=fg)
    ax.title.set_color(fg)
    ax.yaxis.label.set_color(fg)
    ax.xaxis.label.set_color(fg)
    for side in ax.spines.values():
        side.set_color(fg)
