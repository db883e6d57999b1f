"""Training end to end on a few real images (tiny widths, 32x32): loss goes down, a loadable
checkpoint with a complete card, resume, cancel, the CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from napari_prosma.checkpoint import load, read_card
from napari_prosma.cli import main
from napari_prosma.train import TrainConfig, lr_at, overrides_from_strings, train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "training" / "recipes" / "busi_prosma.toml"


def tiny(tmp_path: Path, shared_data: Path, **over) -> TrainConfig:
    base = {
        "data_root": str(shared_data),
        "out_dir": str(tmp_path / "run"),
        "widths": "tiny",
        "size": 32,
        "limit": 24,
        "epochs": 3,
        "lr": 3e-3,
        "min_lr": 1e-3,
        "val_every": 1,
        "checkpoint_every": 1,
        "device": "cpu",
    }
    base.update(over)
    return TrainConfig.from_toml(RECIPE, base)


def test_lr_schedule_and_config_checks():
    cfg = TrainConfig(epochs=10, lr=1e-4, min_lr=1e-5)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 10) == pytest.approx(1e-5)
    assert lr_at(cfg, 5) == pytest.approx(5.5e-5)
    with pytest.raises(ValueError, match="unknown recipe key"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="patch_size"):
        TrainConfig.from_dict({"dataset": "hippocampus"})
    assert overrides_from_strings(["a=3", 'b="x"', "c=[1, 2]", "d=bare"]) == {
        "a": 3,
        "b": "x",
        "c": [1, 2],
        "d": "bare",
    }


@pytest.mark.data
@pytest.mark.slow
def test_train_reduces_loss_and_writes_a_complete_card(tmp_path, shared_data):
    res = train(tiny(tmp_path, shared_data), log=None, command="pytest")
    assert res.status == "finished"
    losses = [h["loss"] for h in res.result["history"]]
    assert losses[-1] < losses[0]
    _, card = load(res.model_path)
    assert card.weights_dtype == "float16" and card.architecture == "prosma_unet"
    assert card.class_names == ["background", "lesion"]
    assert card.normalization["mode"] == "fixed"
    assert card.extra["input_size"] == [32, 32]
    t = card.training
    for key in (
        "data",
        "split",
        "seed",
        "epochs",
        "batch_size",
        "optimizer",
        "loss",
        "augmentation",
        "command",
        "device",
    ):
        assert key in t, key
    assert t["split"]["file"].endswith("busi_leakfree_seed0.json")
    assert t["selected"]["rule"] == "best_val"
    test = card.metrics["test"]
    assert 0 <= test["dice_mean"] <= 1 and test["n_cases"] == t["split"]["n_test"]
    assert card.intended_use and card.limitations
    # the format the plugin's parser reads: {"stageN": [min, max]} (issue 14, finding 5)
    assert sorted(card.gate_sparsity_range) == ["stage1", "stage2", "stage3", "stage4"]
    assert all(0 <= lo <= hi <= 1 for lo, hi in card.gate_sparsity_range.values())
    out = Path(res.out_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        "model.json",
        "model.safetensors",
        "result.json",
    ]
    r = json.loads((out / "result.json").read_text())
    assert len(r["evaluation"]["cases"]) == test["n_cases"]
    # a second call finds the finished run and does nothing
    assert train(tiny(tmp_path, shared_data), log=None).status == "already finished"


@pytest.mark.data
@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch(tmp_path, shared_data):
    cfg = tiny(tmp_path, shared_data, final_eval=False)
    first = train(cfg, log=None, max_epochs=2)
    assert first.status == "stopped" and first.epoch == 2
    card = read_card(Path(cfg.out_dir) / "last")
    assert card.training["state"]["epoch"] == 2
    lines: list[str] = []
    res = train(cfg, log=lines.append)
    assert any("resumed" in s and "epoch 2" in s for s in lines)
    assert res.status == "finished"
    assert [h["epoch"] for h in res.result["history"]] == [1, 2, 3]
    assert not (Path(cfg.out_dir) / "last.json").exists()  # resume state removed when done


@pytest.mark.data
@pytest.mark.slow
def test_a_failed_final_evaluation_resumes_into_it_without_retraining(
    tmp_path, shared_data, monkeypatch
):
    import napari_prosma.train.recipe as train_mod  # where the stack looks it up

    cfg = tiny(tmp_path, shared_data, checkpoint_every=50)
    real = train_mod.evaluate_shipped

    def broken(*a, **k):
        raise ModuleNotFoundError("No module named 'monai'")

    monkeypatch.setattr(train_mod, "evaluate_shipped", broken)
    with pytest.raises(ModuleNotFoundError):
        train(cfg, log=None)
    # the resume state was written after the last epoch, not only every 50
    assert read_card(Path(cfg.out_dir) / "last").training["state"]["epoch"] == 3
    monkeypatch.setattr(train_mod, "evaluate_shipped", real)
    lines: list[str] = []
    res = train(cfg, log=lines.append)
    assert res.status == "finished"
    assert any("resumed" in s and "epoch 3" in s for s in lines)
    assert not any(s.startswith("epoch ") for s in lines)  # no epoch trained again
    assert [h["epoch"] for h in res.result["history"]] == [1, 2, 3]
    assert res.result["evaluation"]["summary"]["n_cases"] > 0
    assert not (Path(cfg.out_dir) / "last.json").exists()


@pytest.mark.data
@pytest.mark.slow
def test_cancel_stops_cleanly(tmp_path, shared_data):
    cfg = tiny(tmp_path, shared_data, epochs=5)
    flag = threading.Event()
    seen = []

    def progress(p):  # cancel during the second epoch
        seen.append(p.epoch)
        flag.set()

    res = train(cfg, log=None, progress=progress, cancel=flag)
    assert res.status == "cancelled" and seen == [1]
    files = sorted(p.name for p in Path(cfg.out_dir).iterdir())
    # only the complete resume checkpoint of epoch 1 and the best validation weights so far
    # (epoch 1's): no model, no temp files
    assert files == [
        "best.json",
        "best.safetensors",
        "last.json",
        "last.safetensors",
        "last_optim.safetensors",
    ]
    assert read_card(Path(cfg.out_dir) / "best").training["state"]["best"]["epoch"] == 1
    assert read_card(Path(cfg.out_dir) / "last").training["state"]["epoch"] == 1


@pytest.mark.data
@pytest.mark.slow
def test_cli_train_and_evaluate(tmp_path, shared_data, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = tmp_path / "cli"
    rc = main(
        [
            "train",
            str(RECIPE),
            "--data-root",
            str(shared_data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--set",
            'widths="tiny"',
            "--set",
            "size=32",
            "--set",
            "limit=16",
        ]
    )
    assert rc == 0
    assert (out / "model.safetensors").exists()
    capsys.readouterr()
    rc = main(
        [
            "evaluate",
            str(out / "model"),
            "busi",
            "--data-root",
            str(shared_data),
            "--split",
            str(REPO / "training/splits/busi_seed0.json"),
            "--limit",
            "3",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "lesion" in text and "dice" in text and "hd95" in text
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["summary"]["n_cases"] == 3


@pytest.mark.data
@pytest.mark.slow
def test_train_3d_tiny(tmp_path, shared_data):
    cfg = TrainConfig.from_toml(
        REPO / "training/recipes/hippocampus_prosma.toml",
        {
            "data_root": str(shared_data),
            "out_dir": str(tmp_path / "h"),
            "widths": "tiny",
            "limit": 6,
            "split": None,  # 6 volumes: a random 80/20 (the committed split needs all 260)
            "select": "last",
            "epochs": 1,
            "iters_per_epoch": 2,
            "batch_size": 2,
            "patch_size": [16, 16, 16],
            "device": "cpu",
            "hd95": False,
        },
    )
    assert cfg.augment == "nnunet" and cfg.norm == "instance" and cfg.tta
    res = train(cfg, log=None)
    assert res.status == "finished"
    _, card = load(res.model_path)
    assert card.spatial_dims == 3 and card.out_channels == 3
    assert card.arch_kwargs["norm"] == "instance"
    assert card.normalization == {"mode": "percentile", "lower": 0.0, "upper": 99.5}
    assert "flip TTA" in res.result["evaluation"]["engine"]
    assert set(card.metrics["test"]["per_class"]) == {"anterior", "posterior"}


# ---------------------------------------------------------------------------- issue 14


def _sparsity_warnings():
    """The plugin's warning function (moving from the widgets' core to inference.gates)."""
    try:
        from napari_prosma.inference.gates import sparsity_warnings  # type: ignore[import-not-found]
    except ImportError:
        from napari_prosma.inference.gates import sparsity_warnings
    return sparsity_warnings


@pytest.mark.parametrize("kind, moves", [("adamw", False), ("adam_l2", True)])
def test_theta_does_not_move_without_task_gradient(kind, moves):
    """Under Adam's L2 decay a theta whose task gradient is zero drifts towards 0 (lambda
    grows to softplus(0)); the AdamW parameter groups leave it exactly where it was."""
    import torch

    from napari_prosma.nets import build_model
    from napari_prosma.train.support import make_optimizer

    model = build_model("prosma_unet", spatial_dims=2, in_channels=1, out_channels=1, widths="tiny")
    opt = make_optimizer(model, kind, 1e-3, 1e-2, torch.device("cpu"))
    thetas = [g.theta for g in model.gates]
    before = [t.detach().clone() for t in thetas]
    x = torch.randn(2, 1, 32, 32)
    for _ in range(20):
        opt.zero_grad()
        model(x).square().mean().backward()
        for t in thetas:
            t.grad = torch.zeros_like(t)  # no task gradient reaches theta
        opt.step()
    moved = any(not torch.equal(a, t) for a, t in zip(before, thetas))
    assert moved is moves
    if moves:  # towards 0, i.e. lambda = softplus(theta) grows
        assert all(bool((t > a).all()) for a, t in zip(before, thetas))
    # weights of convolutions still decay under AdamW (one group with decay, one without)
    if kind == "adamw":
        assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 0.0]


@pytest.mark.data
@pytest.mark.slow
def test_training_logs_lambda_and_validates_on_val_only(tmp_path, shared_data, monkeypatch):
    import napari_prosma.train.support as support

    seen: list[list[str]] = []
    real = support.quick_validate

    def spy(model, data, *a, **k):
        seen.append(list(data.ids))
        return real(model, data, *a, **k)

    monkeypatch.setattr(support, "quick_validate", spy)
    cfg = tiny(tmp_path, shared_data, limit=60, final_eval=False)
    res = train(cfg, log=None)
    split = json.loads((REPO / cfg.split).read_text())
    assert seen and all(set(ids) == set(split["val"]) & set(ids) for ids in seen)
    assert all(set(ids).isdisjoint(split["test"]) for ids in seen)
    hist = res.result["history"]
    assert all(len(h["lambda"]) == 4 for h in hist)  # 4 gate stages: [mean, min, max]
    assert all("zero_frac" in h["val"] for h in hist)
    sel = res.result["card"]["training"]["selected"]
    assert sel["rule"] == "best_val"
    assert sel["score"] == max(h["val"]["dice"] for h in hist)


@pytest.mark.data
@pytest.mark.slow
def test_a_stack_trains_exactly_what_its_runs_train_alone(tmp_path, shared_data):
    from safetensors.numpy import load_file

    from napari_prosma.train import train_many

    def cfgs(root):
        return [
            tiny(tmp_path, shared_data, out_dir=str(root / n), final_eval=False, **over)
            for n, over in (("a", {"gate": "exact"}), ("b", {"gate": "none", "seed": 1}))
        ]

    alone = [train(c, log=None) for c in cfgs(tmp_path / "alone")]
    stacked = train_many(cfgs(tmp_path / "stack"), log=None)
    for a, b in zip(alone, stacked):
        wa, wb = load_file(a.model_path), load_file(b.model_path)
        assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
        assert [h["loss"] for h in a.result["history"]] == [h["loss"] for h in b.result["history"]]


@pytest.mark.data
@pytest.mark.slow
def test_prosma_train_writes_a_sparsity_range_the_plugin_reads_and_warns_on(tmp_path, shared_data):
    from napari_prosma.datasets import read_dataset
    from napari_prosma.inference import predict
    from napari_prosma.inference.gates import parse_sparsity_range

    out = tmp_path / "cli"
    args = ["train", str(RECIPE), "--data-root", str(shared_data), "--out", str(out)]
    args += ["--epochs", "1", "--device", "cpu", "--quiet"]
    for s in ('widths="tiny"', "size=32", "limit=40", "sparsity_images=8"):
        args += ["--set", s]
    assert main(args) == 0
    model, card = load(out / "model")
    ranges = parse_sparsity_range(card.gate_sparsity_range)
    assert sorted(ranges) == [1, 2, 3, 4]  # the parser reads every stage the trainer wrote
    assert card.extra["gate_sparsity_range_from"]["n_images"] == 8
    # the first training image is one of the 8 the range was computed from: no warning
    split = json.loads((REPO / card.training["split"]["file"]).read_text())
    ds = read_dataset("busi_with_normal", shared_data, limit=40)
    first = sorted(set(split["train"]) & set(ds.ids))[0]
    img = ds.subset([first]).images[0, 0]
    from napari_prosma.datasets import resize_image

    # fp32, as the range was computed (the card says so); bf16 moves zero fractions by ~0.3 %
    pred = predict(
        resize_image(img, 32), model, card, device="cpu", precision="fp32", return_gates=True
    )
    # the range is computed with return_gates="stats" (no maps): the same zero fractions
    stats = predict(
        resize_image(img, 32), model, card, device="cpu", precision="fp32", return_gates="stats"
    )
    assert [g.zero_frac_mean for g in stats.gates] == [g.zero_frac_mean for g in pred.gates]
    warn = _sparsity_warnings()
    assert warn(card.gate_sparsity_range, pred.gates) == []
    # the same gates pushed outside the recorded range of stage 2: the plugin warns
    import dataclasses

    lo, hi = ranges[2]
    odd = [
        dataclasses.replace(g, zero_frac_mean=(hi + 0.05 if hi < 0.95 else lo - 0.05))
        if g.stage == 2
        else g
        for g in pred.gates
    ]
    msgs = warn(card.gate_sparsity_range, odd)
    assert len(msgs) == 1 and msgs[0].startswith("stage 2:")


def test_a_time_limited_stack_keeps_room_for_the_final_evaluation():
    """``finish_reserve`` counts only before the last epoch: a call with room for that epoch
    but not for the final evaluation stops first (a later call trains and finishes), and
    nothing ever stops after the last epoch."""
    from napari_prosma.train.stack import _out_of_time

    # 10 epochs (indices 0-9), 5 s each, one run: after index 8 the next one is the last
    assert not _out_of_time(100, 50, 5, 1, 8, 10)  # 50 + 10 + 10 + 8 = 78 <= 100
    assert _out_of_time(100, 50, 5, 1, 8, 10, finish_reserve=30)  # + 30 = 108 > 100
    assert not _out_of_time(100, 50, 5, 1, 7, 10, finish_reserve=30)  # next is not the last
    assert not _out_of_time(100, 99, 5, 1, 9, 10, finish_reserve=30)  # after the last epoch
    assert not _out_of_time(None, 1e9, 5, 1, 8, 10, finish_reserve=30)  # no limit


def test_empty_share_draws_every_lesion_image_once_and_normals_to_the_share():
    import numpy as np
    import torch

    from napari_prosma.train.loop import empty_indices, epoch_draws_per_pass, epoch_order

    labels = np.zeros((20, 4, 4), np.uint8)
    labels[[i for i in range(20) if i not in (3, 7)], 1, 1] = 1
    empty = empty_indices(labels)
    assert empty.tolist() == [3, 7]
    gen = torch.Generator().manual_seed(0)
    assert sorted(epoch_order(20, empty, 0.0, gen).tolist()) == list(range(20))
    order = epoch_order(20, empty, 0.25, gen).tolist()
    assert len(order) == epoch_draws_per_pass(20, 2, 0.25) == 18 + 6
    counts = np.bincount(order, minlength=20)
    assert (np.delete(counts, [3, 7]) == 1).all() and counts[3] == counts[7] == 3
    assert order != sorted(order)  # shuffled together, not appended
    assert epoch_draws_per_pass(20, 0, 0.25) == 20  # nothing empty: one plain pass
    with pytest.raises(ValueError, match="empty_share"):
        TrainConfig.from_dict({"empty_share": 1.0})
    with pytest.raises(ValueError, match="empty_share"):
        TrainConfig.from_dict(
            {"dataset": "hippocampus", "patch_size": [8, 8, 8], "empty_share": 0.2}
        )
