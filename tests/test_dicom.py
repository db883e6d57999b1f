"""DICOM in: files from pydicom's wheel, series built from them; geometry and refusals."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from dicom_support import (
    Card,
    expected_lps,
    make_series,
    marker_value,
    rotation,
    wheel_dir,
    wheel_file,
)
from napari_prosma import dicom
from napari_prosma.dicom import _napari
from napari_prosma.preprocess import InputError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the network (pydicom fetches some test files on demand)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a DICOM test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def one(paths) -> dicom.ImageData:
    images, _ = dicom.read_dicom(paths)
    assert len(images) == 1
    return images[0]


def test_test_files_ship_in_the_wheel():
    import pydicom

    root = Path(pydicom.__file__).parent
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "rtstruct.dcm",
        "rtdose.dcm",
        "liver_1frame.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ):
        assert root in wheel_file(name).parents
    assert (wheel_dir("dicomdirtests") / "98892003" / "MR700").is_dir()


def test_single_ct_file_is_a_2d_image_in_hounsfield_units():
    import pydicom

    path = wheel_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img = one(path)
    assert img.kind == "grey" and img.data.shape == (128, 128) and img.format == "dicom"
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(img.data, hu)
    assert float(img.data.min()) < 0 <= int(ds.pixel_array.min())  # HU, not stored values
    assert img.spacing == pytest.approx([float(v) for v in ds.PixelSpacing])


def test_window_centre_and_width_become_contrast_limits():
    ((_data, kwargs, kind),) = _napari.read_layers(str(wheel_file("MR_small.dcm")))
    c, w = 600.0, 1600.0  # MR_small.dcm's WindowCenter / WindowWidth
    assert kind == "image" and kwargs["colormap"] == "gray"
    assert kwargs["contrast_limits"] == pytest.approx(
        (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)
    )


def test_series_folder_is_one_volume_with_scale_and_translate(tmp_path):
    import pydicom

    paths = make_series(tmp_path / "ct", n=6)
    img = one(tmp_path / "ct")
    assert img.kind == "volume" and img.data.shape == (6, 128, 128)
    # feet -> head along axis 0: slice k of the files is array slice k (z grows with k)
    np.testing.assert_array_equal(img.data[:, 0, 0], np.arange(6) - 1024.0)
    ((_data, kwargs, _),) = _napari.read_layers(str(tmp_path / "ct"))
    assert "affine" not in kwargs
    ds = pydicom.dcmread(paths[0])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    assert kwargs["scale"] == pytest.approx((5.0, dr, dc))
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    assert kwargs["translate"] == pytest.approx((z, y, x))


def _check_world(img, paths, kwargs):
    """Every slice's marker pixel (3, 5) sits in napari's world where its header says."""
    from napari.layers import Image

    layer = Image(img.data, **{k: v for k, v in kwargs.items() if k != "metadata"})
    for k, path in enumerate(paths):
        hits = np.argwhere(img.data == marker_value(path, k))
        assert len(hits) == 1, "each marker appears exactly once"
        world = np.asarray(layer.data_to_world(hits[0]))
        np.testing.assert_allclose(world, expected_lps(path, 3, 5)[::-1], atol=1e-4)


@pytest.mark.parametrize(
    "iop, axis, degrees",
    [
        ((1, 0, 0, 0, 1, 0), (0, 0, 1), 0.0),  # axial
        ((0, 1, 0, 0, 0, -1), (0, 0, 1), 0.0),  # sagittal
        ((1, 0, 0, 0, 0, -1), (0, 0, 1), 0.0),  # coronal
        ((1, 0, 0, 0, 1, 0), (1, 2, 0.5), 23.0),  # oblique, out of plane
        ((-1, 0, 0, 0, -1, 0), (0, 0, 1), 12.0),  # flipped in-plane, rotated in plane
    ],
)
def test_any_orientation_sits_where_the_scanner_put_it(tmp_path, iop, axis, degrees):
    r = rotation(axis, degrees)
    iop = np.r_[r @ np.asarray(iop[:3], float), r @ np.asarray(iop[3:], float)]
    paths = make_series(tmp_path / "s", n=4, iop=iop, step=2.5)
    img = one(tmp_path / "s")
    ((_, kwargs, _),) = _napari.read_layers(str(tmp_path / "s"))
    assert ("affine" in kwargs) == (degrees != 0)
    _check_world(img, paths, kwargs)


def test_a_tilted_stack_warns_that_2d_views_flatten_it(tmp_path):
    iop = np.r_[rotation((1, 0, 0), 30) @ [1, 0, 0], rotation((1, 0, 0), 30) @ [0, 1, 0]]
    make_series(tmp_path / "s", n=3, iop=iop)
    img = one(tmp_path / "s")
    assert any("tilted 30°" in w for w in img.warnings)


def test_folder_with_several_series_gives_one_image_each_and_says_which(tmp_path):
    make_series(tmp_path / "study" / "a", n=3)
    make_series(tmp_path / "study" / "b", n=4, source="MR_small.dcm", step=1.0)
    shutil.copy(wheel_file("rtstruct.dcm"), tmp_path / "study" / "rt.dcm")
    (tmp_path / "study" / "README.txt").write_text("not dicom")
    images, notes = dicom.read_dicom(tmp_path / "study")
    assert sorted(i.data.shape for i in images) == [(3, 128, 128), (4, 64, 64)]
    assert notes[0].startswith("read 2 series: CT series 1") and "MR series 1" in notes[0]
    assert any("rt.dcm: an RT Structure Set" in n for n in notes)
    assert any("1 file(s) that are not DICOM" in n for n in notes)


def test_localizer_series_are_refused_and_the_readable_one_is_read():
    images, notes = dicom.read_dicom(wheel_dir("dicomdirtests") / "98892003" / "MR2")
    assert len(images) == 1 and images[0].data.shape == (16, 16)
    refused = [n for n in notes if n.startswith("not read")]
    assert len(refused) == 2 and all("orientation of the slices varies" in n for n in refused)


def test_varying_orientation_is_refused():
    with pytest.raises(InputError, match="orientation of the slices varies"):
        dicom.read_dicom(wheel_dir("dicomdirtests") / "98892003" / "MR700")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"offsets": [0, 5, 10, 17, 20]}, "irregular slice spacing"),
        ({"offsets": [0, 5, 10, 20, 25]}, r"1 slice\(s\) missing .* 2× the 5 mm"),
        ({"offsets": [0, 5, 5, 10, 15]}, "mixed series given as one: 1 slice"),
        ({"shift": (2.0, 0.0, 0.0)}, "gantry tilt"),
    ],
)
def test_broken_stacks_are_refused(tmp_path, kwargs, match):
    make_series(tmp_path / "s", **kwargs)
    with pytest.raises(InputError, match=match):
        dicom.read_dicom(tmp_path / "s")


def test_two_series_under_one_uid_are_refused_as_mixed(tmp_path):
    make_series(tmp_path / "s", n=3, series_uid="1.2.3.4")
    make_series(tmp_path / "s", n=3, source="MR_small.dcm", series_uid="1.2.3.4", prefix="mr")
    with pytest.raises(InputError, match="mixed series given as one: its files differ"):
        dicom.read_dicom(tmp_path / "s")


@pytest.mark.parametrize(
    "name, match",
    [
        ("rtstruct.dcm", "RT Structure Set"),
        ("rtdose.dcm", "RT Dose"),
        ("liver_1frame.dcm", "Segmentation .SEG., not an image"),
        ("reportsi.dcm", "Basic Text SR Storage .no pixel data."),
    ],
)
def test_non_image_objects_are_refused(name, match):
    with pytest.raises(InputError, match=match):
        dicom.read_dicom(wheel_file(name))


def test_undecodable_compression_names_the_package_that_would_decode_it():
    import pydicom
    from pydicom.pixels import get_decoder

    path = wheel_file("SC_rgb_jpeg_gdcm.dcm")  # JPEG Lossless, process 14
    uid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert not get_decoder(uid).is_available, "precondition: no JPEG Lossless decoder here"
    with pytest.raises(InputError) as e:
        dicom.read_dicom(path)
    msg = str(e.value)
    assert "JPEG Lossless" in msg and "cannot be decoded here" in msg
    assert "python-gdcm" in msg and "pylibjpeg pylibjpeg-libjpeg" in msg


def test_decodable_compression_reads_the_same_pixels():
    import pydicom
    from pydicom.pixels import get_decoder

    path = wheel_file("MR_small_jpeg_ls_lossless.dcm")
    uid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert get_decoder(uid).is_available, "precondition: pyjpegls decodes JPEG-LS here"
    np.testing.assert_array_equal(one(path).data, one(wheel_file("MR_small.dcm")).data)


def test_a_file_that_is_not_dicom_is_refused(tmp_path):
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"\0" * 300)
    with pytest.raises(InputError, match="not a DICOM file"):
        dicom.read_dicom(bad)
    assert _napari.napari_get_reader(str(tmp_path)) is None  # a folder without DICOM


def test_napari_reader_claims_dicom_files_and_folders(tmp_path):
    make_series(tmp_path / "s", n=2)
    assert _napari.napari_get_reader(str(tmp_path / "s")) is _napari.read_layers
    assert _napari.napari_get_reader(str(wheel_file("CT_small.dcm"))) is _napari.read_layers
    assert _napari.napari_get_reader("image.png") is None


def test_no_patient_data_in_layers_or_notes(tmp_path):
    import pickle

    from dicom_support import PATIENT

    make_series(tmp_path / "s", n=3, patient=PATIENT)
    shutil.copy(wheel_file("rtstruct.dcm"), tmp_path / "s" / "rt.dcm")
    images, notes = dicom.read_dicom(tmp_path / "s")
    ((_data, kwargs, _),) = _napari.read_layers(str(tmp_path / "s"))
    blob = pickle.dumps((kwargs, notes, images[0].meta, images[0].warnings))
    for value in PATIENT.values():
        assert value.encode() not in blob


def test_labels_without_a_dicom_source_are_not_written_as_seg(tmp_path):
    from napari_prosma.io import from_array

    with pytest.raises(InputError, match="references its source series"):
        dicom.write_seg(
            tmp_path / "x.dcm", np.zeros((4, 4), np.uint8), from_array(np.zeros((4, 4))), Card()
        )
    assert not (tmp_path / "x.dcm").exists()


def test_dicom_modules_import_without_qt_napari_or_torch():
    import subprocess
    import sys

    mods = "napari_prosma.dicom, napari_prosma.dicom._napari, napari_prosma.dicom.predict, "
    mods += "napari_prosma.oblique"
    code = (
        f"import sys, {mods}; "
        "bad = [m for m in ('torch', 'qtpy', 'PyQt6', 'napari') if m in sys.modules]; "
        "print(bad); sys.exit(bool(bad))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
