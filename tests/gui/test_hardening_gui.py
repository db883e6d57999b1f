"""Faults and bad input in the GUI (issue #7): each gives a plain napari notification (one
line, no traceback), leaves every layer as it was, and never keeps a partial model.
Tiny random-init models on the CPU; napari under Xvfb."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt, QThreadPool
from test_finetune_widget import FAST, disc_stack, finetune_widget, store
from test_segment_widget import errors_since, n_records, save_tiny, segment_widget

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSMA_MODEL_DIR", str(tmp_path / "store"))


def _layers(viewer) -> dict[str, np.ndarray]:
    return {layer.name: np.array(layer.data, copy=True) for layer in viewer.layers}


def _same_layers(viewer, before: dict[str, np.ndarray]) -> None:
    assert [layer.name for layer in viewer.layers] == list(before)
    for layer in viewer.layers:
        np.testing.assert_array_equal(layer.data, before[layer.name])


def _plain(errs: list[str], *words: str) -> str:
    assert errs, "no error notification"
    msg = errs[-1]
    assert "Traceback" not in msg and "\n" not in msg.strip(), msg
    for w in words:
        assert w in msg.lower(), msg
    return msg


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("data", "rgb", "dims", "words"),
    [
        (np.zeros((3, 4, 16, 16), np.float32), False, 3, ("4 spatial dimension", "time series")),
        (np.zeros((3, 4, 16, 16), np.float32), False, 2, ("4 spatial dimension",)),
        (np.zeros((16, 16, 4), np.uint8), True, 3, ("2d image", "choose a 2d model")),
        (np.zeros((4, 16, 16, 4), np.uint8), True, 3, ("greyscale volume",)),
        (np.full((16, 16), 1e300), False, 2, ("too large",)),
    ],
    ids=[
        "time-series-3d",
        "time-series-2d",
        "rgba-to-3d-model",
        "rgba-stack-to-3d-model",
        "beyond-float32",
    ],
)
def test_bad_layers_are_refused_in_one_line(make_napari_viewer, tmp_path, data, rgb, dims, words):
    ckpt = save_tiny(tmp_path, f"m{dims}", spatial_dims=dims)
    viewer = make_napari_viewer()
    viewer.add_image(data, name="scan", rgb=rgb)
    widget = segment_widget(viewer, ckpt)
    before = _layers(viewer)
    n = n_records()
    assert widget.run(sync=True) is None
    _plain(errors_since(n), *words)
    _same_layers(viewer, before)
    assert widget.status_label.text() == "" or widget.status_label.text().startswith("Failed")


@pytest.mark.parametrize(
    "data",
    [
        np.ones((1, 1), np.float32),
        np.eye(24, dtype=bool),
        np.arange(576, dtype=np.int64).reshape(24, 24),
        np.full((24, 24), 7, np.uint16),
        np.zeros((1, 24, 24), np.int16),
    ],
    ids=["1-pixel", "bool", "int64", "uint16-constant", "1-slice-volume"],
)
def test_unusual_but_valid_layers_segment(make_napari_viewer, tmp_path, data):
    ckpt = save_tiny(tmp_path, "m2")
    viewer = make_napari_viewer()
    viewer.add_image(data, name="scan")
    widget = segment_widget(viewer, ckpt)
    n = n_records()
    result = widget.run(sync=True)
    assert not errors_since(n), errors_since(n)
    assert result is not None and widget.last_labels.data.shape == data.shape


def test_checkpoint_with_a_good_card_but_truncated_weights(make_napari_viewer, tmp_path):
    ckpt = save_tiny(tmp_path, "cut")
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((24, 24), np.float32), name="scan")
    widget = segment_widget(viewer, ckpt)  # the card reads fine: the model is listed
    before = _layers(viewer)
    n = n_records()
    assert widget.run(sync=True) is None
    _plain(errors_since(n), "only partly written")
    _same_layers(viewer, before)


# ---------------------------------------------------------------------------- faults


def _always_oom(monkeypatch) -> None:
    """Every forward pass of any network raises CUDA out-of-memory; the CPU is taken for a
    GPU so the engine tries its whole fallback chain."""
    from napari_prosma.inference import device as devmod
    from napari_prosma.nets.unet import ProSMAUNet

    def forward(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(devmod, "is_gpu", lambda d: True)
    monkeypatch.setattr(ProSMAUNet, "forward", forward)


def test_out_of_memory_everywhere_is_a_notification(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    ckpt = save_tiny(tmp_path, "m2")
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((32, 32)), name="scan")
    widget = segment_widget(viewer, ckpt)
    widget.run(sync=True)  # a first, good result the user is correcting
    widget.last_labels.data[:5, :5] = 1
    before = _layers(viewer)
    _always_oom(monkeypatch)
    n = n_records()
    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=60_000)
    _plain(errors_since(n), "out of memory", "crop")
    _same_layers(viewer, before)  # the corrected labels survive
    assert widget.status_label.text().startswith("Failed")
    assert widget.run_button.isEnabled()


def test_out_of_memory_once_is_retried_and_said(make_napari_viewer, tmp_path, monkeypatch):
    from napari_prosma.inference import device as devmod
    from napari_prosma.nets.unet import ProSMAUNet

    ckpt = save_tiny(tmp_path, "m2")
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((64, 64)), name="scan")
    widget = segment_widget(viewer, ckpt)
    real, calls = ProSMAUNet.forward, []

    def forward(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(self, *a, **k)

    monkeypatch.setattr(devmod, "is_gpu", lambda d: True)
    monkeypatch.setattr(ProSMAUNet, "forward", forward)
    n = n_records()
    assert widget.run(sync=True) is not None
    assert not errors_since(n)
    assert widget.last_labels.data.shape == (64, 64)
    assert "smaller tiles" in widget.status_label.text()


@pytest.mark.parametrize("when", ["at once", "first tile", "half-way"])
def test_segment_cancel_at_any_time_changes_nothing(make_napari_viewer, qtbot, tmp_path, when):
    ckpt = save_tiny(tmp_path, "m2")
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((6, 64, 64)), name="vol")
    widget = segment_widget(viewer, ckpt)
    before = _layers(viewer)
    if when != "at once":

        def maybe_cancel(done: int, total: int) -> None:
            if done >= (1 if when == "first tile" else max(total // 2, 1)):
                widget.cancel()

        widget._relay.progress.connect(maybe_cancel)
    widget.run()
    if when == "at once":
        widget.cancel()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=60_000)
    _same_layers(viewer, before)
    assert widget.last_result is None
    assert "ancel" in widget.status_label.text()


def _finetune_ready(viewer, tmp_path):
    """The disc stack, its Segment labels corrected to the truth; returns the widget."""
    torch.manual_seed(3)
    ckpt = save_tiny(tmp_path, "discs")
    vol, truth = disc_stack(4, size=32)
    viewer.add_image(vol, name="discs")
    seg = segment_widget(viewer, ckpt)
    seg.run(sync=True)
    seg.last_labels.data[:] = truth
    return finetune_widget(viewer, ckpt, steps=400, **FAST), truth


def test_finetune_into_a_read_only_store(make_napari_viewer, qtbot, tmp_path):
    from hardening_support import read_only, snapshot

    viewer = make_napari_viewer()
    widget, _ = _finetune_ready(viewer, tmp_path)
    root = store().root
    root.mkdir(parents=True, exist_ok=True)
    before_files = snapshot(root)
    before = _layers(viewer)
    n = n_records()
    with read_only(root):
        widget.run(sync=True)
    _plain(errors_since(n))
    assert any(w in errors_since(n)[-1].lower() for w in ("permission denied", "read-only"))
    assert "Failed" in widget.status_label.text()
    _same_layers(viewer, before)
    assert snapshot(root) == before_files and store().versions() == []


def test_closing_napari_while_segmenting(make_napari_viewer, qtbot, tmp_path):
    """The viewer closes with a segmentation running: the run stops at its next tile,
    nothing raises, nothing is written."""
    ckpt = save_tiny(tmp_path, "m2")
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((12, 96, 96)), name="vol")
    widget = segment_widget(viewer, ckpt)
    started = []
    closed = threading.Event()

    def hold(done, total):  # runs in the worker's thread (direct connection)
        run_cancel = widget._cancel
        started.append(done)
        if closed.wait(30):  # then give the close up to 5 s to reach the run's cancel flag
            run_cancel.wait(5)

    # The run waits at its first tile until the viewer is closed. Without this, a tiny
    # volume could finish first under load; napari's close then asks the worker to quit,
    # and superqt emits neither `returned` nor `errored` for a run that ended after a quit
    # request: the two CI failures of session 5 ("returned", and no outcome after 60 s).
    widget._relay.progress.connect(hold, Qt.ConnectionType.DirectConnection)
    files = sorted(p.name for p in tmp_path.rglob("*"))
    worker = widget.run()
    assert worker is not None
    outcome = _watch(worker)
    qtbot.waitUntil(lambda: bool(started), timeout=60_000)
    cancel = widget._cancel
    viewer.close()
    closed.set()
    qtbot.waitUntil(cancel.is_set, timeout=10_000)  # closing asked the run to stop
    assert QThreadPool.globalInstance().waitForDone(60_000)
    # 10 s timed out once under a load of 7 on 2 cores: allow 60 s
    qtbot.waitUntil(lambda: bool(outcome), timeout=60_000)
    assert outcome == ["Cancelled"]  # stopped early: no result was produced
    assert sorted(p.name for p in tmp_path.rglob("*")) == files


def _watch(worker) -> list[str]:
    """What a worker ended with (the error's type name, or "returned"), recorded by plain
    functions that outlive the widget."""
    from qtpy.QtCore import Qt

    outcome: list[str] = []
    # direct: recorded in the worker's thread as it emits. A queued delivery could be lost
    # when the viewer closes first (CI failed twice with no outcome after 60 s, while the
    # pool had finished)
    direct = Qt.ConnectionType.DirectConnection
    worker.errored.connect(lambda e: outcome.append(type(e).__name__), direct)
    worker.returned.connect(lambda _: outcome.append("returned"), direct)
    return outcome


def test_closing_napari_while_finetuning(make_napari_viewer, qtbot, tmp_path):
    """The viewer closes with fine-tuning running: the run is cancelled, no version is
    saved or activated, the corrections are kept on disk for the user."""
    viewer = make_napari_viewer()
    widget, truth = _finetune_ready(viewer, tmp_path)
    store().activate("parent-name")
    steps = []
    widget._relay.progress.connect(lambda p: steps.append(p.phase))
    outcome = _watch(widget.run())
    qtbot.waitUntil(lambda: steps.count("train") >= 2, timeout=60_000)
    cancel = widget._cancel
    viewer.close()
    qtbot.waitUntil(cancel.is_set, timeout=10_000)
    assert QThreadPool.globalInstance().waitForDone(120_000)
    qtbot.waitUntil(lambda: bool(outcome), timeout=10_000)
    assert outcome == ["Cancelled"]
    assert store().versions() == []
    assert store().active() == "parent-name"
    leftovers = [
        p.name for p in store().root.iterdir() if p.name not in (".incoming", "active.json")
    ]
    assert leftovers == []
    (kept,) = (store().root / ".incoming").glob("*/index.json")
    _, labels = store().load_corrections(kept.parent)
    np.testing.assert_array_equal(labels[0], truth)
    assert os.environ["PROSMA_MODEL_DIR"] == str(store().root)


def test_progress_after_the_widget_is_gone_cancels_the_run():
    """A worker's progress callback on a closed widget (its relay deleted: emitting raises
    RuntimeError) sets the run's cancel flag, so the run ends as cancelled (it used to end on
    that RuntimeError, which the worker swallows without a signal)."""
    import threading
    from types import SimpleNamespace

    from napari_prosma._widgets._common import _progress_to

    def deleted(*_):
        raise RuntimeError("wrapped C/C++ object of type _Relay has been deleted")

    seen = []
    cancel = threading.Event()
    _progress_to(SimpleNamespace(progress=SimpleNamespace(emit=seen.append)), cancel)(3)
    assert seen == [3] and not cancel.is_set()
    _progress_to(SimpleNamespace(progress=SimpleNamespace(emit=deleted)), cancel)(4)
    assert cancel.is_set()
