"""Fine-tuning engine and lineage: learns, never overwrites, cancels cleanly, guards."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hardening_support import disc_images
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

REPO = Path(__file__).resolve().parents[1]


def _disc_images(n: int, size: int = 48, seed: int = 0):
    """Bright discs on a noisy background, larger than the hardening tests' default."""
    return disc_images(n, size, seed, margin=14, radius=(6, 11))


def _save_disc_model(folder, file_name: str, name: str, all_foreground: bool = False):
    """Save a seeded random 2D binary ProSMA-UNet for the disc task; returns its weights.
    ``all_foreground``: zero the head and bias it to sigmoid 0.62 everywhere."""
    torch.manual_seed(0)
    net = build_model(spatial_dims=2, in_channels=1, out_channels=1, widths=[8, 16, 16, 32, 32])
    if all_foreground:
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.fill_(0.5)
    card = ModelCard(
        architecture="prosma_unet",
        arch_kwargs=net.config,
        name=name,
        class_names=["background", "disc"],
        normalization={"mode": "fixed", "scale": 255, "mean": [0.3], "std": [0.2]},
    )
    return save(net, folder / file_name, card)


@pytest.fixture
def parent(tmp_path):
    return _save_disc_model(tmp_path, "parent", "discs")


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
    import napari_prosma.finetune.loop as ft

    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    images, labels = _disc_images(4)
    # before 0.5; the one evaluation 0.8 keeps the trained state; measured again 0.4
    scores = iter([0.5, 0.8, 0.4])
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    result, vid = run_finetune(parent, images, labels, store=store, config=_cfg(max_steps=3))
    assert result.improved is False
    assert store.active() == "parent-name"  # guard held
    assert store.get(vid).run["improved"] is False  # but the version exists to inspect
    scores = iter([0.5, 0.8, 0.4])
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


def test_corrected_slices_along_any_axis():
    """The same corrections found along axis 2 (e.g. sagittal slices of a (Z, Y, X) scan)."""
    net = build_model(spatial_dims=2, widths="tiny")
    card = ModelCard(architecture="prosma_unet", arch_kwargs=net.config)
    vol = np.arange(6 * 10 * 12, dtype=np.float32).reshape(6, 10, 12)
    prev = np.zeros((6, 10, 12), np.uint8)
    lab = prev.copy()
    lab[1:4, 2:5, 7] = 1  # painted on sagittal slice x = 7
    lab[2, 6, 9] = 1  # and one voxel on x = 9
    units = corrected_units(
        [vol], [lab], card, previous=[prev], slice_axis=2, spacing=[(3.0, 0.8, 0.7)]
    )
    assert len(units) == 2
    assert units[0].image.shape == (6, 10) and units[0].labels.sum() == 9
    np.testing.assert_array_equal(units[0].image, vol[:, :, 7])
    assert units[0].spacing == (3.0, 0.8)  # the in-plane spacing of a sagittal slice
    assert len(corrected_units([vol], [lab], card, previous=[prev], slice_axis=0)) == 3
    card3 = ModelCard(architecture="prosma_unet", arch_kwargs={**net.config, "spatial_dims": 3})
    (u,) = corrected_units([vol], [lab], card3, previous=[prev], slice_axis=2)
    assert u.image.shape == (6, 10, 3) and u.labels.sum() == 10  # slab x = 7..9
    assert u.spacing is None
    with pytest.raises(InputError, match="slice_axis"):
        corrected_units([vol], [lab], card, slice_axis=3)
    with pytest.raises(InputError, match="slice_axis"):
        FinetuneConfig(slice_axis=-1).validate()


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
    from napari_prosma.finetune.units import _working

    net = build_model(spatial_dims=2, widths="tiny")
    card = ModelCard(
        architecture="prosma_unet", arch_kwargs=net.config, extra={"input_size": [32, 32]}
    )
    img = np.zeros((64, 48, 3), np.uint8)
    lab = np.zeros((64, 48), np.uint8)
    lab[:32] = 1
    rgb = dataclasses.replace(card, arch_kwargs={**net.config, "in_channels": 3})
    x, y = _working((img, lab), rgb)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert set(np.unique(y).tolist()) == {0, 1} and y[:16].all() and not y[16:].any()
    x, y = _working((img[..., 0], lab), card)
    assert x.shape == (1, 32, 32)
    plain = ModelCard(architecture="prosma_unet", arch_kwargs=net.config)
    x, y = _working((img[..., 0], lab), plain)
    assert x.shape == (1, 64, 48) and y.shape == (64, 48)


# ---------------------------------------------------------------------------- held-out split


