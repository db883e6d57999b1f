"""Segment widget: an image layer + a model -> a Labels layer (and optional maps).

The run happens in napari's ``thread_worker`` (napari stays responsive) with a progress bar
and a Cancel button; the viewer is touched only on the main thread, once the result is
complete, so an error or a cancel leaves every layer as it was. Running again on the same
image updates its output layers instead of adding new ones, except a labels layer the user
edited: that one is kept and the result goes to a new layer (:mod:`._layers`). A placed
result is announced on the viewer's hub (``result_ready``), where the Gate inspector
picks it up.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QMessageBox,
    QVBoxLayout,
    QWidget,
)

from .. import preflight, report
from ..inference.plan import InputPlan, SegResult
from . import _layers, _tooltips
from ._chooser import ModelChooser, follow_active_model
from ._common import (
    Relay,
    WorkerHost,
    announce,
    button_row,
    compact_combo,
    device_combo,
    fill_combo,
    guarded,
    heading,
    hub_for,
    notify_error,
    notify_info,
    notify_warning,
    run_controls,
    segment_job,
    watch_layers,
)
from ._layers import OUTPUT_ROLES  # noqa: F401  (re-exported)
from ._placing import place_result

#: The worker's job (kept under this name for scripts and tests).
_compute = segment_job


class SegmentWidget(WorkerHost, QWidget):
    """Segment an image layer with a ProSMA-UNet model.

    Attributes (the controls, for scripting and tests):
        image_combo: the image layer to segment.
        scope_combo: ``"whole"`` or ``"slice"`` (current slice of a volume, 2D models).
        model: :class:`ModelChooser` (bundled / fine-tuned / file; shows the card).
        device_combo: auto / cuda / mps / cpu.
        tta_check: flip test-time augmentation (slower, steadier, gives uncertainty).
        prob_check, unc_check, gates_check: which extra outputs to produce.
        run_button, cancel_button, progress_bar, status_label.
        worker: the running worker, or None.
        last_result: the last :class:`~napari_prosma.inference.plan.SegResult` this widget
            placed into layers; last_labels: its labels layer.
    """

    CANCELLED = ("Cancelled; nothing was changed.", "segmentation cancelled; no layer was changed")

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self._init_worker_host()
        self.last_result: SegResult | None = None
        self.last_labels: Labels | None = None
        self._t0 = 0.0
        self._succeeded = False
        self._relay = Relay()
        self._relay.progress.connect(self._on_progress)
        self._build()
        self.unc_check.toggled.connect(self._on_unc)
        self.tta_check.toggled.connect(self._on_tta)
        self.image_combo.currentIndexChanged.connect(self._on_image)
        follow_active_model(self.model, self.viewer)
        self.model.model_changed.connect(self._ct_window)
        watch_layers(self.viewer, self._refresh_layers)
        self._refresh_layers()

    def _build(self) -> None:
        tips = _tooltips.SEGMENT
        self.image_combo = compact_combo(QComboBox())
        self.image_combo.setToolTip(tips["image"])
        self.scope_combo = QComboBox()
        for key, text in _tooltips.SCOPE_LABELS.items():
            self.scope_combo.addItem(text, key)
        self.scope_combo.setToolTip(tips["scope"])
        self.model = ModelChooser()
        self.device_combo = device_combo()
        self.tta_check = QCheckBox("Test-time augmentation (flips)")
        self.tta_check.setToolTip(tips["tta"])
        self.prob_check = QCheckBox("Probability layers")
        self.unc_check = QCheckBox("Uncertainty layer (needs TTA)")
        self.unc_check.setToolTip(tips["uncertainty"])
        self.gates_check = QCheckBox("Keep gate maps for the Gate inspector")
        self.gates_check.setChecked(True)
        self.gates_check.setToolTip(tips["gates"])
        run_controls(self, "Run")
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.legend_label = QLabel("")
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        self.legend_label.setWordWrap(True)
        self.legend_label.setToolTip(
            "Colours of the result: warm colours for the model's prediction, cool colours "
            "for ground truth and your corrections"
        )
        self._estimate: preflight.RunEstimate | None = None

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Segment", self.scope_combo)
        form.addRow("Device", self.device_combo)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(heading("Model"))
        lay.addWidget(self.model)
        for w in (self.tta_check, self.prob_check, self.unc_check, self.gates_check):
            lay.addWidget(w)
        lay.addLayout(button_row(self.run_button, self.cancel_button))
        lay.addWidget(self.progress_bar)
        lay.addWidget(self.status_label)
        lay.addWidget(self.legend_label)
        lay.addStretch(1)
        self.setMinimumWidth(340)

    # ------------------------------------------------------------------ layers
    def image_layers(self) -> list[Image]:
        return _layers.image_layers(self.viewer)

    def current_image(self) -> Image | None:
        return _layers.by_name(self.image_layers(), self.image_combo.currentData())

    def _refresh_layers(self, *_: Any) -> None:
        names = [layer.name for layer in self.image_layers()]
        fill_combo(self.image_combo, names, self.image_combo.currentData())
        self._on_image()

    def _on_image(self, *_: Any) -> None:
        layer = self.current_image()
        is_volume = layer is not None and layer.ndim >= 3
        item = self.scope_combo.model().item(self.scope_combo.findData("slice"))
        item.setEnabled(is_volume)
        if not is_volume and self.scope_combo.currentData() == "slice":
            self.scope_combo.setCurrentIndex(self.scope_combo.findData("whole"))
        self.model.suit(_layers.kind_of(layer))
        self._ct_window()

    def _ct_window(self, *_: Any) -> None:
        """A CT shown in the reader's soft-tissue window takes the chosen model's CT window
        when its card has one (a window the user set is left alone)."""
        layer = self.current_image()
        meta = getattr(layer, "metadata", None) or {}
        preset = meta.get("ct_window")
        if layer is None or preset is None:
            return
        if not np.allclose(layer.contrast_limits, preset):
            return
        window = report.ct_window(self.model.current_card())
        layer.contrast_limits = window
        layer.metadata["ct_window"] = list(window)

    def _on_unc(self, on: bool) -> None:
        if on and not self.tta_check.isChecked():
            self.tta_check.setChecked(True)

    def _on_tta(self, on: bool) -> None:
        if not on and self.unc_check.isChecked():
            self.unc_check.setChecked(False)

    # ------------------------------------------------------------------ running
    def _plan(self, layer: Image, card: Any) -> InputPlan:
        return _layers.plan_for(self.viewer, layer, card, self.scope_combo.currentData())

    def _request(self) -> dict[str, Any] | None:
        """Check the choices on the main thread; None (after a notification) if unusable."""
        layer = self.current_image()
        if layer is None:
            return self._refuse(
                "there is no image layer to segment: open an image first (File > Open, or "
                "File > Open Sample > ProSMA-UNet)"
            )
        spec = self.model.current_spec()
        card = self.model.current_card()
        if spec is None:
            return self._refuse(
                "no model is chosen: pick one, or add a checkpoint file with 'File…'"
            )
        if card is None:
            return self._refuse(
                f"the chosen model cannot be used: {self.model.card_text.toPlainText()}"
            )
        try:
            plan = self._plan(layer, card)
        except Exception as exc:
            return self._refuse(exc)
        return {
            "layer": layer,
            "spec": spec,
            "plan": plan,
            "device": self.device_combo.currentData(),
            "tta": self.tta_check.isChecked() or self.unc_check.isChecked(),
            "probabilities": self.prob_check.isChecked(),
            "uncertainty": self.unc_check.isChecked(),
            "gates": self.gates_check.isChecked(),
        }

    def _refuse(self, why: BaseException | str) -> None:
        """A run that cannot start: one plain notification, and a status line that says so
        (not the last run's "Done")."""
        text = notify_error(why)
        self.status_label.setText(f"Failed: {text}")
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)

    def run(self, sync: bool = False) -> Any:
        """Segment the chosen image: in a worker (default) or on this thread (``sync``).

        Returns the worker (async), the result (sync), or None when nothing was started.
        """
        if self.is_running:
            notify_info("a segmentation is already running; wait for it or cancel it")
            return None
        req = self._request()
        if req is None:
            return None
        warning = self._warning(req)
        if warning and not self.confirm(warning):
            self.status_label.setText("Not run: " + warning.removeprefix("Before running: "))
            return None
        self._new_cancel()
        self._t0 = time.perf_counter()
        self.status_label.setText(f"Segmenting {req['plan'].describe()}: {self._phase(0, 0)}")
        if sync:
            try:
                card, result = _compute(req, self._cancel, None)
            except Exception as exc:
                self._on_error(exc)
                return None
            self._apply(req, card, result)
            return result
        self._succeeded = False
        self.progress_bar.setRange(0, 0)  # busy until the first tile batch reports
        return self._launch(_compute, req, "ProSMA segmentation", total=0)

    def confirm(self, text: str) -> bool:
        """Ask the user whether to go on (tests replace this with an answer)."""
        box = QMessageBox.question(
            self,
            "ProSMA: before running",
            text + "\n\nRun anyway?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return box == QMessageBox.StandardButton.Yes

    def _warning(self, req: dict[str, Any]) -> str:
        """What the user should know before this run ("" when nothing), with its estimate
        kept for the progress line."""
        plan, card = req["plan"], self.model.current_card()
        axis = plan.slice_axis or 0
        grid = plan.grid
        if plan.mode != "image":  # one slice at a time
            grid = tuple(n for i, n in enumerate(plan.grid) if i != axis)
        n = plan.grid[axis] if plan.mode == "slices" else 1
        try:
            self._estimate = preflight.estimate_run(
                card,
                grid,
                plan.spacing,
                device=_device_kind(req["device"]),
                tta=req["tta"],
                n_images=n,
            )
        except Exception:  # the engine says what is wrong when it runs
            self._estimate = None
            return ""
        is_ct = report.looks_like_ct(plan.data)
        return preflight.run_warning(card, grid, plan.spacing, self._estimate, image_is_ct=is_ct)

    def _phase(self, done: int, total: int) -> str:
        """What the run is doing now, with the time left when it can be told."""
        est = self._estimate
        if total <= 0 or done <= 0:
            if est is not None and est.notes and "resampled" in " ".join(est.notes):
                return f"resampling to {'×'.join(map(str, est.work_shape))} voxels…"
            return "preparing…"
        if done >= total:
            return "stitching the tiles and putting the result back on the image's grid…"
        spent = time.perf_counter() - self._t0
        left = spent / done * (total - done)
        return f"tile batch {done}/{total}, about {preflight.fmt_seconds(left)} left"

    def _on_returned(self, out: tuple[Any, SegResult]) -> None:
        self._succeeded = True
        self._apply(self._req, *out)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))
        if self.is_running:
            self.status_label.setText(f"Segmenting: {self._phase(int(done), int(total))}")
        if self._pbar is not None:
            if self._pbar.total != total:
                self._pbar.total = int(total)
            step = int(done) - int(self._pbar.n)
            if step > 0:
                self._pbar.update(step)

    def _on_finished(self) -> None:
        super()._on_finished()
        # a finished run shows a full bar; a cancelled or failed one an empty bar
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self._succeeded else 0)

    # ------------------------------------------------------------------ results
    @guarded("Placing the result in layers")
    def _apply(self, req: dict[str, Any], card: Any, result: SegResult) -> None:
        """Put a finished result into layers (main thread) and announce it on the hub."""
        image: Image = req["layer"]
        if _layers.uid(image) not in {_layers.uid(layer) for layer in self.viewer.layers}:
            notify_warning(f"the layer {image.name!r} was removed during the run; result dropped")
            return
        placed = place_result(self.viewer, req, card, result)
        self.last_labels, self.last_result = placed.labels, result
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)  # done (a run on this thread reports no progress)
        took = time.perf_counter() - self._t0
        if self._estimate is not None:
            # the engine's own time (model loading excluded)
            preflight.record_rate(result.device, self._estimate.tile_voxels, result.seconds or took)
        info = _layers.info_of(placed.labels) or {}
        names = info.get("class_names") or result.class_names
        sizes = report.measure_classes(
            np.asarray(placed.labels.data), names, _layers.spacing_of(image)
        )
        lines = [
            f"Done: {result.plan.describe()} in {took:.1f} s on {result.device}. "
            f"{report.measures_summary(sizes)}."
        ]
        self.status_label.setText("\n".join(lines + announce(result, card, placed)))
        self.legend_label.setText(legend_html(names, info.get("made_by")))
        hub_for(self.viewer).publish(placed.labels, result, card, req["spec"])


def legend_html(names: list[str], made_by: Any) -> str:
    """The legend of a result: one colour swatch per class (prediction colours), the
    colours of ground truth / corrections, and what made it."""
    n = max(len(names), 2)
    pred, truth = report.class_colours(n), report.class_colours(n, "truth")
    names = report.class_names_for(names, n)
    sw = '<span style="color:{c}">&#9632;</span>'
    rows = [f"{sw.format(c=report.hex_colour(pred[k]))} {names[k]}" for k in range(1, n)]
    gt = "".join(sw.format(c=report.hex_colour(truth[k])) for k in range(1, n))
    text = "Prediction: " + ", ".join(rows) + f"<br>{gt} ground truth / your corrections"
    if isinstance(made_by, dict):
        text += f"<br><small>{report.provenance_text(made_by)}</small>"
    return text


def _device_kind(device: str) -> str:
    """``"cpu"`` or ``"gpu"`` for an estimate (``auto`` is a GPU only when torch, already
    loaded, sees one: the main thread never loads torch for this)."""
    import sys

    if device in ("cuda", "mps"):
        return "gpu"
    torch = sys.modules.get("torch")
    if device == "auto" and torch is not None and torch.cuda.is_available():
        return "gpu"
    return "cpu"
