"""Fine-tuning engine and lineage: learns, never overwrites, cancels cleanly, guards."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from napari_prosma.checkpoint import ModelCard, file_sha256, load, save
from napari_prosma.finetune import (
    FinetuneConfig,
    corrected_units,
    finetune,
    run_finetune,
    trainable_parameters,
)
from napari_prosma.inference import Cancelled
from napari_prosma.nets import build_model
from napari_prosma.preprocess import InputError
from napari_prosma.versions import ModelStore


def _disc_images(n: int, size: int = 48, seed: int = 0):
    """Bright discs on a noisy background: an easy task a random model gets wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        cy, cx, r = [*rng.integers(14, size - 14, 2).tolist(), int(rng.integers(6, 11))]
        lab = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        img = (rng.normal(60, 15, (size, size)) + 120 * lab).clip(0, 255).astype(np.uint8)
        images.append(img)
        labels.append(lab)
    return images, labels


@pytest.fixture
def parent(tmp_path):
    torch.manual_seed(0)
    net = build_model(spatial_dims=2, in_channels=1, out_channels=1, widths=[8, 16, 16, 32, 32])
    card = ModelCard(
        architecture="prosma_unet",
        arch_kwargs=net.config,
        name="discs",
        class_names=["background", "disc"],
        normalization={"mode": "fixed", "scale": 255, "mean": [0.3], "std": [0.2]},
    )
    path = save(net, tmp_path / "parent", card)
    return path


def _cfg(**kw):
    base = dict(
        max_steps=60,
        time_budget_s=None,
        lr=3e-3,
        batch_size=4,
        eval_every=20,
        patience=10,
        trainable="all",
        device="cpu",
        holdout_fraction=0.25,
    )
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.slow
def test_finetune_raises_holdout_dice_and_writes_a_new_version(parent, tmp_path):
    store = ModelStore(tmp_path / "store")
    store.activate(str(parent))
    images, labels = _disc_images(8)
    parent_hash = file_sha256(parent)
    seen = []
    result, vid = run_finetune(
        parent, images, labels, store=store, config=_cfg(), progress=seen.append
    )
    assert result.dice_after > result.dice_before + 0.1, (result.dice_before, result.dice_after)
    assert result.n_holdout == 2 and result.n_train == 6
    assert file_sha256(parent) == parent_hash  # the parent is never touched
    v = store.get(vid)
    _net, card = load(v.checkpoint)
    assert card.parent_hash == parent_hash
    assert card.training["config"]["trainable"] == "all"
    assert len(card.training["data"]) == 8 and "labels_sha256" in card.training["data"][0]
    assert card.metrics["finetune_holdout"]["dice_after"] == pytest.approx(result.dice_after)
    _back_images, back_labels = store.load_corrections(v.path / "corrections")
    assert all(np.array_equal(a, b) for a, b in zip(back_labels, labels))
    assert store.active() == vid
    assert {p.phase for p in seen} >= {"before", "train", "eval", "done"}


def test_cancel_leaves_parent_active_and_no_version(parent, tmp_path):
    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    images, labels = _disc_images(4)
    stop = threading.Event()

    def progress(p):
        if p.step >= 3:
            stop.set()

    with pytest.raises(Cancelled):
        run_finetune(
            parent, images, labels, store=store, config=_cfg(), progress=progress, cancel=stop
        )
    assert store.versions() == []
    assert store.active() == "parent-name"
    # no partial files in the store, but the corrections survive in .incoming
    leftovers = [p for p in store.root.iterdir() if p.name not in (".incoming", "active.json")]
    assert leftovers == []
    assert list((store.root / ".incoming").glob("*/index.json"))


def test_regression_guard_keeps_parent_active(parent, tmp_path, monkeypatch):
    import napari_prosma.finetune as ft

    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    images, labels = _disc_images(4)
    scores = iter([0.8, 0.5, 0.5, 0.5, 0.5, 0.5])
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    result, vid = run_finetune(parent, images, labels, store=store, config=_cfg(max_steps=3))
    assert result.improved is False
    assert store.active() == "parent-name"  # guard held
    assert store.get(vid).run["improved"] is False  # but the version exists to inspect
    scores = iter([0.8, 0.5, 0.5, 0.5, 0.5, 0.5])
    _, vid2 = run_finetune(
        parent, images, labels, store=store, config=_cfg(max_steps=3), activate="always"
    )
    assert store.active() == vid2


