"""Qt helpers shared by the widgets: notifications, the hub, the worker host, the model
chooser.

The three widgets never drive one another: they meet through the viewer's :class:`Hub`
(``result_ready`` when a result is placed into layers, ``active_model_changed`` when a
model becomes the active one) and through layer data. Widgets keep their controls as
attributes so tests can drive them; the work itself lives in the Qt-free core
(:mod:`napari_prosma.inference.plan`, :mod:`napari_prosma.inference.gates`).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal
from qtpy.QtCore import QObject, Qt
from qtpy.QtCore import Signal as QtSignal
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ..errors import user_message
from ..inference.gates import sparsity_warnings
from ..inference.plan import SegResult, run_segmentation
from . import _core
from ._layers import uid
from ._placing import Placed

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


# ---------------------------------------------------------------------------- the hub


@dataclass
class HeldResult:
    """A result placed into layers: what the Gate inspector shows."""

    result: SegResult
    card: Any
    spec: str


class Hub:
    """Per viewer, where the widgets meet (:func:`hub_for`).

    Signals:
        result_ready(layer): a result was placed into the labels ``layer`` (new or updated);
            :meth:`result_of` gives it.
        active_model_changed(spec): the model ``spec`` became the active one; every model
            chooser selects it.
    """

    result_ready = Signal(object)
    active_model_changed = Signal(str)

    def __init__(self) -> None:
        self._results: dict[str, HeldResult] = {}

    def publish(self, layer: Any, result: SegResult, card: Any, spec: str) -> None:
        """Record the result held by the labels ``layer`` and say so."""
        self._results[uid(layer)] = HeldResult(result, card, spec)
        self.result_ready.emit(layer)

    def result_of(self, layer: Any) -> HeldResult | None:
        """The result held by ``layer``, or None."""
        return None if layer is None else self._results.get(uid(layer))

    def result_layers(self, viewer: Any) -> list[Any]:
        """Labels layers of ``viewer`` that hold a result, in layer order."""
        return [layer for layer in viewer.layers if uid(layer) in self._results]

    def _on_removed(self, event: Any) -> None:
        self._results.pop(uid(event.value), None)


_HUBS: weakref.WeakKeyDictionary[Any, Hub] = weakref.WeakKeyDictionary()


def hub_for(viewer: Any) -> Hub:
    """The viewer's hub (napari hands each widget its own proxy of the viewer: the hub
    belongs to the viewer behind them)."""
    real = getattr(viewer, "__wrapped__", viewer)
    hub = _HUBS.get(real)
    if hub is None:
        hub = _HUBS[real] = Hub()
        real.layers.events.removed.connect(hub._on_removed)
    return hub


def fill_combo(combo: QComboBox, names: list[str], keep: str | None) -> None:
    """Fill ``combo`` with ``names``; keep ``keep`` selected, else the last one."""
    combo.blockSignals(True)
    combo.clear()
    for name in names:
        combo.addItem(name, name)
    if keep in names:
        combo.setCurrentIndex(names.index(keep))
    elif names:
        combo.setCurrentIndex(len(names) - 1)
    combo.blockSignals(False)


def segment_job(req: dict[str, Any], cancel: threading.Event, progress: Any) -> tuple[Any, Any]:
    """A worker's job: load the model ``req["spec"]`` (cached) and segment ``req["plan"]``;
    returns ``(card, SegResult)``. No viewer access here."""
    from ..inference import Cancelled

    if cancel.is_set():
        raise Cancelled()
    model, card = _core.get_model(req["spec"], req["device"])
    if cancel.is_set():
        raise Cancelled()
    result = run_segmentation(
        req["plan"],
        model,
        card,
        device=req["device"],
        tta=req["tta"],
        probabilities=req["probabilities"],
        gates=req["gates"],
        progress=progress,
        cancel=cancel,
    )
    return card, result


def announce(result: SegResult, card: Any, placed: Placed) -> list[str]:
    """Tell the user what a placed result needs them to know: an edited layer kept (a
    notification), the engine's notes, the scan outside the training range (a warning).
    Returns the status lines."""
    lines = []
    if placed.kept is not None:
        note = (
            f"'{placed.kept.name}' holds your edits, so it was kept as it is; the new result "
            f"is in '{placed.labels.name}'"
        )
        lines.append(f"Note: {note}.")
        notify_info(note)
    lines += [f"Note: {note}." for note in result.notes]
    warnings = sparsity_warnings(card.gate_sparsity_range, result.gates)
    lines += [f"Warning: {w}." for w in warnings]
    for w in warnings:
        notify_warning(w)
    return lines


# ---------------------------------------------------------------------------- worker relay


class Relay(QObject):
    """Carries progress from a worker thread to the main thread (queued signal)."""

    progress = QtSignal(int, int)


def start_worker(host: Any, compute: Callable[..., Any], *args: Any) -> Any:
    """Run ``compute(*args)`` in napari's worker thread: its outcome goes to ``host``'s
    ``_on_returned`` / ``_on_error`` / ``_on_finished``, and ``host.worker`` holds the
    worker while it runs. Returns the worker."""
    from napari.qt.threading import create_worker

    worker = create_worker(compute, *args, _start_thread=False, _ignore_errors=True)
    # bound methods: Qt drops these connections if the widget is closed meanwhile
    worker.returned.connect(host._on_returned)
    worker.errored.connect(host._on_error)
    worker.finished.connect(host._on_finished)
    host.worker = worker
    worker.start()
    return worker


def _progress_to(relay: Any, cancel: threading.Event) -> Callable[..., None]:
    """The worker's progress callback: emit on ``relay``; once the widget is closed (its
    relay deleted, so emitting raises RuntimeError) set ``cancel`` instead, so the run
    stops as cancelled at its next check (it used to end on that RuntimeError, which the
    worker swallows without a signal: seen as a flaky close-while-running test)."""

    def emit(*args: Any) -> None:
        try:
            relay.progress.emit(*args)
        except RuntimeError:
            cancel.set()

    return emit


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

    def _launch(
        self, compute: Callable[..., Any], req: dict[str, Any], desc: str, total: int
    ) -> Any:
        """Start ``compute(req, cancel, progress)`` in a worker, with a napari progress bar
        of ``total`` steps (0: busy); returns the worker."""
        from napari.utils import progress

        self._pbar = progress(total=total, desc=desc)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._req = req
        return start_worker(
            self, compute, req, self._cancel, _progress_to(self._relay, self._cancel)
        )

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


def compact_combo(combo: QComboBox, chars: int = 16) -> QComboBox:
    """Let a combo box shrink to the dock's width however long its items are."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    return combo


