"""Segment widget: an image layer + a model -> a Labels layer (and optional maps).

The run happens in napari's ``thread_worker`` (napari stays responsive) with a progress bar
and a Cancel button; the viewer is touched only on the main thread, once the result is
complete, so an error or a cancel leaves every layer as it was. Running again on the same
image updates its output layers instead of adding new ones.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..inference.device import DEVICES
from . import _core
from ._common import (
    META,
    ModelChooser,
    Relay,
    WorkerHost,
    compact_combo,
    geometry_kwargs,
    guarded,
    heading,
    hub_for,
    layer_spacing_mm,
    notify_error,
    notify_info,
    notify_warning,
)

SCOPE_LABELS = {"whole": "Whole image / volume", "slice": "Current slice"}
#: Roles of the layers this plugin adds (never offered as inputs).
OUTPUT_ROLES = ("labels", "probability", "uncertainty", "psi", "zeros")


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
        last_result: the last :class:`~._core.SegResult` placed into layers.
    """

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self._init_worker_host()
        self.last_result: _core.SegResult | None = None
        self.last_labels: Labels | None = None
        self._t0 = 0.0
        self._succeeded = False
        self._relay = Relay()
        self._relay.progress.connect(self._on_progress)

        self.image_combo = compact_combo(QComboBox())
        self.image_combo.setToolTip("The image layer to segment (2D grey or colour, or a volume)")
        self.scope_combo = QComboBox()
        for key, text in SCOPE_LABELS.items():
            self.scope_combo.addItem(text, key)
        self.scope_combo.setToolTip(
            "Whole: the full image, or every slice of a volume. Current slice: only the slice "
            "shown (2D models); its result goes into the volume's label layer."
        )
        self.model = ModelChooser()
        self.device_combo = QComboBox()
        for d in DEVICES:
            self.device_combo.addItem(d, d)
        self.device_combo.setToolTip("auto: CUDA GPU, else Apple MPS, else the CPU")
        self.tta_check = QCheckBox("Test-time augmentation (flips)")
        self.tta_check.setToolTip("Average over mirrored copies: slower, steadier")
        self.prob_check = QCheckBox("Probability layers")
        self.unc_check = QCheckBox("Uncertainty layer (needs TTA)")
        self.unc_check.setToolTip("Where the mirrored predictions disagree; turns TTA on")
        self.gates_check = QCheckBox("Keep gate maps for the Gate inspector")
        self.gates_check.setChecked(True)
        self.gates_check.setToolTip("ψ and exact-zero maps of every decoder stage (memory)")
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Segment", self.scope_combo)
        form.addRow("Device", self.device_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(heading("Model"))
        lay.addWidget(self.model)
        for w in (self.tta_check, self.prob_check, self.unc_check, self.gates_check):
            lay.addWidget(w)
        lay.addLayout(buttons)
        lay.addWidget(self.progress_bar)
        lay.addWidget(self.status_label)
        lay.addStretch(1)
        self.setMinimumWidth(340)

        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(self.cancel)
        self.unc_check.toggled.connect(self._on_unc)
        self.tta_check.toggled.connect(self._on_tta)
        self.image_combo.currentIndexChanged.connect(self._on_image)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layers)
        events.removed.connect(self._refresh_layers)
        events.reordered.connect(self._refresh_layers)
        events.inserted.connect(self._watch_name)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ layers
    def image_layers(self) -> list[Image]:
        return [
            layer for layer in self.viewer.layers
            if isinstance(layer, Image)
            and (layer.metadata.get(META) or {}).get("role") not in OUTPUT_ROLES
        ]

    def current_image(self) -> Image | None:
        name = self.image_combo.currentData()
        for layer in self.image_layers():
            if layer.name == name:
                return layer
        return None

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh_layers)

    def _refresh_layers(self, *_: Any) -> None:
        keep = self.image_combo.currentData()
        layers = self.image_layers()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for layer in layers:
            self.image_combo.addItem(layer.name, layer.name)
        names = [layer.name for layer in layers]
        if keep in names:
            self.image_combo.setCurrentIndex(names.index(keep))
        elif layers:  # the newest image layer
            self.image_combo.setCurrentIndex(len(layers) - 1)
        self.image_combo.blockSignals(False)
        self._on_image()

    def _on_image(self, *_: Any) -> None:
        layer = self.current_image()
        is_volume = layer is not None and layer.ndim >= 3
        item = self.scope_combo.model().item(self.scope_combo.findData("slice"))
        item.setEnabled(is_volume)
        if not is_volume and self.scope_combo.currentData() == "slice":
            self.scope_combo.setCurrentIndex(self.scope_combo.findData("whole"))

    def _on_unc(self, on: bool) -> None:
        if on and not self.tta_check.isChecked():
            self.tta_check.setChecked(True)

    def _on_tta(self, on: bool) -> None:
        if not on and self.unc_check.isChecked():
            self.unc_check.setChecked(False)

    # ------------------------------------------------------------------ running
    def _plan(self, layer: Image, card: Any) -> _core.InputPlan:
        point = None
        axis = 0
        if layer.ndim >= 3:
            offset = self.viewer.dims.ndim - layer.ndim
            hidden = [a - offset for a in self.viewer.dims.not_displayed if a >= offset]
            axis = hidden[-1] if hidden else 0
            point = layer.world_to_data(self.viewer.dims.point[offset:])
        return _core.plan_input(
            layer.data, rgb=bool(layer.rgb), spatial_dims=card.spatial_dims,
            scope=self.scope_combo.currentData(), point=point, slice_axis=axis,
            spacing=layer_spacing_mm(layer), multiscale=bool(layer.multiscale),
        )

    def _request(self) -> dict[str, Any] | None:
        """Check the choices on the main thread; None (after a notification) if unusable."""
        layer = self.current_image()
        if layer is None:
            notify_error(
                "there is no image layer to segment: open an image first (File > Open, or "
                "File > Open Sample > ProSMA-UNet)"
            )
            return None
        spec = self.model.current_spec()
        card = self.model.current_card()
        if spec is None:
            notify_error("no model is chosen: pick one, or add a checkpoint file with 'File…'")
            return None
        if card is None:
            notify_error(f"the chosen model cannot be used: {self.model.card_text.toPlainText()}")
            return None
        try:
            plan = self._plan(layer, card)
        except Exception as exc:
            notify_error(exc)
            return None
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
        self._new_cancel()
        self._t0 = time.perf_counter()
        self.status_label.setText(f"Segmenting {req['plan'].describe()}…")
        if sync:
            try:
                card, result = _compute(req, self._cancel, None)
            except Exception as exc:
                self._on_error(exc)
                return None
            self._apply(req, card, result)
            return result
        return self._start_worker(req)

    def _start_worker(self, req: dict[str, Any]) -> Any:
        self._succeeded = False
        self.progress_bar.setRange(0, 0)  # busy until the first tile batch reports
        return self._launch(_compute, req, "ProSMA segmentation", total=0)

    def _on_returned(self, out: tuple[Any, _core.SegResult]) -> None:
        self._succeeded = True
        self._apply(self._req, *out)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(int(done))
        if self._pbar is not None:
            if self._pbar.total != total:
                self._pbar.total = int(total)
            step = int(done) - int(self._pbar.n)
            if step > 0:
                self._pbar.update(step)

    CANCELLED = ("Cancelled; nothing was changed.", "segmentation cancelled; no layer was changed")

    def _on_finished(self) -> None:
        super()._on_finished()
        # a finished run shows a full bar; a cancelled or failed one an empty bar
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self._succeeded else 0)

    # ------------------------------------------------------------------ results
    @guarded("Placing the result in layers")
    def _apply(self, req: dict[str, Any], card: Any, result: _core.SegResult) -> None:
        """Put a finished result into layers (main thread). Builds every array first, then
        changes the layers, so nothing is half-updated."""
        image: Image = req["layer"]
        if _uid(image) not in {_uid(layer) for layer in self.viewer.layers}:
            notify_warning(f"the layer {image.name!r} was removed during the run; result dropped")
            return
        plan = result.plan
        geo = geometry_kwargs(image)
        source = {"source": image.name, "source_id": _uid(image)}
        outputs: list[tuple[str, str, np.ndarray, dict[str, Any]]] = []

        labels_layer = self._find(image, "labels")
        labels = _core.place(plan, result.labels, _data_or_none(labels_layer))
        if labels is result.labels:  # the layer gets painted on: keep the prediction intact
            labels = labels.copy()
        outputs.append(("labels", f"{image.name} labels", labels, {}))
        if req["probabilities"] and result.probabilities is not None:
            for k in range(1, result.probabilities.shape[0]):
                cls = _core.class_name(result.class_names, k)
                old = self._find(image, "probability", cls)
                arr = _core.place(plan, result.probabilities[k].astype(np.float32),
                                  _data_or_none(old))
                outputs.append(("probability", f"{image.name} P({cls})", arr, {"class": cls}))
        if req["uncertainty"] and result.uncertainty is not None:
            old = self._find(image, "uncertainty")
            arr = _core.place(plan, result.uncertainty.astype(np.float32), _data_or_none(old))
            outputs.append(("uncertainty", f"{image.name} uncertainty", arr, {}))

        produced = set()
        for role, name, arr, extra in outputs:
            info = {"role": role, **source, **extra}
            if role == "labels":
                info.update(result=result, card=card, model=req["spec"])
            layer = self._find(image, role, extra.get("class"))
            meta = {**geo["metadata"], META: info}
            if layer is not None and layer.ndim == arr.ndim:
                layer.data = arr
                layer.scale, layer.translate = geo["scale"], geo["translate"]
                if geo.get("affine") is not None:
                    layer.affine = geo["affine"]
                layer.metadata = {**layer.metadata, **meta}
                if role != "labels":
                    layer.reset_contrast_limits()
            else:
                if layer is not None:
                    self.viewer.layers.remove(layer)
                kw = {"name": name, "scale": geo["scale"], "translate": geo["translate"],
                      "affine": geo.get("affine"), "metadata": meta}
                if role == "labels":
                    layer = self.viewer.add_labels(arr, **kw)
                elif role == "probability":
                    layer = self.viewer.add_image(
                        arr, colormap="viridis", contrast_limits=(0.0, 1.0), opacity=0.6,
                        blending="additive", visible=False, **kw,
                    )
                else:
                    hi = float(arr.max()) if arr.size and arr.max() > 0 else 1.0
                    layer = self.viewer.add_image(
                        arr, colormap="inferno", contrast_limits=(0.0, hi), opacity=0.7,
                        blending="additive", visible=False, **kw,
                    )
            produced.add(_uid(layer))
            if role == "labels":
                self.last_labels = layer
        # maps from an earlier run that were not asked for this time would be stale
        for layer in list(self.viewer.layers):
            info = layer.metadata.get(META) if isinstance(layer.metadata, dict) else None
            if (
                isinstance(info, dict) and info.get("role") in ("probability", "uncertainty")
                and self._same_source(info, image) and _uid(layer) not in produced
            ):
                self.viewer.layers.remove(layer)
        labels_layer = self.last_labels
        top = len(self.viewer.layers) - 1
        if labels_layer is not None and self.viewer.layers.index(labels_layer) != top:
            self.viewer.layers.move(self.viewer.layers.index(labels_layer), top + 1)
        if labels_layer is not None:  # ready for corrections
            self.viewer.layers.selection.active = labels_layer
        self.last_result = result
        self._report(result, card)
        hub_for(self.viewer).result_ready.emit(labels_layer)

    def _report(self, result: _core.SegResult, card: Any) -> None:
        n = int(np.count_nonzero(result.labels))
        took = time.perf_counter() - self._t0
        lines = [
            f"Done: {result.plan.describe()} in {took:.1f} s on {result.device}; "
            f"{n} foreground pixel(s)."
        ]
        lines += [f"Note: {note}." for note in result.notes]
        warnings = _core.sparsity_warnings(card.gate_sparsity_range, result.gates)
        lines += [f"Warning: {w}." for w in warnings]
        self.status_label.setText("\n".join(lines))
        for w in warnings:
            notify_warning(w)

    def _same_source(self, info: dict[str, Any], image: Image) -> bool:
        return info.get("source_id") == _uid(image) or (
            info.get("source") == image.name and "source_id" not in info
        )

    def _find(self, image: Image, role: str, cls: str | None = None) -> Any:
        for layer in self.viewer.layers:
            info = layer.metadata.get(META) if isinstance(layer.metadata, dict) else None
            if (
                isinstance(info, dict) and info.get("role") == role
                and self._same_source(info, image)
                and (cls is None or info.get("class") == cls)
            ):
                return layer
        return None


def _uid(layer: Any) -> str:
    """A layer's lasting identity (napari hands plugins proxies: ``id()`` changes)."""
    return str(layer.unique_id)


def _data_or_none(layer: Any) -> np.ndarray | None:
    return None if layer is None else np.asarray(layer.data)


def _compute(req: dict[str, Any], cancel: threading.Event, progress: Any) -> tuple[Any, Any]:
    """The worker's job: load the model (cached), segment. No viewer access here."""
    from ..inference import Cancelled

    if cancel.is_set():
        raise Cancelled()
    model, card = _core.get_model(req["spec"], req["device"])
    if cancel.is_set():
        raise Cancelled()
    result = _core.run_segmentation(
        req["plan"], model, card, device=req["device"], tta=req["tta"],
        probabilities=req["probabilities"], gates=req["gates"], progress=progress,
        cancel=cancel,
    )
    return card, result
