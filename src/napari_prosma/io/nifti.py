"""NIfTI reading (nibabel): voxel ``(i, j, k)`` to napari ``(k, j, i)`` with its affine.

The world axes are reversed too, so an axis-aligned scan keeps a diagonal affine. The
source affine and header are kept, and the writers give them back exactly.
"""

from __future__ import annotations

import warnings as pywarnings
from pathlib import Path
from typing import Any

import numpy as np

from ..fs import suffix_of
from ..oblique import plane_matrix
from ..preprocess import InputError
from .checks import _corrupt, _quiet, check_decoded_size, check_nifti_geometry
from .image import ImageData

_NIFTI_UNIT_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3}


def _load(p: Path) -> tuple[Any, Any, np.ndarray]:
    """``(image, header as stored, voxel array (i, j, k, ...))``, the data only read once
    the header's size is checked against the file.

    Raises:
        InputError: not NIfTI-1/2, corrupt or truncated, or larger than the file can hold.
    """
    import nibabel as nib

    try:
        # nibabel logs the header fixes it makes (checked by the caller) and warns about NaN
        with _quiet("nibabel.global"), pywarnings.catch_warnings(), np.errstate(all="ignore"):
            pywarnings.simplefilter("ignore")
            img = nib.load(str(p))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(f"{p.name} is not a NIfTI-1/2 image")
        with nib.openers.ImageOpener(str(p)) as f:  # as stored: load() turns pixdim 0 into 1
            raw = type(img.header).from_fileobj(f, check=False)
        slope, inter = img.header.get_slope_inter()
        scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
        check_decoded_size(
            p,
            tuple(img.shape),
            img.get_data_dtype().itemsize,
            "deflate" if suffix_of(p) == ".nii.gz" else "none",
            out_itemsize=8 if scaled else 0,
        )
        return img, raw, np.asanyarray(img.dataobj)
    except InputError:
        raise
    except Exception as e:
        raise _corrupt(p, "NIfTI", e) from None


def _read_nifti(p: Path) -> ImageData:
    img, raw, a = _load(p)
    hdr = img.header
    if a.dtype.fields is not None:
        raise InputError(f"{p.name} holds RGB/structured NIfTI data, which is not supported")
    src_shape = a.shape
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim > 3:
        raise InputError(
            f"{p.name} is a {a.ndim}D NIfTI (shape {src_shape}); only 2D images and 3D "
            "volumes are supported (split the time points or channels first)"
        )
    src_affine = np.asarray(img.affine, dtype=np.float64)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    n = a.ndim
    if n < 2:
        raise InputError(f"{p.name} has shape {src_shape}; it is not an image")
    unit_name = hdr.get_xyzt_units()[0]
    scale = _NIFTI_UNIT_MM.get(unit_name, 1.0)
    check_nifti_geometry(p, raw, src_affine, n, scale)
    a = np.ascontiguousarray(np.transpose(a))  # (i, j[, k]) -> ([k,] j, i)
    plane = plane_matrix(src_affine, n)  # a 2D coronal/sagittal slice: its own world pair
    rev = np.eye(n)[::-1]
    lin = rev @ plane[:n, :n] @ rev  # world axes reversed too: axis-aligned stays diagonal
    aff = np.eye(n + 1)
    aff[:n, :n] = lin
    aff[:n, n] = plane[:n, n][::-1]
    spacing = tuple(float(v) * scale for v in np.linalg.norm(lin, axis=0))
    origin = tuple(float(v) * scale for v in aff[:n, n])
    warnings: list[str] = []
    off = lin - np.diag(np.diag(lin))
    if np.abs(off).max() > 1e-4 * max(np.abs(lin).max(), 1e-12):
        warnings.append(
            "the scan is stored rotated or sheared relative to the scanner axes; it is shown "
            "with its voxel spacing and origin only (the full affine is kept and restored on save)"
        )
    if n == 2 and np.abs(src_affine[:2, 2:3]).max() > 0 and src_shape[2:3] not in ((), (1,)):
        warnings.append("a 2D NIfTI with an unusual affine; the third axis was dropped")
    return ImageData(
        a,
        "volume" if n == 3 else "grey",
        spacing,
        origin,
        aff,
        unit="mm",
        format="nifti",
        source_affine=src_affine,
        header=img.header.copy(),
        meta={"nifti_shape": src_shape, "nifti_class": type(img).__name__},
        warnings=warnings,
    )
