"""``prosma predict`` through the widgets' own plan and gate checks (issue 13): a volume
given to a 2D model is segmented slice by slice, and a scan whose gate sparsity lies
outside the card's training range is warned about. Real files from ``../shared/data``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hardening_support import save_tiny, smooth_image, tiny_model
from napari_prosma.checkpoint import load
from napari_prosma.cli import main
from napari_prosma.inference import predict
from napari_prosma.inference.gates import sparsity_warnings
from napari_prosma.inference.plan import plan_input, run_segmentation
from napari_prosma.io import read_image


def _predict(*args: str | Path) -> int:
    return main(["predict", *map(str, args), "--device", "cpu"])


@pytest.mark.parametrize("axis", [0, 2])
def test_a_volume_with_a_2d_model_is_segmented_slice_by_slice(tmp_path, shared_data, capsys, axis):
    """A real hippocampus MRI and a 2D model: every slice along ``--slice-axis``, labels
    and maps on the volume's grid with its affine, the gates per slice (the CLI **used to**
    refuse: "is a 3D volume but the model segments 2D images"). The labels are the ones the
    Segment widget's plan gives."""
    model_path = save_tiny(tmp_path / "models", "grey2d")
    src = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    out = tmp_path / "out"
    rc = _predict(
        src,
        "-o",
        out,
        "--model",
        model_path,
        "--gates",
        "--probabilities",
        "--slice-axis",
        str(axis),
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    img = read_image(src)
    n = img.data.shape[axis]
    assert f"all {n} slices of the volume, one at a time (2D model)" in cap.out
    labels = nib.load(out / "hippocampus_001_labels.nii.gz")
    np.testing.assert_array_equal(labels.affine, nib.load(src).affine)
    ours = read_image(out / "hippocampus_001_labels.nii.gz").data
    model, card = load(model_path)
    plan = plan_input(img.data, rgb=False, spatial_dims=2, slice_axis=axis, spacing=img.spacing)
    widget = run_segmentation(plan, model, card, device="cpu", gates=False)
    np.testing.assert_array_equal(ours, widget.labels)
    probs = nib.load(out / "hippocampus_001_probabilities.nii.gz")
    assert probs.shape == (*labels.shape, 2)  # NIfTI keeps the classes on the 4th axis
    gates = json.loads((out / "hippocampus_001_gates.json").read_text())
    assert [len(s["zero_frac_mean_per_slice"]) for s in gates["stages"]] == [n, n]
    assert nib.load(out / "hippocampus_001_gates_psi.nii.gz").shape == (*labels.shape, 2)


@pytest.mark.parametrize("depth", [3, 4])
def test_a_3_or_4_slice_volume_is_not_taken_for_colour(tmp_path, capsys, depth):
    """The former refusal cases: a 3- or 4-slice volume for a 2D model gives a label volume
    of its own shape (never an RGB(A) reading of it)."""
    model = save_tiny(tmp_path / "models", "m", spatial_dims=2)
    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(smooth_image((24, 24, depth)), np.eye(4)), src)
    assert _predict(src, "-o", tmp_path / "out", "--model", model) == 0
    labels = read_image(tmp_path / "out" / "vol_labels.nii.gz")
    assert labels.data.shape == read_image(src).data.shape == (depth, 24, 24)
    assert f"all {depth} slices" in capsys.readouterr().out


def _with_range(tmp_path: Path, name: str, rng: dict) -> Path:
    """The tiny model (same weights as ``save_tiny``'s) with a sparsity range on its card."""
    from napari_prosma.checkpoint import save

    net, card = tiny_model(gate_sparsity_range=rng)
    card.name = name
    return save(net, tmp_path / "models" / name, card)


def test_a_scan_unlike_the_training_data_is_warned(tmp_path, shared_data, capsys):
    """A card whose recorded training range of stage 1's exact-zero sparsity excludes what
    a real BUSI scan gives: a warning on stderr (also with ``-q``) and in the gates JSON,
    word for word the Segment widget's (the CLI **used to** say nothing); exit code 0. A
    range that holds the scan: no warning."""
    scan = shared_data / "busi" / "images" / "benign_001.png"
    img = read_image(scan)
    model, card = load(save_tiny(tmp_path / "probe", "probe"))
    v = predict(img.data, model, card, device="cpu", return_gates="stats").gates[0]
    v = v.zero_frac_mean
    outside = [min(v + 0.05, 1.0), 1.0] if v < 0.9 else [0.0, v - 0.05]
    odd = _with_range(tmp_path, "odd", {"stage1": outside})
    usual = _with_range(tmp_path, "usual", {"stage1": [0.0, 1.0], "stage2": [0.0, 1.0]})

    rc = _predict(scan, "-o", tmp_path / "a", "--model", odd, "--gates")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and len(err) == 1, err
    assert err[0].startswith("prosma predict: benign_001.png: warning: stage 1: ")
    assert "this scan is unlike what the model was trained on" in err[0]
    m, c = load(odd)
    plan = plan_input(img.data, rgb=False, spatial_dims=2)
    expected = sparsity_warnings(
        c.gate_sparsity_range, run_segmentation(plan, m, c, device="cpu").gates
    )
    assert err[0].endswith(expected[0])
    gates = json.loads((tmp_path / "a" / "benign_001_gates.json").read_text())
    assert gates["warnings"] == expected

    assert _predict(scan, "-o", tmp_path / "b", "--model", odd, "-q") == 0
    cap = capsys.readouterr()
    assert cap.out == "" and "warning: stage 1" in cap.err
    assert _predict(scan, "-o", tmp_path / "c", "--model", usual) == 0
    assert "warning" not in capsys.readouterr().err