def test_held_out_units_split_into_selection_and_report_when_enough():
    from napari_prosma.finetune import REPORT_SPLIT_MIN, min_units_for_report, split_units

    for n in range(2, 40):
        train, sel, rep = split_units(n, 0.25, np.random.default_rng(n))
        held = set(sel) | set(rep)
        assert set(train).isdisjoint(held) and len(train) + len(held) == n
        assert train, n  # never everything held out
        if len(held) >= REPORT_SPLIT_MIN:
            assert set(sel).isdisjoint(rep) and len(rep) >= len(sel) >= 2, (n, sel, rep)
        else:
            assert sel == rep, (n, sel, rep)  # too few: both roles on the same units
    assert min_units_for_report(0.25) == 14
    assert len(split_units(13, 0.25, np.random.default_rng(0))[2]) == 3  # shared
    assert len(split_units(14, 0.25, np.random.default_rng(0))[2]) == 2  # own half
    assert split_units(5, 0.0, np.random.default_rng(0)) == ([0, 1, 2, 3, 4], [], [])


def _by_role(selection, report):
    """A stand-in for ``holdout_dice``: the first list of units it sees is the selection
    part (measured first), the second the report part; each gets its own scores."""
    roles: dict[int, str] = {}
    scores = {"selection": iter(selection), "report": iter(report)}
    calls = []

    def fake(model, card, units, device, cancel=None):
        if id(units) not in roles:
            roles[id(units)] = ("selection", "report")[len(roles)]
        role = roles[id(units)]
        calls.append((role, len(units)))
        return next(scores[role])

    return fake, calls


def test_guard_decides_on_the_report_part_not_on_the_selection_part(parent, tmp_path, monkeypatch):
    """The selection part improves (so early stopping keeps a trained state) while the
    report part gets worse: the guard must fire. Had it used the selection part, it
    would have activated the new model."""
    import json

    import napari_prosma.finetune.loop as ft

    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    images, labels = _disc_images(16)
    fake, calls = _by_role(selection=[0.2, 0.5, 0.9, 0.9], report=[0.8, 0.4])
    monkeypatch.setattr(ft, "holdout_dice", fake)
    result, vid = run_finetune(
        parent, images, labels, store=store, config=_cfg(max_steps=4, eval_every=2)
    )
    assert calls == [
        ("selection", 2),
        ("report", 2),
        ("selection", 2),
        ("selection", 2),
        ("report", 2),
    ]
    assert result.independent_report and result.n_select == 2 and result.n_report == 2
    assert result.selection_before == 0.2 and result.selection_after == 0.9
    assert (result.dice_before, result.dice_after) == (0.8, 0.4)
    assert result.improved is False
    assert store.active() == "parent-name"
    run = json.loads((store.get(vid).path / "run.json").read_text())
    assert run["improved"] is False and run["independent_report"] is True
    m = store.get(vid).card.metrics["finetune_holdout"]
    assert m["dice_after"] == 0.4 and m["selection_dice_after"] == 0.9
    # the other way round (report better, selection hardly) activates it
    fake, _ = _by_role(selection=[0.5, 0.51, 0.51], report=[0.4, 0.6])
    monkeypatch.setattr(ft, "holdout_dice", fake)
    result, vid2 = run_finetune(
        parent, images, labels, store=store, config=_cfg(max_steps=4, eval_every=2)
    )
    assert result.improved is True and store.active() == vid2


@pytest.mark.slow
def test_guard_fires_on_a_real_run_that_gets_worse(tmp_path):
    """No stand-ins: the parent calls every pixel foreground; the user's corrections teach
    it discs, but the report images' labels are everything *but* the disc (corrections
    that contradict the rest). Training improves the selection part and ruins the report
    part, and the guard keeps the parent active."""
    from napari_prosma.finetune import split_units

    path = _save_disc_model(tmp_path, "allfg", "allfg", all_foreground=True)
    images, labels = _disc_images(16)
    cfg = _cfg(max_steps=30, eval_every=10, seed=0)
    _, sel, rep = split_units(16, cfg.holdout_fraction, np.random.default_rng(cfg.seed))
    assert set(sel).isdisjoint(rep)
    for k in rep:
        labels[k] = (1 - labels[k]).astype(np.uint8)
    store = ModelStore(tmp_path / "store")
    store.activate("allfg")
    result, vid = run_finetune(path, images, labels, store=store, config=cfg)
    assert result.selection_after > result.selection_before + 0.3, result
    assert result.dice_after < result.dice_before - 0.3, result
    assert result.improved is False
    assert store.active() == "allfg"
    assert store.get(vid).run["improved"] is False


# ---------------------------------------------------------------------------- replay


