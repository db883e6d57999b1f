"""``prosma predict`` end to end on small random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_prosma._samples import sample_path
from napari_prosma.checkpoint import ModelCard, save
from napari_prosma.cli import main
from napari_prosma.nets import build_model


def _checkpoint(folder: Path, name: str, **kw) -> Path:
    torch.manual_seed(0)
    model = build_model("prosma_unet", **kw)
    norm = {"mode": "fixed", "scale": 255.0} if kw["in_channels"] == 3 else {"mode": "zscore"}
    card = ModelCard(
        "prosma_unet", kw, name=name, normalization=norm, class_names=["background", "thing"]
    )
    return save(model, folder / name, card)


@pytest.fixture
def rgb_model(tmp_path) -> Path:
    return _checkpoint(
        tmp_path / "models",
        "rgb",
        spatial_dims=2,
        in_channels=3,
        out_channels=1,
        widths=[8, 16, 32],
    )


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def test_folder_with_a_corrupt_file(tmp_path, rgb_model, capsys):
    src = tmp_path / "in"
    (src / "more").mkdir(parents=True)
    shutil.copy(sample_path("kvasir_polyp"), src / "a.jpg")
    shutil.copy(sample_path("kvasir_polyp"), src / "more" / "b.jpg")
    (src / "broken.png").write_bytes(sample_path("busi_benign").read_bytes()[:300])
    (src / "notes.txt").write_text("not an image")  # ignored inside folders
    out = tmp_path / "out"

    rc = main(
        [
            "predict",
            str(src),
            "-o",
            str(out),
            "--model",
            str(rgb_model),
            "--device",
            "cpu",
            "--probabilities",
            "--gates",
            "--tta",
        ]
    )

    captured = capsys.readouterr()
    assert rc == 1
    errors = [line for line in captured.err.splitlines() if "broken.png" in line]
    assert len(errors) == 1 and "corrupt or truncated" in errors[0]
    assert "Traceback" not in captured.err
    for stem, folder in (("a", out), ("b", out / "more")):
        labels = folder / f"{stem}_labels.png"
        assert labels.exists()
        for suffix in (
            "probabilities.tif",
            "uncertainty.tif",
            "gates_psi.tif",
            "gates_zero.tif",
            "gates.json",
        ):
            assert (folder / f"{stem}_{suffix}").exists(), suffix
    assert not list(out.rglob("broken*"))
    assert _leftovers(out) == []
    gates = json.loads((out / "a_gates.json").read_text())
    assert [s["stage"] for s in gates["stages"]] == [1, 2]
    assert "a.jpg: 288×337×3 rgb" in captured.out

    # a second run never overwrites ...
    rc = main(
        [
            "predict",
            str(src / "a.jpg"),
            "-o",
            str(out),
            "--model",
            str(rgb_model),
            "--device",
            "cpu",
        ]
    )
    assert rc == 1 and "never overwritten" in capsys.readouterr().err
    # ... unless asked to
    rc = main(
        [
            "predict",
            str(src / "a.jpg"),
            "-o",
            str(out),
            "--model",
            str(rgb_model),
            "--device",
            "cpu",
            "--overwrite",
        ]
    )
    assert rc == 0


def test_nifti_volume_keeps_geometry(tmp_path, capsys):
    import nibabel as nib

    ckpt = _checkpoint(
        tmp_path, "mri", spatial_dims=3, in_channels=1, out_channels=3, widths=[4, 8, 16]
    )
    src = sample_path("hippocampus_mri")
    out = tmp_path / "out"
    rc = main(
        [
            "predict",
            str(src),
            "-o",
            str(out),
            "--model",
            str(ckpt),
            "--device",
            "cpu",
            "--probabilities",
            "--gates",
            "--tile-size",
            "32",
            "--overlap",
            "0.25",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    lab = nib.load(out / "hippocampus_mri_labels.nii.gz")
    ref = nib.load(src)
    np.testing.assert_array_equal(lab.affine, ref.affine)
    assert lab.shape == ref.shape and lab.get_data_dtype() == np.uint8
    probs = nib.load(out / "hippocampus_mri_probabilities.nii.gz")
    assert probs.shape == (*ref.shape, 3)
    psi = nib.load(out / "hippocampus_mri_gates_psi.nii.gz")
    assert psi.shape == (*ref.shape, 2)  # two gated stages
    assert "done: 1 file(s)" in capsys.readouterr().out


def test_wrong_model_for_the_image_fails_plainly(tmp_path, rgb_model, capsys):
    rc = main(
        [
            "predict",
            str(sample_path("hippocampus_mri")),
            "-o",
            str(tmp_path / "o"),
            "--model",
            str(rgb_model),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "hippocampus_mri.nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_usage_errors(tmp_path, rgb_model, capsys):
    assert (
        main(["predict", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(rgb_model)]) == 1
    )
    assert "no image files" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(sample_path("kvasir_polyp")),
                "-o",
                str(tmp_path / "o"),
                "--model",
                str(tmp_path / "nope"),
            ]
        )
        == 1
    )
    assert "no checkpoint" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(sample_path("kvasir_polyp")),
                "-o",
                str(tmp_path / "o"),
                "--model",
                str(rgb_model),
                "--overlap",
                "1.5",
            ]
        )
        == 1
    )
    assert "--overlap" in capsys.readouterr().err


def test_no_model_and_none_bundled(tmp_path, capsys, monkeypatch):
    import napari_prosma.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "list_bundled", lambda: [])
    rc = main(["predict", str(sample_path("kvasir_polyp")), "-o", str(tmp_path / "o")])
    assert rc == 1 and "pass --model" in capsys.readouterr().err
