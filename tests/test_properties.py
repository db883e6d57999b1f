"""Property-based tests (issue #7, hypothesis): the soft-threshold maths of the ProSMA gate
and the image reader/writer round trip (data and affine exact).

Example counts are modest (CI runs on 2 cores); hypothesis keeps its database in
``.hypothesis/`` (git-ignored) so a failure found once is replayed first next time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_prosma.io import (
    ImageData,
    from_array,
    label_dtype,
    read_image,
    write_image,
    write_labels,
)
from napari_prosma.nets import soft_threshold, theta_for_lambda
from napari_prosma.preprocess import InputError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------- soft threshold

_f64 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=True)
_lam = st.floats(0, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def fields(draw, dtype=np.float64):
    """``(u, lam)``: a field ``(N, C, *S)`` (2D or 3D) and one threshold per channel."""
    sd = draw(st.sampled_from([2, 3]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 4), min_size=sd, max_size=sd))
    u = draw(hnp.arrays(dtype, (n, c, *spatial), elements=_f64))
    lam = draw(hnp.arrays(dtype, (c,), elements=_lam))
    return torch.from_numpy(u), torch.from_numpy(lam)


def _b(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return lam.view(1, -1, *([1] * (u.ndim - 2)))


@SETTINGS
@given(fields(np.float32))
def test_soft_threshold_is_eq4_exactly(ul):
    """z* = sign(u) max(|u| - lambda, 0), bit for bit, with exact zeros where |u| <= lambda."""
    u, lam = ul
    z = soft_threshold(u, lam)
    lb = _b(lam, u)
    expected = torch.sign(u) * torch.clamp(u.abs() - lb, min=0)
    assert torch.equal(z, expected)
    assert torch.all(z[u.abs() <= lb] == 0)
    assert torch.all((z == 0) | (torch.sign(z) == torch.sign(u)))
    assert torch.all(z.abs() <= u.abs())


@SETTINGS
@given(fields())
def test_soft_threshold_is_the_l1_proximal_operator(ul):
    """Optimality of argmin_z 1/2 (z - u)^2 + lambda |z|: where z != 0, u - z = lambda
    sign(z); where z == 0, |u| <= lambda (the subgradient condition)."""
    u, lam = ul
    z = soft_threshold(u, lam)
    lb = _b(lam, u).expand_as(u)
    nz = z != 0
    tol = 1e-9 * (1 + u.abs())
    assert torch.all(((u - z) - lb * torch.sign(z))[nz].abs() <= tol[nz])
    assert torch.all(u.abs()[~nz] <= lb[~nz])


@SETTINGS
@given(fields(), st.data())
def test_soft_threshold_is_nonexpansive_and_monotone(ul, data):
    u, lam = ul
    v = u + torch.from_numpy(data.draw(hnp.arrays(np.float64, tuple(u.shape), elements=_f64)))
    zu, zv = soft_threshold(u, lam), soft_threshold(v, lam)
    assert torch.all((zu - zv).abs() <= (u - v).abs() * (1 + 1e-12) + 1e-9)  # 1-Lipschitz
    # order preserving: u <= v elementwise implies z(u) <= z(v)
    lo, hi = torch.minimum(u, v), torch.maximum(u, v)
    assert torch.all(soft_threshold(lo, lam) <= soft_threshold(hi, lam))
    # a larger threshold never adds a non-zero
    more = lam + torch.from_numpy(
        data.draw(hnp.arrays(np.float64, tuple(lam.shape), elements=_lam))
    )
    assert torch.all((soft_threshold(u, more) != 0) <= (zu != 0))


@SETTINGS
@given(fields())
def test_soft_threshold_with_zero_lambda_is_the_identity(ul):
    u, lam = ul
    assert torch.equal(soft_threshold(u, torch.zeros_like(lam)), u)


@SETTINGS
@given(st.floats(1e-4, 30.0))
def test_theta_for_lambda_inverts_softplus(lam):
    theta = theta_for_lambda(lam)
    back = F.softplus(torch.tensor(theta, dtype=torch.float64)).item()
    assert abs(back - lam) <= 1e-9 * max(lam, 1.0)


# ---------------------------------------------------------------------------- reader / writer

# float32-exact numbers: NIfTI stores its sform affine as float32
_f32 = st.floats(-500, 500, width=32, allow_nan=False, allow_infinity=False)
_spacing = st.floats(0.0625, 10, width=32)


@st.composite
def nifti_affines(draw, n: int = 3) -> np.ndarray:
    """Axis-aligned, flipped, permuted or oblique (sheared) affines with float32 entries."""
    kind = draw(st.sampled_from(["diagonal", "flipped", "permuted", "oblique"]))
    a = np.eye(4)
    spacing = np.array(draw(st.lists(_spacing, min_size=3, max_size=3)))
    if kind == "oblique":
        m = np.array(draw(st.lists(_f32, min_size=9, max_size=9))).reshape(3, 3) / 100
        m += np.diag(spacing)
        assume(abs(np.linalg.det(m)) > 1e-3)
    else:
        m = np.diag(spacing)
        if kind in ("flipped", "permuted"):
            m = m @ np.diag(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3)))
        if kind == "permuted":
            m = m[draw(st.permutations([0, 1, 2]))]
    a[:3, :3] = m.astype(np.float32)
    a[:3, 3] = draw(st.lists(_f32, min_size=3, max_size=3))
    return a.astype(np.float32).astype(np.float64)


_dtypes = st.sampled_from([np.uint8, np.int16, np.uint16, np.float32])


@st.composite
def volumes(draw) -> np.ndarray:
    """NIfTI voxel arrays ``(i, j[, k])`` of an integer or float dtype."""
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(2, 7), min_size=ndim, max_size=ndim)))
    dtype = draw(_dtypes)
    elems = (
        st.floats(-1e4, 1e4, width=32)
        if dtype == np.float32
        else st.integers(int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    )
    return draw(hnp.arrays(dtype, shape, elements=elems))


@SETTINGS
@given(volumes(), nifti_affines(), st.sampled_from([".nii", ".nii.gz"]), st.data())
def test_nifti_labels_and_images_round_trip_exactly(vox, affine, suffix, data):
    """Read a NIfTI, write labels and an image map with its geometry, read them back:
    the data and the file's affine and its codes come back bit for bit, and the napari-
    order geometry is the same."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / f"scan{suffix}"
        img0 = nib.Nifti1Image(vox, affine)
        img0.set_data_dtype(vox.dtype)
        nib.save(img0, src)
        img = read_image(src)
        n_labels = data.draw(st.integers(1, 300))
        labels = data.draw(
            hnp.arrays(
                np.uint16 if n_labels > 255 else np.uint8,
                img.spatial_shape,
                elements=st.integers(0, n_labels),
            )
        )
        out = write_labels(Path(d) / f"labels{suffix}", labels, img)
        back = read_image(out)
        np.testing.assert_array_equal(back.data, labels)
        assert back.data.dtype == label_dtype(labels)  # the smallest that holds them
        raw = nib.load(out)
        np.testing.assert_array_equal(raw.affine, nib.load(src).affine)
        assert raw.shape == vox.shape
        for code in ("sform_code", "qform_code"):
            assert int(raw.header[code]) == int(nib.load(src).header[code])
        np.testing.assert_array_equal(back.affine, img.affine)
        assert back.spacing == img.spacing and back.origin == img.origin
        # an image (float map) with the same geometry: data exact too
        again = read_image(write_image(Path(d) / f"copy{suffix}", img.data, img))
        np.testing.assert_array_equal(again.data, img.data)
        np.testing.assert_array_equal(nib.load(again.path).affine, nib.load(src).affine)


