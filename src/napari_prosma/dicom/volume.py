"""One DICOM series -> an :class:`~napari_prosma.io.ImageData` with its exact geometry.

The headers are checked first, so that a series that is not one regular volume is refused
with a message that says why (orientation varying, slices missing, irregular spacing,
several acquisitions under one series UID, a tilted stack); highdicom then assembles the
volume (:func:`highdicom.get_volume_from_series`, or :meth:`highdicom.Image.get_volume` for
a multi-frame file) with the modality transform applied (CT in Hounsfield units).

Axis convention: highdicom's volume is indexed ``(slice, row, column)`` and its affine maps
that index to the patient's LPS coordinates. It is re-arranged (axis permutation and flips
only, :meth:`highdicom.Volume.to_patient_orientation`) to the orientation closest to
``HPL``: array axis 0 runs feet -> head, axis 1 anterior -> posterior, axis 2 right -> left,
so an axial series is shown as radiologists read it and a volume acquired in any plane
shows in the same frame. What is left of the rotation (an oblique acquisition) goes to the
layer's ``affine``; :mod:`napari_prosma.oblique` documents the world axes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import ImageData
from ..oblique import is_axis_aligned, tilt_warning
from ..preprocess import InputError
from .scan import Series

_SAME = (
    ("Rows", "image size"),
    ("Columns", "image size"),
    ("SamplesPerPixel", "colour samples"),
    ("PhotometricInterpretation", "photometric interpretation"),
    ("BitsAllocated", "bit depth"),
    ("PixelSpacing", "pixel spacing"),
    ("FrameOfReferenceUID", "frame of reference"),
    ("Modality", "modality"),
)
_IOP_TOL = 1e-4  # direction cosines
_SPACING_RTOL = 0.01  # highdicom's default regularity tolerance
_PERPENDICULAR_TOL = 1e-3  # highdicom's default
_FLIP_RAS = np.diag([-1.0, -1.0, 1.0])
#: Closest orientation the array is re-arranged to (see the module docstring).
DISPLAY_ORIENTATION = "HPL"


def _floats(v: Any) -> np.ndarray:
    return np.asarray([float(x) for x in v], dtype=float)


def check_series(series: Series) -> None:
    """Refuse a series that is not one regular, gap-free stack of parallel slices.

    Raises:
        InputError: the message names the series and says what is wrong.
    """
    hs = series.headers
    for key, what in _SAME:
        values = {str(h.ds.get(key)) for h in hs}
        if len(values) > 1:
            a, b = sorted(values)[:2]
            raise InputError(
                f"{series.label}: mixed series given as one: its files differ in {what} "
                f"({a} and {b}); open each series on its own"
            )
    if len(hs) > 1 and any(int(h.ds.get("NumberOfFrames", 1) or 1) > 1 for h in hs):
        raise InputError(
            f"{series.label}: mixed series given as one: multi-frame files together with "
            "others; open each file on its own"
        )
    if len(hs) > 1:
        _check_stack(series)


def _check_stack(series: Series) -> None:
    hs = series.headers
    if any("ImagePositionPatient" not in h.ds or "ImageOrientationPatient" not in h.ds for h in hs):
        raise InputError(
            f"{series.label}: {len(hs)} images without a position in the patient "
            "(ImagePositionPatient/ImageOrientationPatient): they cannot be stacked into a "
            "volume; open the files one by one"
        )
    iops = np.stack([_floats(h.ds.ImageOrientationPatient) for h in hs])
    if np.abs(iops - iops[0]).max() > _IOP_TOL:
        n = len({tuple(np.round(v, 3)) for v in iops})
        raise InputError(
            f"{series.label}: the orientation of the slices varies within the series "
            f"({n} different orientations, as in a localizer); it is not one volume"
        )
    row, col = iops[0][:3], iops[0][3:]
    normal = np.cross(row, col)
    ipps = np.stack([_floats(h.ds.ImagePositionPatient) for h in hs])
    z = np.sort(ipps @ normal)
    steps = np.diff(z)
    spacing = float(np.median(steps))
    if np.any(steps <= 1e-3 * max(abs(spacing), 1e-6)):
        n = int(np.sum(steps <= 1e-3 * max(abs(spacing), 1e-6)))
        raise InputError(
            f"{series.label}: mixed series given as one: {n} slice(s) share their position "
            "with another (several echoes, time points or acquisitions under one series); "
            "split the series first"
        )
    stack = ipps[np.argmax(ipps @ normal)] - ipps[np.argmin(ipps @ normal)]
    if 1.0 - abs(float(stack @ normal)) / float(np.linalg.norm(stack)) > _PERPENDICULAR_TOL:
        raise InputError(
            f"{series.label}: the slices are stacked at an angle to their own plane "
            "(gantry tilt); a sheared stack is not read as a volume here"
        )
    if np.abs(steps - spacing).max() <= _SPACING_RTOL * spacing:
        return
    _refuse_spacing(series, steps)


def _refuse_spacing(series: Series, steps: np.ndarray) -> None:
    base = float(steps.min())
    ratio = steps / base
    whole = np.abs(ratio - np.round(ratio)) <= 0.05
    if np.all(whole) and np.round(ratio).max() >= 2:
        missing = int(np.sum(np.round(ratio) - 1))
        where = [int(i) + 1 for i in np.nonzero(np.round(ratio) >= 2)[0]][:3]
        raise InputError(
            f"{series.label}: {missing} slice(s) missing (gaps of "
            f"{'/'.join(str(int(r)) for r in sorted(set(np.round(ratio[ratio > 1.5]))))}× "
            f"the {base:.3g} mm spacing after slice(s) {', '.join(map(str, where))}); "
            "the series is incomplete: copy it again from the scanner or archive"
        )
    raise InputError(
        f"{series.label}: irregular slice spacing ({steps.min():.3g} to {steps.max():.3g} mm "
        "between neighbouring slices): not one regular volume; resample it first"
    )


def _dtype(datasets: Sequence[Any]) -> np.dtype:
    """float32 when a modality transform applies (or may, per frame), else the stored
    integer type."""
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return np.dtype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1 or inter != 0 or "ModalityLUTSequence" in ds:
            return np.dtype(np.float32)
        if "RealWorldValueMappingSequence" in ds:
            return np.dtype(np.float32)
    ds = datasets[0]
    bits = int(ds.get("BitsAllocated", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return np.dtype(f"{'i' if signed else 'u'}{max(bits, 8) // 8}")


def _volume(series: Series) -> tuple[Any, list[Any]]:
    """highdicom's volume of the series and the full datasets (pixels included)."""
    import highdicom as hd
    import pydicom

    try:
        datasets = [pydicom.dcmread(h.path) for h in series.headers]
    except Exception as e:
        raise InputError(f"{series.label}: a file could not be read ({type(e).__name__})") from None
    kw = {"dtype": _dtype(datasets), "apply_voi_transform": False, "apply_presentation_lut": False}
    try:
        if int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
            vol = hd.Image.from_dataset(datasets[0], copy=False).get_volume(**kw)
        elif "ImagePositionPatient" in datasets[0] and "FrameOfReferenceUID" in datasets[0]:
            vol = hd.get_volume_from_series(datasets, **kw)
        else:
            return None, datasets
    except ValueError as e:
        frames = int(datasets[0].get("NumberOfFrames", 1) or 1)
        if frames > 1 and "PerFrameFunctionalGroupsSequence" not in datasets[0]:
            raise InputError(
                f"{series.label}: {frames} frames without positions in the patient (a video "
                "or cine loop), not a volume; save one frame per file"
            ) from None
        raise InputError(f"{series.label}: not one regular volume ({e})") from None
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{series.label}: the pixels could not be decoded ({detail})") from None
    return vol, datasets