def test_replay_patches_take_their_share_of_every_batch():
    from napari_prosma.finetune.units import _batch, _n_replay

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    user = [(np.zeros((1, 16, 16), np.float32), np.zeros((16, 16), np.int64))]
    base = [(np.full((1, 16, 16), 5.0, np.float32), np.ones((16, 16), np.int64))]
    for bs, frac, want in ((4, 0.25, 1), (8, 0.25, 2), (4, 0.0, 0), (4, 0.5, 2)):
        cfg = FinetuneConfig(batch_size=bs, replay_fraction=frac)
        x, y, n_rep = _batch(user, base, cfg, (16, 16), rng, gen)
        assert n_rep == want
        from_base = (x.mean(dim=(1, 2, 3)) > 2).sum().item()  # intensity 5 ± 10 %
        assert from_base == want and y.sum().item() == want * 256
    x, y, n_rep = _batch(user, [], FinetuneConfig(batch_size=4), (16, 16), rng, gen)
    assert n_rep == 0 and x.max() < 1
    draws = [_n_replay(2, 0.25, rng) for _ in range(4000)]  # 0.5 per batch on average
    assert 0.45 < np.mean(draws) < 0.55 and max(draws) == 1  # one user patch always left


def test_replay_is_trained_on_and_recorded(parent, tmp_path):
    from napari_prosma.finetune.replay import ReplaySet

    images, labels = _disc_images(4)
    base_i, base_l = _disc_images(3, seed=7)
    replay = ReplaySet(
        [(i, lab, None) for i, lab in zip(base_i, base_l)],
        "discs (test)",
        "replaying 3",
        ["a", "b", "c"],
    )
    store = ModelStore(tmp_path / "store")
    result, vid = run_finetune(
        parent,
        images,
        labels,
        store=store,
        replay=replay,
        config=_cfg(max_steps=3, batch_size=4, replay_fraction=0.5, holdout_fraction=0.0),
    )  # nothing held out: 3 steps on a random model need not beat it (no version then)
    assert result.replay["patches"] == 6  # 2 of 4 patches in each of 3 steps
    rec = store.get(vid).card.training["replay"]
    assert rec["used"] is True and rec["n_samples"] == 3 and rec["source"] == "discs (test)"
    assert rec["ids"] == ["a", "b", "c"] and rec["fraction"] == 0.5
    assert store.get(vid).run["replay"]["n_samples"] == 3
    assert "replaying 3" in result.notes
    # nothing to replay for this card ('auto'): said plainly, and training goes on
    result, vid = run_finetune(
        parent,
        images,
        labels,
        store=store,
        replay="auto",
        config=_cfg(max_steps=2, holdout_fraction=0.0),
    )
    assert result.replay["used"] is False and result.replay["patches"] == 0
    assert any("no replay" in n and "does not name" in n for n in result.notes)
    assert store.get(vid).card.training["replay"]["n_samples"] == 0


# ---------------------------------------------------------------------------- geometry


def _card3(spacing=(1.0, 1.0, 1.0)):
    net = build_model(spatial_dims=3, in_channels=1, out_channels=2, widths=[4, 8, 8, 16, 16])
    card = ModelCard(
        architecture="prosma_unet",
        arch_kwargs=net.config,
        name="blobs3d",
        class_names=["background", "blob"],
        normalization={"mode": "zscore"},
        spacing=list(spacing),
        patch_size=[32, 32, 32],
    )
    return net, card


def test_volumes_are_resampled_to_the_card_spacing_as_in_inference():
    from napari_prosma.finetune.units import Unit, _working
    from napari_prosma.inference.resample import working_shape

    _, card = _card3()
    vol = np.random.default_rng(0).normal(size=(8, 24, 20)).astype(np.float32)
    lab = np.zeros((8, 24, 20), np.uint8)
    lab[2:6, 5:15, 4:12] = 1
    x, y = _working(Unit(vol, lab, (2.0, 1.0, 0.5)), card)
    assert y.shape == (16, 24, 10) == working_shape(lab.shape, (2.0, 1.0, 0.5), card)[0]
    assert x.shape == (1, 16, 24, 10)
    assert set(np.unique(y).tolist()) == {0, 1}  # nearest: still labels
    assert y.sum() == pytest.approx(lab.sum() * 2 * 0.5, rel=0.05)  # same volume in mm
    for same in (None, (1.0, 1.0, 1.0), (1.02, 0.99, 1.0)):  # unknown, or within 5 %
        x, y = _working(Unit(vol, lab, same), card)
        assert y.shape == lab.shape


