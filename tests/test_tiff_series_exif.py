"""Issue 12 item 8: OME-TIFF physical sizes, multi-series TIFFs and JPEG EXIF orientation.

Before: an OME-TIFF's PhysicalSizeX/Y/Z were ignored ("slice spacing unknown, taken as 1"),
so a 3D model did not resample; a TIFF holding several series was segmented from series 0
without a word; a JPEG's EXIF orientation was ignored, so labels came out in the raw pixel
order while every photo viewer shows the photo turned.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from hardening_support import save_tiny, smooth_image
from napari_prosma import _reader
from napari_prosma.cli import main
from napari_prosma.io import read_image, read_series, write_labels
from napari_prosma.preprocess import InputError


def _ome(path, a, **sizes):
    meta = {"axes": "ZYX" if a.ndim == 3 else "YX"}
    for ax, (v, unit) in sizes.items():
        meta[f"PhysicalSize{ax}"], meta[f"PhysicalSize{ax}Unit"] = v, unit
    tifffile.imwrite(path, a, metadata=meta)
    return path


def _volume(shape=(6, 20, 24)) -> np.ndarray:
    return (smooth_image(shape) * 40 + 100).astype(np.uint16)


def test_ome_physical_sizes_become_the_spacing_in_mm(tmp_path):
    p = _ome(tmp_path / "scan.ome.tif", _volume(), X=(500, "µm"), Y=(0.6, "mm"), Z=(2, "mm"))
    img = read_image(p)
    assert img.kind == "volume" and img.unit == "mm"
    np.testing.assert_allclose(img.spacing, (2.0, 0.6, 0.5))
    assert not any("spacing is unknown" in w for w in img.warnings)
    default_unit = read_image(_ome(tmp_path / "um.ome.tif", _volume(), X=(5, "µm"), Y=(5, "µm")))
    np.testing.assert_allclose(default_unit.spacing[1:], (0.005, 0.005))


@pytest.mark.parametrize("dims", [2, 3])
def test_labels_of_an_ome_tiff_keep_its_spacing(tmp_path, dims):
    a = _volume() if dims == 3 else _volume()[0]
    p = _ome(tmp_path / "scan.ome.tif", a, X=(0.5, "mm"), Y=(0.25, "mm"), Z=(3, "mm"))
    img = read_image(p)
    assert img.spacing == ((3.0,) if dims == 3 else ()) + (0.25, 0.5)
    out = write_labels(tmp_path / "labels.tif", np.zeros(img.spatial_shape, np.uint8), img)
    np.testing.assert_allclose(read_image(out).spacing, img.spacing)


def test_bad_ome_sizes_are_ignored_with_a_warning(tmp_path):
    p = _ome(tmp_path / "bad.ome.tif", _volume(), X=(0, "mm"), Y=(1, "parsec"), Z=(2, "mm"))
    img = read_image(p)
    assert img.spacing == (1.0, 1.0, 1.0)
    text = " ".join(img.warnings)
    assert "PhysicalSizeX" in text and "PhysicalSizeY" in text and "PhysicalSizeZ" in text


def test_a_3d_model_resamples_an_ome_tiff(tmp_path, capsys):
    """End to end: ``prosma predict`` resamples the 2 mm slices to the model's 1 mm."""
    weights = save_tiny(tmp_path / "models", "tiny3d", spatial_dims=3, spacing=[1.0, 1.0, 1.0])
    (tmp_path / "in").mkdir()
    p = _ome(tmp_path / "in" / "scan.ome.tif", _volume(), X=(1, "mm"), Y=(1, "mm"), Z=(2, "mm"))
    rc = main(
        ["predict", str(p), "-o", str(tmp_path / "out"), "--model", str(weights), "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "resampled from 2×1×1 mm" in out and "spacing is unknown" not in out
    assert read_image(tmp_path / "out" / "scan.ome_labels.tif").spatial_shape == (6, 20, 24)


def _two_series(path):
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.full((10, 12), 7, np.uint8))
        tw.write(np.full((3, 8, 9), 9, np.uint16))
    return path


def test_a_multi_series_tiff_is_refused_with_its_series_listed(tmp_path):
    p = _two_series(tmp_path / "two.tif")
    with pytest.raises(InputError) as info:
        read_image(p)
    msg = str(info.value)
    assert "2 image series" in msg and "10×12 uint8" in msg and "3×8×9 uint16" in msg
    assert read_image(p, series=1).data.shape == (3, 8, 9)


def test_predict_refuses_a_multi_series_tiff_and_writes_nothing(tmp_path, capsys):
    weights = save_tiny(tmp_path / "models", "tiny")
    p = _two_series(tmp_path / "two.tif")
    out = tmp_path / "out"
    rc = main(["predict", str(p), "-o", str(out), "--model", str(weights), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "2 image series" in err[0]
    assert not out.exists() or not any(out.rglob("*"))


def test_napari_reader_opens_one_layer_per_series(tmp_path, monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(_reader, "_warn", seen.append)
    p = _two_series(tmp_path / "two.tif")
    layers = _reader.napari_get_reader(str(p))(str(p))
    assert [d.shape for d, _, _ in layers] == [(10, 12), (3, 8, 9)]
    assert [kw["name"] for _, kw, _ in layers] == ["two [series 0]", "two [series 1]"]
    assert any("2 image series" in w for w in seen)
    # each layer keeps its own series' geometry for the writer
    assert layers[1][1]["metadata"][_reader.IO_KEY]["spatial_shape"] == (3, 8, 9)


def _exif_jpeg(path, a: np.ndarray, orientation: int):
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_is_applied_as_pil_does(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    p = _exif_jpeg(tmp_path / "photo.jpg", rng.integers(0, 255, (30, 40, 3), np.uint8), orientation)
    img = read_image(p)
    with Image.open(p) as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(img.data, expected)
    assert any("EXIF orientation" in w for w in img.warnings) == (orientation != 1)


def test_predict_writes_labels_in_the_orientation_viewers_show(tmp_path, capsys):
    """A photo stored 40 wide × 30 high with orientation 6 (turn 90° clockwise) is shown
    30 wide × 40 high: its labels have that shape, and the CLI says what it did."""
    weights = save_tiny(tmp_path / "models", "rgb", in_channels=3)
    (tmp_path / "in").mkdir()
    a = np.zeros((30, 40, 3), np.uint8)
    a[:, :20] = 255  # left half bright: after the turn, the top half
    p = _exif_jpeg(tmp_path / "in" / "photo.jpg", a, 6)
    rc = main(
        ["predict", str(p), "-o", str(tmp_path / "out"), "--model", str(weights), "--device", "cpu"]
    )
    assert rc == 0 and "EXIF orientation" in capsys.readouterr().out
    labels = read_image(tmp_path / "out" / "photo_labels.png").data
    assert labels.shape == (40, 30)


def test_napari_reader_claims_jpeg_and_shows_it_turned(tmp_path, monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(_reader, "_warn", seen.append)
    p = _exif_jpeg(tmp_path / "photo.jpeg", np.zeros((30, 40, 3), np.uint8), 8)
    reader = _reader.napari_get_reader(str(p))
    assert reader is _reader.read_layers
    ((data, kw, kind),) = reader(str(p))
    assert kind == "image" and kw["rgb"] and data.shape == (40, 30, 3)
    assert any("EXIF orientation" in w for w in seen)
    assert read_series(p)[0].meta["exif_orientation"] == 8


def test_a_truncated_imagej_stack_is_refused_not_read_as_one_slice(tmp_path):
    """Found by the fuzz test: with the page list cut off, tifffile falls back to the pages
    it finds and a 6-slice stack came back as a single 2D image, segmented as such."""
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, _volume(), imagej=True, metadata={"spacing": 2.0, "axes": "ZYX"})
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"corrupt or truncated.*imagej metadata"):
        read_image(p)


def test_a_series_is_only_chosen_in_a_tiff(tmp_path):
    p = _exif_jpeg(tmp_path / "photo.jpg", np.zeros((8, 8, 3), np.uint8), 1)
    assert read_image(p, series=0).data.shape == (8, 8, 3)
    with pytest.raises(InputError, match="only a TIFF"):
        read_image(p, series=1)
