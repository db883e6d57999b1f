"""The Fine-tune widget's form: its controls and layout, and reading them into a request
(the image, the corrections and the model checked and copied on the main thread)."""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from . import _layers
from ._common import button_row, compact_combo, device_combo, heading, run_controls
from ._tooltips import FINETUNE, TRAINABLE_LABELS, TRAINABLE_TIPS


class FinetuneForm:
    """Mixin of :class:`~.finetune.FinetuneWidget`: :meth:`_build_form` makes the controls
    (``image_combo``, ``labels_combo``, ``others_check``, ``axis_combo``,
    ``replay_check``/``replay_label``, ``trainable_combo``, ``steps_spin``, ``time_spin``,
    ``device_combo`` and the run controls) and lays them out around ``model``, ``canvas``,
    ``versions`` and ``activate_anyway_button``; :meth:`_request` reads them."""

    def _build_form(self) -> None:
        self.image_combo = compact_combo(QComboBox())
        self.image_combo.setToolTip(FINETUNE["image"])
        self.labels_combo = compact_combo(QComboBox())
        self.labels_combo.setToolTip(FINETUNE["labels"])
        self.others_check = QCheckBox("Also learn from other corrected images")
        self.others_check.setToolTip(FINETUNE["others"])
        self.axis_combo = QComboBox()
        self.axis_combo.addItem("the viewer's slicing axis", "auto")
        for a in range(3):
            self.axis_combo.addItem(f"axis {a}", a)
        self.axis_combo.setToolTip(FINETUNE["axis"])
        self.model.card_text.setMaximumHeight(80)
        self.replay_check = QCheckBox("Replay training images")
        self.replay_check.setChecked(True)
        self.replay_check.setToolTip(FINETUNE["replay"])
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
        self.steps_spin.setToolTip(FINETUNE["steps"])
        self.time_spin = QSpinBox()
        self.time_spin.setRange(0, 24 * 3600)
        self.time_spin.setValue(120)
        self.time_spin.setSuffix(" s")
        self.time_spin.setSpecialValueText("no limit")
        self.time_spin.setToolTip(FINETUNE["time"])
        self.device_combo = device_combo()
        self.task_edit = QLineEdit()
        self.task_edit.setToolTip(FINETUNE["task"])
        self.classes_edit = QLineEdit()
        self.classes_edit.setToolTip(FINETUNE["classes"])
        self.label_edit = QLineEdit()
        self.label_edit.setToolTip(FINETUNE["label"])
        self.label_edit.setPlaceholderText("a few words, e.g. spleen CT, ward 3")
        run_controls(self, "Fine-tune")
        self.run_button.setToolTip(FINETUNE["run"])
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(0)
        self.status_label.setText("Segment an image, correct its labels, then fine-tune.")
        self._lay_out()

    def _lay_out(self) -> None:
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("", self.others_check)
        budget = QFormLayout()
        for label, w in (
            ("Train", self.trainable_combo),
            ("Slices along", self.axis_combo),
            ("", self.replay_check),
            ("", self.replay_label),
            ("Steps at most", self.steps_spin),
            ("Time at most", self.time_spin),
            ("Device", self.device_combo),
        ):
            budget.addRow(label, w)
        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.addLayout(form)
        lay.addWidget(heading("Start from model"))
        lay.addWidget(self.model)
        lay.addLayout(budget)
        lay.addWidget(heading("Name the new version"))
        naming = QFormLayout()
        naming.addRow("Task", self.task_edit)
        naming.addRow("Classes", self.classes_edit)
        naming.addRow("Label", self.label_edit)
        lay.addLayout(naming)
        lay.addWidget(heading("Versions"))
        lay.addWidget(self.versions)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        # the run controls, progress, status and plot sit below the scrolled settings, in
        # a splitter: they stay in view however little room the dock gives (issue 16)
        self.footer = QWidget()
        foot = QVBoxLayout(self.footer)
        foot.setContentsMargins(6, 0, 6, 0)
        foot.addLayout(button_row(self.run_button, self.cancel_button))
        for w in (
            self.progress_bar,
            self.status_label,
            self.activate_anyway_button,
            heading("Training loss and held-out Dice"),
        ):
            foot.addWidget(w)
        self.canvas.setMinimumHeight(140)
        foot.addWidget(self.canvas, 1)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(scroll)
        splitter.addWidget(self.footer)
        splitter.setChildrenCollapsible(False)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 1)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(splitter)
        self.setMinimumWidth(360)

    # ------------------------------------------------------------------ the request
    def _request(self) -> dict[str, Any] | None:
        """Check the choices and copy the data on the main thread; None (after a plain
        notification, :meth:`_refuse`) when they can't be used."""
        image, labels_layer = self.current_image(), self.current_labels()
        spec, card = self.model.current_spec(), self.model.current_card()
        why = _unusable(image, labels_layer, spec, card, self.model)
        if why:
            return self._refuse(why)
        lab = np.array(labels_layer.data, copy=True)
        pred = _layers.prediction_for(self.viewer, labels_layer, image)
        if _layers.nothing_corrected(lab, pred):
            return self._refuse(
                f"the labels in '{labels_layer.name}' are exactly the model's prediction: "
                "correct its mistakes first (paint what it missed, erase what it got wrong), "
                "then fine-tune"
            )
        images, labels, previous = [np.array(image.data, copy=True)], [lab], [pred]
        spacing = [_layers.spacing_of(image)]
        if self.others_check.isChecked():
            for other, layer, other_pred in _layers.other_pairs(self.viewer, image):
                images.append(np.array(other.data, copy=True))
                labels.append(np.array(layer.data, copy=True))
                previous.append(other_pred)
                spacing.append(_layers.spacing_of(other))
        config = self._config(image, card, images, labels, previous, spacing)
        if config is None:
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
            **self._naming(card),
        }

    def _naming(self, card: Any) -> dict[str, Any]:
        """The new version's task, class names and label as typed (None: the parent's)."""
        names = [n.strip() for n in self.classes_edit.text().split(",") if n.strip()]
        return {
            "task": self.task_edit.text().strip() or None,
            "class_names": names or None,
            "label": self.label_edit.text().strip() or None,
        }

    def show_parent_naming(self, card: Any) -> None:
        """The parent's task and classes as the fields' placeholders (what is kept when
        they are left empty)."""
        task = (getattr(card, "intended_use", None) or "") if card is not None else ""
        names = list(getattr(card, "class_names", []) or [])[1:] if card is not None else []
        self.task_edit.setPlaceholderText(f"the parent's: {task}" if task else "")
        self.classes_edit.setPlaceholderText(
            f"the parent's: {', '.join(names)}" if names else "comma-separated, e.g. spleen"
        )

    def _config(
        self, image: Any, card: Any, images: list, labels: list, previous: list, spacing: list
    ) -> Any:
        """The run's :class:`~napari_prosma.finetune.FinetuneConfig`, after checking that
        the corrections can be learnt from; None (after a notification) when not."""
        from ..finetune import FinetuneConfig, check_naming, corrected_units
        from ..preprocess import InputError

        axis = self.slice_axis(image)
        try:
            corrected_units(images, labels, card, previous, spacing=spacing, slice_axis=axis)
            check_naming(card, self.task_edit.text(), self._naming(card)["class_names"])
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
            return self._refuse(exc)
        return config


