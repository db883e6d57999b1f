"""Bad inputs (issue #7): empty, tiny, non-finite, unusual dtypes, too many dimensions,
RGBA, channel mismatches, NIfTI with odd geometry, corrupt files, and labels of another
shape. Each either works (same result as the plain equivalent, on the input's grid) or is
refused with one plain sentence, in the engine and in the CLI."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from hardening_support import save_tiny, smooth_image, tiny_model
from napari_prosma.cli import main
from napari_prosma.errors import user_message
from napari_prosma.inference import predict
from napari_prosma.io import read_image, write_labels
from napari_prosma.preprocess import InputError


def _refused(img, model, card, *words: str, **kw) -> str:
    with pytest.raises(InputError) as info:
        predict(img, model, card, device="cpu", **kw)
    msg = user_message(info.value)
    assert "\n" not in msg and "Error" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def m2():
    return tiny_model(2)


@pytest.fixture(scope="module")
def m3():
    return tiny_model(3)


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0), (0, 4, 4)])
def test_empty_arrays_are_refused(m2, m3, shape):
    model, card = m2 if len(shape) == 2 else m3
    _refused(np.zeros(shape, np.float32), model, card, "empty")


@pytest.mark.parametrize(
    ("shape", "dims"),
    [((1, 1), 2), ((1, 9), 2), ((9, 1), 2), ((1, 1, 1), 3), ((1, 20, 20), 3), ((20, 1, 20), 3)],
)
def test_one_pixel_and_one_slice_images_segment(m2, m3, shape, dims):
    model, card = m2 if dims == 2 else m3
    pred = predict(
        smooth_image(shape), model, card, device="cpu", return_probabilities=True, return_gates=True
    )
    assert pred.labels.shape == shape
    assert np.isfinite(pred.probabilities).all()
    assert pred.probabilities.shape == (2, *shape)
    assert all(g.psi is None or g.psi.shape == shape for g in pred.gates)


# ---------------------------------------------------------------------------- values, dtypes


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(np.nan, np.float32), (np.inf, np.float32), (-np.inf, np.float64), (np.inf, np.float16)],
)
def test_nan_and_inf_are_refused(m2, value, dtype):
    img = smooth_image((16, 16)).astype(dtype)
    img[3, 4] = value
    _refused(img, *m2, "NaN or infinite", "1 ")


def test_values_beyond_float32_are_refused_not_turned_into_nan(m2):
    """float64 data of 1e300 overflow the float32 the network uses: refused in words
    (before the fix they became inf/NaN and gave an arbitrary segmentation)."""
    _refused(np.full((16, 16), 1e300), *m2, "too large")
    _refused(np.array([[-1e308, 1e308], [0.0, 1.0]]), *m2, "too large")


@pytest.mark.parametrize("norm", ["zscore", "percentile"])
def test_huge_but_finite_values_are_normalised_first(norm):
    model, card = tiny_model(2, normalization={"mode": norm})
    img = smooth_image((16, 16))
    ref = predict(img, model, card, device="cpu", return_probabilities=True)
    big = predict(
        img.astype(np.float64) * 1e30, model, card, device="cpu", return_probabilities=True
    )
    np.testing.assert_allclose(big.probabilities, ref.probabilities, atol=1e-4)


def test_network_output_nan_is_refused_not_labelled_background():
    """Values the network cannot digest (raw 1e38 with no normalisation) made its output
    NaN, which the argmax silently turned into 'all background'; now it is refused."""
    model, card = tiny_model(2, normalization={"mode": "none"})
    _refused(smooth_image((16, 16)) * 1e38, model, card, "invalid numbers (NaN)")


@pytest.mark.parametrize(
    "dtype", [np.int64, np.uint64, np.int8, np.uint16, np.int16, np.float16, np.float64]
)
def test_integer_and_float_dtypes_give_the_float32_result(m2, dtype):
    """Any numeric dtype segments exactly like the same values as float32."""
    model, card = m2
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    lo = max(int(info.min), -1000) if info else -1.0
    hi = min(int(info.max), 3000) if info else 1.0
    vals = rng.uniform(lo, hi, (24, 24)).astype(dtype)
    ref = predict(vals.astype(np.float32), model, card, device="cpu", return_probabilities=True)
    got = predict(vals, model, card, device="cpu", return_probabilities=True)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=1e-5)


def test_bool_image_is_segmented_as_0_and_1(m2):
    mask = np.zeros((24, 24), bool)
    mask[5:15, 5:15] = True
    ref = predict(mask.astype(np.uint8), *m2, device="cpu")
    np.testing.assert_array_equal(predict(mask, *m2, device="cpu").labels, ref.labels)


def test_uint16_ct_and_signed_hounsfield_units(tmp_path):
    """A CT model (window -160..240 HU): signed int16 HU and uint16 stored with an offset
    both run; HU below and above the window saturate instead of overflowing."""
    model, card = tiny_model(3, normalization={"mode": "ct_window", "window": [-160, 240]})
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3071, (8, 24, 24)).astype(np.int16)
    pred = predict(hu, model, card, device="cpu", return_probabilities=True)
    assert pred.labels.shape == hu.shape and np.isfinite(pred.probabilities).all()
    clipped = predict(np.clip(hu, -160, 240), model, card, device="cpu", return_probabilities=True)
    np.testing.assert_allclose(pred.probabilities, clipped.probabilities, atol=1e-5)
    # the same scan as uint16 (HU + 1024), written and read back as NIfTI
    path = tmp_path / "ct_uint16.nii.gz"
    nib.save(nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.uint16).T, np.eye(4)), path)
    img = read_image(path)
    assert img.data.dtype == np.uint16 and img.data.shape == hu.shape
    assert predict(img.data, model, card, device="cpu").labels.shape == hu.shape


@pytest.mark.parametrize("dtype", [np.complex64, object, "U1"])
def test_non_numbers_are_refused(m2, dtype):
    _refused(np.zeros((8, 8), dtype=dtype), *m2, "not numbers")


# ---------------------------------------------------------------------------- dims, channels


@pytest.mark.parametrize("t", [2, 3, 4, 5])
def test_time_series_for_a_3d_model_is_refused_never_averaged(m3, t):
    """(T, D, H, W): before the fix T = 3 or 4 time points were taken as RGB(A) channels,
    the 4th dropped as 'alpha' and the rest averaged to grey."""
    _refused(np.zeros((t, 6, 16, 16), np.float32), *m3, "one volume at a time", f"{t} volumes")


def test_4d_and_5d_for_a_2d_model_and_5d_for_a_3d_model(m2, m3):
    _refused(np.zeros((2, 6, 16, 16), np.float32), *m2, "one slice at a time")
    _refused(np.zeros((1, 2, 6, 16, 16), np.float32), *m3, "3D volume")


def test_multichannel_volume_that_fits_the_model_runs():
    model, card = tiny_model(3, in_channels=2)
    vol = np.stack([smooth_image((6, 16, 16)), smooth_image((6, 16, 16), seed=1)])
    assert predict(vol, model, card, device="cpu").labels.shape == (6, 16, 16)


def test_rgba_drops_alpha_and_says_so():
    rgb_model, rgb_card = tiny_model(2, in_channels=3, normalization={"mode": "fixed"})
    rgba = np.random.default_rng(0).integers(0, 255, (20, 20, 4)).astype(np.uint8)
    pred = predict(rgba, rgb_model, rgb_card, device="cpu", return_probabilities=True)
    ref = predict(rgba[..., :3], rgb_model, rgb_card, device="cpu", return_probabilities=True)
    assert "the alpha channel was ignored" in pred.notes
    np.testing.assert_array_equal(pred.probabilities, ref.probabilities)
    grey_model, grey_card = tiny_model(2)
    notes = predict(rgba, grey_model, grey_card, device="cpu").notes
    assert any("greyscale" in n for n in notes) and any("alpha" in n for n in notes)


def test_channel_count_that_does_not_match_the_model(m2):
    _refused(
        np.zeros((16, 16, 2), np.float32),
        *m2,
        "greyscale (1 channel)",
        "2 channel(s)",
        channel_axis=-1,
    )
    rgb_model, rgb_card = tiny_model(2, in_channels=3, normalization={"mode": "fixed"})
    _refused(
        np.zeros((16, 16), np.float32), rgb_model, rgb_card, "expects colour", "choose a model"
    )
    model5, card5 = tiny_model(2, in_channels=5)
    _refused(np.zeros((16, 16, 3), np.uint8), model5, card5, "5 channels")


# ---------------------------------------------------------------------------- NIfTI geometry


def _affine(kind: str) -> np.ndarray:
    a = np.eye(4)
    if kind == "flipped":
        a[:3, :3] = np.diag([-0.75, 0.75, -2.5])
    elif kind == "oblique":
        t = 0.4
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
        a[:3, :3] = rot @ np.diag([0.75, 0.75, 2.5])
    a[:3, 3] = [-90.5, 12.25, 40.0]
    return a


@pytest.mark.parametrize("kind", ["flipped", "oblique"])
def test_cli_keeps_a_flipped_or_oblique_affine_exactly(tmp_path, kind, capsys):
    model = save_tiny(tmp_path / "models", "vol", spatial_dims=3)
    src = tmp_path / f"{kind}.nii.gz"
    vox = smooth_image((20, 18, 6))
    nib.save(nib.Nifti1Image(vox, _affine(kind)), src)
    rc = main(
        ["predict", str(src), "-o", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert ("rotated or sheared" in out) == (kind == "oblique")  # said, not hidden
    lab = nib.load(tmp_path / "out" / f"{kind}_labels.nii.gz")
    ref = nib.load(src)
    np.testing.assert_array_equal(lab.affine, ref.affine)
    assert lab.shape == ref.shape
    assert int(lab.header["sform_code"]) == int(ref.header["sform_code"])


def test_2d_nifti_round_trips_through_the_cli(tmp_path):
    model = save_tiny(tmp_path / "models", "flat")
    for name, arr, aff in (
        ("plain2d", smooth_image((30, 20)), np.diag([0.5, 0.7, 1.0, 1.0])),
        ("slice3d", smooth_image((30, 20, 1)), np.diag([0.5, 0.7, 3.0, 1.0])),
    ):
        nib.save(nib.Nifti1Image(arr, aff), tmp_path / f"{name}.nii.gz")
        assert (
            main(
                [
                    "predict",
                    str(tmp_path / f"{name}.nii.gz"),
                    "-o",
                    str(tmp_path / "o"),
                    "--model",
                    str(model),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        lab = nib.load(tmp_path / "o" / f"{name}_labels.nii.gz")
        assert lab.shape == arr.shape
        np.testing.assert_array_equal(lab.affine, nib.load(tmp_path / f"{name}.nii.gz").affine)


def test_4d_nifti_is_refused_in_one_line(tmp_path, capsys):
    model = save_tiny(tmp_path / "models", "vol", spatial_dims=3)
    nib.save(
        nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), tmp_path / "fmri.nii.gz"
    )
    rc = main(
        [
            "predict",
            str(tmp_path / "fmri.nii.gz"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(model),
            "--device",
            "cpu",
        ]
    )
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "4D NIfTI" in line and "split the time points" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------- corrupt files


def _corrupt_files(folder: Path) -> dict[str, bytes]:
    """name -> bytes of broken files of every supported format."""
    import io

    vol = np.random.default_rng(0).random((24, 20, 6)).astype(np.float32)
    nii = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    buf = io.BytesIO()
    tifffile.imwrite(buf, (vol.T * 1000).astype(np.uint16))
    tif = buf.getvalue()
    import imageio.v3 as iio

    png = iio.imwrite("<bytes>", (vol[..., 0] * 255).astype(np.uint8), extension=".png")
    return {
        "trunc.nii": nii[: len(nii) // 2],
        "header_only.nii": nii[:200],
        "trunc.nii.gz": gzip.compress(nii)[:3000],
        "not_gzip.nii.gz": b"\x1f\x8b" + os.urandom(200),
        "empty.nii.gz": b"",
        "trunc.tif": tif[: len(tif) // 2],
        "garbage.tiff": b"II*\x00" + os.urandom(100),
        "trunc.png": png[: len(png) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + os.urandom(100),
        "empty.png": b"",
        "jpeg_body.jpg": os.urandom(300),
    }


def test_corrupt_files_are_refused_by_name(tmp_path):
    for name, data in _corrupt_files(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError) as info:
            read_image(tmp_path / name)
        msg = user_message(info.value)
        assert msg.startswith(name) and "corrupt or truncated" in msg, msg


def test_cli_reports_each_corrupt_file_in_one_line_and_writes_nothing(tmp_path, capsys):
    model = save_tiny(tmp_path / "models", "grey")
    src = tmp_path / "in"
    src.mkdir()
    files = _corrupt_files(tmp_path)
    for name, data in files.items():
        (src / name).write_bytes(data)
    rc = main(
        ["predict", str(src), "-o", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]
    )
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err
    assert len(lines) == len(files) + 1  # one per file, then the count
    assert all("corrupt or truncated" in line for line in lines[:-1]), err
    assert f"{len(files)} of {len(files)} file(s) failed" in lines[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


# ---------------------------------------------------------------------------- labels shape


def test_labels_of_another_shape_are_refused_everywhere(tmp_path, capsys):
    """Writing labels on another grid, and fine-tuning on labels of another shape (CLI):
    refused in words; nothing written, no version, the parent stays active."""
    from napari_prosma.io import from_array
    from napari_prosma.versions import ModelStore

    like = from_array(np.zeros((20, 30), np.uint8))
    with pytest.raises(InputError, match="do not fit the image grid"):
        write_labels(tmp_path / "x.png", np.zeros((20, 31), np.uint8), like)
    assert not (tmp_path / "x.png").exists()

    parent = save_tiny(tmp_path / "models", "parent", normalization={"mode": "fixed"})
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    imgs.mkdir()
    labs.mkdir()
    import imageio.v3 as iio

    iio.imwrite(imgs / "a.png", np.zeros((32, 32), np.uint8))
    iio.imwrite(labs / "a.png", np.ones((32, 30), np.uint8))
    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    rc = main(
        [
            "finetune",
            str(imgs),
            str(labs),
            "--model",
            str(parent),
            "-o",
            str(store.root),
            "--device",
            "cpu",
            "--max-steps",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "do not match the image" in err
    assert store.versions() == [] and store.active() == "parent-name"


@pytest.mark.filterwarnings("ignore:.*zero-size array:UserWarning")
def test_cli_refuses_bad_content_one_line_per_file(tmp_path, capsys):
    """Readable files whose content cannot be segmented: NaN, values beyond float32,
    complex numbers, a 4D TIFF, an empty TIFF. One line each, exit code 1, no output."""
    model = save_tiny(tmp_path / "models", "grey")
    src = tmp_path / "in"
    src.mkdir()
    nan = smooth_image((16, 16))
    nan[2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan[..., None], np.eye(4)), src / "nan.nii.gz")
    tifffile.imwrite(src / "huge.tif", np.full((16, 16), 1e300))
    tifffile.imwrite(src / "complex.tif", np.zeros((16, 16), np.complex64))
    tifffile.imwrite(src / "series.tif", np.zeros((2, 3, 16, 16), np.uint8))
    tifffile.imwrite(src / "empty.tif", np.zeros((0, 16), np.uint8))
    expect = {
        "nan.nii.gz": "NaN",
        "huge.tif": "too large",
        "complex.tif": "not numbers",
        "series.tif": "4 dimensions",
        "empty.tif": "empty",
    }
    rc = main(
        ["predict", str(src), "-o", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]
    )
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err and len(lines) == len(expect) + 1, err
    for name, words in expect.items():
        (line,) = [line for line in lines if f"/{name}:" in line]
        assert words in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


@pytest.mark.parametrize(
    ("kind", "dims", "words"),
    [("rgb", 3, "is a 2D colour image but the model segments 3D volumes")],
)  # a 3- or 4-slice volume for a 2D model is now segmented slice by slice:
#    test_cli_trust.py::test_a_volume_with_a_2d_model_is_segmented_slice_by_slice
def test_cli_refuses_an_image_the_model_cannot_take(tmp_path, capsys, kind, dims, words):
    """Before the fix a colour photo given to a 3D model was segmented as an (H, W, 3)
    volume and written as a 3-channel PNG (and a 3- or 4-slice volume given to a 2D model
    was taken for RGB(A))."""
    import imageio.v3 as iio

    model = save_tiny(tmp_path / "models", "m", spatial_dims=dims)
    if kind == "rgb":
        src = tmp_path / "photo.png"
        iio.imwrite(src, np.random.default_rng(0).integers(0, 255, (24, 24, 3), np.uint8))
    else:
        src = tmp_path / "vol.nii.gz"
        nib.save(nib.Nifti1Image(smooth_image((24, 24, int(kind[-1]))), np.eye(4)), src)
    rc = main(
        ["predict", str(src), "-o", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]
    )
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and words in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
