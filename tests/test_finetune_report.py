"""Fine-tuning, issue 16/20: the new version's task, classes and gate range; the report on
whole images and volumes; the curve of held-out Dice; memory given back."""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pytest
import torch

from hardening_support import disc_images, tiny_model
from napari_prosma.checkpoint import load, save
from napari_prosma.finetune import FinetuneConfig, check_naming, finetune, run_finetune
from napari_prosma.finetune.whole import describe_whole
from napari_prosma.inference import gate_sparsity_range, predict
from napari_prosma.inference.gates import sparsity_warnings
from napari_prosma.preprocess import InputError
from napari_prosma.versions import ModelStore, version_rows
from test_hardening_cancel_oom import _cfg as _fast_cfg  # tests/ is on sys.path

#: A range no fine-tuned disc model lands in: must be replaced, not inherited.
STALE_RANGE = {"stage1": [0.001, 0.002], "stage2": [0.001, 0.002]}


def _cfg(**kw) -> FinetuneConfig:
    """The fast CPU settings of the hardening tests, without replay."""
    return _fast_cfg(**{"replay_fraction": 0.0, **kw})


@pytest.fixture
def parent(tmp_path):
    net, card = tiny_model(
        intended_use="Research: outline a breast lesion in ultrasound.",
        gate_sparsity_range=dict(STALE_RANGE),
        normalization={"mode": "fixed", "scale": 255, "mean": [0.3], "std": [0.2]},
        extra={"modality": "ultrasound"},
    )
    return save(net, tmp_path / "parent", card)


def _improving(monkeypatch) -> None:
    """Held-out Dice that beats the parent, so a version is saved."""
    import napari_prosma.finetune.loop as ft

    scores = iter([0.2] + [0.5] * 50)
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))


def test_the_user_names_the_new_task_classes_and_version(parent, tmp_path, monkeypatch):
    _improving(monkeypatch)
    store = ModelStore(tmp_path / "store")
    images, labels = disc_images(4)
    _, vid = run_finetune(
        parent,
        images,
        labels,
        store=store,
        config=_cfg(),
        task="Spleen in abdominal CT slices",
        class_names=["spleen"],
        label="Spleen CT, ward 3",
    )
    assert vid.startswith("tiny-spleen-ct-ward-3-ft-")
    card = store.get(vid).card
    assert card.intended_use == "Spleen in abdominal CT slices"
    assert card.class_names == ["background", "spleen"]
    assert card.extra["parent_task"].startswith("Research: outline a breast lesion")
    assert card.extra["parent_class_names"] == ["background", "thing"]
    assert "modality" not in card.extra  # the parent's "ultrasound" no longer applies
    run = json.loads((store.get(vid).path / "run.json").read_text())
    assert run["label"] == "Spleen CT, ward 3" and run["task"] == card.intended_use
    (row,) = version_rows(store)
    assert row.label == "Spleen CT, ward 3" and row.task == card.intended_use
    # without a label the task names the version; without either the parent's stay
    _improving(monkeypatch)
    _, vid2 = run_finetune(parent, images, labels, store=store, config=_cfg(), task="Liver CT")
    assert vid2.startswith("tiny-liver-ct-ft-")
    _improving(monkeypatch)
    _, vid3 = run_finetune(parent, images, labels, store=store, config=_cfg())
    assert vid3.startswith("tiny-ft-")
    assert store.get(vid3).card.class_names == ["background", "thing"]
    assert store.get(vid3).card.extra["modality"] == "ultrasound"


def test_bad_class_names_are_refused_before_anything_is_saved(parent, tmp_path):
    store = ModelStore(tmp_path / "store")
    images, labels = disc_images(4)
    for names, words in (
        (["spleen", "liver", "kidney"], r"has 2 classes \(background and 1 more\) but 3 class"),
        (["background", "background"], "must differ"),
        (["  "], "must not be blank"),
    ):
        with pytest.raises(InputError, match=words):
            run_finetune(parent, images, labels, store=store, config=_cfg(), class_names=names)
    with pytest.raises(InputError, match="200 at most"):
        run_finetune(parent, images, labels, store=store, config=_cfg(), task="x" * 201)
    assert not store.root.exists() or not any(store.root.iterdir())
    _net, card = load(parent)
    assert check_naming(card, "  ", []) == (None, None)
    assert check_naming(card, None, ["bg", "spleen"]) == (None, ["bg", "spleen"])


