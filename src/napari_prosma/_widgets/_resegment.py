"""Segmenting an image again with a newly fine-tuned model, for the Fine-tune widget.

It plans with :mod:`napari_prosma.inference.plan`, runs in its own worker (or on the
calling thread), places the result with :mod:`._placing` (never into a layer the user
edited) and announces it on the viewer's hub: the Segment widget is not involved.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import _core, _layers
from ._common import announce, hub_for, notify_error, notify_warning, segment_job, start_worker
from ._placing import place_result

#: What is produced when the image's earlier run does not say (its labels layer records
#: the options of the Segment run that made it).
DEFAULT_OPTIONS = {"tta": False, "probabilities": False, "uncertainty": False, "gates": True}


class Resegmenter:
    """Segment an image again with a model, one run at a time.

    Args:
        viewer: the napari viewer.
        done: called on the main thread when a run ends: ``done(ok, why)`` (``why`` says
            what stopped it when not ``ok``).
    """

    def __init__(self, viewer: Any, done: Callable[[bool, str], Any]):
        self.viewer = viewer
        self.worker: Any = None
        self._done = done
        self._req: dict[str, Any] = {}

    @property
    def is_running(self) -> bool:
        return self.worker is not None

    def start(
        self,
        image: Any,
        corrected: Any,
        prediction: Any,
        spec: str,
        *,
        device: str,
        cancel: threading.Event,
        sync: bool = False,
    ) -> Any:
        """Segment ``image`` again with ``spec``; the labels layer ``corrected`` that holds
        the corrections is kept as it is (renamed ``<image> corrected`` when it was the
        image's Segment labels). Returns the worker, the result (``sync``) or None."""
        if self.is_running:
            notify_warning("the image is already being segmented again; wait for it")
            return None
        if _layers.uid(image) not in {_layers.uid(layer) for layer in self.viewer.layers}:
            return self._done(False, f"the image {image.name!r} is no longer open")
        info = _layers.info_of(corrected) or {}
        options = {**DEFAULT_OPTIONS, **(info.get("options") or {})}
        _layers.keep_corrections(self.viewer, corrected, image, prediction)
        try:
            card = _core.read_model_card(spec)
            plan = _layers.plan_for(self.viewer, image, card)
        except Exception as exc:
            return self._done(False, notify_error(exc))
        req = self._req = {"layer": image, "spec": spec, "plan": plan, "device": device, **options}
        if sync:
            try:
                out = segment_job(req, cancel, None)
            except Exception as exc:
                return self._on_error(exc)
            return self._on_returned(out)
        return start_worker(self, segment_job, req, cancel, None)

    def _on_returned(self, out: tuple[Any, Any]) -> Any:
        card, result = out
        req = self._req
        image = req["layer"]
        if _layers.uid(image) not in {_layers.uid(layer) for layer in self.viewer.layers}:
            return self._done(False, f"the image {image.name!r} was closed meanwhile")
        try:
            placed = place_result(self.viewer, req, card, result)
            announce(result, card, placed)
            hub_for(self.viewer).publish(placed.labels, result, card, req["spec"])
        except Exception as exc:  # a plain message, never a traceback dialog
            return self._done(False, notify_error(exc))
        self._done(True, "")
        return result

    def _on_error(self, exc: BaseException) -> None:
        from ..inference import Cancelled

        why = "it was cancelled" if isinstance(exc, Cancelled) else notify_error(exc)
        self._done(False, why)

    def _on_finished(self) -> None:
        self.worker = None
