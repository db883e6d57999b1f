"""Qt helpers shared by the widgets: the model chooser, notifications, the result hub.

Widgets keep their controls as attributes so tests can drive them; the work itself lives
in :mod:`._core` (Qt-free).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from qtpy.QtCore import QObject, Qt
from qtpy.QtCore import Signal as QtSignal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..errors import user_message
from . import _core

#: Layer metadata key of everything this plugin puts on its output layers.
META = "prosma"
IO_KEY = "prosma_io"


# ---------------------------------------------------------------------------- notifications


def notify_error(exc_or_text: BaseException | str) -> str:
    """Show a plain one-line error (never a traceback); returns the text shown."""
    text = exc_or_text if isinstance(exc_or_text, str) else user_message(exc_or_text)
    show_error(_sentence(text))
    return text


def notify_warning(text: str) -> None:
    show_warning(_sentence(text))


def notify_info(text: str) -> None:
    show_info(_sentence(text))


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] if text else text


_F = TypeVar("_F", bound=Callable[..., Any])
log = logging.getLogger("napari_prosma")


def guarded(what: str) -> Callable[[_F], _F]:
    """Decorate a Qt slot: an unexpected error becomes a plain notification (the traceback
    goes to the log), never a crash or a traceback dialog."""

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                log.exception("%s failed", what)
                notify_error(f"{what} failed: {user_message(exc)}")
                return None

        return wrapper  # type: ignore[return-value]

    return deco


# ---------------------------------------------------------------------------- results


class ResultHub:
    """Per viewer: tells the Gate inspector that the Segment widget produced a result."""

    result_ready = Signal(object)  # the labels layer holding the result in its metadata


_HUBS: weakref.WeakKeyDictionary[Any, ResultHub] = weakref.WeakKeyDictionary()


def hub_for(viewer: Any) -> ResultHub:
    hub = _HUBS.get(viewer)
    if hub is None:
        hub = _HUBS[viewer] = ResultHub()
    return hub


def result_layers(viewer: Any) -> list[Any]:
    """Labels layers of ``viewer`` that hold a segmentation result of this plugin."""
    return [
        layer
        for layer in viewer.layers
        if isinstance(layer.metadata.get(META), dict) and "result" in layer.metadata[META]
    ]


def layer_spacing_mm(layer: Any) -> tuple[float, ...] | None:
    """The layer's voxel spacing in mm when known (read by this plugin, or napari units)."""
    meta = layer.metadata if isinstance(layer.metadata, dict) else {}
    src = meta.get(IO_KEY)
    if isinstance(src, dict) and src.get("unit") == "mm":
        return tuple(float(s) for s in layer.scale)
    if meta.get("unit") == "mm":
        return tuple(float(s) for s in layer.scale)
    try:
        units = [str(u) for u in layer.units]
    except AttributeError:
        return None
    if units and all(u in ("millimeter", "mm") for u in units):
        return tuple(float(s) for s in layer.scale)
    return None


def geometry_kwargs(image_layer: Any) -> dict[str, Any]:
    """Layer keyword arguments that put a new layer on ``image_layer``'s grid, with the
    geometry metadata a writer needs (copied from the image layer)."""
    meta = image_layer.metadata if isinstance(image_layer.metadata, dict) else {}
    carried = {k: meta[k] for k in ("affine", "unit", "path", IO_KEY) if k in meta}
    if IO_KEY in carried and isinstance(carried[IO_KEY], dict) and getattr(
        image_layer, "rgb", False
    ):
        src = dict(carried[IO_KEY])  # the outputs are grey on the colour image's grid
        src["kind"] = "grey"
        src["shape"] = tuple(src.get("spatial_shape", ()))
        carried[IO_KEY] = src
    affine = getattr(getattr(image_layer, "affine", None), "affine_matrix", None)
    return {
        "scale": tuple(image_layer.scale),
        "translate": tuple(image_layer.translate),
        # an oblique scan is placed by its affine (issue 17): its outputs must be too
        "affine": None if affine is None else [list(map(float, r)) for r in affine],
        "metadata": carried,
    }


# ---------------------------------------------------------------------------- worker relay


class Relay(QObject):
    """Carries progress from a worker thread to the main thread (queued signal)."""

    progress = QtSignal(int, int)


class WorkerHost:
    """One background run at a time in napari's worker thread, with Cancel: the part the
    Segment and Fine-tune widgets share (a mixin for a ``QWidget``).

    The widget calls :meth:`_init_worker_host` in ``__init__`` and provides
    ``run_button``, ``cancel_button``, ``status_label``, ``_relay`` (whose ``progress``
    signal the worker emits) and ``_on_returned``; ``CANCELLED`` is the status text and the
    notification of a cancelled run.
    """

    CANCELLED: tuple[str, str] = ("Cancelled.", "cancelled")

    def _init_worker_host(self) -> None:
        self.worker: Any = None
        self._pbar: Any = None
        self._req: dict[str, Any] = {}
        self._cancel = threading.Event()
        # closing the widget stops a run in progress (the event of the current run)
        holder = self._cancel_holder = [self._cancel]
        self.destroyed.connect(lambda *_: holder[0].set())

    @property
    def is_running(self) -> bool:
        """A run is in progress."""
        return self.worker is not None

    def _new_cancel(self) -> threading.Event:
        """A fresh cancel flag for the next run (closing the widget sets it too)."""
        self._cancel = threading.Event()
        self._cancel_holder[0] = self._cancel
        return self._cancel

    def _launch(self, compute: Callable[..., Any], req: dict[str, Any], desc: str,
                total: int) -> Any:
        """Start ``compute(req, cancel, progress)`` in a worker, with a napari progress bar
        of ``total`` steps (0: busy); returns the worker."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._pbar = progress(total=total, desc=desc)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker = create_worker(
            compute, req, self._cancel, self._relay.progress.emit,
            _start_thread=False, _ignore_errors=True,
        )
        self._req = req
        # bound methods: Qt drops these connections if the widget is closed meanwhile
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running worker to stop at its next check."""
        if self.worker is not None:
            self._cancel.set()
            self.cancel_button.setEnabled(False)
            self.status_label.setText("Cancelling…")

    def _on_error(self, exc: BaseException) -> None:
        from ..inference import Cancelled

        if isinstance(exc, Cancelled):
            status, note = self.CANCELLED
            self.status_label.setText(status)
            notify_info(note)
        else:
            text = notify_error(exc)
            self.status_label.setText(f"Failed: {text}")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None


def plot_canvas(figsize: tuple[float, float], min_height: int) -> tuple[Any, Any]:
    """``(figure, canvas)``: a matplotlib figure in a Qt canvas that grows with the dock
    (matplotlib is imported here, when a widget is made, not when napari starts)."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=90)
    canvas = FigureCanvasQTAgg(figure)
    canvas.setMinimumHeight(min_height)
    canvas.setMinimumWidth(220)
    canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
    return figure, canvas


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
    ranges = _core.parse_sparsity_range(card.gate_sparsity_range)
    if ranges:
        spans = ", ".join(
            f"s{stage} {_core.fmt_range(lo, hi)}" for stage, (lo, hi) in sorted(ranges.items())
        )
        extra.append(f"Sparsity   exact-zero range on training data: {spans}")
    return "\n".join([text, *extra])


def compact_combo(combo: QComboBox, chars: int = 16) -> QComboBox:
    """Let a combo box shrink to the dock's width however long its items are."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    return combo


def heading(text: str) -> QLabel:
    lab = QLabel(f"<b>{text}</b>")
    lab.setTextFormat(Qt.TextFormat.RichText)
    return lab
