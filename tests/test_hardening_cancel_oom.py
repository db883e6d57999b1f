"""Injected faults (issue #7): cancel at every phase of inference and fine-tuning, and a
simulated CUDA out-of-memory error (retry with smaller tiles, then the CPU, then a plain
message). Every case checks that nothing is returned, kept or activated."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hardening_support import disc_images, save_tiny, smooth_image, snapshot, tiny_model
from napari_prosma.errors import user_message
from napari_prosma.finetune import FinetuneConfig, run_finetune
from napari_prosma.inference import Cancelled, predict, predict_batch
from napari_prosma.inference import device as devmod
from napari_prosma.preprocess import InputError
from napari_prosma.versions import ModelStore


class CancelAt:
    """A cancel flag that turns true at its ``n``-th poll (0: never) and counts polls."""

    def __init__(self, n: int = 0):
        self.n, self.polls = n, 0

    def __call__(self) -> bool:
        self.polls += 1
        return 0 < self.n <= self.polls


# ---------------------------------------------------------------------------- inference


@pytest.mark.parametrize("dims", [2, 3])
def test_inference_cancel_at_every_poll_returns_nothing(dims):
    """The engine polls the flag before any work, between tile batches and before it
    assembles the result; a cancel at any one of those polls raises Cancelled."""
    model, card = tiny_model(dims)
    img = smooth_image((32, 32) if dims == 2 else (8, 16, 16))
    tile = 16 if dims == 2 else 8
    count = CancelAt()
    # one tile a batch, so that every tile is a poll (the CPU default batches small tiles)
    kw = dict(device="cpu", tile_size=tile, batch_size=1)
    done = predict(img, model, card, cancel=count, **kw)
    polls = count.polls
    assert polls >= done.n_tiles + 2  # start, every tile batch, the end
    for n in range(1, polls + 1):
        flag = CancelAt(n)
        with pytest.raises(Cancelled, match="cancelled; nothing was changed"):
            predict(img, model, card, cancel=flag, **kw)
        assert flag.polls == n  # stopped at that poll, no further work
    assert not model.training  # the model's mode was restored each time


def test_batch_cancel_between_images_of_a_volume():
    """A 2D model on every slice of a volume (one batch): cancelling half-way raises."""
    model, card = tiny_model(2)
    vol = smooth_image((6, 32, 32))
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        if done == total // 2:
            stop.set()

    with pytest.raises(Cancelled):
        predict_batch(
            list(vol), model, card, device="cpu", tile_size=16, progress=progress, cancel=stop
        )


def test_segment_job_cancel_before_and_after_loading_the_model(tmp_path, monkeypatch):
    """The Segment widget's worker job polls before and after loading the model."""
    from napari_prosma._widgets import _core
    from napari_prosma._widgets.segment import _compute
    from napari_prosma.inference.plan import plan_input

    ckpt = save_tiny(tmp_path)
    plan = plan_input(smooth_image((32, 32)), rgb=False, spatial_dims=2)
    req = {
        "spec": str(ckpt),
        "device": "cpu",
        "plan": plan,
        "tta": False,
        "probabilities": False,
        "gates": True,
    }
    before = threading.Event()
    before.set()
    with pytest.raises(Cancelled):
        _compute(req, before, None)

    during = threading.Event()
    real = _core.get_model

    def load_then_cancel(spec, device="auto"):
        out = real(spec, device)
        during.set()  # the user pressed Cancel while the model was loading
        return out

    monkeypatch.setattr(_core, "get_model", load_then_cancel)
    with pytest.raises(Cancelled):
        _compute(req, during, None)


# ---------------------------------------------------------------------------- fine-tuning


def _cfg(**kw) -> FinetuneConfig:
    base = dict(
        max_steps=6,
        time_budget_s=None,
        lr=3e-3,
        batch_size=2,
        eval_every=2,
        patience=10,
        trainable="all",
        device="cpu",
        holdout_fraction=0.25,
    )
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture
def ft_setup(tmp_path):
    parent = save_tiny(tmp_path / "models", "parent", normalization={"mode": "fixed"})
    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    images, labels = disc_images(4)
    return parent, store, images, labels


