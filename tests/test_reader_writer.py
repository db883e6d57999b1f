"""The npe2 reader and writers without a viewer: geometry in, geometry out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_prosma import _reader, _writer

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "napari_prosma" / "_samples"
CT = SAMPLES / "spleen_ct.nii.gz"


@pytest.fixture
def warned(monkeypatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(_reader, "_warn", seen.append)
    return seen


def as_layer(tuple_: tuple) -> tuple[np.ndarray, dict]:
    """What napari hands a writer: the data and the layer's attributes."""
    data, kwargs, _ = tuple_
    attrs = {
        "scale": kwargs["scale"],
        "translate": kwargs["translate"],
        "metadata": kwargs["metadata"],
        "rgb": kwargs.get("rgb", False),
        "name": kwargs["name"],
    }
    return data, attrs


def test_get_reader_claims_nifti_and_tiff_only():
    assert _reader.napari_get_reader("a.nii.gz") is _reader.read_layers
    assert _reader.napari_get_reader("a.NII") is _reader.read_layers
    assert _reader.napari_get_reader(["a.tif", "b.tiff"]) is _reader.read_layers
    assert _reader.napari_get_reader("a.png") is _reader.read_layers  # issue 16
    assert _reader.napari_get_reader("a.bmp") is None
    assert _reader.napari_get_reader(["a.nii", "b.bmp"]) is None
    assert _reader.napari_get_reader([]) is None


def test_nifti_affine_becomes_scale_and_translate(warned):
    import nibabel as nib

    ((data, kwargs, kind),) = _reader.read_layers(str(CT))
    affine = nib.load(str(CT)).affine
    assert kind == "image" and data.shape == (26, 166, 164)
    np.testing.assert_allclose(kwargs["scale"], np.diag(affine)[:3][::-1])
    np.testing.assert_allclose(kwargs["translate"], affine[:3, 3][::-1])
    meta = kwargs["metadata"]
    assert meta["affine"].shape == (4, 4)
    np.testing.assert_array_equal(meta["prosma_io"]["source_affine"], affine)
    assert kwargs["name"] == "spleen_ct"
    assert warned == []  # axis-aligned: nothing to warn about


def test_label_files_open_as_labels():
    ((data, kwargs, kind),) = _reader.read_layers(str(SAMPLES / "spleen_ct_label.nii.gz"))
    assert kind == "labels"
    assert data.dtype.kind in "iu" and set(np.unique(data)) <= {0, 1}
    assert "rgb" not in kwargs


def test_rotated_nifti_is_shown_rotated_and_keeps_the_full_affine(tmp_path, warned):
    """Issue 17: a rotated NIfTI is placed by the layer's affine where the scanner put it
    (was: spacing and origin only, with a warning); napari can show an in-plane rotation,
    so nothing is said; labels drawn on it are written back with the source affine."""
    import nibabel as nib

    a = np.deg2rad(20)
    affine = np.array(
        [
            [np.cos(a), -np.sin(a), 0, 10],
            [np.sin(a), np.cos(a), 0, -5],
            [0, 0, 2.5, 30],
            [0, 0, 0, 1],
        ]
    )
    path = tmp_path / "rotated.nii.gz"
    nib.save(
        nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), affine), str(path)
    )

    ((data, kwargs, _),) = _reader.read_layers(str(path))

    assert not warned
    shown = np.asarray(kwargs["affine"])
    assert not np.allclose(shown[:3, :3], np.diag(np.diag(shown[:3, :3])))  # rotated
    # the voxel sizes survive in the layer's affine: columns of 2.5, 1, 1 mm
    np.testing.assert_allclose(np.linalg.norm(shown[:3, :3], axis=0), (2.5, 1.0, 1.0))
    assert not np.allclose(
        kwargs["metadata"]["affine"], np.diag(np.diag(kwargs["metadata"]["affine"]))
    )
    # writing labels drawn on it gives the rotated affine back
    out = _writer.write_labels(
        str(tmp_path / "lab.nii.gz"),
        (data > 50).astype(np.uint8),
        as_layer((data, kwargs, "image"))[1],
    )
    np.testing.assert_allclose(nib.load(out[0]).affine, affine)


def test_tiff_resolution_becomes_scale(tmp_path):
    import tifffile

    path = tmp_path / "cells.tif"
    tifffile.imwrite(
        path, np.zeros((20, 30), np.uint16), resolution=(2.0, 4.0), resolutionunit=3
    )  # pixels per cm -> 5 mm (x), 2.5 mm (y)
    ((data, kwargs, kind),) = _reader.read_layers(str(path))
    assert kind == "image" and data.shape == (20, 30)
    np.testing.assert_allclose(kwargs["scale"], (2.5, 5.0))
    assert kwargs["metadata"]["unit"] == "mm"


