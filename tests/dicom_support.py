"""DICOM test material: files shipped inside pydicom's wheel, and series built from them.

Only files of the wheel are used (``get_testdata_file(name, download=False)`` returns None
for those that pydicom would fetch from the network); series are made by copying a real
file in ``tmp_path`` and changing its position, orientation and UIDs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

MARKER = 30000  # a stored value no test image holds
PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-4711-SECRET",
    "PatientBirthDate": "19700101",
}


def wheel_file(name: str) -> Path:
    """A file that ships inside the pydicom wheel (never downloaded)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in the pydicom wheel"
    return Path(path)


def wheel_dir(sub: str) -> Path:
    return wheel_file("CT_small.dcm").parent / sub


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def make_series(
    folder: Path,
    n: int = 5,
    *,
    source: str = "CT_small.dcm",
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    offsets: Sequence[float] | None = None,
    step: float = 5.0,
    shift: Sequence[float] = (0.0, 0.0, 0.0),
    patient: dict[str, str] | None = None,
    series_uid: str | None = None,
    prefix: str = "slice",
) -> list[Path]:
    """Write ``n`` slices copied from ``source`` into ``folder`` (file names not in order).

    Slice ``k`` sits at ``IPP0 + offsets[k] * normal + k * shift`` (``offsets`` default:
    ``k * step``); its pixel ``(3, 5)`` holds ``MARKER + k`` and ``(0, 0)`` holds ``k``, so a
    test can find each slice in a volume. File names start with ``prefix``.
    """
    import highdicom as hd
    import pydicom

    src = pydicom.dcmread(wheel_file(source))
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or hd.UID()
    iop = np.asarray(iop, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    ipp0 = np.array([float(v) for v in src.ImagePositionPatient])
    offsets = [k * step for k in range(n)] if offsets is None else list(offsets)
    paths = []
    for k, off in enumerate(offsets):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = hd.UID()
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [round(float(v), 10) for v in iop]
        pos = ipp0 + off * normal + k * np.asarray(shift, dtype=float)
        ds.ImagePositionPatient = [round(float(v), 6) for v in pos]
        arr = src.pixel_array.copy()
        arr[0, 0], arr[3, 5] = k, MARKER + k
        ds.PixelData = arr.tobytes()
        for key, value in (patient or {}).items():
            setattr(ds, key, value)
        path = folder / f"{prefix}_{(7 * k + 3) % (n + 11):03d}_{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def marker_value(path: Path, k: int) -> float:
    """The marker of slice ``k`` after the file's modality transform."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (MARKER + k) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )


def expected_lps(path: Path, row: int, col: int) -> np.ndarray:
    """Patient position (LPS, mm) of pixel (row, col) of a file, from its own header."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    return ipp + row * dr * iop[3:] + col * dc * iop[:3]


class Card:
    """The part of a model card the SEG writer reads."""

    name = "hippocampus_prosma"
    class_names: ClassVar[list[str]] = ["background", "anterior", "posterior"]
    weights_sha256 = "84270b4343b17ce7e5a852e9bef32836029ebfddf7f402ddab2bfbbdc1233f24"
    architecture = "prosma_unet"
    parent_hash = None
    extra: ClassVar[dict] = {}