def _unusable(image: Any, labels_layer: Any, spec: Any, card: Any, chooser: Any) -> str:
    """Why the chosen image, labels and model cannot be fine-tuned on ("" when they can)."""
    if image is None:
        return "there is no image layer: open the image whose labels you corrected"
    if labels_layer is None:
        return (
            "there is no labels layer with corrections: segment the image with the Segment "
            "widget, correct its labels layer (paint, erase), then fine-tune"
        )
    if spec is None:
        return "no model is chosen: pick one, or add a checkpoint file with 'File…'"
    if card is None:
        return f"the chosen model cannot be used: {chooser.card_text.toPlainText()}"
    if image.multiscale:
        return (
            "this image is a multi-resolution pyramid; open the full-resolution image to "
            "fine-tune on it"
        )
    shape, grid = tuple(np.shape(labels_layer.data)), _layers.grid_of(image)
    if shape != grid:
        return (
            f"the labels layer '{labels_layer.name}' (shape {shape}) does not match the image "
            f"'{image.name}' (shape {grid}): choose the labels drawn on this image"
        )
    return ""


def run_summary(result: Any, notify: Any) -> str:
    """How the run went: steps, why it stopped, time, data, replay, the held-out curve, the
    whole images before and after, recovered runs (``notify`` shows the notes that need
    the user's attention)."""
    from ..finetune.whole import describe_whole

    took = (
        f"{result.steps} steps ({result.stopped.replace('_', ' ')}) in "
        f"{result.seconds:.0f} s on {result.n_train} training and {result.n_holdout} "
        "held-out image(s)/slice(s)"
    )
    replay = result.replay or {}
    if replay.get("message") and replay.get("message") != "replay is off":
        took += f"; {replay['message']}"
    curve = result.curve
    if len(curve) > 1:
        took += (
            ". Held-out Dice as it went, on the part that chose the state kept (step: Dice): "
            + ", ".join(f"{s}: {d:.2f}" for s, d in curve)
        )
    for line in describe_whole(result.whole, "image(s)/slice(s)"):
        took += f". {line[:1].upper()}{line[1:]}"
    for note in result.notes:
        # an earlier killed run's corrections were recovered, or 0/255 masks were taken as 0/1
        # or new class names turned replay and the forgetting guard off
        if (
            "interrupted" in note
            or note.startswith("the labels are stored as")
            or note.startswith("new classes")
        ):
            took += f". Note: {note}"
            notify(note)
    return took