@SETTINGS
@given(
    st.lists(st.integers(2, 7), min_size=2, max_size=3),
    st.lists(_spacing, min_size=3, max_size=3),
    st.lists(_f32, min_size=3, max_size=3),
    st.data(),
)
def test_geometry_without_a_source_file_round_trips(shape, spacing, origin, data):
    """Labels drawn on a layer that only has napari scale/translate (no NIfTI header) are
    written with that geometry, and reading them gives it back exactly."""
    n = len(shape)
    sp = tuple(float(s) for s in spacing[:n])
    org = tuple(float(o) for o in origin[:n])
    aff = np.eye(n + 1)
    aff[:n, :n] = np.diag(sp)
    aff[:n, n] = org
    like = ImageData(
        np.zeros(shape, np.uint8), "volume" if n == 3 else "grey", sp, org, aff, unit="mm"
    )
    labels = data.draw(hnp.arrays(np.uint8, tuple(shape), elements=st.integers(0, 5)))
    with tempfile.TemporaryDirectory() as d:
        back = read_image(write_labels(Path(d) / "l.nii.gz", labels, like))
    np.testing.assert_array_equal(back.data, labels)
    np.testing.assert_allclose(back.affine, aff, rtol=0, atol=0)
    assert back.spacing == pytest_approx(sp) and back.origin == org


