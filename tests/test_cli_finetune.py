"""``prosma finetune`` end to end on a tiny random checkpoint: a new version, replay
reported plainly, slices along the chosen axis, a plain error for a bad replay folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_prosma.checkpoint import ModelCard, save
from napari_prosma.cli import main
from napari_prosma.nets import build_model
from napari_prosma.versions import ModelStore


def _tiny(folder: Path, training: dict | None = None) -> Path:
    torch.manual_seed(0)
    net = build_model(spatial_dims=2, in_channels=1, out_channels=1, widths=[4, 8, 8])
    card = ModelCard(
        "prosma_unet",
        net.config,
        name="tiny",
        normalization={"mode": "zscore"},
        class_names=["background", "thing"],
        training=training or {},
    )
    return save(net, folder / "tiny", card)


def _png_pairs(folder: Path, n: int, size: int = 32) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for k in range(n):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 12, 2)
        mask[y : y + 8, x : x + 8] = 1
        img = (rng.normal(60, 10, (size, size)) + 120 * mask).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "images" / f"im{k}.png")
        Image.fromarray(mask).save(folder / "masks" / f"im{k}.png")
    return folder / "images", folder / "masks"


def _run(*args: str) -> int:
    # 2 steps of a tiny random model move the held-out Dice by less than the default
    # min_improvement (0.005); these tests are about the command's plumbing
    opts = ["--max-steps", "2", "--device", "cpu", "--batch-size", "2", "--min-improvement", "0"]
    return main(["finetune", *args, *opts])


def test_cli_finetune_with_and_without_replay(tmp_path, capsys):
    ckpt = _tiny(tmp_path / "m")
    images, masks = _png_pairs(tmp_path / "user", 4)
    store = tmp_path / "store"
    assert _run(str(images), str(masks), "--model", str(ckpt), "-o", str(store)) == 0
    out = capsys.readouterr().out
    assert "New version tiny-ft-" in out
    assert "note: no replay: the model card does not name" in out  # 'auto' found nothing
    assert "optimistic" in out  # 1 held-out image chooses and reports
    (v,) = ModelStore(store).versions()
    assert v.card.training["replay"]["used"] is False

    base_images, _ = _png_pairs(tmp_path / "base", 3)
    assert (
        _run(
            str(images),
            str(masks),
            "--model",
            str(ckpt),
            "-o",
            str(store),
            "--replay",
            str(base_images.parent),
            "--replay-fraction",
            "0.5",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"note: replaying 3 samples from {base_images.parent}" in out
    new = [v for v in ModelStore(store).versions() if v.card.training["replay"]["used"]]
    (v2,) = new
    rec = v2.card.training["replay"]
    assert rec["n_samples"] == 3 and rec["source"] == str(base_images.parent)
    assert rec["patches"] == 2  # 1 of 2 patches in each of 2 steps
    assert v2.card.training["config"]["replay_fraction"] == 0.5
    run = json.loads((v2.path / "run.json").read_text())
    assert run["replay"]["n_samples"] == 3 and "ids" not in run["replay"]


def test_cli_finetune_bad_replay_folder_is_one_plain_line(tmp_path, capsys):
    ckpt = _tiny(tmp_path / "m")
    images, masks = _png_pairs(tmp_path / "user", 2)
    rc = _run(
        str(images),
        str(masks),
        "--model",
        str(ckpt),
        "-o",
        str(tmp_path / "s"),
        "--replay",
        str(tmp_path / "nowhere"),
    )
    err = capsys.readouterr().err
    assert rc == 1 and "replay folder" in err and "does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "s").exists() or ModelStore(tmp_path / "s").versions() == []


def test_cli_finetune_slices_along_the_chosen_axis(tmp_path, capsys):
    import nibabel as nib

    ckpt = _tiny(tmp_path / "m")
    vol = np.random.default_rng(0).normal(100, 10, (16, 16, 6)).astype(np.float32)
    lab = np.zeros((16, 16, 6), np.uint8)
    lab[4:8, 4:8, :] = 1  # every slice along one axis; 4 slices along another
    for name, data in (("vol", vol), ("lab", lab)):
        (tmp_path / name).mkdir()
        nib.save(
            nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / name / "case.nii.gz"
        )
    counts = {}
    for axis in ("0", "2"):
        assert (
            _run(
                str(tmp_path / "vol"),
                str(tmp_path / "lab"),
                "--model",
                str(ckpt),
                "-o",
                str(tmp_path / f"s{axis}"),
                "--slice-axis",
                axis,
                "--replay",
                "none",
                "--holdout-fraction",
                "0",
            )
            == 0
        )
        (v,) = ModelStore(tmp_path / f"s{axis}").versions()
        counts[axis] = v.card.training["n_train_units"] + v.card.training["n_holdout_units"]
        assert v.card.training["data"][0]["spacing"] == [2.0, 1.0, 1.0]
    capsys.readouterr()
    # napari order (k, j, i) = (6, 16, 16): 6 labelled slices along axis 0, 4 along axis 2
    assert counts == {"0": 6, "2": 4}


def test_cli_help_names_replay_and_slice_axis(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "--replay PATH|auto|none" in out and "--slice-axis" in out
    assert "optimistic" in out


def _touch_pngs(folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / name)


def test_files_pair_by_stem_and_suffix_never_by_order(tmp_path):
    """Issue 12 #4: case1 <-> case10_mask by sorted order was trained on; now by name."""
    import argparse

    from napari_prosma.cli.finetune import _pair

    _touch_pngs(tmp_path / "im", ["case1.png", "case10.png", "case2.png"])
    _touch_pngs(tmp_path / "lab", ["case10_mask.png", "case1_Seg.png", "case2_labels.png"])
    ns = argparse.Namespace(images=tmp_path / "im", labels=tmp_path / "lab")
    got = {i.name: lab.name for i, lab in _pair(ns)}
    assert got == {
        "case1.png": "case1_Seg.png",
        "case10.png": "case10_mask.png",
        "case2.png": "case2_labels.png",
    }
    # one folder holding both
    _touch_pngs(tmp_path / "both", ["a.png", "a_mask.png", "b.png", "b_label.png"])
    ns = argparse.Namespace(images=tmp_path / "both", labels=tmp_path / "both")
    assert {i.name: lab.name for i, lab in _pair(ns)} == {
        "a.png": "a_mask.png",
        "b.png": "b_label.png",
    }


