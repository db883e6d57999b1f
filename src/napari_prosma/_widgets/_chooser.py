"""The model chooser: a bundled model, a fine-tuned version or a checkpoint file, with its
card; it follows the model that becomes active (through the viewer's hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psygnal import Signal
from qtpy.QtCore import Qt
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import user_message
from ..inference.gates import fmt_range, parse_sparsity_range
from ..report import card_summary, kind_words, model_fit
from . import _core
from ._common import compact_combo, hub_for, notify_error, notify_warning

# ---------------------------------------------------------------------------- model chooser


class ModelChooser(QWidget):
    """Pick a bundled model, a fine-tuned version or a checkpoint file; shows its card.

    Attributes:
        combo: the models (item data: the spec passed to ``checkpoint.load``).
        browse_button: adds a checkpoint file.
        card_text: the selected model's card (data, metrics, intended use).
    """

    model_changed = Signal(object)  # the spec, or None

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._files: list[str] = []
        self._card: Any = None
        self._kind: str | None = None
        self._user_choice = False  # the user picked the selected model in the list
        self.combo = QComboBox()
        self.combo.setToolTip("A bundled model, one of your fine-tuned versions, or a file")
        compact_combo(self.combo, 18)
        self.browse_button = QPushButton("File…")
        self.browse_button.setToolTip(
            "Use a checkpoint file (NAME.safetensors with its NAME.json model card)"
        )
        self.card_text = QPlainTextEdit()
        self.card_text.setReadOnly(True)
        self.card_text.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        self.card_text.setMaximumHeight(130)
        self.card_text.setPlaceholderText("No model: add a checkpoint file with 'File…'")
        self.full_card_button = QPushButton("Full card…")
        self.full_card_button.setToolTip("Every field of the model card, as stored (JSON)")
        self.full_card_button.clicked.connect(self.show_full_card)
        self.card_dialog: Any = None
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.browse_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.card_text)
        lay.addWidget(self.full_card_button, alignment=Qt.AlignmentFlag.AlignRight)
        self.combo.currentIndexChanged.connect(self._on_index)
        self.combo.activated.connect(self._on_user_pick)
        self.browse_button.clicked.connect(self._browse)
        self.refresh()

    # -- public
    def refresh(self, select: str | None = None) -> None:
        """Re-list the models; keep the selection, or select ``select``/the active model."""
        keep = select or self.current_spec()
        try:
            choices, active = _core.model_choices(self._files)
        except Exception as exc:  # a broken store must not break the widget
            notify_warning(f"the model list could not be read: {user_message(exc)}")
            choices, active = [], None
        self.combo.blockSignals(True)
        self.combo.clear()
        for c in choices:
            self.combo.addItem(c.label, c.spec)
        target = keep or active
        idx = self.combo.findData(target) if target is not None else -1
        self.combo.setCurrentIndex(idx if idx >= 0 else (0 if choices else -1))
        self.combo.blockSignals(False)
        self._active = active
        self._mark_fit()
        if keep is None and self._kind is not None:
            self.suit(self._kind)
        self._on_index()

    def suit(self, kind: str | None) -> None:
        """Fit the chooser to an image of ``kind`` (``"rgb"``, ``"grey"``, ``"volume"``;
        :func:`napari_prosma.report.image_kind`): mark the models that do not fit it (✗,
        with the reason as tooltip) and, unless the user picked a model that fits, select
        the active model when it fits, else the bundled model for that kind."""
        same = kind == self._kind
        self._kind = kind
        self._mark_fit()
        if kind is None:
            return
        spec = self.current_spec()
        fits = spec is not None and self.fit_reason(spec) == ""
        if fits and (self._user_choice or same):
            return  # a layer was added or renamed: a model that fits stays chosen
        from ..models import default_model_name

        for target in (getattr(self, "_active", None), default_model_name(kind)):
            if target and self.combo.findData(target) >= 0 and self.fit_reason(target) == "":
                if target != spec:
                    self.combo.setCurrentIndex(self.combo.findData(target))
                self._user_choice = False
                return
        if not fits:
            for i in range(self.combo.count()):
                if self.fit_reason(str(self.combo.itemData(i))) == "":
                    self.combo.setCurrentIndex(i)
                    return

    def fit_reason(self, spec: str) -> str:
        """Why the model ``spec`` does not fit the current image kind ("" when it fits or
        no image is known; "cannot be read" for a broken card)."""
        if self._kind is None:
            return ""
        try:
            card = _core.read_model_card(spec)
        except Exception:
            return "its card cannot be read"
        return model_fit(card, self._kind)

    def _mark_fit(self) -> None:
        """Mark every listed model that does not fit the image kind (✗, greyed, reason)."""
        for i in range(self.combo.count()):
            label = self.combo.itemData(i, Qt.ItemDataRole.UserRole + 1)
            if label is None:
                label = self.combo.itemText(i)
                self.combo.setItemData(i, label, Qt.ItemDataRole.UserRole + 1)
            why = self.fit_reason(str(self.combo.itemData(i)))
            self.combo.setItemText(i, f"{label}  ✗" if why else label)
            tip = f"does not fit {kind_words(self._kind)}: {why}" if why else ""
            self.combo.setItemData(i, tip or None, Qt.ItemDataRole.ToolTipRole)
            colour = QBrush(QColor("#888888")) if why else None
            self.combo.setItemData(i, colour, Qt.ItemDataRole.ForegroundRole)

    def _on_user_pick(self, *_: Any) -> None:
        self._user_choice = True

    def select(self, spec: str) -> None:
        """Select ``spec`` (adding it as a file when it is not listed)."""
        select_model(self, spec)
        self._user_choice = self.current_spec() == spec

    def current_spec(self) -> str | None:
        spec = self.combo.currentData()
        return str(spec) if spec is not None else None

    def full_card_text(self) -> str:
        """The selected model's whole card as indented JSON ("" without a card)."""
        import json

        if self._card is None:
            return ""
        return json.dumps(self._card.to_dict(), indent=2, ensure_ascii=False, default=str)

    def show_full_card(self) -> Any:
        """Open (or refresh) a window with the whole card; returns it."""
        from qtpy.QtWidgets import QDialog

        if self.card_dialog is None:
            self.card_dialog = QDialog(self)
            self.card_dialog.setWindowTitle("Model card")
            view = QPlainTextEdit(self.card_dialog)
            view.setReadOnly(True)
            QVBoxLayout(self.card_dialog).addWidget(view)
            self.card_dialog.resize(560, 620)
            self.card_dialog.view = view
        self.card_dialog.view.setPlainText(self.full_card_text() or "No model is chosen.")
        self.card_dialog.show()
        return self.card_dialog

    def current_card(self) -> Any:
        """The selected model's :class:`~napari_prosma.checkpoint.ModelCard`, or None."""
        return self._card

    def add_checkpoint(self, path: str | Path) -> None:
        """Add a checkpoint file and select it (a bad file gives a notification)."""
        p = str(Path(path).expanduser())
        try:
            _core.read_model_card(p)
        except Exception as exc:
            notify_error(exc)
            return
        if p not in self._files:
            self._files.append(p)
        self.refresh(select=p)
        self._user_choice = True

    # -- internals
    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Choose a model checkpoint",
            "",
            "Checkpoints (*.safetensors *.json *.pt *.pth);;All files (*)",
        )
        if path:
            self.add_checkpoint(path)

    def _on_index(self, *_: Any) -> None:
        spec = self.current_spec()
        self._card = None
        if spec is None:
            self.card_text.setPlainText("")
            self.model_changed.emit(None)
            return
        try:
            self._card = _core.read_model_card(spec)
        except Exception as exc:
            self.card_text.setPlainText(f"This model cannot be used: {user_message(exc)}")
        else:
            self.card_text.setPlainText(card_text(self._card))
        self.model_changed.emit(spec)


def card_text(card: Any) -> str:
    """The readable card summary (:func:`napari_prosma.report.card_summary`), plus the gate
    sparsity range seen on the training data."""
    text = card_summary(card)
    extra = []
    ranges = parse_sparsity_range(card.gate_sparsity_range)
    if ranges:
        spans = ", ".join(
            f"s{stage} {fmt_range(lo, hi)}" for stage, (lo, hi) in sorted(ranges.items())
        )
        extra.append(f"Gate zeros, exact-zero range on training data: {spans}")
    return "\n".join([text, *extra])


def select_model(chooser: ModelChooser, spec: str) -> None:
    """Select ``spec`` in a model chooser (adding it as a file when not listed)."""
    chooser.refresh(select=spec)
    if chooser.current_spec() != spec and Path(spec).exists():
        chooser.add_checkpoint(spec)


def follow_active_model(chooser: ModelChooser, viewer: Any) -> None:
    """Let ``chooser`` select every model that becomes active in ``viewer``."""
    hub_for(viewer).active_model_changed.connect(chooser.select)