def pytest_approx(values):
    return pytest.approx(values, rel=1e-6)


@SETTINGS
@given(
    st.sampled_from(["grey", "rgb", "volume"]),
    st.sampled_from([np.uint8, np.uint16, np.int16, np.float32]),
    st.lists(st.integers(1, 9), min_size=3, max_size=3),
    st.data(),
)
def test_tiff_and_png_round_trip_data_exactly(kind, dtype, dims, data):
    """TIFF keeps every dtype, shape and spacing (a one-slice stack is read as a 2D image; a
    volume of 1-pixel-wide slices is refused, tifffile would mix its axes up); PNG keeps
    8-bit colour and 8/16-bit grey, and refuses the rest in words."""
    shape = {"grey": dims[:2], "rgb": [*dims[:2], 3], "volume": dims}[kind]
    if dtype == np.float32:
        elems = st.floats(-1e4, 1e4, width=32)
    else:
        elems = st.integers(int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    arr = data.draw(hnp.arrays(dtype, tuple(shape), elements=elems))
    like = from_array(arr) if kind != "volume" else from_array(arr, spacing=(2.0, 0.5, 0.5))
    with tempfile.TemporaryDirectory() as d:
        if kind == "volume" and min(shape[1:]) == 1:  # tifffile would squeeze the plane
            with pytest.raises(InputError, match="use NIfTI"):
                write_image(Path(d) / "x.tif", arr, like)
            assert list(Path(d).iterdir()) == []
            return
        back = read_image(write_image(Path(d) / "x.tif", arr, like))
        expected = arr[0] if kind == "volume" and arr.shape[0] == 1 else arr
        np.testing.assert_array_equal(back.data, expected)
        assert back.data.dtype == arr.dtype
        if kind == "volume":  # the spacing too, in-plane and between slices
            spacing = (2.0, 0.5, 0.5) if arr.shape[0] > 1 else (0.5, 0.5)
            assert back.spacing == pytest_approx(spacing)
        png_ok = dtype == np.uint8 or (dtype == np.uint16 and kind == "grey")
        if kind == "volume":
            return
        if png_ok:
            png = read_image(write_image(Path(d) / "x.png", arr, like))
            np.testing.assert_array_equal(png.data, arr)
        elif dtype != np.float32:
            with pytest.raises(InputError, match="a PNG holds"):
                write_image(Path(d) / "x.png", arr, like)
            assert not list(Path(d).glob("*.png")) and not list(Path(d).glob(".*"))


@SETTINGS
@given(volumes(), nifti_affines(), st.data())
def test_napari_reader_and_writer_round_trip_exactly(vox, affine, data):
    """The plugin's npe2 reader and writer (layer data + metadata in between): labels
    painted on a NIfTI layer are saved with the source's affine and header exactly."""
    import warnings

    from napari_prosma import _reader, _writer

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an oblique scan's notice, shown to the user
        src = Path(d) / "scan.nii.gz"
        nib.save(nib.Nifti1Image(vox, affine), src)
        [(layer, kwargs, kind)] = _reader.read_layers(str(src))
        assert kind == "image" and layer.shape == vox.T.shape
        painted = data.draw(hnp.arrays(np.uint8, layer.shape, elements=st.integers(0, 3)))
        [out] = _writer.write_labels(str(Path(d) / "painted"), painted, kwargs)
        raw = nib.load(out)
        np.testing.assert_array_equal(raw.affine, nib.load(src).affine)
        np.testing.assert_array_equal(np.asarray(raw.dataobj).T, painted)
        [(_, back_kwargs, _)] = _reader.read_layers(out)
        np.testing.assert_array_equal(back_kwargs["scale"], kwargs["scale"])
        np.testing.assert_array_equal(back_kwargs["translate"], kwargs["translate"])
