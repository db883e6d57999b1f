"""Write labels, images and maps with the geometry of the image they belong to.

NIfTI gets its source affine and header back, TIFF its resolution and slice spacing, PNG
its pixels. Every write is atomic (:func:`napari_prosma.fs.atomic_write`). Qt-free and
torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..fs import atomic_write, suffix_of
from ..preprocess import InputError
from .image import NIFTI_SUFFIXES, PNG_SUFFIXES, TIFF_SUFFIXES, ImageData


def label_dtype(labels: np.ndarray) -> np.dtype:
    """uint8 when the labels fit, else uint16 (refuses negatives and > 65535)."""
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise InputError(f"label values must lie in 0..65535, found {lo}..{hi}")
    return np.dtype(np.uint8) if hi <= 255 else np.dtype(np.uint16)


def write_labels(
    path: str | os.PathLike[str],
    labels: np.ndarray,
    like: ImageData | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a label map with the geometry of ``like`` (atomic, never clobbering).

    Args:
        path: ``.nii``/``.nii.gz`` (source affine and header restored), ``.tif``/``.tiff``
            (resolution kept) or ``.png`` (uint8).
        labels: integer labels on ``like``'s spatial grid, napari order.
        like: the image the labels belong to (its geometry is written), or None.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    lab = np.asarray(labels)
    if lab.dtype.kind not in "biu":
        if lab.dtype.kind != "f" or not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise InputError(f"labels must be whole numbers, got data type {lab.dtype}")
    lab = lab.astype(label_dtype(lab), copy=False)
    if suffix_of(path) in PNG_SUFFIXES and lab.dtype != np.uint8:
        raise InputError(f"{Path(path).name}: PNG labels hold at most 255 classes; use TIFF")
    return _write(path, lab, like, overwrite=overwrite, is_label=True)


def write_image(
    path: str | os.PathLike[str],
    data: np.ndarray,
    like: ImageData | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write an image, map or stack of maps with the geometry of ``like``.

    Args:
        path: ``.nii``/``.nii.gz``, ``.tif``/``.tiff`` or ``.png`` (uint8/uint16 data, or
            floats in [0, 1] scaled to uint8).
        data: ``like``'s spatial shape, or ``(C, *spatial)`` for several maps (written as a
            4D NIfTI with the channel last, or a multi-page TIFF).
        like: the image whose geometry to write, or None.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    a = np.asarray(data)
    if a.dtype == np.float64 or a.dtype == np.float16:
        a = a.astype(np.float32)
    if suffix_of(path) in PNG_SUFFIXES and a.dtype.kind == "f":
        if a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 1):
            raise InputError("a PNG holds whole numbers; floats must lie in [0, 1] to be scaled")
        a = np.round(np.nan_to_num(a) * 255).astype(np.uint8)
    return _write(path, a, like, overwrite=overwrite, is_label=False)


def _write(
    path: str | os.PathLike[str],
    a: np.ndarray,
    like: ImageData | None,
    *,
    overwrite: bool,
    is_label: bool,
) -> Path:
    suf = suffix_of(path)
    if suf not in NIFTI_SUFFIXES + TIFF_SUFFIXES + PNG_SUFFIXES:
        raise InputError(
            f"{Path(path).name}: cannot write {suf or 'files without a suffix'}; "
            "use .nii.gz, .tif or .png"
        )
    spatial = like.spatial_shape if like is not None else None
    channels = False
    if spatial is not None and tuple(a.shape) != spatial:
        if tuple(a.shape[1:]) == spatial:
            channels = True
        elif not (like is not None and like.kind == "rgb" and a.shape == like.data.shape):
            raise InputError(f"data of shape {a.shape} do not fit the image grid {spatial}")
    if suf in NIFTI_SUFFIXES:
        writer = _nifti_writer(a, like, channels, is_label)
    elif suf in TIFF_SUFFIXES:
        writer = _tiff_writer(a, like, channels)
    else:
        if a.ndim != 2 and not (a.ndim == 3 and a.shape[-1] in (3, 4)):
            raise InputError(f"a PNG holds one 2D image; got shape {a.shape} (use TIFF)")
        if a.dtype != np.uint8 and not (a.ndim == 2 and a.dtype == np.uint16):
            raise InputError(
                f"{Path(path).name}: a PNG holds 8-bit colour or 8/16-bit grey, not "
                f"{'colour' if a.ndim == 3 else 'grey'} {a.dtype} data (use TIFF)"
            )

        def writer(tmp: Path) -> None:
            import imageio.v3 as iio

            iio.imwrite(tmp, a, extension=".png")

    return atomic_write(path, writer, overwrite=overwrite)


def _nifti_writer(
    a: np.ndarray, like: ImageData | None, channels: bool, is_label: bool
) -> Callable[[Path], None]:
    import nibabel as nib

    n = a.ndim - 1 if channels else a.ndim
    if like is not None and like.kind == "rgb":
        raise InputError("colour images are written as TIFF or PNG, not NIfTI")
    if channels:  # (C, *S) -> (*S reversed, C): NIfTI keeps channels on the 4th axis
        vox = np.moveaxis(np.transpose(a, (0, *range(n, 0, -1))), 0, -1)
    else:
        vox = np.transpose(a)
    if like is not None and like.source_affine is not None:
        src_shape = like.meta.get("nifti_shape", ())
        if n == 2 and len(src_shape) >= 3:  # a 2D slice stored as (X, Y, 1)
            vox = vox[:, :, None, ...]
        affine = like.source_affine
        header = like.header.copy()
        cls = nib.Nifti2Image if like.meta.get("nifti_class") == "Nifti2Image" else nib.Nifti1Image
    else:
        affine = np.eye(4)
        if like is not None:  # napari-order affine -> NIfTI (i, j, k) order
            rev = np.eye(n)[::-1]
            affine[:n, :n] = rev @ like.affine[:n, :n] @ rev
            affine[:n, 3] = like.affine[:n, n][::-1]
        header, cls = None, nib.Nifti1Image
    vox = np.ascontiguousarray(vox)

    def writer(tmp: Path) -> None:
        img = cls(vox, affine, header=header)
        img.set_data_dtype(vox.dtype)
        img.header.set_slope_inter(1.0 if is_label else None, 0.0 if is_label else None)
        if header is not None:  # keep the source's qform/sform codes exactly
            img.set_qform(affine, int(header["qform_code"]))
            img.set_sform(affine, int(header["sform_code"]))
        img.header["cal_min"], img.header["cal_max"] = 0, 0
        nib.save(img, str(tmp))

    return writer


def _tiff_writer(a: np.ndarray, like: ImageData | None, channels: bool) -> Callable[[Path], None]:
    import tifffile

    kwargs: dict[str, Any] = {}
    volume = like is not None and like.kind == "volume"
    # a TIFF source's own resolution tags, unless its spacing came from OME metadata
    tags = like is not None and like.format == "tiff" and like.meta.get("spacing_from") != "ome"
    if tags and like.meta.get("tiff_resolution", (None,))[0]:
        xres, yres = like.meta["tiff_resolution"]
        kwargs["resolution"] = (tuple(xres), tuple(yres))
        kwargs["resolutionunit"] = like.meta.get("tiff_resolutionunit", 1)
    elif like is not None and (like.unit is not None or tuple(like.spacing[-2:]) != (1.0, 1.0)):
        # a spacing without a unit (a napari scale) is kept too, as unitless resolution
        sy, sx = like.spacing[-2:]
        to_cm = {"mm": 0.1, "cm": 1.0}.get(like.unit)
        if to_cm:
            kwargs["resolution"] = (1.0 / (sx * to_cm), 1.0 / (sy * to_cm))
            kwargs["resolutionunit"] = 3
        else:
            kwargs["resolution"] = (1.0 / sx, 1.0 / sy)
            kwargs["resolutionunit"] = 1
    imagej = volume and a.dtype in (np.uint8, np.uint16, np.float32)
    if volume and min(a.shape[-2:]) == 1:  # tifffile would read it back squeezed, axes mixed
        raise InputError(
            f"a TIFF cannot hold a volume whose slices are 1 pixel wide or high (shape "
            f"{a.shape}); use NIfTI (.nii.gz)"
        )
    if volume:  # the slice spacing: ImageJ metadata (8/16-bit, float32), else tifffile's JSON
        meta: dict[str, Any] = {"spacing": float(like.spacing[0])}
        if imagej:
            meta["axes"] = "ZYX"
        if like.unit:
            meta["unit"] = {"um": "micron"}.get(like.unit, like.unit) if imagej else like.unit
        kwargs["metadata"] = meta
        if kwargs.get("resolutionunit") == 3 and not tags:
            kwargs["resolution"] = (1.0 / like.spacing[2], 1.0 / like.spacing[1])
            kwargs["resolutionunit"] = 1
    rgb = like is not None and like.kind == "rgb" and a.ndim == 3 and a.shape[-1] == 3
    if imagej and channels:  # ImageJ hyperstacks order channels after slices: (Z, C, Y, X)
        a = np.moveaxis(a, 0, 1)
        kwargs["metadata"]["axes"] = "ZCYX"

    def writer(tmp: Path) -> None:
        tifffile.imwrite(
            tmp, a, imagej=imagej, photometric="rgb" if rgb else "minisblack", **kwargs
        )

    return writer