def test_unmatched_or_ambiguous_files_are_refused_by_name(tmp_path, capsys):
    ckpt = _tiny(tmp_path / "m")
    _touch_pngs(tmp_path / "im", ["case1.png", "case10.png", "case3.png"])
    _touch_pngs(
        tmp_path / "lab", ["case1_mask.png", "case1_seg.png", "case10_mask.png", "case4_mask.png"]
    )
    rc = _run(
        str(tmp_path / "im"),
        str(tmp_path / "lab"),
        "--model",
        str(ckpt),
        "-o",
        str(tmp_path / "store"),
    )
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no label file for case3.png" in err
    assert "no image for case4_mask.png" in err
    assert "more than one label file for case1.png (case1_mask.png, case1_seg.png)" in err
    assert not (tmp_path / "store").exists()


def test_cli_takes_0_255_masks_as_binary_and_refuses_fractional_labels(tmp_path, capsys):
    """Issue 12 #7 through the CLI: 0/255 PNG masks (Kvasir, BUSI) train a binary model and
    it is said; float labels 0.6 are refused by value (they were truncated to 0)."""
    import tifffile
    from PIL import Image

    ckpt = _tiny(tmp_path / "m")
    images, masks = _png_pairs(tmp_path / "user", 2)
    for f in masks.iterdir():
        Image.fromarray((np.asarray(Image.open(f)) * 255).astype(np.uint8)).save(f)
    assert (
        _run(
            str(images),
            str(masks),
            "--model",
            str(ckpt),
            "-o",
            str(tmp_path / "s"),
            "--replay",
            "none",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "note: the labels are stored as 0 and 255: taken as 0 = background" in out
    (tmp_path / "flt").mkdir()
    for f in masks.iterdir():
        lab = (np.asarray(Image.open(f)) > 0) * np.float32(0.6)
        tifffile.imwrite(tmp_path / "flt" / f"{f.stem}.tif", lab.astype(np.float32))
    rc = _run(str(images), str(tmp_path / "flt"), "--model", str(ckpt), "-o", str(tmp_path / "s2"))
    err = capsys.readouterr().err
    assert rc == 1 and "fractional values (0.6)" in err and "Traceback" not in err
    assert not (tmp_path / "s2").exists() or ModelStore(tmp_path / "s2").versions() == []


def test_cli_finetune_shows_progress_on_stderr_unless_quiet(tmp_path, capsys):
    """Issue 12 #14: long CLI work was silent; now steps done and time left go to stderr."""
    ckpt = _tiny(tmp_path / "m")
    images, masks = _png_pairs(tmp_path / "user", 2)
    args = [
        str(images),
        str(masks),
        "--model",
        str(ckpt),
        "--replay",
        "none",
        "--holdout-fraction",
        "0",
    ]
    assert _run(*args, "-o", str(tmp_path / "s1")) == 0
    err = capsys.readouterr().err
    assert "[train ] step 1/2, loss " in err and "s left" in err, err
    assert "[done  ] done: step 2" in err
    assert _run(*args, "-o", str(tmp_path / "s2"), "-q") == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "New version tiny-ft-" in cap.out


def test_progress_time_left_follows_the_pace_and_the_budget():
    from types import SimpleNamespace

    from napari_prosma.cli.finetune import _Progress

    p = SimpleNamespace(step=10, max_steps=100, elapsed_s=20.0)
    assert _Progress(None).left(p) == pytest.approx(180.0)  # 90 steps at 2 s
    assert _Progress(60.0).left(p) == pytest.approx(40.0)  # the budget ends first


def test_cli_names_the_new_version_and_shows_the_curve_and_whole_images(
    tmp_path, capsys, monkeypatch
):
    """Issue 16: --task/--class-names/--label name the version; the held-out Dice is shown
    as it went (every evaluation, not only the last) and what changed on the whole images."""
    import napari_prosma.finetune.loop as ft

    scores = iter([0.2, 0.4, 0.5, 0.45, 0.5, 0.5, 0.5])
    monkeypatch.setattr(ft, "holdout_dice", lambda *a, **k: next(scores))
    ckpt = _tiny(tmp_path / "m")
    images, masks = _png_pairs(tmp_path / "user", 4)
    store = tmp_path / "store"
    common = [str(images), str(masks), "--model", str(ckpt), "-o", str(store)]
    naming = ["--task", "Spleen in CT", "--class-names", "spleen", "--label", "Ward 3"]
    budget = ["--max-steps", "4", "--device", "cpu", "--batch-size", "2", "--replay", "none"]
    rc = main(["finetune", *common, *naming, *budget])
    out = capsys.readouterr().out
    assert rc == 0
    assert "New version tiny-ward-3-ft-" in out
    assert "task: Spleen in CT; classes: spleen" in out
    assert (
        "held-out Dice as it went, on the part that chose the state kept (step:Dice): 0:0.200, "
        in out
    )
    (v,) = ModelStore(store).versions()
    curve = json.loads((v.path / "run.json").read_text())["holdout_curve"]
    assert len(curve) >= 2 and curve[0] == [0, 0.2]
    assert ", ".join(f"{s}:{d:.3f}" for s, d in curve) in out
    assert "on your 4 image(s), whole (most of it was trained on" in out
    rc = _run(*common, "--class-names", "a,b,c")
    err = capsys.readouterr().err
    assert rc == 1 and "2 classes" in err and "3 class name(s)" in err and "Traceback" not in err