def test_finetune_trains_and_measures_on_the_card_grid(tmp_path, monkeypatch):
    """A 3D volume at 2 mm slices for a 1 mm model: training patches come from the volume
    resampled to 1 mm, and the held-out Dice is measured through the engine with the
    volume's spacing (result back on the user's grid)."""
    import napari_prosma.finetune.units as ft
    import napari_prosma.inference as inference

    net, card = _card3()
    rng = np.random.default_rng(0)
    vols, labs = [], []
    for _ in range(2):
        v = rng.normal(size=(8, 24, 24)).astype(np.float32)
        lab = np.zeros((8, 24, 24), np.uint8)
        lab[2:6, 6:16, 6:16] = 1
        vols.append(v + 2 * lab)
        labs.append(lab)
    seen_shapes, seen_spacing = [], []
    real_sample, real_predict = ft._sample_patch, inference.predict

    def sample(x, y, *a, **k):
        seen_shapes.append(y.shape)
        return real_sample(x, y, *a, **k)

    def predict(image, *a, **k):
        seen_spacing.append(k.get("spacing"))
        return real_predict(image, *a, **k)

    monkeypatch.setattr(ft, "_sample_patch", sample)
    monkeypatch.setattr(inference, "predict", predict)
    result = finetune(
        net,
        card,
        vols,
        labs,
        spacing=[(2.0, 1.0, 1.0)] * 2,
        config=_cfg(max_steps=2, batch_size=1, holdout_fraction=0.5),
    )
    assert set(seen_shapes) == {(8, 24, 24)}, seen_shapes  # slab 2..5: 4 slices, 8 at 1 mm
    assert seen_spacing and set(seen_spacing) == {(2.0, 1.0, 1.0)}
    assert result.card.training["data"][0]["spacing"] == [2.0, 1.0, 1.0]


# ---------------------------------------------------------------------------- faults


PHASES = ("before", "whole_before", "train", "eval", "after", "whole", "save", "save_crash")


@pytest.mark.parametrize("phase", PHASES)
def test_cancel_or_crash_in_any_phase_leaves_the_parent_and_no_files(
    phase, parent, tmp_path, monkeypatch
):
    """Cancel while the parent is measured (held-out part, then whole images), between
    training steps, inside a held-out evaluation during training, inside the final
    evaluation of the kept state, while the new model segments the whole images, and while
    the checkpoint is written (or a crash there): no version, no partial file, the parent
    active and untouched, the corrections kept in .incoming."""
    import napari_prosma.finetune.run as ft
    import napari_prosma.inference as inference

    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    parent_hash = file_sha256(parent)
    # 2 of 8 held out: predict calls 0-1 before, 2-9 the 8 whole images, 10-11 at step 2,
    # 12-13 at step 4, 14-15 on the kept state, 16-23 the whole images again
    images, labels = _disc_images(8)
    stop = threading.Event()
    cfg = _cfg(max_steps=4, eval_every=2)
    seen: list[tuple[str, int]] = []
    calls = [0]
    real_predict, real_save = inference.predict, ft.save
    at_call = {"before": 0, "whole_before": 3, "eval": 10, "after": 14, "whole": 17}.get(phase)

    def predict(*a, **k):
        if calls[0] == at_call:
            stop.set()
        calls[0] += 1
        return real_predict(*a, **k)

    def progress(p):
        seen.append((p.phase, p.step))
        if phase == "train" and p.phase == "train" and p.step == 1:
            stop.set()

    def save(model, path, card):
        if phase == "save_crash":
            (path.parent / "model.safetensors").write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        out = real_save(model, path, card)
        stop.set()  # the user presses Cancel while the files are written
        return out

    monkeypatch.setattr(inference, "predict", predict)
    monkeypatch.setattr(ft, "save", save)
    expected = OSError if phase == "save_crash" else Cancelled
    with pytest.raises(expected) as info:
        run_finetune(
            parent, images, labels, store=store, config=cfg, progress=progress, cancel=stop
        )
    if expected is Cancelled:
        assert "previous model stays active" in str(info.value)
    # it stopped where it was meant to
    last = seen[-1] if seen else None
    want_last = {
        "before": None,
        "whole_before": ("whole", 0),
        "train": ("train", 1),
        "eval": ("train", 2),
        "after": ("eval", 4),
        "whole": ("whole", 4),
        "save": ("done", 4),
        "save_crash": ("done", 4),
    }[phase]
    assert last == want_last, seen
    assert store.versions() == []
    assert store.active() == "parent-name"
    assert file_sha256(parent) == parent_hash
    left = sorted(p.name for p in store.root.iterdir())
    assert left == [".incoming", "active.json"], left
    (kept,) = list((store.root / ".incoming").iterdir())
    assert sorted(p.name for p in kept.iterdir()) == [
        "index.json",
        *(f"pair_{k:03d}.npz" for k in range(8)),
    ]


# ---------------------------------------------------------------------------- issue 12