def _assert_nothing_kept(store: ModelStore, parent, parent_bytes: bytes) -> None:
    assert store.versions() == []
    assert store.active() == "parent-name"
    assert parent.read_bytes() == parent_bytes  # the earlier model untouched
    leftovers = [p.name for p in store.root.iterdir() if p.name not in (".incoming", "active.json")]
    assert leftovers == []  # no half-made version folder
    assert list((store.root / ".incoming").glob("*/index.json"))  # corrections kept


@pytest.mark.parametrize("phase", ["before", "train", "eval", "done"])
def test_finetune_cancel_at_every_phase(ft_setup, phase):
    """Cancel when the run reports each phase: after the first held-out measurement,
    after a training step, after an evaluation, and after the final evaluation (just
    before the checkpoint would be saved)."""
    parent, store, images, labels = ft_setup
    parent_bytes = parent.read_bytes()
    stop = threading.Event()
    seen = []

    def progress(p) -> None:
        seen.append(p.phase)
        if p.phase == phase:
            stop.set()

    with pytest.raises(Cancelled):
        run_finetune(
            parent, images, labels, store=store, config=_cfg(), progress=progress, cancel=stop
        )
    assert phase in seen
    _assert_nothing_kept(store, parent, parent_bytes)


def test_finetune_cancel_during_the_final_evaluation(ft_setup, monkeypatch):
    """A cancel while the trained model is being measured on the held-out part is not
    ignored: no version is saved or activated."""
    import napari_prosma.finetune.loop as ft

    parent, store, images, labels = ft_setup
    parent_bytes = parent.read_bytes()
    stop = threading.Event()
    calls = {"n": 0}
    real = ft.holdout_dice

    def measure(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # before, after 2 steps ... the final measurement
            stop.set()
        return real(*a, **k)

    monkeypatch.setattr(ft, "holdout_dice", measure)
    with pytest.raises(Cancelled):
        run_finetune(parent, images, labels, store=store, config=_cfg(max_steps=2), cancel=stop)
    _assert_nothing_kept(store, parent, parent_bytes)


def test_finetune_cancel_before_start_trains_nothing(ft_setup, monkeypatch):
    import napari_prosma.finetune.units as ft

    parent, store, images, labels = ft_setup
    parent_bytes = parent.read_bytes()
    steps = []
    monkeypatch.setattr(ft, "_sample_patch", lambda *a, **k: steps.append(1))
    with pytest.raises(Cancelled):
        run_finetune(parent, images, labels, store=store, config=_cfg(), cancel=lambda: True)
    assert steps == []
    _assert_nothing_kept(store, parent, parent_bytes)


# ---------------------------------------------------------------------------- out of memory


def _oom_after(model, good_calls: int, times: int, wrap: bool = False) -> dict:
    """Make ``model.forward`` raise CUDA out-of-memory ``times`` times after ``good_calls``
    successful calls (``wrap``: inside a RuntimeError, as MONAI re-raises)."""
    real = model.forward
    state = {"calls": 0, "left": times}

    def forward(*a, **k):
        state["calls"] += 1
        if state["calls"] > good_calls and state["left"] > 0:
            state["left"] -= 1
            err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if wrap:
                raise RuntimeError("sliding window inference failed") from err
            raise err
        return real(*a, **k)

    model.forward = forward
    return state


def test_oom_mid_run_retries_and_the_result_is_complete(monkeypatch):
    """Out-of-memory after some tiles (wrapped as MONAI does): the run is redone with
    smaller tiles from the start, the result covers the whole image, a note says so."""
    model, card = tiny_model(2)
    img = smooth_image((64, 64))
    ref = predict(img, model, card, device="cpu", tile_size=32, return_probabilities=True)
    monkeypatch.setattr(devmod, "is_gpu", lambda d: True)  # pretend the CPU is a GPU
    _oom_after(model, good_calls=3, times=1, wrap=True)
    progress = []
    pred = predict(
        img,
        model,
        card,
        device="cpu",
        tile_size=32,
        batch_size=1,  # one tile a forward: the 4th forward is mid-run
        return_probabilities=True,
        progress=lambda d, t: progress.append((d, t)),
    )
    assert any("smaller tiles" in n for n in pred.notes), pred.notes
    assert pred.tile_size == (16, 16)
    assert pred.labels.shape == img.shape
    assert np.abs(pred.probabilities - ref.probabilities).max() < 0.1
    assert progress[-1][0] == progress[-1][1]  # the progress of the retry reached its end


def test_oom_everywhere_is_one_plain_message(monkeypatch):
    """GPU, smaller tiles and the CPU all run out: an InputError whose user message talks
    about memory on this machine (not a GPU hint, not a traceback)."""
    model, card = tiny_model(2)
    monkeypatch.setattr(devmod, "is_gpu", lambda d: True)  # pretend the CPU is a GPU
    state = _oom_after(model, good_calls=0, times=100)
    with pytest.raises(InputError) as info:
        predict(smooth_image((32, 32)), model, card, device="cpu", tile_size=16)
    msg = user_message(info.value)
    assert "out of memory" in msg and "crop" in msg and "GPU ran out" not in msg
    assert "\n" not in msg and "Traceback" not in msg
    assert state["calls"] == 3  # the GPU, smaller tiles on it, then the CPU
    assert not model.training


def test_finetune_oom_leaves_no_version(ft_setup, monkeypatch):
    """Out of memory while training: a plain error, no version, the parent stays active."""
    import napari_prosma.finetune.units as ft

    parent, store, images, labels = ft_setup
    parent_bytes = parent.read_bytes()

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(ft, "_augment", boom)
    with pytest.raises(torch.OutOfMemoryError) as info:
        run_finetune(parent, images, labels, store=store, config=_cfg())
    assert user_message(info.value) == "the GPU ran out of memory; try the CPU or smaller tiles"
    _assert_nothing_kept(store, parent, parent_bytes)
    assert snapshot(parent.parent)  # the parent's folder still holds its files


def test_finetune_that_diverges_saves_nothing(ft_setup, monkeypatch):
    """A loss that becomes NaN (as CPU bf16 training once did) stops the run with a plain
    message; no NaN model is saved, let alone activated (with no held-out part to catch
    it, it used to be)."""
    import napari_prosma.finetune.loop as ft

    parent, store, images, labels = ft_setup
    parent_bytes = parent.read_bytes()
    monkeypatch.setattr(ft, "_loss_fn", lambda card: lambda logits, y: logits.sum() * np.nan)
    with pytest.raises(InputError, match="diverged") as info:
        run_finetune(parent, images[:1], labels[:1], store=store, config=_cfg(holdout_fraction=0.0))
    assert "previous model stays active" in user_message(info.value)
    _assert_nothing_kept(store, parent, parent_bytes)


def test_cli_ctrl_c_removes_the_outputs_of_the_file_in_progress(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the labels of a file were written but before its probability map:
    exit code 130, one line, and that file's labels are removed (no half set of outputs)."""
    import napari_prosma.io as io_mod
    from napari_prosma._samples import sample_path
    from napari_prosma.cli import main

    model = save_tiny(tmp_path / "models", "grey")
    out = tmp_path / "out"

    def interrupted(*a, **k):
        assert list(out.glob("*_labels.png"))  # the labels are on disk at this point
        raise KeyboardInterrupt

    monkeypatch.setattr(io_mod, "write_image", interrupted)
    rc = main(
        [
            "predict",
            str(sample_path("busi_benign")),
            "-o",
            str(out),
            "--model",
            str(model),
            "--device",
            "cpu",
            "--probabilities",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err == ["prosma: interrupted"]
    assert list(out.rglob("*")) == []
