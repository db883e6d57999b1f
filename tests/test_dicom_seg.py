"""DICOM-SEG out: written by highdicom, read back onto exactly the source grid."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from dicom_support import PATIENT, Card, expected_lps, make_series, rotation, wheel_file
from napari_prosma import dicom
from napari_prosma.dicom import _napari
from napari_prosma.preprocess import InputError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a DICOM test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def painted(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Labels 0/1/2 with every class present and no symmetry to hide a flipped axis."""
    rng = np.random.default_rng(seed)
    lab = (rng.random(shape) > 0.6).astype(np.uint8) + (rng.random(shape) > 0.8)
    lab.reshape(-1)[:3] = [0, 1, 2]
    return lab.astype(np.uint8)


def one(path):
    images, _ = dicom.read_dicom(path)
    assert len(images) == 1
    return images[0]


@pytest.mark.parametrize(
    "iop, degrees",
    [
        ((1, 0, 0, 0, 1, 0), 0.0),  # axial
        ((0, 1, 0, 0, 0, -1), 0.0),  # sagittal: the shown grid is a re-arrangement
        ((1, 0, 0, 0, 1, 0), 23.0),  # oblique
    ],
)
def test_seg_round_trip_is_voxel_exact_on_the_source_grid(tmp_path, iop, degrees):
    import highdicom as hd
    import pydicom

    r = rotation((1, 2, 0.5), degrees)
    iop = np.r_[r @ np.asarray(iop[:3], float), r @ np.asarray(iop[3:], float)]
    paths = make_series(tmp_path / "s", n=5, iop=iop, step=2.0)
    img = one(tmp_path / "s")
    lab = painted(img.data.shape)
    out = dicom.write_seg(tmp_path / "seg.dcm", lab, img, Card())
    np.testing.assert_array_equal(dicom.read_seg(out, img), lab)
    # independently of read_seg: highdicom's frame for each source file, against the
    # labels at the positions that file's header gives its pixels (via the layer's affine,
    # which test_dicom checks against the headers in napari)
    seg = hd.seg.segread(out)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    src = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    inv = np.linalg.inv(img.affine)
    rr, cc = np.mgrid[0:128, 0:128]
    for k, path in enumerate(paths):
        corner = expected_lps(path, 0, 0)
        step_r = expected_lps(path, 1, 0) - corner
        step_c = expected_lps(path, 0, 1) - corner
        lps = corner + rr[..., None] * step_r + cc[..., None] * step_c
        idx = np.rint(lps[..., ::-1] @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        np.testing.assert_array_equal(lab[idx[..., 0], idx[..., 1], idx[..., 2]], src[k])


def test_seg_names_segments_and_identifies_the_algorithm(tmp_path):
    make_series(tmp_path / "s", n=3)
    img = one(tmp_path / "s")
    out = dicom.write_seg(tmp_path / "seg.dcm", painted(img.data.shape), img, Card(), version="v3")
    segs = dicom.seg_segments(out)
    assert [(s["number"], s["label"]) for s in segs] == [(1, "anterior"), (2, "posterior")]
    for s in segs:
        assert s["algorithm_type"] == "AUTOMATIC" and s["algorithm"] == "hippocampus_prosma"
        assert s["version"] == "v3" and f"weights_sha256={Card.weights_sha256}" in s["parameters"]


def test_seg_references_the_source_series(tmp_path):
    import pydicom

    paths = make_series(tmp_path / "s", n=3)
    img = one(tmp_path / "s")
    out = dicom.write_seg(tmp_path / "seg.dcm", painted(img.data.shape), img, Card())
    seg = pydicom.dcmread(out)
    src = pydicom.dcmread(paths[0])
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == {
        pydicom.dcmread(p).SOPInstanceUID for p in paths
    }
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID


def test_multiframe_source_round_trip(tmp_path):
    import highdicom as hd
    import pydicom

    paths = make_series(tmp_path / "src", n=4)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=hd.UID(),
        series_number=5,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "enhanced.dcm")
    img = one(tmp_path / "mf" / "enhanced.dcm")
    assert img.data.shape == (4, 128, 128) and img.meta["dicom"]["multiframe"]
    np.testing.assert_array_equal(img.data, one(tmp_path / "src").data)
    lab = painted(img.data.shape, seed=1)
    out = dicom.write_seg(tmp_path / "seg.dcm", lab, img, Card())
    np.testing.assert_array_equal(dicom.read_seg(out, img), lab)


@pytest.mark.parametrize("name", ["CT_small.dcm", "examples_rgb_color.dcm"])
def test_single_images_round_trip(tmp_path, name):
    img = one(wheel_file(name))
    lab = painted(img.spatial_shape)
    out = dicom.write_seg(tmp_path / "seg.dcm", lab, img, Card())
    np.testing.assert_array_equal(dicom.read_seg(out, img), lab)