def test_nothing_held_out_saves_the_trained_weights(parent, tmp_path):
    """Issue 12 #2: with one corrected image nothing is held out; the saved version must
    hold the trained weights (it held the parent's), and the training loss fell."""
    from safetensors.torch import load_file

    store = ModelStore(tmp_path / "store")
    images, labels = _disc_images(1)
    result, vid = run_finetune(
        parent, images, labels, store=store, config=_cfg(max_steps=40), replay=None
    )
    assert result.n_holdout == 0 and result.dice_before is None
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    before = load_file(str(parent))
    after = load_file(str(store.get(vid).checkpoint))
    weights = [k for k in before if k.endswith("weight")]
    changed = [k for k in weights if not torch.equal(before[k], after[k])]
    assert len(changed) > len(weights) // 2, changed
    assert file_sha256(store.get(vid).checkpoint) != file_sha256(parent)


def test_label_values_binary_masks_mapped_negative_and_fractional_refused():
    """Issue 12 #7: 0/255 was refused for a 2-class model; -1 was trained on as a class;
    0.6 was truncated to 0 and then called "not labelled"."""
    from napari_prosma.finetune import check_labels

    net = build_model(spatial_dims=2, widths="tiny")  # out_channels 2
    card = ModelCard(
        architecture="prosma_unet", arch_kwargs=net.config, class_names=["background", "polyp"]
    )
    img = np.zeros((8, 8), np.float32)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    lab, note = check_labels(mask, card)
    assert lab.dtype == np.int64 and set(np.unique(lab).tolist()) == {0, 1}
    assert lab.sum() == 9 and "stored as 0 and 255" in note and "255 = polyp" in note
    notes: list[str] = []
    (u,) = corrected_units([img], [mask], card, notes=notes)
    assert u.labels.max() == 1 and notes == [note]
    assert check_labels(np.where(mask > 0, 7, 0), card)[0].max() == 1  # {0, max}
    assert check_labels(mask.astype(np.float32) / 255, card)[1] is None  # whole floats
    neg = mask.astype(np.int16) // 255
    neg[0, :3] = -1
    with pytest.raises(InputError, match=r"negative values \(-1\)"):
        corrected_units([img], [neg], card)
    frac = (mask > 0) * 0.6
    with pytest.raises(InputError, match=r"fractional values \(0\.6\)"):
        corrected_units([img], [frac], card)
    with pytest.raises(InputError, match="NaN"):
        check_labels(np.full((4, 4), np.nan), card)
    three = dataclasses.replace(
        card, arch_kwargs={**net.config, "out_channels": 3}, class_names=["bg", "a", "b"]
    )
    with pytest.raises(InputError, match="use class 255 but the model knows 3"):
        check_labels(mask, three)  # not binary: 255 is no class it knows
    with pytest.raises(InputError, match="values found: 0, 1, 255"):
        check_labels(np.where(mask > 0, 255, 0) + np.eye(8, dtype=np.int64), card)


def test_refused_labels_leave_nothing_in_the_store(parent, tmp_path):
    """Issue 12 #7/#15: bad label values are refused before the corrections are saved."""
    store = ModelStore(tmp_path / "store")
    images, labels = _disc_images(2)
    bad = [labels[0].astype(np.int16) - 1, labels[1]]
    with pytest.raises(InputError, match="negative values"):
        run_finetune(parent, images, bad, store=store, config=_cfg(max_steps=2))
    assert not (store.root / ".incoming").exists()
    assert store.versions() == []


def test_a_finetuned_versions_card_is_hash_checked(parent, tmp_path):
    """Issue 12 #10: a fine-tuned version's card was covered by no hash, so a hand-edited
    normalisation loaded silently; its run.json now records the hashes as saved."""
    import json

    from napari_prosma.checkpoint import CheckpointError, card_digest, seal_card

    store = ModelStore(tmp_path / "store")
    images, labels = _disc_images(2)
    _, vid = run_finetune(
        parent, images, labels, store=store, config=_cfg(max_steps=2), activate="always"
    )
    v = store.get(vid)
    card_file = v.path / "model.json"
    data = json.loads(card_file.read_text())
    assert v.run["card_sha256"] == data["card_sha256"] == card_digest(data)
    assert v.run["weights_sha256"] == file_sha256(v.checkpoint) == data["weights_sha256"]
    data["normalization"] = {"mode": "zscore"}
    card_file.write_text(json.dumps(data, indent=2))
    with pytest.raises(CheckpointError, match="was changed after it was written"):
        load(v.checkpoint)
    with pytest.raises(CheckpointError, match="was changed"):  # nor fine-tuned further
        run_finetune(vid, images, labels, store=store, config=_cfg(max_steps=2))
    seal_card(v.checkpoint)  # sealed again by hand: loads, but it is no longer that run's
    load(v.checkpoint)
    assert vid not in [w.id for w in store.versions()]