def heading(text: str) -> QLabel:
    lab = QLabel(f"<b>{text}</b>")
    lab.setTextFormat(Qt.TextFormat.RichText)
    return lab


def watch_layers(viewer: Any, callback: Callable[..., Any]) -> None:
    """Call ``callback`` whenever a layer is added, removed, moved or renamed."""
    events = viewer.layers.events
    for event in (events.inserted, events.removed, events.reordered):
        event.connect(callback)
    events.inserted.connect(lambda e: e.value.events.name.connect(callback))
    for layer in viewer.layers:
        layer.events.name.connect(callback)


def device_combo() -> QComboBox:
    """The device choice: auto / cuda / mps / cpu."""
    from ..inference.device import DEVICES
    from ._tooltips import DEVICE

    combo = QComboBox()
    for d in DEVICES:
        combo.addItem(d, d)
    combo.setToolTip(DEVICE)
    return combo


def run_controls(widget: Any, run_text: str) -> None:
    """Give a :class:`WorkerHost` widget its ``run_button``, ``cancel_button``,
    ``progress_bar`` and ``status_label``."""
    widget.run_button = QPushButton(run_text)
    widget.cancel_button = QPushButton("Cancel")
    widget.cancel_button.setEnabled(False)
    widget.progress_bar = QProgressBar()
    widget.status_label = QLabel("")
    widget.status_label.setWordWrap(True)
    widget.run_button.clicked.connect(lambda: widget.run())
    widget.cancel_button.clicked.connect(widget.cancel)


def button_row(*buttons: QWidget) -> QHBoxLayout:
    """Buttons side by side, the first one stretched."""
    row = QHBoxLayout()
    for k, b in enumerate(buttons):
        row.addWidget(b, 1 if k == 0 else 0)
    return row
