"""Fine-tune widget: teach the model from the user's corrected labels, in one click.

The user segments an image (Segment), corrects the labels layer and presses **Fine-tune**.
:func:`napari_prosma.finetune.run_finetune` runs in napari's ``thread_worker`` with the
image's last prediction as ``previous`` (only what was corrected counts; in a volume, only
the corrected slices), a live plot of the loss and the held-out Dice, and Cancel. The
corrections are saved into the model store first; the new model is a new version, never
written over its parent. When the held-out Dice did not drop, the new version becomes the
active model (the hub tells every chooser) and the image is segmented again in this
widget's own worker (:mod:`._resegment`; the corrected layer is kept as ``<image>
corrected`` and never modified); when it dropped, a warning says so, the parent stays
active, and a button activates the new version anyway. :mod:`._versions` lists each
version's held-out Dice before → after and its date, with Activate and Revert to parent.
"Replay training images" mixes a few of the parent's training images into every batch
(:mod:`napari_prosma.replay`) when they are on this computer. "Slices along" picks the
volume axis of the corrected slices (default: the axis the viewer steps through).
The viewer is touched, and the user's labels copied, on the main thread only.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from napari.layers import Image, Labels
from qtpy.QtCore import QObject
from qtpy.QtCore import Signal as QtSignal
from qtpy.QtWidgets import QPushButton, QWidget

from . import _core, _layers, _plots
from ._chooser import ModelChooser, follow_active_model
from ._common import (
    WorkerHost,
    fill_combo,
    guarded,
    hub_for,
    notify_error,
    notify_info,
    notify_warning,
    watch_layers,
)
from ._finetune_form import FinetuneForm, run_summary
from ._layers import CORRECTED_ROLE  # noqa: F401  (re-exported)
from ._resegment import Resegmenter
from ._tooltips import TRAINABLE_LABELS, TRAINABLE_TIPS  # noqa: F401  (re-exported)
from ._versions import VersionsPanel


class _Relay(QObject):
    """Carries :class:`~napari_prosma.finetune.FinetuneProgress` to the main thread."""

    progress = QtSignal(object)


class FinetuneWidget(FinetuneForm, WorkerHost, QWidget):
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
        task_edit, classes_edit, label_edit: the new version's task, class names, label.
        run_button ("Fine-tune"), cancel_button, progress_bar, status_label.
        activate_anyway_button: shown when the regression guard kept the parent active.
        figure, canvas, loss_line, dice_line, best_marker: the live plot.
        versions_table, activate_button, revert_button, store_label: the model versions.
        store_dir: the model store folder (None: ``$PROSMA_MODEL_DIR`` or the user data
            folder, the one the model choosers list).
        extra_config: more :class:`~napari_prosma.finetune.FinetuneConfig` fields
            (e.g. ``{"lr": 1e-3, "eval_every": 10}``).
        worker: the running worker, or None. history: the progress reports of the last run.
        last_result, last_version: the last finished run and its version id.
        resegmenter: segments the image again with the new model (its own worker).
    """

    CANCELLED = (
        "Cancelled: the previous model stays active and no new version was saved; your "
        "corrections are kept in the model store's .incoming folder.",
        "fine-tuning cancelled; the previous model stays active",
    )

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.store_dir: str | os.PathLike[str] | None = None
        self.extra_config: dict[str, Any] = {}
        self._init_worker_host()
        self.history: list[Any] = []
        self.last_result: Any = None
        self.last_version: str | None = None
        self._last_req: dict[str, Any] = {}
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self.resegmenter = Resegmenter(self.viewer, self._resegmented)
        self.model = ModelChooser()
        self.plot = _plots.LossPlot(_plots.theme_colours(self.viewer))
        self.figure, self.canvas = self.plot.figure, self.plot.canvas
        self.loss_line, self.dice_line = self.plot.loss_line, self.plot.dice_line
        self.best_marker = self.plot.best_marker
        self.versions = VersionsPanel(self.viewer, self.store, self.spec_of, self.status_label_text)
        self.versions_table = self.versions.table
        self.activate_button = self.versions.activate_button
        self.revert_button = self.versions.revert_button
        self.store_label = self.versions.store_label
        self.activate_anyway_button = QPushButton("Activate the new model anyway")
        self.activate_anyway_button.setVisible(False)
        self._build_form()  # the inputs, the budget, the run controls, the layout
        self.activate_anyway_button.clicked.connect(lambda: self._activate_anyway())
        self.image_combo.currentIndexChanged.connect(self._on_image)
        self.model.model_changed.connect(self._update_replay)
        self.model.model_changed.connect(lambda *_: self.show_parent_naming(self._card()))
        self.replay_check.toggled.connect(self._update_replay)
        follow_active_model(self.model, self.viewer)
        watch_layers(self.viewer, self._refresh_layers)
        self._refresh_layers()
        self.refresh_versions()
        self._update_replay()
        self.show_parent_naming(self._card())

    def _card(self) -> Any:
        try:
            return self.model.current_card()
        except Exception:  # a placeholder must never break the widget
            return None

    def status_label_text(self, text: str) -> None:
        self.status_label.setText(text)

    # ------------------------------------------------------------------ store
    def store(self) -> Any:
        """The model store (``store_dir``, else the default one)."""
        from ..versions import ModelStore

        return ModelStore(self.store_dir)

    def spec_of(self, model_id: str) -> str:
        """What a model chooser holds for a store version id, bundled name or path."""
        from ..models import resolve_model, version_id_of

        store = self.store()
        if version_id_of(model_id, store) == model_id:
            return str(resolve_model(model_id, store))
        return model_id

    def _parent_arg(self, spec: str) -> str:
        """A chooser spec as ``run_finetune``'s parent: a store version by its id."""
        from ..models import version_id_of

        return version_id_of(spec, self.store()) or spec

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
            if text
            else ""
        )

    # ------------------------------------------------------------------ layers
    def image_layers(self) -> list[Image]:
        return _layers.image_layers(self.viewer)

    def labels_layers(self) -> list[Labels]:
        return _layers.labels_layers(self.viewer)

    def current_image(self) -> Image | None:
        return _layers.by_name(self.image_layers(), self.image_combo.currentData())

    def current_labels(self) -> Labels | None:
        return _layers.by_name(self.labels_layers(), self.labels_combo.currentData())

    def _refresh_layers(self, *_: Any) -> None:
        keep_image = self.image_combo.currentData()
        keep_labels = self.labels_combo.currentData()
        fill_combo(self.image_combo, [layer.name for layer in self.image_layers()], keep_image)
        self._fill_labels(keep_labels if keep_image == self.image_combo.currentData() else None)

    def _on_image(self, *_: Any) -> None:
        self._fill_labels(None)
        self.model.suit(_layers.kind_of(self.current_image()))

    def _fill_labels(self, keep: str | None) -> None:
        names = [layer.name for layer in self.labels_layers()]
        if keep not in names:
            best = _layers.labels_for(self.viewer, self.current_image())
            keep = best.name if best is not None else None
        fill_combo(self.labels_combo, names, keep)

    def slice_axis(self, image: Image) -> int:
        """The volume axis of the corrected slices: the chosen one, else (``auto``) the
        axis the viewer steps through for ``image``, as the Segment widget takes it."""
        choice = self.axis_combo.currentData()
        if choice != "auto":
            return int(choice)
        ndim = len(_layers.grid_of(image))
        return 0 if ndim < 3 else _layers.slicing_axis(self.viewer, ndim)

    # ------------------------------------------------------------------ running
    @property
    def is_busy(self) -> bool:
        """Fine-tuning, or segmenting again with the new model."""
        return self.is_running or self.resegmenter.is_running

    def _refuse(self, why: BaseException | str) -> None:
        """A run that cannot start: one plain notification, and a status line that says so
        (not the last run's "Done")."""
        self.status_label.setText(f"Failed: {notify_error(why)}")

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
        self.last_result = None
        self.history = []
        self.plot.reset()
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
        return self._launch(_compute, req, "ProSMA fine-tuning", total=100)

    def _on_returned(self, out: tuple[Any, str]) -> None:
        self._finish(self._req, *out)

    @guarded("Showing the fine-tuning progress")
    def _on_progress(self, p: Any) -> None:
        if self._cancel.is_set() and not self._req.get("sync"):
            return  # cancelled: a report still queued must not bring back an old step
        self.history.append(p)
        frac = p.step / max(p.max_steps, 1)
        budget = self._req.get("config").time_budget_s if self._req.get("config") else None
        if budget:
            frac = max(frac, p.elapsed_s / budget)
        pct = 100 if p.phase == "done" else int(min(frac, 1.0) * 100)
        self.progress_bar.setValue(pct)
        if self._pbar is not None and pct > self._pbar.n:
            self._pbar.update(pct - int(self._pbar.n))
        self.plot.add(p)
        parts = [f"step {p.step}/{p.max_steps}", f"{p.elapsed_s:.0f} s"]
        if self.plot.loss:
            parts.append(f"loss {self.plot.loss[-1][1]:.3f}")
        if self.plot.dice:
            parts.append(f"held-out Dice {self.plot.dice[-1][1]:.3f}")
        if p.phase == "before":
            parts = ["measuring the model before training", *parts[2:]]
        elif p.phase == "whole":
            who = "the parent" if p.step == 0 else "the new model"
            parts = [f"segmenting your whole images with {who}", *parts[1:2]]
        self.status_label.setText("Fine-tuning: " + ", ".join(parts))
        if self._pbar is not None:  # napari's activity dock says the same
            self._pbar.set_description("ProSMA fine-tuning: " + ", ".join(parts))
        self.plot.draw()

    def _on_finished(self) -> None:
        super()._on_finished()
        if self.last_result is None or self._cancel.is_set():
            self.progress_bar.setValue(0)

    # ------------------------------------------------------------------ finishing
    @guarded("Finishing the fine-tuning")
    def _finish(self, req: dict[str, Any], result: Any, vid: str) -> None:
        self.last_result, self.last_version = result, vid
        self._last_req = req
        activated = self.store().active() == vid
        level, text = _core.finetune_outcome(
            result.dice_before,
            result.dice_after,
            vid,
            activated,
            independent=result.independent_report,
        )
        took = run_summary(result, notify_info)
        self.refresh_versions()
        self.plot.draw()
        if activated:
            self.status_label.setText(f"Done: {text}. {took}. Segmenting again with it…")
            notify_info(text)
            spec = self.spec_of(vid)
            hub_for(self.viewer).active_model_changed.emit(spec)
            self.resegment(req, spec)
        else:
            self.status_label.setText(f"Done: {text}. {took}.")
            (notify_warning if level == "warning" else notify_info)(text)
            self.activate_anyway_button.setVisible(True)

    def resegment(self, req: dict[str, Any], spec: str) -> Any:
        """Segment the image again with ``spec`` (this widget's own worker; on this thread
        for a ``sync`` run), keeping the user's corrected layer as it is."""
        return self.resegmenter.start(
            req["image"],
            req["labels_layer"],
            req["prediction"],
            spec,
            device=self.device_combo.currentData(),
            cancel=self._cancel,
            sync=bool(req.get("sync")),
        )

    def _resegmented(self, ok: bool, why: str) -> None:
        text = self.status_label.text()
        if text.endswith("Segmenting again with it…"):
            self.status_label.setText(
                text.removesuffix("Segmenting again with it…")
                + (
                    "The image was segmented again with it."
                    if ok
                    else f"Segmenting again did not finish: {why}."
                )
            )

    # ------------------------------------------------------------------ versions
    def refresh_versions(self) -> None:
        """Re-read the store and fill the versions list (newest first, ★ = active)."""
        self.versions.refresh()

    def selected_version(self) -> str | None:
        return self.versions.selected()

    def select_version(self, vid: str) -> None:
        self.versions.select(vid)

    def activate_version(self, vid: str | None = None) -> None:
        """Make a version (the selected one by default) the active model everywhere."""
        self.versions.activate(vid)

    def revert_to_parent(self, vid: str | None = None) -> None:
        """Make the parent of a version (the selected one, else the active one) active."""
        self.versions.revert(vid)

    @guarded("Activating the new model")
    def _activate_anyway(self) -> None:
        if self.last_version is None:
            return
        self.activate_version(self.last_version)
        self.activate_anyway_button.setVisible(False)
        if self._last_req:
            self.resegment(self._last_req, self.spec_of(self.last_version))


def _compute(req: dict[str, Any], cancel: threading.Event, progress: Any) -> tuple[Any, str]:
    """The worker's job: fine-tune and save a version (no viewer access here)."""
    from ..finetune import run_finetune
    from ..inference import Cancelled
    from ..versions import ModelStore

    if cancel.is_set():
        raise Cancelled()
    return run_finetune(
        req["parent"],
        req["images"],
        req["labels"],
        store=ModelStore(req["store_dir"]),
        config=req["config"],
        previous=req["previous"],
        spacing=req.get("spacing"),
        replay=req.get("replay"),
        activate="if_better",
        progress=progress,
        cancel=cancel,
        task=req.get("task"),
        class_names=req.get("class_names"),
        label=req.get("label"),
    )