def test_no_version_when_nothing_beats_the_parent(parent, tmp_path, monkeypatch):
    """Issue 20: early stopping kept the initial state and still created and activated a
    "new version" holding the parent's weights. Now nothing is saved, the parent stays
    active, it is said plainly, and the corrections stay saved for a later try."""
    import napari_prosma.finetune.loop as ft

    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    images, labels = _disc_images(4)
    scores = iter([0.758, 0.59, 0.707, 0.689, 0.758])  # the last: the kept state again
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    with pytest.raises(InputError) as info:
        run_finetune(
            parent, images, labels, store=store, config=_cfg(max_steps=6, eval_every=2, patience=5)
        )
    text = str(info.value)
    assert text.startswith("the corrections did not improve the model; nothing was saved")
    assert "0.758 before training, at best 0.707 in 3 evaluation(s)" in text
    assert "the previous model stays active" in text
    (kept,) = (store.root / ".incoming").iterdir()
    assert f"your corrections are kept in {kept}" in text
    assert len(store.load_corrections(kept)[1]) == 4
    assert store.versions() == [] and store.active() == "parent-name"
    assert info.value.result.kept_parent and info.value.result.steps == 6


def test_refusals_after_training_say_where_the_corrections_are(parent, tmp_path):
    """Issue 12 #15: a refused or cancelled run left its corrections in .incoming without
    a word; the message now says where they are."""
    store = ModelStore(tmp_path / "store")
    images, labels = _disc_images(4)
    stop = threading.Event()

    def progress(p):
        if p.step >= 1:
            stop.set()

    with pytest.raises(Cancelled) as info:
        run_finetune(
            parent, images, labels, store=store, config=_cfg(), progress=progress, cancel=stop
        )
    (kept,) = (store.root / ".incoming").iterdir()
    assert str(info.value).endswith(f"your corrections are kept in {kept}")
    assert "previous model stays active" in str(info.value)


def test_long_model_and_file_names_fit_the_temporary_names(tmp_path):
    """Issue 12 #15: a 235-character name was refused: its temporary name (".NAME.<8>.tmp",
    ".<id>.<8>") passed the 255-byte limit of a file name."""
    name = "m" * 235
    path = _save_disc_model(tmp_path, name, name)  # checkpoint files of 235 + 5..12 chars
    assert path.name == name + ".safetensors" and load(path)[1].name == name
    store = ModelStore(tmp_path / "store")
    images, labels = _disc_images(1)
    _, vid = run_finetune(path, images, labels, store=store, config=_cfg(max_steps=2))
    assert len(vid) < 120 and store.get(vid).card.name == vid


def test_finetune_rooms_import_without_torch_or_qt():
    """The fine-tuning package, the store and its helpers are Qt-free and import torch only
    when a run starts (issue 13)."""
    import subprocess
    import sys

    mods = [
        "napari_prosma.finetune",
        "napari_prosma.finetune.config",
        "napari_prosma.finetune.units",
        "napari_prosma.finetune.net",
        "napari_prosma.finetune.loop",
        "napari_prosma.finetune.lineage",
        "napari_prosma.finetune.run",
        "napari_prosma.finetune.replay",
        "napari_prosma.replay",
        "napari_prosma.versions",
        "napari_prosma.locking",
        "napari_prosma.pairing",
        "napari_prosma.checkpoint",
        "napari_prosma.cli.finetune",
    ]
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {mods!r}]; "
        "bad = [m for m in ('torch', 'qtpy', 'PyQt6', 'PyQt5', 'napari') if m in sys.modules]; "
        "print(bad); sys.exit(bool(bad))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _kvasir(root, ids):
    from PIL import Image

    images, masks = [], []
    for i in ids:
        images.append(
            np.asarray(Image.open(root / "kvasir-seg" / "images" / f"{i}.jpg").convert("RGB"))
        )
        m = np.asarray(Image.open(root / "kvasir-seg" / "masks" / f"{i}.jpg").convert("L"))
        masks.append((m > 127).astype(np.uint8))
    return images, masks


def _mean_dice(net, card, images, masks):
    from napari_prosma.inference import predict
    from napari_prosma.metrics import dice

    return float(
        np.mean(
            [
                dice(predict(i, net, card, device="cpu").labels > 0, m > 0)
                for i, m in zip(images, masks)
            ]
        )
    )


