"""Fine-tune widget: teach the model from the user's corrected labels, in one click.

The user segments an image (Segment widget), corrects the labels layer (paint, erase), and
presses **Fine-tune**. :func:`napari_prosma.finetune.run_finetune` runs in napari's
``thread_worker`` with the last prediction of that image as ``previous`` (so only what was
corrected counts; for a volume, only the corrected slices), a live plot of the training
loss and the held-out Dice, and a Cancel button. The corrections are saved into the model
store before training starts; the new model is a new version, never written over its
parent. When the held-out Dice did not drop, the new version becomes the active model in
every model chooser and the image is segmented again with it (the corrected layer is kept,
renamed ``<image> corrected``, and is never modified); when it dropped, a warning says so
and the parent stays active, with a button to activate the new version anyway. The list
of versions shows each one's held-out Dice before → after and its date, with Activate and
Revert to parent.

"Replay training images" mixes a few of the parent's own training images
into every batch (:mod:`napari_prosma.replay`) when they are on this computer; the line
under it says whether they were found. "Slices along" picks the volume axis of the
corrected slices (by default the axis the viewer steps through, as in Segment).

Nothing here touches the viewer outside the main thread; the user's labels are copied on
the main thread before the run starts.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import QObject, Qt
from qtpy.QtCore import Signal as QtSignal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..inference.device import DEVICES
from . import _core
from ._common import (
    META,
    ModelChooser,
    WorkerHost,
    compact_combo,
    guarded,
    heading,
    layer_spacing_mm,
    notify_error,
    notify_info,
    notify_warning,
    plot_canvas,
)
from .segment import OUTPUT_ROLES, SegmentWidget

#: What to train: engine key -> label (see ``napari_prosma.finetune.TRAINABLE``).
TRAINABLE_LABELS = {
    "decoder_gates": "Decoder and gates",
    "all": "Everything",
    "gates": "Gates only",
}
TRAINABLE_TIPS = {
    "decoder_gates": "The upsampling path, the skip gates, the decoder and the output head; "
    "the encoder stays as it was (a good default)",
    "all": "Every weight: adapts most, forgets most; needs more corrected images",
    "gates": "Only the ProSMA skip gates (θ, W_x, W_g, f_ms, ψ and the channel gate): "
    "the smallest change",
}
VERSION_COLUMNS = ("Version", "Held-out Dice", "Date", "Parent")
#: Metadata role of a labels layer kept for its corrections after a re-segmentation.
CORRECTED_ROLE = "corrected"


class _Relay(QObject):
    """Carries :class:`~napari_prosma.finetune.FinetuneProgress` to the main thread."""

    progress = QtSignal(object)


class FinetuneWidget(WorkerHost, QWidget):
    """Fine-tune a model on the corrected labels of an image.

    Attributes (the controls, for scripting and tests):
        image_combo, labels_combo: the image and the labels layer with the corrections.
        others_check: also learn from the other images' corrected Segment labels.
        axis_combo: the volume axis of the corrected slices (``"auto"``: the viewer's
            slicing axis, else 0, 1 or 2).
        replay_check, replay_label: replay base-model samples when available, and whether
            they were found for the chosen model.
        model: :class:`ModelChooser` (the model to start from).
        trainable_combo: ``"decoder_gates"``, ``"all"`` or ``"gates"``.
        steps_spin, time_spin: budget (optimiser steps at most; seconds at most, 0 = none).
        device_combo: auto / cuda / mps / cpu.
        run_button ("Fine-tune"), cancel_button, progress_bar, status_label.
        activate_anyway_button: shown when the regression guard kept the parent active.
        figure, canvas, loss_line, dice_line: the live plot.
        versions_table, activate_button, revert_button, store_label: the model versions.
        store_dir: the model store folder (None: ``$PROSMA_MODEL_DIR`` or the user data
            folder, the one the model choosers list).
        extra_config: more :class:`~napari_prosma.finetune.FinetuneConfig` fields
            (e.g. ``{"lr": 1e-3, "eval_every": 10}``).
        worker: the running worker, or None. history: the progress reports of the last run.
        last_result, last_version: the last finished run and its version id.
        resegment_widget: the Segment widget used to show the new model's result.
    """

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.store_dir: str | os.PathLike[str] | None = None
        self.extra_config: dict[str, Any] = {}
        self._init_worker_host()
        self.history: list[Any] = []
        self.last_result: Any = None
        self.last_version: str | None = None
        self.resegment_widget: SegmentWidget | None = None
        self._own_segmenter: SegmentWidget | None = None
        self._last_req: dict[str, Any] = {}
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)

        # -- inputs
        self.image_combo = compact_combo(QComboBox())
        self.image_combo.setToolTip("The image whose labels you corrected")
        self.labels_combo = compact_combo(QComboBox())
        self.labels_combo.setToolTip(
            "The labels layer with your corrections (usually '<image> labels' made by the "
            "Segment widget, after you painted and erased). It is never modified."
        )
        self.others_check = QCheckBox("Also learn from other corrected images")
        self.others_check.setToolTip(
            "Add the Segment labels of the other open images that you corrected (those that "
            "differ from their prediction)"
        )
        self.axis_combo = QComboBox()
        self.axis_combo.addItem("the viewer's slicing axis", "auto")
        for a in range(3):
            self.axis_combo.addItem(f"axis {a}", a)
        self.axis_combo.setToolTip(
            "For volumes: the axis along which your corrected slices are found (the one you "
            "step through with the slider, unless you choose another)"
        )
        self.model = ModelChooser()
        self.model.card_text.setMaximumHeight(80)
        self.replay_check = QCheckBox("Replay training images")
        self.replay_check.setChecked(True)
        self.replay_check.setToolTip(
            "Mix a few of the images the model was first trained on into every training "
            "batch (a quarter of it), so that it forgets less of what it knew; used only "
            "when those images are on this computer ($PROSMA_DATA)"
        )
        self.replay_label = QLabel("")
        self.replay_label.setWordWrap(True)
        self.trainable_combo = QComboBox()
        for key, text in TRAINABLE_LABELS.items():
            self.trainable_combo.addItem(text, key)
            self.trainable_combo.setItemData(
                self.trainable_combo.count() - 1, TRAINABLE_TIPS[key], Qt.ItemDataRole.ToolTipRole
            )
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(300)
        self.steps_spin.setToolTip("Optimiser steps at most (training stops early when the "
                                   "held-out Dice stops improving)")
        self.time_spin = QSpinBox()
        self.time_spin.setRange(0, 24 * 3600)
        self.time_spin.setValue(120)
        self.time_spin.setSuffix(" s")
        self.time_spin.setSpecialValueText("no limit")
        self.time_spin.setToolTip("Stop after this many seconds (0: no limit)")
        self.device_combo = QComboBox()
        for d in DEVICES:
            self.device_combo.addItem(d, d)
        self.device_combo.setToolTip("auto: CUDA GPU, else Apple MPS, else the CPU")

        # -- running
        self.run_button = QPushButton("Fine-tune")
        self.run_button.setToolTip(
            "Train a new version of the model on your corrections; the model you start from "
            "is kept"
        )
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("Segment an image, correct its labels, then fine-tune.")
        self.status_label.setWordWrap(True)
        self.activate_anyway_button = QPushButton("Activate the new model anyway")
        self.activate_anyway_button.setVisible(False)

        # -- plot
        self.figure, self.canvas = plot_canvas((4.0, 3.0), min_height=220)
        self._setup_plot()

        # -- versions
        self.versions_table = QTableWidget(0, len(VERSION_COLUMNS))
        self.versions_table.setHorizontalHeaderLabels(VERSION_COLUMNS)
        self.versions_table.verticalHeader().setVisible(False)
        self.versions_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.versions_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.versions_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        header = self.versions_table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        self.versions_table.setMinimumHeight(110)
        self.activate_button = QPushButton("Activate")
        self.activate_button.setToolTip("Make the selected version the active model")
        self.revert_button = QPushButton("Revert to parent")
        self.revert_button.setToolTip(
            "Make the model the selected version (else the active one) was trained from the "
            "active model again"
        )
        self.store_label = QLabel("")
        self.store_label.setWordWrap(True)
        self.store_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        # -- layout
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("", self.others_check)
        budget = QFormLayout()
        budget.addRow("Train", self.trainable_combo)
        budget.addRow("Slices along", self.axis_combo)
        budget.addRow("", self.replay_check)
        budget.addRow("", self.replay_label)
        budget.addRow("Steps at most", self.steps_spin)
        budget.addRow("Time at most", self.time_spin)
        budget.addRow("Device", self.device_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.cancel_button)
        vbuttons = QHBoxLayout()
        vbuttons.addWidget(self.activate_button)
        vbuttons.addWidget(self.revert_button)
        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.addLayout(form)
        lay.addWidget(heading("Start from model"))
        lay.addWidget(self.model)
        lay.addLayout(budget)
        lay.addLayout(buttons)
        lay.addWidget(self.progress_bar)
        lay.addWidget(self.status_label)
        lay.addWidget(self.activate_anyway_button)
        lay.addWidget(heading("Training loss and held-out Dice"))
        lay.addWidget(self.canvas, 1)
        lay.addWidget(heading("Versions"))
        lay.addWidget(self.versions_table)
        lay.addLayout(vbuttons)
        lay.addWidget(self.store_label)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(360)

        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(self.cancel)
        self.activate_anyway_button.clicked.connect(lambda: self._activate_anyway())
        self.activate_button.clicked.connect(lambda: self.activate_version())
        self.revert_button.clicked.connect(lambda: self.revert_to_parent())
        self.image_combo.currentIndexChanged.connect(self._on_image)
        self.model.model_changed.connect(self._update_replay)
        self.replay_check.toggled.connect(self._update_replay)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layers)
        events.removed.connect(self._refresh_layers)
        events.reordered.connect(self._refresh_layers)
        events.inserted.connect(self._watch_name)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        self._refresh_layers()
        self.refresh_versions()
        self._update_replay()

    # ------------------------------------------------------------------ store
    def store(self) -> Any:
        """The model store (``store_dir``, else the default one)."""
        from ..versions import ModelStore

        return ModelStore(self.store_dir)

    def spec_of(self, model_id: str) -> str:
        """What a model chooser holds for a store version id, bundled name or path."""
        ckpt = self.store().root / model_id / "model.safetensors"
        return str(ckpt) if ckpt.exists() else model_id

    def _parent_arg(self, spec: str) -> str:
        """A chooser spec as ``run_finetune``'s parent: a store version by its id."""
        p = Path(spec)
        root = self.store().root
        try:
            if p.name == "model.safetensors" and p.parent.parent.resolve() == root.resolve():
                return p.parent.name
        except OSError:
            pass
        return spec

    def _update_replay(self, *_: Any) -> None:
        """Say under the checkbox whether replay samples exist for the chosen model."""
        if not self.replay_check.isChecked():
            self.replay_label.setText("Replay is off: only your corrections are learnt from.")
            return
        from ..replay import replay_status

        try:
            found, text = replay_status(self.model.current_card(), "auto")
        except Exception as exc:  # a status line must never break the widget
            found, text = False, f"could not look for them ({exc})"
        self.replay_label.setText(
            ("Replay: " if found else "No replay: ") + text[:1].lower() + text[1:] + "."
            if text else ""
        )

    # ------------------------------------------------------------------ layers
    def image_layers(self) -> list[Image]:
        return [
            layer for layer in self.viewer.layers
            if isinstance(layer, Image)
            and (_info(layer) or {}).get("role") not in OUTPUT_ROLES
        ]

    def labels_layers(self) -> list[Labels]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels)]

    def current_image(self) -> Image | None:
        return _by_name(self.image_layers(), self.image_combo.currentData())

    def current_labels(self) -> Labels | None:
        return _by_name(self.labels_layers(), self.labels_combo.currentData())

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh_layers)

    def _refresh_layers(self, *_: Any) -> None:
        keep_image = self.image_combo.currentData()
        keep_labels = self.labels_combo.currentData()
        images = self.image_layers()
        _fill(self.image_combo, [layer.name for layer in images], keep_image)
        self._fill_labels(keep_labels if keep_image == self.image_combo.currentData() else None)

    def _on_image(self, *_: Any) -> None:
        self._fill_labels(None)

    def _fill_labels(self, keep: str | None) -> None:
        layers = self.labels_layers()
        names = [layer.name for layer in layers]
        if keep not in names:
            best = self._labels_for(self.current_image())
            keep = best.name if best is not None else None
        _fill(self.labels_combo, names, keep)

    def _labels_for(self, image: Image | None) -> Labels | None:
        """The labels layer that most likely holds the corrections of ``image``."""
        if image is None:
            return None
        layers = self.labels_layers()
        uid = _uid(image)
        for role in (CORRECTED_ROLE, "labels"):
            for layer in layers[::-1]:
                info = _info(layer) or {}
                if info.get("role") == role and info.get("source_id") == uid:
                    return layer
        grid = _grid(image)
        same = [layer for layer in layers if tuple(layer.data.shape) == grid]
        return same[-1] if same else (layers[-1] if layers else None)

    def _other_pairs(self, image: Image | None) -> list[tuple[Image, Labels, np.ndarray]]:
        """Other images with Segment labels that differ from their prediction."""
        out = []
        for other in self.image_layers():
            if image is not None and _uid(other) == _uid(image):
                continue
            for layer in self.labels_layers():
                info = _info(layer) or {}
                if info.get("source_id") != _uid(other) or info.get("role") not in (
                    "labels", CORRECTED_ROLE
                ):
                    continue
                data = np.asarray(layer.data)
                pred = _core.layer_prediction(info, data.shape)
                if pred is not None and not _core.nothing_corrected(data, pred):
                    out.append((other, layer, pred))
                    break
        return out

    def _prediction(self, labels: Labels, image: Image) -> np.ndarray | None:
        """The last prediction of ``image`` on the labels' grid, if the plugin knows it."""
        shape = tuple(labels.data.shape)
        own = _core.layer_prediction(_info(labels), shape)
        if own is not None:
            return own
        seg = next(
            (
                layer for layer in self.labels_layers()
                if (_info(layer) or {}).get("role") == "labels"
                and (_info(layer) or {}).get("source_id") == _uid(image)
            ),
            None,
        )
        return None if seg is None else _core.layer_prediction(_info(seg), shape)

    # ------------------------------------------------------------------ running
    @property
    def is_busy(self) -> bool:
        """Fine-tuning, or segmenting again with the new model."""
        seg = self.resegment_widget
        return self.is_running or (seg is not None and seg.is_running)

    def _request(self) -> dict[str, Any] | None:
        """Check the choices and copy the data on the main thread; None (after a plain
        notification) when they can't be used."""
        from ..finetune import FinetuneConfig, corrected_units
        from ..preprocess import InputError

        image = self.current_image()
        if image is None:
            notify_error("there is no image layer: open the image whose labels you corrected")
            return None
        labels_layer = self.current_labels()
        if labels_layer is None:
            notify_error(
                "there is no labels layer with corrections: segment the image with the Segment "
                "widget, correct its labels layer (paint, erase), then fine-tune"
            )
            return None
        spec, card = self.model.current_spec(), self.model.current_card()
        if spec is None:
            notify_error("no model is chosen: pick one, or add a checkpoint file with 'File…'")
            return None
        if card is None:
            notify_error(f"the chosen model cannot be used: {self.model.card_text.toPlainText()}")
            return None
        if image.multiscale:
            notify_error("this image is a multi-resolution pyramid; open the full-resolution "
                         "image to fine-tune on it")
            return None
        img = np.array(image.data, copy=True)
        lab = np.array(labels_layer.data, copy=True)
        if lab.shape != _grid(image):
            notify_error(
                f"the labels layer '{labels_layer.name}' (shape {lab.shape}) does not match "
                f"the image '{image.name}' (shape {_grid(image)}): choose the labels drawn on "
                "this image"
            )
            return None
        pred = self._prediction(labels_layer, image)
        if _core.nothing_corrected(lab, pred):
            notify_error(
                f"the labels in '{labels_layer.name}' are exactly the model's prediction: "
                "correct its mistakes first (paint what it missed, erase what it got wrong), "
                "then fine-tune"
            )
            return None
        images, labels, previous = [img], [lab], [pred]
        spacing = [_spacing(image)]
        if self.others_check.isChecked():
            for other, layer, other_pred in self._other_pairs(image):
                images.append(np.array(other.data, copy=True))
                labels.append(np.array(layer.data, copy=True))
                previous.append(other_pred)
                spacing.append(_spacing(other))
        axis = self.slice_axis(image)
        try:
            corrected_units(images, labels, card, previous, spacing=spacing, slice_axis=axis)
            budget = int(self.time_spin.value())
            config = FinetuneConfig(
                trainable=self.trainable_combo.currentData(),
                max_steps=int(self.steps_spin.value()),
                time_budget_s=float(budget) if budget > 0 else None,
                device=self.device_combo.currentData(),
                slice_axis=axis,
                **self.extra_config,
            )
            config.validate()
        except (InputError, TypeError, ValueError) as exc:
            notify_error(exc)
            return None
        return {
            "image": image,
            "labels_layer": labels_layer,
            "prediction": pred,
            "spec": spec,
            "parent": self._parent_arg(spec),
            "images": images,
            "labels": labels,
            "previous": previous,
            "spacing": spacing,
            "replay": "auto" if self.replay_check.isChecked() else None,
            "config": config,
            "store_dir": self.store_dir,
        }

    def slice_axis(self, image: Image) -> int:
        """The volume axis of the corrected slices: the chosen one, else (``auto``) the
        axis the viewer steps through for ``image``, as the Segment widget takes it."""
        choice = self.axis_combo.currentData()
        if choice != "auto":
            return int(choice)
        ndim = len(_grid(image))
        if ndim < 3:
            return 0
        offset = self.viewer.dims.ndim - ndim
        hidden = [a - offset for a in self.viewer.dims.not_displayed if a >= offset]
        return int(hidden[-1]) if hidden else 0

    def run(self, sync: bool = False) -> Any:
        """Fine-tune: in a worker (default) or on this thread (``sync``, for scripts).

        Returns the worker (async), ``(result, version_id)`` (sync), or None when nothing
        was started or the run failed.
        """
        if self.is_busy:
            notify_info("fine-tuning is already running; wait for it or cancel it")
            return None
        req = self._request()
        if req is None:
            return None
        req["sync"] = sync
        self._new_cancel()
        self.history = []
        self._reset_plot()
        self.activate_anyway_button.setVisible(False)
        n = len(req["images"])
        self.status_label.setText(
            f"Fine-tuning {req['parent']} on {n} image(s)… (your corrections are saved first)"
        )
        if sync:
            self._req = req
            try:
                out = _compute(req, self._cancel, self._on_progress)
            except Exception as exc:
                self._on_error(exc)
                return None
            self._finish(req, *out)
            return out
        return self._start_worker(req)

    def _start_worker(self, req: dict[str, Any]) -> Any:
        return self._launch(_compute, req, "ProSMA fine-tuning", total=100)

    def _on_returned(self, out: tuple[Any, str]) -> None:
        self._finish(self._req, *out)

    CANCELLED = (
        "Cancelled: the previous model stays active and no new version was saved; your "
        "corrections are kept in the model store's .incoming folder.",
        "fine-tuning cancelled; the previous model stays active",
    )

    @guarded("Showing the fine-tuning progress")
    def _on_progress(self, p: Any) -> None:
        self.history.append(p)
        frac = p.step / max(p.max_steps, 1)
        budget = self._req.get("config").time_budget_s if self._req.get("config") else None
        if budget:
            frac = max(frac, p.elapsed_s / budget)
        pct = 100 if p.phase == "done" else int(min(frac, 1.0) * 100)
        self.progress_bar.setValue(pct)
        if self._pbar is not None and pct > self._pbar.n:
            self._pbar.update(pct - int(self._pbar.n))
        if p.phase == "train" and p.loss is not None:
            self._loss.append((p.step, p.loss))
        if p.holdout_dice is not None and p.phase in ("before", "eval"):
            self._dice.append((p.step, p.holdout_dice))
        if p.phase == "done" and p.holdout_dice is not None:
            # the kept state: the first evaluation that reached the best held-out Dice
            top = max((d for _, d in self._dice), default=p.holdout_dice)
            step = next((s for s, d in self._dice if d >= top), p.step)
            self._best = (step, p.holdout_dice)
        parts = [f"step {p.step}/{p.max_steps}", f"{p.elapsed_s:.0f} s"]
        if self._loss:
            parts.append(f"loss {self._loss[-1][1]:.3f}")
        if self._dice:
            parts.append(f"held-out Dice {self._dice[-1][1]:.3f}")
        if p.phase == "before":
            parts = ["measuring the model before training", *parts[2:]]
        self.status_label.setText("Fine-tuning: " + ", ".join(parts))
        self._draw()

    # ------------------------------------------------------------------ finishing
    @guarded("Finishing the fine-tuning")
    def _finish(self, req: dict[str, Any], result: Any, vid: str) -> None:
        store = self.store()
        self.last_result, self.last_version = result, vid
        self._last_req = req
        activated = store.active() == vid
        level, text = _core.finetune_outcome(
            result.dice_before, result.dice_after, vid, activated,
            independent=result.independent_report,
        )
        took = (
            f"{result.steps} steps ({result.stopped.replace('_', ' ')}) in "
            f"{result.seconds:.0f} s on {result.n_train} training and {result.n_holdout} "
            "held-out image(s)/slice(s)"
        )
        replay = result.replay or {}
        if replay.get("message") and replay.get("message") != "replay is off":
            took += f"; {replay['message']}"
        for note in result.notes:
            if "interrupted" in note or note.startswith("the labels are stored as"):
                took += f". Note: {note}"
                notify_info(note)
        self.refresh_versions()
        self._draw()
        if activated:
            self.status_label.setText(f"Done: {text}. {took}. Segmenting again with it…")
            notify_info(text)
            spec = self.spec_of(vid)
            self._select_everywhere(spec)
            self.resegment(req, spec)
        else:
            self.status_label.setText(f"Done: {text}. {took}.")
            (notify_warning if level == "warning" else notify_info)(text)
            self.activate_anyway_button.setVisible(True)

    def resegment(self, req: dict[str, Any], spec: str) -> Any:
        """Segment the image again with ``spec`` through the Segment widget (the docked one,
        else a private one), keeping the user's corrected layer as it is."""
        image = req["image"]
        if _uid(image) not in {_uid(layer) for layer in self.viewer.layers}:
            return None
        seg = self._segmenter()
        if seg.is_running:
            notify_info("the Segment widget is busy; run it again to see the new model")
            return None
        labels_layer = req["labels_layer"]
        info = _info(labels_layer)
        if (
            isinstance(info, dict) and info.get("role") == "labels"
            and info.get("source_id") == _uid(image)
            and _uid(labels_layer) in {_uid(layer) for layer in self.viewer.layers}
        ):
            self._keep_corrections(labels_layer, image, req["prediction"])
        seg.image_combo.setCurrentIndex(seg.image_combo.findData(image.name))
        _select(seg.model, spec)
        self.resegment_widget = seg
        out = seg.run(sync=bool(req.get("sync")))
        if out is not None and hasattr(out, "finished"):  # a worker
            out.finished.connect(self._resegmented)
        else:
            self._resegmented()
        return out

    def _resegmented(self) -> None:
        text = self.status_label.text()
        if text.endswith("Segmenting again with it…"):
            seg = self.resegment_widget
            done = seg is not None and seg.status_label.text().startswith("Done")
            self.status_label.setText(
                text.removesuffix("Segmenting again with it…")
                + ("The image was segmented again with it." if done
                   else "Segmenting again did not finish; see the Segment widget.")
            )

    def _keep_corrections(self, layer: Labels, image: Image, prediction: Any) -> None:
        """Take the corrected labels layer out of the Segment widget's hands (it would write
        the new result into it): its data stay as they are; it is renamed."""
        info = dict(_info(layer) or {})
        kept = {
            "role": CORRECTED_ROLE,
            "source": info.get("source", image.name),
            "source_id": info.get("source_id", _uid(image)),
            "model": info.get("model"),
            "prediction": prediction,
        }
        layer.metadata = {**layer.metadata, META: kept}
        layer.name = f"{image.name} corrected"

    def _segmenter(self) -> SegmentWidget:
        win = self.window()
        if win is not self:
            docked = [w for w in win.findChildren(SegmentWidget) if w is not self._own_segmenter]
            if docked:
                return docked[-1]
        if self._own_segmenter is None:
            self._own_segmenter = SegmentWidget(self.viewer)
            self._own_segmenter.setParent(self)
            self._own_segmenter.hide()
        seg = self._own_segmenter
        seg.device_combo.setCurrentIndex(seg.device_combo.findData(self.device_combo.currentData()))
        return seg

    def _choosers(self) -> list[ModelChooser]:
        win = self.window()
        found = list(win.findChildren(ModelChooser))
        if self.model not in found:
            found.append(self.model)
        own = self._own_segmenter
        if own is not None and own.model not in found:
            found.append(own.model)
        return found

    def _select_everywhere(self, spec: str) -> None:
        for chooser in self._choosers():
            _select(chooser, spec)

    # ------------------------------------------------------------------ versions
    def refresh_versions(self) -> None:
        """Re-read the store and fill the versions list (newest first, ★ = active)."""
        store = self.store()
        try:
            rows = _core.version_rows(store)
        except OSError as exc:
            notify_warning(f"the model versions could not be read: {exc}")
            rows = []
        self._rows = rows
        t = self.versions_table
        t.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = [
                ("★ " if row.active else "") + row.id,
                row.dice_text() + ("  ⚠" if row.improved is False else ""),
                row.date,
                row.parent_text(),
            ]
            tips = [
                row.id + ("  (active)" if row.active else ""),
                "held-out Dice of the parent → the new model"
                + ("; it got worse" if row.improved is False else ""),
                "created (UTC)",
                row.parent or "",
            ]
            for c, (text, tip) in enumerate(zip(cells, tips)):
                item = QTableWidgetItem(text)
                item.setToolTip(tip)
                item.setData(Qt.ItemDataRole.UserRole, row.id)
                t.setItem(r, c, item)
        t.resizeColumnsToContents()
        self.activate_button.setEnabled(bool(rows))
        self.revert_button.setEnabled(bool(rows))
        self.store_label.setText(f"Versions are saved in {store.root}")

    def selected_version(self) -> str | None:
        items = self.versions_table.selectedItems()
        return items[0].data(Qt.ItemDataRole.UserRole) if items else None

    def select_version(self, vid: str) -> None:
        for r, row in enumerate(getattr(self, "_rows", [])):
            if row.id == vid:
                self.versions_table.selectRow(r)
                return

    @guarded("Activating the version")
    def activate_version(self, vid: str | None = None) -> None:
        """Make a version (the selected one by default) the active model everywhere."""
        vid = vid or self.selected_version()
        if vid is None:
            notify_info("select a version in the list first")
            return
        store = self.store()
        store.get(vid)  # a plain KeyError message if it is gone
        store.activate(vid)
        self.refresh_versions()
        self._select_everywhere(self.spec_of(vid))
        self.status_label.setText(f"{vid} is the active model.")
        notify_info(f"{vid} is now the active model")

    @guarded("Reverting to the parent model")
    def revert_to_parent(self, vid: str | None = None) -> None:
        """Make the parent of a version (the selected one, else the active one) active."""
        store = self.store()
        vid = vid or self.selected_version() or store.active()
        if vid is None:
            notify_info("select a version in the list first")
            return
        try:
            parent = store.get(vid).parent
        except KeyError:
            notify_info(f"{vid} is not a fine-tuned version, so it has no parent here")
            return
        if not parent:
            notify_warning(f"the version {vid} does not record its parent")
            return
        try:
            _core.read_model_card(self.spec_of(parent))
        except Exception:
            notify_error(
                f"the model {vid} was trained from ({parent}) is not available any more, so "
                "it cannot be made active; choose another model or version"
            )
            return
        store.activate(parent)
        self.refresh_versions()
        self._select_everywhere(self.spec_of(parent))
        self.status_label.setText(f"Reverted: {parent} is the active model again.")
        notify_info(f"{parent} (the model {vid} was trained from) is active again")

    @guarded("Activating the new model")
    def _activate_anyway(self) -> None:
        if self.last_version is None:
            return
        self.activate_version(self.last_version)
        self.activate_anyway_button.setVisible(False)
        if self._last_req:
            self.resegment(self._last_req, self.spec_of(self.last_version))

    # ------------------------------------------------------------------ plot
    def _setup_plot(self) -> None:
        from .gates import _style, _theme_colours

        fg, bg = _theme_colours(self.viewer)
        fig = self.figure
        fig.clear()
        fig.set_facecolor(bg)
        self.ax_loss = fig.add_subplot(2, 1, 1)
        self.ax_dice = fig.add_subplot(2, 1, 2, sharex=self.ax_loss)
        (self.loss_line,) = self.ax_loss.plot([], [], color="#4c9be8", lw=1.2)
        (self.dice_line,) = self.ax_dice.plot([], [], "o-", color="#58c48b", ms=4, lw=1.2)
        (self.best_marker,) = self.ax_dice.plot([], [], "*", color="#f2a541", ms=11,
                                                label="kept")
        self.ax_loss.set_ylabel("loss", fontsize=8)
        self.ax_dice.set_ylabel("held-out Dice", fontsize=8)
        self.ax_dice.set_xlabel("step", fontsize=8)
        self.ax_dice.set_ylim(0, 1.02)
        for ax in (self.ax_loss, self.ax_dice):
            _style(ax, fg, bg)
        fig.subplots_adjust(left=0.17, right=0.97, top=0.96, bottom=0.16, hspace=0.25)
        self._loss: list[tuple[int, float]] = []
        self._dice: list[tuple[int, float]] = []
        self._best: tuple[int, float] | None = None

    def _reset_plot(self) -> None:
        self._loss, self._dice, self._best = [], [], None
        self._draw()

    def _draw(self) -> None:
        def xy(points: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
            return [p[0] for p in points], [p[1] for p in points]

        self.loss_line.set_data(*xy(self._loss))
        self.dice_line.set_data(*xy(self._dice))
        self.best_marker.set_data(*xy([self._best] if self._best else []))
        self.ax_loss.relim()
        self.ax_loss.autoscale_view()
        if self._loss or self._dice:
            right = max([p[0] for p in self._loss + self._dice] + [1])
            self.ax_loss.set_xlim(0, right * 1.03)
        self.canvas.draw_idle()


# ---------------------------------------------------------------------------- helpers


def _compute(req: dict[str, Any], cancel: threading.Event, progress: Any) -> tuple[Any, str]:
    """The worker's job: fine-tune and save a version (no viewer access here)."""
    from ..finetune import run_finetune
    from ..inference import Cancelled
    from ..versions import ModelStore

    if cancel.is_set():
        raise Cancelled()
    return run_finetune(
        req["parent"], req["images"], req["labels"], store=ModelStore(req["store_dir"]),
        config=req["config"], previous=req["previous"], spacing=req.get("spacing"),
        replay=req.get("replay"), activate="if_better", progress=progress, cancel=cancel,
    )


def _select(chooser: ModelChooser, spec: str) -> None:
    """Select ``spec`` in a model chooser (adding it as a file when not listed)."""
    chooser.refresh(select=spec)
    if chooser.current_spec() != spec and Path(spec).exists():
        chooser.add_checkpoint(spec)


def _fill(combo: QComboBox, names: list[str], keep: str | None) -> None:
    combo.blockSignals(True)
    combo.clear()
    for name in names:
        combo.addItem(name, name)
    if keep in names:
        combo.setCurrentIndex(names.index(keep))
    elif names:
        combo.setCurrentIndex(len(names) - 1)
    combo.blockSignals(False)


def _by_name(layers: list[Any], name: Any) -> Any:
    return next((layer for layer in layers if layer.name == name), None)


def _info(layer: Any) -> dict[str, Any] | None:
    meta = layer.metadata if isinstance(layer.metadata, dict) else {}
    info = meta.get(META)
    return info if isinstance(info, dict) else None


def _grid(image: Any) -> tuple[int, ...]:
    shape = tuple(int(s) for s in np.shape(image.data))
    return shape[:-1] if image.rgb else shape


def _spacing(layer: Any) -> tuple[float, ...] | None:
    """A layer's pixel/voxel spacing in mm when known, as the Segment widget hands it to
    the engine (so that fine-tuning resamples as segmenting does)."""
    sp = layer_spacing_mm(layer)
    return sp if sp is not None and len(sp) == len(_grid(layer)) else None


def _uid(layer: Any) -> str:
    """A layer's lasting identity (napari hands plugins proxies: ``id()`` changes)."""
    return str(layer.unique_id)