def test_labels_writer_restores_nifti_affine_and_header(tmp_path):
    import nibabel as nib

    src = nib.load(str(CT))
    image = _reader.read_layers(str(CT))[0]
    data, attrs = as_layer(image)
    labels = (data > 0).astype(np.uint8)

    (out,) = _writer.write_labels(str(tmp_path / "seg.nii.gz"), labels, attrs)

    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, src.affine)
    for key in ("pixdim", "qform_code", "sform_code", "xyzt_units", "srow_x"):
        np.testing.assert_array_equal(back.header[key], src.header[key])
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels.T)


def test_writer_adds_a_suffix_and_replaces_an_existing_file(tmp_path):
    import nibabel as nib

    data, attrs = as_layer(_reader.read_layers(str(CT))[0])
    labels = np.zeros(data.shape, np.uint8)
    (out,) = _writer.write_labels(str(tmp_path / "seg"), labels, attrs)
    assert out.endswith("seg.nii.gz")
    labels[0, 0, 0] = 3
    (out2,) = _writer.write_labels(out, labels, attrs)  # napari's dialog asked already
    assert out2 == out and np.asarray(nib.load(out).dataobj).max() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]  # no temporary left


def test_writer_falls_back_to_the_source_file(tmp_path):
    """Layers from the sample menu carry only the file's path; the header comes from it."""
    import nibabel as nib

    from napari_prosma._samples import spleen_ct

    _image, gt = spleen_ct()
    attrs = {
        "scale": gt[1]["scale"],
        "translate": gt[1]["translate"],
        "metadata": gt[1]["metadata"],
    }
    assert "prosma_io" not in attrs["metadata"]
    (out,) = _writer.write_labels(str(tmp_path / "gt.nii.gz"), gt[0], attrs)
    src = nib.load(str(CT))
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, src.affine)
    np.testing.assert_array_equal(back.header["pixdim"], src.header["pixdim"])


def test_writer_without_source_uses_scale_and_translate(tmp_path):
    import nibabel as nib

    attrs = {"scale": (2.0, 0.5, 0.25), "translate": (7.0, 8.0, 9.0), "metadata": {}}
    (out,) = _writer.write_labels(str(tmp_path / "x.nii"), np.ones((3, 4, 5), np.uint8), attrs)
    back = nib.load(out)
    assert back.shape == (5, 4, 3)
    np.testing.assert_allclose(np.diag(back.affine)[:3], (0.25, 0.5, 2.0))
    np.testing.assert_allclose(back.affine[:3, 3], (9.0, 8.0, 7.0))


def test_image_writer_tiff_keeps_resolution(tmp_path):
    import tifffile

    src = tmp_path / "in.tif"
    tifffile.imwrite(
        src,
        np.arange(600, dtype=np.uint16).reshape(20, 30),
        resolution=(2.0, 4.0),
        resolutionunit=3,
    )
    data, attrs = as_layer(_reader.read_layers(str(src))[0])
    prob = np.linspace(0, 1, data.size, dtype=np.float32).reshape(data.shape)

    (out,) = _writer.write_image(str(tmp_path / "prob.tif"), prob, attrs)

    ((back, kwargs, _),) = _reader.read_layers(out)
    np.testing.assert_allclose(back, prob)
    np.testing.assert_allclose(kwargs["scale"], (2.5, 5.0))


def test_rgb_image_to_nifti_is_refused_plainly(tmp_path):
    """napari drops a writer's ValueError ("not a valid writer"): the writer says why itself
    (issue 16: "say why when a format cannot hold the data") and writes nothing."""
    from napari.utils.notifications import notification_manager

    attrs = {"scale": (1, 1), "translate": (0, 0), "metadata": {}, "rgb": True, "name": "photo"}
    n = len(notification_manager.records)
    out = _writer.write_image(str(tmp_path / "c.nii.gz"), np.zeros((4, 5, 3), np.uint8), attrs)
    assert out == [] and not list(tmp_path.iterdir())
    (msg,) = [str(r.message) for r in notification_manager.records[n:]]
    assert msg == (
        "'photo' was not saved to c.nii.gz: colour images are saved as TIFF (.tif), not NIfTI"
    )
    labels = {"scale": (1, 1, 1), "translate": (0, 0, 0), "metadata": {}, "name": "seg"}
    vol = np.zeros((3, 4, 5), np.uint8)
    assert _writer.write_labels(str(tmp_path / "v.png"), vol, labels) == []
    assert "a PNG holds one 2D image" in str(notification_manager.records[-1].message)
    assert not list(tmp_path.iterdir())