@pytest.mark.data
@pytest.mark.slow
def test_a_good_model_fits_its_corrections_and_is_not_broken_by_the_first_steps(shared_data):
    """Issue 20: held-out Dice fell from the first evaluation when fine-tuning the bundled
    kvasir_prosma. Measured cause: the default learning rate (3e-4, 3-30x the rate the model
    was trained at; Adam moves every weight by about that much each step). Fine-tuned on 4
    of its own training images (Dice 0.98; 0.93 for session 9's leak-free reship) for 20
    steps, it got worse on them and on its
    test images; with the default at 3e-5 neither moves by more than 0.02. And on the first 4
    test images (in split order) it segments at Dice 0.70-0.80 (by the card's own
    evaluation), fitting those corrections with the defaults (decoder + gates) raises their
    Dice while its other test images lose at most 0.02. (Skip gates only, which forgot least
    with the earlier model, no longer fits them with session 9's leak-free reship: 0.765 ->
    0.762 in 30 steps, 0.762 in 60; decoder + gates: 0.776 in 30, 0.854 in 60 steps, the
    other 8 test images 0.750 -> 0.800; this CPU, one run each.)"""
    import json

    model, card = load("kvasir_prosma")
    split = json.loads((REPO / card.training["split"]["file"]).read_text())
    raw = json.loads((REPO / card.metrics["test"]["raw"]).read_text())  # the card's evaluation
    test_dice = {c["id"]: c["polyp"]["dice"] for c in raw["cases"]}
    fix = [i for i in split["test"] if 0.70 <= test_dice[i] <= 0.80][:4]  # test part, 0.70-0.80
    assert len(fix) == 4
    rest_i, rest_m = _kvasir(shared_data, [i for i in split["test"] if i not in fix][:8])
    rest_before = _mean_dice(model, card, rest_i, rest_m)
    cfg = FinetuneConfig(
        max_steps=20, holdout_fraction=0.0, time_budget_s=None, device="cpu", seed=0
    )

    own_i, own_m = _kvasir(shared_data, split["train"][:4])
    res = finetune(model, card, own_i, own_m, config=cfg)
    own = (_mean_dice(model, card, own_i, own_m), _mean_dice(res.model, card, own_i, own_m))
    rest = (rest_before, _mean_dice(res.model, card, rest_i, rest_m))
    assert own[0] > 0.9 and own[1] > own[0] - 0.02, own  # a model that fits its training
    assert rest[1] > rest[0] - 0.02, rest

    fix_i, fix_m = _kvasir(shared_data, fix)
    res = finetune(model, card, fix_i, fix_m, config=dataclasses.replace(cfg, max_steps=60))
    fixed = (_mean_dice(model, card, fix_i, fix_m), _mean_dice(res.model, card, fix_i, fix_m))
    rest = (rest_before, _mean_dice(res.model, card, rest_i, rest_m))
    assert fixed[1] > fixed[0] + 0.01, fixed
    assert rest[1] > rest[0] - 0.02, rest


def test_forgetting_guard_refuses_states_that_forget_the_parents_images(
    parent, tmp_path, monkeypatch
):
    """Issue 20 (a): fine-tuning on a few hard images raised the held-out Dice of the
    corrections while the parent's other images got worse (0.881 -> 0.832). The guard
    measures ``forgetting_guard`` replay images the run does not train on and keeps a
    state only if their Dice stays within ``max_forgetting`` of the parent's."""
    import napari_prosma.finetune.loop as ft
    from napari_prosma.finetune.replay import ReplaySet

    images, labels = _disc_images(4)
    base_i, base_l = _disc_images(6, seed=7)
    replay = ReplaySet(
        [(i, lab, None) for i, lab in zip(base_i, base_l)], "discs", "replaying 6", list("abcdef")
    )

    def scored(sel, guard):
        it = {"sel": iter(sel), "guard": iter(guard)}
        seen = []

        def fake(model, card, units, device, cancel=None):
            role = "guard" if len(units) == 3 else "sel"  # 3 of 6 replay units guard
            seen.append(role)
            return next(it[role])

        return fake, seen

    cfg = _cfg(max_steps=6, eval_every=2, patience=5, forgetting_guard=3, replay_fraction=0.5)
    # the corrections' held-out Dice rises, the guard images fall by 0.05: nothing is kept
    fake, seen = scored(sel=[0.2, 0.5, 0.6, 0.7, 0.7], guard=[0.9, 0.85, 0.85, 0.84])
    monkeypatch.setattr(ft, "holdout_dice", fake)
    store = ModelStore(tmp_path / "s1")
    store.activate("parent-name")
    with pytest.raises(InputError) as info:
        run_finetune(parent, images, labels, store=store, replay=replay, config=cfg)
    res = info.value.result
    assert seen[:2] == ["sel", "guard"] and seen.count("guard") == 4
    assert res.kept_parent and store.active() == "parent-name" and store.versions() == []
    assert res.replay["patches"] > 0
    assert any("3 state(s) that did better" in n and "0.02" in n for n in res.notes), res.notes
    # the refusal says why: better on the corrections, but the model forgot (issue 20)
    text = str(info.value)
    assert "3 state(s) did better on your held-out corrections but were refused" in text
    assert "its own training images its Dice fell from 0.900 to as low as 0.840" in text
    # within 0.02 of the parent: the best held-out state is kept and activated
    fake, _ = scored(sel=[0.2, 0.5, 0.6, 0.7, 0.7], guard=[0.9, 0.89, 0.95, 0.85])
    monkeypatch.setattr(ft, "holdout_dice", fake)
    store = ModelStore(tmp_path / "s2")
    res, vid = run_finetune(parent, images, labels, store=store, replay=replay, config=cfg)
    assert not res.kept_parent and store.active() == vid
    g = store.get(vid).card.metrics["finetune_holdout"]["forgetting_guard"]
    assert g["n"] == 3 and g["dice_parent"] == 0.9 and g["dice_kept"] == 0.95
    assert g["states_refused"] == 1  # step 6: 0.7 beat 0.6, but its guard Dice fell to 0.85
    with pytest.raises(InputError, match="forgetting_guard"):
        FinetuneConfig(forgetting_guard=-1).validate()


