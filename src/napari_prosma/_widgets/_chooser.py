"""The model chooser: a bundled model, a fine-tuned version or a checkpoint file, with its
card; it follows the model that becomes active (through the viewer's hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psygnal import Signal
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
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.browse_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.card_text)
        self.combo.currentIndexChanged.connect(self._on_index)
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
        self._on_index()

    def select(self, spec: str) -> None:
        """Select ``spec`` (adding it as a file when it is not listed)."""
        select_model(self, spec)

    def current_spec(self) -> str | None:
        spec = self.combo.currentData()
        return str(spec) if spec is not None else None

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
    """The card summary, plus a plain note for untrained models and the sparsity range."""
    text = card.summary()
    extra = []
    if not card.metrics and not card.training:
        extra.append("Note       no training record or metrics: results may be meaningless")
    ranges = parse_sparsity_range(card.gate_sparsity_range)
    if ranges:
        spans = ", ".join(
            f"s{stage} {fmt_range(lo, hi)}" for stage, (lo, hi) in sorted(ranges.items())
        )
        extra.append(f"Sparsity   exact-zero range on training data: {spans}")
    return "\n".join([text, *extra])


def select_model(chooser: ModelChooser, spec: str) -> None:
    """Select ``spec`` in a model chooser (adding it as a file when not listed)."""
    chooser.refresh(select=spec)
    if chooser.current_spec() != spec and Path(spec).exists():
        chooser.add_checkpoint(spec)


def follow_active_model(chooser: ModelChooser, viewer: Any) -> None:
    """Let ``chooser`` select every model that becomes active in ``viewer``."""
    hub_for(viewer).active_model_changed.connect(chooser.select)
