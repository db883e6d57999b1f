"""What ``prosma predict`` needs for DICOM inputs: one input per series, read on demand.

``cli/predict.py`` calls :func:`series_inputs` while it collects its inputs (a DICOM file or
a folder holding DICOM stands for the series in it: one input each) and :func:`read_input`
where it reads an input; ``--format dicom-seg`` writes with
:func:`napari_prosma.dicom.write_seg`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import ImageData
from ..preprocess import InputError
from .scan import Series, has_preamble, looks_like_dicom
from .volume import read_series


@dataclass(eq=False)
class SeriesInput(os.PathLike):
    """One DICOM series as a ``prosma predict`` input.

    Behaves as a path for naming the outputs: ``os.fspath`` is ``FOLDER/STEM`` where the stem
    is the file's or folder's name, with ``_series<N>`` when the folder holds several.
    """

    where: Path
    series: Series
    stem: str
    notes: list[str] = field(default_factory=list)

    def __fspath__(self) -> str:
        return str(
            self.where.parent / self.stem if self.where.is_file() else self.where / self.stem
        )

    @property
    def name(self) -> str:
        return self.stem

    def __str__(self) -> str:
        return f"{self.where} ({self.series.label})"


def is_dicom_input(path: str | os.PathLike[str], nested: bool = True) -> bool:
    """A DICOM file, or a folder that holds DICOM files (directly, or also below with
    ``nested``: a folder of series folders)."""
    p = Path(path).expanduser()
    if p.is_file():
        return has_preamble(p)
    if not nested and p.is_dir():
        return any(has_preamble(f) for f in sorted(p.iterdir())[:64] if f.is_file())
    return looks_like_dicom(p)


def series_inputs(path: str | os.PathLike[str]) -> list[SeriesInput]:
    """One input per image series in a DICOM file or folder (headers only).

    Raises:
        InputError: no image series there (the message says what was found instead).
    """
    from . import find_series

    p = Path(path).expanduser()
    found, notes = find_series(p)
    base = p.stem if p.is_file() else p.name
    out = []
    for k, s in enumerate(found):
        number = str(s.first.get("SeriesNumber", "") or k + 1)
        stem = base if len(found) == 1 else f"{base}_series{number}"
        if any(o.stem == stem for o in out):
            stem = f"{stem}_{k + 1}"
        out.append(SeriesInput(p, s, stem, notes if k == 0 else []))
    return out


def output_format(img: ImageData, requested: str = "auto") -> str | None:
    """The ``prosma predict`` output format for an image: NIfTI for a DICOM volume (with its
    scanner affine), the input's own format otherwise.

    Raises:
        InputError: ``dicom-seg`` asked for an input that is not DICOM.
    """
    if requested == "dicom-seg" and img.format != "dicom":
        raise InputError(
            "--format dicom-seg needs DICOM input: a DICOM Segmentation references the "
            "series it was made on"
        )
    if img.format == "dicom":
        return "nifti" if img.kind == "volume" else "png"
    return img.format


def read_input(item: SeriesInput) -> ImageData:
    """Read one series input; the notes of its folder become the image's warnings."""
    img = read_series(item.series)
    img.warnings = list(item.notes) + list(img.warnings)
    return img