def test_the_gate_range_is_measured_again_on_the_new_model_and_data(parent, tmp_path):
    """The card's range is the one training would record (the same function, fp32) for
    the new model on the user's images and replay samples; none of those images then
    raises the drift warning, whereas the parent's range would."""
    store = ModelStore(tmp_path / "store")
    images, labels = disc_images(6, size=32, seed=1)
    replay = [(im, lab) for im, lab in zip(*disc_images(3, size=40, seed=2))]
    _, vid = run_finetune(
        parent,
        images,
        labels,
        store=store,
        config=_cfg(holdout_fraction=0.0, max_steps=4),
        replay=replay,
    )
    net, card = load(store.get(vid).checkpoint)
    preds = [
        predict(x, net, card, device="cpu", precision="fp32", return_gates="stats")
        for x in [*images, *(r[0] for r in replay)]
    ]
    want = gate_sparsity_range(preds)
    assert want and card.gate_sparsity_range.keys() == want.keys()
    for stage, (lo, hi) in want.items():
        assert card.gate_sparsity_range[stage] == pytest.approx([lo, hi], abs=1e-6)
    assert card.extra["gate_sparsity_range_from"]["n_images"] == 9
    assert card.extra["gate_sparsity_range_from"]["n_replay"] == 3
    for p in preds:
        assert sparsity_warnings(card.gate_sparsity_range, p.gates) == []
    assert any(sparsity_warnings(STALE_RANGE, p.gates) for p in preds)


def test_whole_volume_report_counts_false_positives_on_empty_slices(parent, tmp_path):
    """A volume whose labels leave some slices empty: the report's numbers are what
    segmenting every slice with each model gives, counted here independently."""
    imgs, labs = disc_images(6, size=32, seed=3)
    vol, lab = np.stack(imgs), np.stack(labs)
    lab[4:] = 0  # the user found nothing on the last two slices
    parent_net, card = load(parent)
    result = finetune(
        parent_net, card, [vol], [lab], config=_cfg(holdout_fraction=0.25, max_steps=4)
    )
    w = result.whole
    assert w["n_volumes"] == 1 and w["n_images"] == 0 and w["empty_slices"] == 2
    for side, net in (("before", parent_net), ("after", result.model)):
        pred = np.stack([predict(s, net, card, device="cpu", precision="fp32").labels for s in vol])
        fg = pred > 0
        assert w[side]["false_positive"] == int((fg & (lab == 0)).sum())
        assert w[side]["false_positive_on_empty"] == int(fg[4:].sum())
        assert w[side]["true_positive"] == int((fg & (lab > 0)).sum())
        assert w[side]["empty_slices_marked"] == int(fg[4:].reshape(2, -1).any(1).sum())
    assert w["holdout_units"] == result.n_report == 1  # 4 labelled slices, 1 held out
    text = " ".join(describe_whole(w, "slice(s)"))
    assert "1 volume(s), whole" in text and "no independent test" in text
    assert "on the 2 slice(s) you left empty" in text
    assert "the held-out Dice rests on 1 slice(s)" in text
    assert result.card.metrics["finetune_whole"] == w


def test_held_out_dice_is_measured_at_least_min_evals_times_in_the_budget(parent, monkeypatch):
    """Issue 16: 17 steps ran in the 120 s budget and eval_every=20 never came, so no curve.
    A clock that runs fast: the budget ends the run after a few steps, and the held-out
    Dice is still measured ``min_evals`` times on the way."""
    import napari_prosma.finetune.loop as ft

    class Clock:
        t = 0.0

        def perf_counter(self) -> float:
            self.t += 1.0
            return self.t

    monkeypatch.setattr(ft, "time", Clock())
    scores = iter(np.linspace(0.1, 0.9, 200).tolist())
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    images, labels = disc_images(4)
    net, card = load(parent)
    cfg = _cfg(max_steps=10_000, eval_every=10_000, time_budget_s=60.0, min_evals=5)
    result = finetune(net, card, images, labels, config=cfg)
    assert result.stopped == "time_budget" and result.steps < 100
    curve = result.curve
    assert curve[0][0] == 0 and len(curve) >= 1 + 5, curve
    assert [s for s, _ in curve] == sorted(s for s, _ in curve)
    # with the old schedule (min_evals 0) only the step at the budget's end was measured
    scores = iter(np.linspace(0.1, 0.9, 200).tolist())
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    old = finetune(net, card, images, labels, config=_cfg(**{**cfg.__dict__, "min_evals": 0}))
    assert len(old.curve) == 2


def test_training_copy_optimiser_and_gradients_are_released(parent, monkeypatch):
    """Nothing of the run stays referenced (micro-sam #952: GPU memory kept after
    fine-tuning): the optimiser dies with the call, the model
    returned holds no gradients, and the CUDA allocator's cache is emptied."""
    import napari_prosma.finetune.loop as ft
    import napari_prosma.finetune.net as ftnet

    made: list[weakref.ref] = []
    real_adamw = torch.optim.AdamW

    class Tracked(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(weakref.ref(self))

    monkeypatch.setattr(torch.optim, "AdamW", Tracked)
    freed: list[str] = []
    monkeypatch.setattr(ft, "free_device_memory", lambda d: freed.append(str(d)))
    net, card = load(parent)
    images, labels = disc_images(4)
    result = finetune(net, card, images, labels, config=_cfg())
    gc.collect()
    assert made and all(r() is None for r in made)
    assert all(p.grad is None for p in result.model.parameters())
    assert freed == ["cpu"]
    # the device step itself: CUDA's cache is emptied, nothing is asked of a CPU
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    ftnet.free_device_memory(torch.device("cpu"))
    assert calls == []
    ftnet.free_device_memory(torch.device("cuda"))
    assert calls == ["cuda"]
