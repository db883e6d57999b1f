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
    assert t["split"]["file"].endswith("busi_seed0.json")
    test = card.metrics["test"]
    assert 0 <= test["dice_mean"] <= 1 and test["n_cases"] == t["split"]["n_test"]
    assert card.intended_use and card.limitations
    assert len(card.gate_sparsity_range["stages"]) == 4
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
    import napari_prosma.train as train_mod

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
    # only the complete resume checkpoint of epoch 1: no model, no temp files
    assert files == ["last.json", "last.safetensors", "last_optim.safetensors"]
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
            "epochs": 1,
            "iters_per_epoch": 2,
            "batch_size": 2,
            "patch_size": [16, 16, 16],
            "device": "cpu",
            "hd95": False,
        },
    )
    res = train(cfg, log=None)
    assert res.status == "finished"
    _, card = load(res.model_path)
    assert card.spatial_dims == 3 and card.out_channels == 3
    assert set(card.metrics["test"]["per_class"]) == {"anterior", "posterior"}
