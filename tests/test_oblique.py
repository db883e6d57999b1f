"""Oblique NIfTI: shown with napari's layer affine where the scanner put it; labels painted on
it are written back with the source affine exactly (hypothesis over random oblique affines).

The reader hook itself (``_reader.layer_data`` calling :func:`nifti_layer_geometry`) is the
io refactor's; here the function is checked with napari's own layer transform.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_prosma import _reader, _writer
from napari_prosma.io import read_image
from napari_prosma.oblique import (
    is_axis_aligned,
    layer_geometry,
    nifti_layer_geometry,
    out_of_plane_tilt_deg,
)

SHAPE = (5, 6, 7)  # NIfTI (i, j, k)


def quaternion_rotation(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@st.composite
def oblique_affines(draw) -> np.ndarray:
    q = np.array([draw(st.floats(-1, 1)) for _ in range(4)])
    if np.linalg.norm(q) < 0.1:
        q = np.array([0.9, 0.3, -0.2, 0.1])
    spacing = np.array([draw(st.floats(0.3, 4.0)) for _ in range(3)])
    shear = np.eye(3)
    shear[0, 1], shear[1, 2] = draw(st.floats(-0.3, 0.3)), draw(st.floats(-0.3, 0.3))
    a = np.eye(4)
    a[:3, :3] = quaternion_rotation(q) @ shear @ np.diag(spacing)
    a[:3, 3] = [draw(st.floats(-200, 200)) for _ in range(3)]
    return a


def write_nifti(path, affine: np.ndarray) -> None:
    import nibabel as nib

    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(affine=oblique_affines(), seed=st.integers(0, 2**16))
def test_oblique_nifti_sits_in_place_and_labels_keep_the_source_affine(tmp_path, affine, seed):
    import nibabel as nib
    from napari.layers import Labels

    src = tmp_path / f"scan_{seed}.nii.gz"
    write_nifti(src, affine)
    stored = nib.load(str(src)).affine  # as the file holds it (float32 in the header)
    img = read_image(src)
    kwargs, _ = nifti_layer_geometry(img.source_affine, 3)
    if is_axis_aligned(np.eye(3)[::-1] @ stored[:3, :3] @ np.eye(3)[::-1]):
        return  # hypothesis drew an axis-aligned matrix: covered by the next test
    layer = Labels(
        np.zeros(img.spatial_shape, np.uint8),
        **kwargs,
        metadata={_reader.IO_KEY: _reader.source_metadata(img)},
    )
    # napari's own transform puts voxel (k, j, i) at the file's RAS position, in LPS (z, y, x)
    for ijk in ([0, 0, 0], [4, 5, 6], [1, 3, 2]):
        ras = stored[:3, :3] @ ijk + stored[:3, 3]
        lps = ras * [-1, -1, 1]
        world = np.asarray(layer.data_to_world(ijk[::-1]), dtype=float)
        np.testing.assert_allclose(world, lps[::-1], atol=1e-6)
    painted = np.random.default_rng(seed).integers(0, 3, img.spatial_shape).astype(np.uint8)
    layer.data = painted
    data, attrs, _ = layer.as_layer_data_tuple()
    (out,) = _writer.write_labels(str(tmp_path / f"labels_{seed}.nii.gz"), data, attrs)
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, stored)  # exactly, bit for bit
    np.testing.assert_array_equal(back.header.get_sform(), nib.load(str(src)).header.get_sform())
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.transpose(painted))


def test_axis_aligned_nifti_keeps_todays_scale_and_translate(tmp_path):
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 30]
    write_nifti(tmp_path / "a.nii.gz", affine)
    img = read_image(tmp_path / "a.nii.gz")
    kwargs, warnings = nifti_layer_geometry(img.source_affine, 3)
    assert "affine" not in kwargs and warnings == []
    assert kwargs["scale"] == pytest.approx(img.spacing)
    assert kwargs["translate"] == pytest.approx(img.origin)


def test_tilt_warning_only_where_napari_flattens_slices():
    rz = np.eye(4)
    rz[:3, :3] = quaternion_rotation(np.array([np.cos(0.2), 0, 0, np.sin(0.2)]))  # about z
    rx = np.eye(4)
    rx[:3, :3] = quaternion_rotation(np.array([np.cos(0.2), np.sin(0.2), 0, 0]))  # about x
    _, in_plane = nifti_layer_geometry(rz, 3)
    _, tilted = nifti_layer_geometry(rx, 3)
    assert in_plane == []
    assert len(tilted) == 1 and "tilted 23°" in tilted[0]
    assert out_of_plane_tilt_deg(np.eye(4)) == 0.0


def test_layer_geometry_uses_scale_only_for_positive_diagonals():
    assert layer_geometry(np.diag([2.0, 3.0, 1.0])) == {
        "scale": (2.0, 3.0),
        "translate": (0.0, 0.0),
    }
    flipped = layer_geometry(np.diag([-2.0, 3.0, 1.0]))
    np.testing.assert_array_equal(flipped["affine"], np.diag([-2.0, 3.0, 1.0]))
    assert flipped["scale"] == (1.0, 1.0)


def test_a_coronal_slice_saved_as_2d_keeps_its_voxel_size(tmp_path):
    """A 2D NIfTI whose second axis points along z (a coronal slice): its voxel size and
    origin come from the x-z pair, not a zero y column (hypothesis found a division by
    zero here), and painted labels keep the source affine."""
    import nibabel as nib

    affine = np.array([[-0.7, 0, 0, 5.0], [0, 0, 0, -12.0], [0, 2.5, 0, 40.0], [0, 0, 0, 1]])
    affine[1, 2] = 1.0  # the (dropped) third axis runs along y
    src = tmp_path / "coronal.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(12, dtype=np.int16).reshape(3, 4), affine), src)
    img = read_image(src)
    assert img.spacing == pytest.approx((2.5, 0.7))
    assert img.origin == pytest.approx((40.0, 5.0))
    [(data, kwargs, _)] = _reader.read_layers(str(src))
    assert kwargs["scale"] == pytest.approx((2.5, 0.7))
    [out] = _writer.write_labels(str(tmp_path / "painted"), np.ones_like(data, np.uint8), kwargs)
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(src).affine)