def test_a_new_task_neither_replays_nor_guards_with_the_parents_images(parent, tmp_path):
    """The parent's images are labelled for its own classes: with new class names (a new
    task, e.g. a lesion model taught the spleen) replaying them would teach the old outlines
    as the new class, and the forgetting guard would refuse every state that learns the new
    task. Both are off then, and the notes say why; the same names keep both on."""
    from napari_prosma.finetune.replay import ReplaySet

    images, labels = _disc_images(4)
    base_i, base_l = _disc_images(6, seed=7)
    replay = ReplaySet(
        [(i, lab, None) for i, lab in zip(base_i, base_l)], "discs", "replaying 6", list("abcdef")
    )
    cfg = _cfg(max_steps=4, eval_every=2, forgetting_guard=3, replay_fraction=0.5)

    def tuned(name: str):
        res, _ = run_finetune(
            parent,
            images,
            labels,
            store=ModelStore(tmp_path / name),
            replay=replay,
            config=cfg,
            class_names=[name],
            activate="always",
        )
        return res

    new = tuned("ring")
    assert not new.replay["used"] and new.replay.get("patches", 0) == 0
    assert new.card.metrics["finetune_holdout"]["forgetting_guard"]["n"] == 0
    assert any("new classes (ring instead of the parent's disc)" in n for n in new.notes)
    same = tuned("disc")
    assert same.replay["used"] and same.replay["patches"] > 0
    assert same.card.metrics["finetune_holdout"]["forgetting_guard"]["n"] == 3
    assert not any("new classes" in n for n in same.notes)


def test_anchor_pulls_the_trained_weights_back_towards_the_parents(parent, tmp_path):
    """Issue 20: ``anchor`` (L2-SP, decoupled) keeps the weights near the parent's: the
    same 30 steps move them far less with a strong anchor than without one, while the
    anchored run still trains (some weights change)."""
    from safetensors.torch import load_file

    images, labels = _disc_images(1)
    before = load_file(str(parent))

    def moved(anchor: float) -> float:
        store = ModelStore(tmp_path / f"store{anchor}")
        _r, vid = run_finetune(
            parent,
            images,
            labels,
            store=store,
            config=_cfg(max_steps=30, anchor=anchor),
            replay=None,
        )
        after = load_file(str(store.get(vid).checkpoint))
        keys = [k for k in before if k.endswith("weight") and before[k].is_floating_point()]
        return float(sum((after[k].float() - before[k].float()).norm() ** 2 for k in keys))

    free, anchored = moved(0.0), moved(200.0)  # lr 3e-3: 60 % back towards the parent a step
    assert 0 < anchored < 0.1 * free, (anchored, free)
    with pytest.raises(InputError, match="anchor"):
        FinetuneConfig(anchor=-1).validate()
    with pytest.raises(InputError, match="anchor"):
        FinetuneConfig(anchor=1e6, lr=3e-5).validate()


def test_the_widget_summary_says_when_a_new_task_turned_replay_and_guard_off():
    """The Fine-tune widget's summary shows (and notifies) the new-task note: the form's
    'Replay training images' box was ticked, yet the parent's images were not used."""
    from types import SimpleNamespace

    from napari_prosma._widgets._finetune_form import run_summary

    note = (
        "new classes (spleen instead of the parent's lesion): the parent's own images were "
        "neither replayed nor used to guard against forgetting; the new version is for the new "
        "task only"
    )
    result = SimpleNamespace(
        steps=60,
        stopped="max_steps",
        seconds=43.0,
        n_train=20,
        n_holdout=6,
        replay={"used": False, "message": "replay is off"},
        curve=[],
        whole={},
        notes=[note, "the held-out Dice is measured on the same 2 image(s)"],
    )
    told: list[str] = []
    text = run_summary(result, told.append)
    assert f"Note: {note}" in text and told == [note]
