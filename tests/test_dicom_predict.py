"""``prosma predict`` on DICOM: one input per series, NIfTI or DICOM-SEG out, refusals."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from dicom_support import PATIENT, make_series
from napari_prosma import dicom
from napari_prosma.cli import main

MODEL = "hippocampus_prosma"  # the bundled 3D model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a DICOM test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def mr_series(folder, **kw):
    return make_series(folder, n=6, source="MR_small.dcm", step=1.0, **kw)


def test_predict_writes_a_seg_of_the_series(tmp_path, capsys):
    from napari_prosma.checkpoint import read_card, resolve

    mr_series(tmp_path / "study", patient=PATIENT)
    rc = main(
        [
            "predict",
            str(tmp_path / "study"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            MODEL,
            "--format",
            "dicom-seg",
            "--device",
            "cpu",
        ]
    )
    text = capsys.readouterr()
    assert rc == 0, text.err
    # the SEG and prosma predict's record of what it wrote (cli/outputs.py)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "prosma_outputs.json",
        "study_seg.dcm",
    ]
    img = dicom.read_dicom(tmp_path / "study")[0][0]
    back = dicom.read_seg(tmp_path / "out" / "study_seg.dcm", img)
    assert back.shape == img.data.shape and set(np.unique(back)) <= {0, 1, 2}
    card = read_card(resolve(MODEL))
    segs = dicom.seg_segments(tmp_path / "out" / "study_seg.dcm")
    assert [s["label"] for s in segs] == card.class_names[1:]
    assert all(s["algorithm"] == MODEL and card.weights_sha256 in s["parameters"] for s in segs)
    for value in PATIENT.values():  # nothing of the patient on the terminal
        assert value not in text.out + text.err


def test_predict_default_is_nifti_with_the_scanner_affine(tmp_path, capsys):
    import nibabel as nib

    mr_series(tmp_path / "s")
    rc = main(
        [
            "predict",
            str(tmp_path / "s"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            MODEL,
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    nii = nib.load(tmp_path / "out" / "s_labels.nii.gz")
    img = dicom.read_dicom(tmp_path / "s")[0][0]
    assert nii.shape == img.data.shape[::-1]
    # voxel (i, j, k) of the NIfTI is array voxel (k, j, i); RAS = diag(-1, -1, 1) LPS
    idx = np.array([2, 3, 4])
    ras = nii.affine[:3, :3] @ idx + nii.affine[:3, 3]
    zyx = img.affine[:3, :3] @ idx[::-1] + img.affine[:3, 3]
    np.testing.assert_allclose(ras, zyx[::-1] * [-1, -1, 1], atol=1e-4)


def test_predict_reads_each_series_of_a_folder(tmp_path, capsys):
    mr_series(tmp_path / "study")
    mr_series(tmp_path / "study", prefix="b")
    rc = main(
        [
            "predict",
            str(tmp_path / "study"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            MODEL,
            "--format",
            "dicom-seg",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "prosma_outputs.json",
        "study_series1_2_seg.dcm",
        "study_series1_seg.dcm",
    ]


def test_predict_refuses_a_broken_series_and_writes_nothing(tmp_path, capsys):
    make_series(tmp_path / "s", n=5, source="MR_small.dcm", offsets=[0, 1, 2, 4, 5])
    rc = main(
        [
            "predict",
            str(tmp_path / "s"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            MODEL,
            "--format",
            "dicom-seg",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "1 slice(s) missing" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_dicom_seg_needs_dicom_input(tmp_path, capsys):
    from pathlib import Path

    ct = Path(__file__).resolve().parents[1] / "src" / "napari_prosma" / "_samples"
    rc = main(
        [
            "predict",
            str(ct / "hippocampus_mri.nii.gz"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            MODEL,
            "--format",
            "dicom-seg",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "--format dicom-seg needs DICOM input" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