def test_trainable_groups_freeze_the_rest():
    net = build_model(spatial_dims=2, widths="tiny")
    gates = trainable_parameters(net, "gates")
    assert {id(p) for p in gates} == {id(p) for p in net.gates.parameters()}
    assert not any(p.requires_grad for p in net.encoder.parameters())
    dec = trainable_parameters(net, "decoder_gates")
    assert len(dec) > len(gates)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    assert len(trainable_parameters(net, "all")) == len(list(net.parameters()))
    plain = build_model("unet", spatial_dims=2, widths="tiny")
    with pytest.raises(InputError, match="nothing to train"):
        trainable_parameters(plain, "gates")


def test_only_changed_slices_of_a_volume_count():
    net = build_model(spatial_dims=2, widths="tiny")
    card = ModelCard(architecture="prosma_unet", arch_kwargs=net.config)
    vol = np.zeros((6, 16, 16), np.float32)
    prev = np.zeros((6, 16, 16), np.uint8)
    prev[1:5, 4:8, 4:8] = 1
    lab = prev.copy()
    lab[2, 4:8, 4:8] = 0  # the user erased a false positive on slice 2
    lab[4, 9:12, 9:12] = 1  # and added a region on slice 4
    units = corrected_units([vol], [lab], card, previous=[prev])
    assert len(units) == 2
    assert units[0][1].sum() == 0 and units[1][1].sum() == 16 + 9
    # without a previous prediction: every labelled slice
    assert len(corrected_units([vol], [lab], card)) == 3
    card3 = ModelCard(architecture="prosma_unet", arch_kwargs={**net.config, "spatial_dims": 3})
    (u,) = corrected_units([vol], [lab], card3, previous=[prev])
    assert u[0].shape == (3, 16, 16)  # slab of corrected slices 2..4


def test_bad_inputs_are_refused_with_plain_messages():
    net = build_model(spatial_dims=2, widths="tiny")
    card = ModelCard(architecture="prosma_unet", arch_kwargs=net.config, class_names=["bg", "fg"])
    with pytest.raises(InputError, match="do not match the image"):
        corrected_units([np.zeros((8, 8))], [np.zeros((8, 9), np.uint8)], card)
    with pytest.raises(InputError, match="no corrected or labelled"):
        corrected_units([np.zeros((8, 8))], [np.zeros((8, 8), np.uint8)], card)
    with pytest.raises(InputError, match="use class 5"):
        corrected_units([np.zeros((8, 8))], [np.full((8, 8), 5, np.uint8)], card)
    with pytest.raises(InputError, match="trainable"):
        finetune(
            net,
            card,
            [np.zeros((8, 8))],
            [np.ones((8, 8), np.uint8)],
            config=FinetuneConfig(trainable="encoder"),
        )


def test_model_stays_trainable_after_a_prediction():
    """The inference engine must not turn parameters into inference tensors."""
    from napari_prosma.inference import predict

    net = build_model(spatial_dims=2, in_channels=1, out_channels=1, widths="tiny")
    card = ModelCard(architecture="prosma_unet", arch_kwargs=net.config)
    predict(np.zeros((40, 40), np.float32), net, card, device="cpu")
    trainable_parameters(net, "all")
    net.train()
    net(torch.randn(2, 1, 32, 32)).mean().backward()
    assert net.head.weight.grad is not None


def test_training_units_are_resized_like_inference_does():
    """A model trained on resized images (card input_size) sees the same scale in fine-tuning
    as in inference."""
    from napari_prosma.finetune import _working

    net = build_model(spatial_dims=2, widths="tiny")
    card = ModelCard(
        architecture="prosma_unet", arch_kwargs=net.config, extra={"input_size": [32, 32]}
    )
    img = np.zeros((64, 48, 3), np.uint8)
    lab = np.zeros((64, 48), np.uint8)
    lab[:32] = 1
    rgb = dataclasses.replace(card, arch_kwargs={**net.config, "in_channels": 3})
    x, y = _working(img, lab, rgb)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert set(np.unique(y).tolist()) == {0, 1} and y[:16].all() and not y[16:].any()
    x, y = _working(img[..., 0], lab, card)
    assert x.shape == (1, 32, 32)
    plain = ModelCard(architecture="prosma_unet", arch_kwargs=net.config)
    x, y = _working(img[..., 0], lab, plain)
    assert x.shape == (1, 64, 48) and y.shape == (64, 48)
