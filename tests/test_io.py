"""Reading and writing images with their geometry (napari_prosma.io)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from napari_prosma import io
from napari_prosma.io import read_image, write_image, write_labels
from napari_prosma.preprocess import InputError

# header fields a label file legitimately changes: its data type and intensity scaling
_DTYPE_FIELDS = {"datatype", "bitpix", "scl_slope", "scl_inter", "cal_min", "cal_max"}


def _same_header(a, b) -> list[str]:
    diffs = []
    for k in a:
        if k in _DTYPE_FIELDS:
            continue
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            diffs.append(k)
    return diffs


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.fixture
def spleen(shared_data) -> Path:
    return shared_data / "ct-samples" / "spleen_2_crop_ct.nii.gz"


@pytest.mark.data
def test_nifti_geometry_in_napari_order(spleen):
    img = read_image(spleen)
    assert img.kind == "volume" and img.format == "nifti"
    assert img.data.shape == (26, 166, 164)  # (k, j, i): slices first
    np.testing.assert_allclose(img.spacing, (5.0, 0.79492, 0.79492), atol=1e-4)
    np.testing.assert_allclose(img.origin, (0.0, -406.205, -406.205), atol=1e-3)
    np.testing.assert_allclose(np.diag(img.affine)[:3], img.spacing)
    assert img.warnings == []
    assert img.data.min() < -1000 + 10 and img.data.max() > 500  # Hounsfield units kept
    kw = img.layer_kwargs()
    assert kw["scale"] == img.spacing and kw["translate"] == img.origin


@pytest.mark.data
def test_nifti_label_round_trip_keeps_affine_and_header_exactly(spleen, tmp_path):
    import nibabel as nib

    img = read_image(spleen)
    labels = (img.data > 100).astype(np.uint8)
    out = write_labels(tmp_path / "labels.nii.gz", labels, img)
    src, got = nib.load(spleen), nib.load(out)
    np.testing.assert_array_equal(got.affine, src.affine)
    np.testing.assert_array_equal(got.get_sform(), src.get_sform())
    np.testing.assert_array_equal(got.get_qform(), src.get_qform())
    assert _same_header(src.header, got.header) == []
    assert got.get_data_dtype() == np.uint8
    assert got.header.get_slope_inter() in ((None, None), (1.0, 0.0))
    back = read_image(out)
    np.testing.assert_array_equal(back.data, labels)
    assert back.spacing == img.spacing and back.origin == img.origin
    assert _no_temp_files(tmp_path)


@pytest.mark.data
def test_hippocampus_round_trip_and_uint16_labels(shared_data, tmp_path):
    import nibabel as nib

    path = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    img = read_image(path)
    assert img.data.shape == (35, 51, 35) and img.spacing == (1.0, 1.0, 1.0)
    big = np.zeros(img.data.shape, np.int64)
    big[0, 0, 0] = 300
    out = write_labels(tmp_path / "big.nii", big, img)
    assert nib.load(out).get_data_dtype() == np.uint16
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(path).affine)


@pytest.mark.data
def test_probability_maps_written_as_4d_nifti(spleen, tmp_path):
    import nibabel as nib

    img = read_image(spleen)
    probs = np.random.default_rng(0).random((2, *img.data.shape), dtype=np.float32)
    out = write_image(tmp_path / "p.nii.gz", probs, img)
    vol = nib.load(out)
    assert vol.shape == (164, 166, 26, 2)
    np.testing.assert_array_equal(vol.affine, nib.load(spleen).affine)
    np.testing.assert_allclose(np.asarray(vol.dataobj)[..., 1].T, probs[1])


def test_rotated_affine_warns_and_is_restored(tmp_path):
    import nibabel as nib

    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.array([[c, -s, 0, 10], [s, c, 0, -5], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), aff), path)
    img = read_image(path)
    assert any("rotated" in w for w in img.warnings)
    np.testing.assert_allclose(img.spacing, (2.5, 1.0, 1.0))
    out = write_labels(tmp_path / "lab.nii.gz", np.ones(img.data.shape, np.uint8), img)
    np.testing.assert_allclose(nib.load(out).affine, aff)


def test_tiff_resolution_kept(tmp_path):
    import tifffile

    src = tmp_path / "slide.tif"
    tifffile.imwrite(
        src,
        np.arange(30 * 40, dtype=np.uint16).reshape(30, 40),
        resolution=(4.0, 2.0),
        resolutionunit="CENTIMETER",
    )
    img = read_image(src)
    assert img.kind == "grey" and img.unit == "mm"
    np.testing.assert_allclose(img.spacing, (5.0, 2.5))  # (y, x) in mm
    out = write_labels(tmp_path / "slide_labels.tif", np.ones((30, 40), np.uint8), img)
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(out) as b:
        for tag in ("XResolution", "YResolution", "ResolutionUnit"):
            assert a.pages[0].tags[tag].value == b.pages[0].tags[tag].value
    assert read_image(out).spacing == img.spacing


def test_tiff_volume_spacing_round_trip(tmp_path):
    import tifffile

    vol = io.from_array(np.zeros((4, 8, 9), np.float32), spacing=(3.0, 0.5, 0.25))
    vol.unit = "mm"
    out = write_labels(tmp_path / "vol.tif", np.ones((4, 8, 9), np.uint8), vol)
    back = read_image(out)
    assert back.kind == "volume" and back.data.shape == (4, 8, 9)
    np.testing.assert_allclose(back.spacing, (3.0, 0.5, 0.25), rtol=1e-5)
    probs = np.zeros((2, 4, 8, 9), np.float32)
    probs[1] = 1
    out = write_image(tmp_path / "p.tif", probs, vol)
    with tifffile.TiffFile(out) as tf:  # an ImageJ hyperstack: slices, then channels
        assert tf.series[0].axes == "ZCYX"
        np.testing.assert_array_equal(np.moveaxis(tf.series[0].asarray(), 1, 0), probs)
        assert tf.imagej_metadata["spacing"] == pytest.approx(3.0)


def test_png_and_jpeg(tmp_path):
    import imageio.v3 as iio

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    iio.imwrite(tmp_path / "a.png", rgb)
    img = read_image(tmp_path / "a.png")
    assert img.kind == "rgb" and img.spatial_shape == (20, 30) and img.spacing == (1.0, 1.0)
    iio.imwrite(tmp_path / "b.jpg", rgb)
    assert read_image(tmp_path / "b.jpg").format == "jpeg"
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], -1)
    iio.imwrite(tmp_path / "c.png", rgba)
    c = read_image(tmp_path / "c.png")
    assert c.data.shape == (20, 30, 3) and c.warnings
    out = write_labels(tmp_path / "a_labels.png", np.ones((20, 30), np.int32), img)
    lab = iio.imread(out)
    assert lab.dtype == np.uint8 and lab.shape == (20, 30)
    with pytest.raises(InputError, match="255"):
        write_labels(tmp_path / "x.png", np.full((20, 30), 300), img)


def test_never_overwrites_unless_asked_and_leaves_no_temp(tmp_path):
    target = tmp_path / "labels.png"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_labels(target, np.zeros((4, 4), np.uint8))
    assert target.read_bytes() == b"keep me"
    write_labels(target, np.zeros((4, 4), np.uint8), overwrite=True)
    assert target.read_bytes() != b"keep me"
    assert _no_temp_files(tmp_path)


def test_failed_write_leaves_nothing(tmp_path):
    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(tmp_path / "out.nii.gz", broken)
    assert list(tmp_path.iterdir()) == []


def test_wrong_shape_labels_refused(tmp_path):
    img = io.from_array(np.zeros((10, 12), np.uint8))
    with pytest.raises(InputError, match="do not fit"):
        write_labels(tmp_path / "l.png", np.zeros((10, 11), np.uint8), img)
    with pytest.raises(InputError, match="whole numbers"):
        write_labels(tmp_path / "l.png", np.full((10, 12), 0.5), img)


@pytest.mark.data
def test_corrupt_truncated_and_unsupported_files(spleen, tmp_path):
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(spleen.read_bytes()[:200_000])
    with pytest.raises(InputError, match=r"trunc\.nii\.gz.*corrupt or truncated"):
        read_image(trunc)
    notgz = tmp_path / "garbage.nii.gz"
    notgz.write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(InputError, match=r"garbage\.nii\.gz"):
        read_image(notgz)
    for name in ("bad.png", "bad.tif", "bad.jpg"):
        (tmp_path / name).write_bytes(os.urandom(300))
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)
    (tmp_path / "scan.bmp").write_bytes(b"BM")
    with pytest.raises(InputError, match="unsupported format"):
        read_image(tmp_path / "scan.bmp")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


def test_4d_nifti_refused_plainly(tmp_path):
    import nibabel as nib

    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 5), np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match="4D NIfTI"):
        read_image(path)
    path2 = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((7, 9, 1), np.float32), np.diag([0.5, 0.6, 3, 1])), path2)
    img = read_image(path2)
    assert img.kind == "grey" and img.data.shape == (9, 7)
    np.testing.assert_allclose(img.spacing, (0.6, 0.5))
    out = write_labels(tmp_path / "slice_lab.nii.gz", np.ones((9, 7), np.uint8), img)
    assert nib.load(out).shape == (7, 9, 1)