def test_patient_identifiers_only_where_dicom_requires_them(tmp_path):
    make_series(tmp_path / "s", n=3, patient=PATIENT)
    img = one(tmp_path / "s")
    out = dicom.write_seg(tmp_path / "seg.dcm", painted(img.data.shape), img, Card())
    import pydicom

    seg = pydicom.dcmread(out)
    assert str(seg.PatientName) == PATIENT["PatientName"]
    assert seg.PatientID == PATIENT["PatientID"]
    raw = out.read_bytes()
    for value in PATIENT.values():
        assert raw.count(value.encode()) == 1  # the patient module, nowhere else
    assert "InstitutionName" not in seg and "OperatorsName" not in seg


def test_a_seg_of_another_series_is_refused(tmp_path):
    make_series(tmp_path / "a", n=3)
    make_series(tmp_path / "b", n=3)
    a, b = one(tmp_path / "a"), one(tmp_path / "b")
    out = dicom.write_seg(tmp_path / "seg.dcm", painted(a.data.shape), a, Card())
    with pytest.raises(InputError, match="made on another series"):
        dicom.read_seg(out, b)


def test_a_changed_source_is_refused_and_nothing_is_written(tmp_path):
    import pydicom

    paths = make_series(tmp_path / "s", n=3)
    img = one(tmp_path / "s")
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = "1.2.3.999"
    ds.save_as(paths[1])
    with pytest.raises(InputError, match="changed since it was opened"):
        dicom.write_seg(tmp_path / "seg.dcm", painted(img.data.shape), img, Card())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_labels_that_do_not_fit_are_refused(tmp_path):
    make_series(tmp_path / "s", n=3)
    img = one(tmp_path / "s")
    with pytest.raises(InputError, match="do not fit the image grid"):
        dicom.write_seg(tmp_path / "seg.dcm", np.zeros((3, 4, 4), np.uint8), img, Card())
    with pytest.raises(InputError, match="whole numbers"):
        dicom.write_seg(tmp_path / "seg.dcm", np.full(img.data.shape, 0.5), img, Card())
    with pytest.raises(FileExistsError):
        (tmp_path / "seg.dcm").write_text("mine")
        dicom.write_seg(tmp_path / "seg.dcm", painted(img.data.shape), img, Card())
    assert (tmp_path / "seg.dcm").read_text() == "mine"


def test_napari_writer_writes_a_labels_layer_as_seg(tmp_path):
    make_series(tmp_path / "s", n=4, iop=(0, 1, 0, 0, 0, -1))
    ((data, kwargs, _),) = _napari.read_layers(str(tmp_path / "s"))
    lab = painted(data.shape)
    attrs = {
        **{k: v for k, v in kwargs.items() if k != "metadata"},
        "metadata": {**kwargs["metadata"], "prosma": {"role": "labels", "card": Card()}},
    }
    written = _napari.write_seg_layer(str(tmp_path / "out"), lab, attrs)
    assert written == [str(tmp_path / "out.dcm")]
    img = one(tmp_path / "s")
    np.testing.assert_array_equal(dicom.read_seg(Path(written[0]), img), lab)
    assert {s["algorithm_type"] for s in dicom.seg_segments(written[0])} == {"SEMIAUTOMATIC"}


def test_hand_painted_labels_without_a_model_are_manual_segments(tmp_path):
    make_series(tmp_path / "s", n=3)
    img = one(tmp_path / "s")
    lab = np.zeros(img.data.shape, np.uint8)
    lab[1, 10:20, 10:20] = 4
    out = dicom.write_seg(tmp_path / "seg.dcm", lab, img, None)
    segs = [(s["number"], s["label"], s["algorithm_type"]) for s in dicom.seg_segments(out)]
    assert segs == [(k, f"label {k}", "MANUAL") for k in (1, 2, 3, 4)]
    np.testing.assert_array_equal(dicom.read_seg(out, img), lab)


def test_empty_labels_of_a_model_give_empty_named_segments(tmp_path):
    make_series(tmp_path / "s", n=3)
    img = one(tmp_path / "s")
    out = dicom.write_seg(tmp_path / "seg.dcm", np.zeros(img.data.shape, np.uint8), img, Card())
    assert [s["label"] for s in dicom.seg_segments(out)] == ["anterior", "posterior"]
    assert not dicom.read_seg(out, img).any()
    with pytest.raises(InputError, match="nothing to save"):
        dicom.write_seg(tmp_path / "x.dcm", np.zeros(img.data.shape, np.uint8), img, None)
