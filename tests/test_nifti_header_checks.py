"""Issue 12 item 9: absurd NIfTI geometry is refused, naming the cause, before any work.

Before: a NaN pixdim ended in a raw ``cannot convert float NaN to integer``; a zero pixdim
was silently taken as 1 (nibabel's loader fixes it and logs a line on stderr); a 50 mm
pixdim made a working grid of gigavoxels before anything was checked; 1e-4 mm collapsed
the volume to one voxel. A header promising more voxels than the file holds made nibabel
allocate the promised size first.
"""

from __future__ import annotations

import numpy as np
import pytest

from file_mutations import edit_nifti, pixdim_only, read_bytes, write_bytes
from hardening_support import save_tiny
from napari_prosma._samples import sample_path
from napari_prosma.cli import main
from napari_prosma.inference.resample import MAX_WORK_VOXELS, working_shape
from napari_prosma.io import read_image
from napari_prosma.preprocess import InputError

SRC = sample_path("hippocampus_mri")  # 1 mm MRI, sform and qform both set


@pytest.fixture(scope="module")
def model3d(tmp_path_factory):
    return save_tiny(
        tmp_path_factory.mktemp("models"), "tiny3d", spatial_dims=3, spacing=[1.0, 1.0, 1.0]
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (float("nan"), "pixdim"),
        (0.0, "pixdim"),
        (-1.0, "pixdim"),
        (50.0, "voxel size of 1×1×50 mm"),
        (1e-4, "voxel size of 1×1×0.0001 mm"),
        (float("inf"), "pixdim"),
    ],
)
def test_absurd_pixdim_is_refused_by_name(tmp_path, value, words):
    p = pixdim_only(SRC, tmp_path / "scan.nii.gz", pixdim=(3, value))
    with pytest.raises(InputError) as info:
        read_image(p)
    assert words in str(info.value) and str(info.value).startswith("scan.nii.gz")


def test_a_plausible_pixdim_is_read(tmp_path):
    img = read_image(pixdim_only(SRC, tmp_path / "scan.nii.gz", pixdim=(3, 2.5)))
    assert img.spacing[0] == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("field", "index", "value", "words"),
    [
        ("srow_x", 0, float("nan"), "sform affine holds NaN"),
        ("srow_y", 1, 0.0, "voxel size"),
        ("srow_z", 2, 60.0, "voxel size"),
        ("srow_x", 3, float("inf"), "sform affine holds NaN or infinite"),
    ],
)
def test_absurd_sform_is_refused_by_name(tmp_path, field, index, value, words):
    p = edit_nifti(SRC, tmp_path / "scan.nii.gz", **{field: (index, value)})
    with pytest.raises(InputError, match=words):
        read_image(p)


def test_parallel_axes_are_refused(tmp_path):
    """Two voxel axes pointing the same way: the scan has no 3D geometry."""
    p = edit_nifti(
        SRC, tmp_path / "scan.nii.gz", srow_x=[(0, 1.0), (1, 1.0)], srow_y=[(0, 0.0), (1, 0.0)]
    )
    with pytest.raises(InputError, match="degenerate"):
        read_image(p)


def test_millimetres_follow_the_header_unit(tmp_path):
    """A 1-unit voxel in a header that says metres is 1000 mm: refused, unit named."""
    buf = read_bytes(SRC)
    buf[123] = (buf[123] & ~0x07) | 1  # xyzt_units: space in metres
    p = write_bytes(tmp_path / "scan.nii.gz", buf)
    with pytest.raises(InputError, match="unit is 'meter'"):
        read_image(p)


def test_a_header_promising_more_than_the_file_holds_is_refused(tmp_path):
    """dim 34×49×36 -> 34×30000×30000: 31 G voxels promised by a 49 KB file, refused before
    nibabel allocates them (deflate cannot expand more than 1032:1)."""
    p = edit_nifti(SRC, tmp_path / "scan.nii.gz", dim=[(2, 30000), (3, 30000)])
    with pytest.raises(InputError, match=r"more than a file of .* can hold"):
        read_image(p)
    raw = tmp_path / "scan.nii"  # uncompressed: the bound is the file size itself
    write_bytes(raw, read_bytes(SRC))
    big = edit_nifti(raw, tmp_path / "big.nii", dim=(3, 40))  # 36 slices stored
    with pytest.raises(InputError, match=r"more than a file of .* can hold"):
        read_image(big)


@pytest.mark.parametrize("value", [float("nan"), 0.0, 50.0, 1e-4])
def test_predict_refuses_in_one_line_and_writes_nothing(tmp_path, model3d, capsys, value):
    (tmp_path / "in").mkdir()
    p = pixdim_only(SRC, tmp_path / "in" / "scan.nii.gz", pixdim=(3, value))
    out = tmp_path / "out"
    rc = main(["predict", str(p), "-o", str(out), "--model", str(model3d), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "pixdim" in err[0] or "voxel size" in err[0]
    assert "convert float NaN" not in err[0]
    assert not out.exists() or not any(out.rglob("*"))


# ---------------------------------------------------------------------------- working grid


def _card(spacing):
    from hardening_support import tiny_model

    return tiny_model(3, spacing=list(spacing))[1]


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf")])
def test_working_grid_refuses_a_spacing_that_is_no_size(bad):
    with pytest.raises(InputError, match="not a positive size"):
        working_shape((10, 10, 10), (bad, 1.0, 1.0), _card((1.0, 1.0, 1.0)))


@pytest.mark.parametrize("spacing", [(100.0, 1.0, 1.0), (1e-3, 1.0, 1.0)])
def test_working_grid_refuses_an_absurd_zoom(spacing):
    with pytest.raises(InputError, match="64 times finer or coarser"):
        working_shape((10, 10, 10), spacing, _card((1.0, 1.0, 1.0)))


def test_working_grid_is_bounded_before_allocating():
    """A 512^3 grid at 40 mm for a 1 mm model: 40^3 times larger, refused by arithmetic."""
    with pytest.raises(InputError, match="would make a grid of"):
        working_shape((512, 512, 512), (40.0, 40.0, 40.0), _card((1.0, 1.0, 1.0)))
    # an unresampled input larger than the limit is the user's own size: not refused
    big = (1024, 1024, 200)
    assert np.prod(big) > MAX_WORK_VOXELS
    assert working_shape(big, (1.0, 1.0, 1.0), _card((1.0, 1.0, 1.0)))[0] == big
    assert working_shape((20, 20, 20), (2.0, 1.0, 1.0), _card((1.0, 1.0, 1.0)))[0] == (40, 20, 20)