def read_series(series: Series) -> ImageData:
    """Check and assemble one series (see the module docstring for the axes).

    Returns:
        An ``ImageData`` with ``format="dicom"``: a ``(Z, Y, X)`` volume, or a 2D image for a
        single slice or a picture without a patient position. ``meta["dicom"]`` holds what
        a DICOM-SEG writer needs (file paths, SOP instance UIDs in source order, the source
        and shown grids) and nothing of the patient.

    Raises:
        InputError: a series that is refused (see :func:`check_series`).
    """
    check_series(series)
    vol, datasets = _volume(series)
    if vol is None:
        return _picture(series, datasets[0])
    if vol.array.ndim != 3:
        raise InputError(f"{series.label}: colour volumes are not supported")
    order = _source_order(vol, datasets)
    if vol.spatial_shape[0] == 1:
        img = _flat(series, vol)
    else:
        img = _shown(series, vol)
    img.meta["dicom"].update(_source_record(series, vol, datasets, order))
    return img


def _positions(ds: Any) -> list[np.ndarray]:
    """ImagePositionPatient of every frame of a dataset (one entry for a single frame)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        return [_floats(ds.ImagePositionPatient)]
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    out = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        group = item if "PlanePositionSequence" in item else shared
        out.append(_floats(group.PlanePositionSequence[0].ImagePositionPatient))
    return out


def _source_order(vol: Any, datasets: Sequence[Any]) -> list[tuple[int, int]]:
    """``(dataset index, frame number)`` of each slice of ``vol``, slice by slice."""
    inv = np.linalg.inv(vol.affine)
    where = [(i, f + 1, p) for i, ds in enumerate(datasets) for f, p in enumerate(_positions(ds))]
    if len(where) == 1:
        return [(0, 1)]
    index = [float((inv @ np.r_[p, 1.0])[0]) for _, _, p in where]
    return [where[k][:2] for k in np.argsort(index)]


def _source_record(
    series: Series, vol: Any, datasets: Sequence[Any], order: list[tuple[int, int]]
) -> dict[str, Any]:
    first = datasets[0]
    c, w = _window(first)
    return {
        "files": [str(h.path) for h in series.headers],
        "sop_uids": [str(ds.SOPInstanceUID) for ds in datasets],
        "frames": [(int(i), int(f)) for i, f in order],
        "multiframe": int(first.get("NumberOfFrames", 1) or 1) > 1,
        "series_uid": series.uid,
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")) or None,
        "source_affine_lps": np.asarray(vol.affine, dtype=float),
        "source_shape": tuple(int(s) for s in vol.spatial_shape),
        "window": None if c is None else (c, w),
        "modality": str(first.get("Modality", "")),
        "label": series.label,
    }


def _window(ds: Any) -> tuple[float | None, float | None]:
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None, None
    c = float(c[0] if hasattr(c, "__len__") and not isinstance(c, str) else c)
    w = float(w[0] if hasattr(w, "__len__") and not isinstance(w, str) else w)
    return (c, w) if w > 1 else (None, None)


def contrast_limits(window: tuple[float, float] | None) -> tuple[float, float] | None:
    """napari contrast limits of a DICOM linear window (PS3.3 C.11.2.1.2.1)."""
    if window is None:
        return None
    c, w = window
    return (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)


def _napari_affine(lps: np.ndarray) -> np.ndarray:
    """index ``(d0, d1, d2)`` -> LPS ``(x, y, z)`` becomes index -> ``(z, y, x)``."""
    out = np.eye(4)
    out[:3, :3] = lps[:3, :3][::-1]
    out[:3, 3] = lps[:3, 3][::-1]
    return out


def _nifti_of(lps: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
    """The NIfTI affine (voxel ``(i, j, k)`` = array ``(d2, d1, d0)`` -> RAS) and a header,
    so labels saved as NIfTI sit where the scanner put them."""
    import nibabel as nib

    src = np.eye(4)
    src[:3, :3] = _FLIP_RAS @ lps[:3, :3][:, ::-1]
    src[:3, 3] = _FLIP_RAS @ lps[:3, 3]
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(shape[::-1]))
    header.set_xyzt_units("mm")
    header.set_qform(src, code=1)
    header.set_sform(src, code=1)
    return src, header


def _shown(series: Series, vol: Any) -> ImageData:
    """A volume re-arranged towards HPL (axes permuted/flipped only)."""
    shown = vol.to_patient_orientation(DISPLAY_ORIENTATION)
    lps = np.asarray(shown.affine, dtype=float)
    aff = _napari_affine(lps)
    src, header = _nifti_of(lps, shown.spatial_shape)
    warnings = [] if is_axis_aligned(aff[:3, :3]) else [w for w in [tilt_warning(aff)] if w]
    return ImageData(
        np.ascontiguousarray(shown.array),
        "volume",
        tuple(float(v) for v in np.linalg.norm(aff[:3, :3], axis=0)),
        tuple(float(v) for v in aff[:3, 3]),
        aff,
        unit="mm",
        path=_where(series),
        format="dicom",
        source_affine=src,
        header=header,
        meta={
            "nifti_shape": tuple(shown.spatial_shape[::-1]),
            "nifti_class": "Nifti1Image",
            "dicom": {"shown_affine_lps": lps, "shown_shape": tuple(shown.spatial_shape)},
        },
        warnings=warnings,
    )


def _flat(series: Series, vol: Any) -> ImageData:
    """A single slice in the patient frame: a 2D image with its pixel spacing."""
    a = np.ascontiguousarray(vol.array[0])
    sy, sx = (float(v) for v in vol.pixel_spacing)
    aff = np.diag([sy, sx, 1.0])
    return ImageData(
        a,
        "grey",
        (sy, sx),
        (0.0, 0.0),
        aff,
        unit="mm",
        path=_where(series),
        format="dicom",
        meta={
            "dicom": {
                "shown_affine_lps": np.asarray(vol.affine, dtype=float),
                "shown_shape": tuple(vol.spatial_shape),
            }
        },
    )


def _picture(series: Series, ds: Any) -> ImageData:
    """A single image without a patient position (secondary capture, ultrasound, ...)."""
    import highdicom as hd

    try:
        a = hd.Image.from_dataset(ds, copy=False).get_frame(
            1, dtype=_dtype([ds]), apply_voi_transform=False, apply_presentation_lut=False
        )
    except Exception as e:
        raise InputError(f"{series.label}: the pixels could not be decoded ({e})") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(
            f"{series.label}: {ds.NumberOfFrames} frames without positions in the patient "
            "(a video or cine loop), not a volume; save one frame per file"
        )
    ps = ds.get("PixelSpacing")
    sy, sx = (float(ps[0]), float(ps[1])) if ps else (1.0, 1.0)
    c, w = _window(ds)
    return ImageData(
        np.ascontiguousarray(a),
        "rgb" if a.ndim == 3 else "grey",
        (sy, sx),
        (0.0, 0.0),
        np.diag([sy, sx, 1.0]),
        unit="mm" if ps else None,
        path=_where(series),
        format="dicom",
        meta={
            "dicom": {
                "files": [str(series.headers[0].path)],
                "sop_uids": [str(ds.SOPInstanceUID)],
                "frames": [(0, 1)],
                "multiframe": False,
                "series_uid": series.uid,
                "frame_of_reference_uid": None,
                "source_affine_lps": None,
                "source_shape": (1, *a.shape[:2]),
                "shown_affine_lps": None,
                "shown_shape": (1, *a.shape[:2]),
                "window": None if c is None else (c, w),
                "modality": str(ds.get("Modality", "")),
                "label": series.label,
            }
        },
        warnings=[] if ps else ["the pixel spacing is unknown and was taken as 1"],
    )


def _where(series: Series) -> Path:
    """The series' folder (or its one file)."""
    paths = [str(h.path) for h in series.headers]
    return Path(paths[0]) if len(paths) == 1 else Path(os.path.commonpath(paths))
