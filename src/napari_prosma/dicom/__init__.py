"""DICOM in (a file, a series folder, a folder of several series) and DICOM-SEG out.

- :func:`read_dicom`: every image series among the paths, one
  :class:`~napari_prosma.io.ImageData` each, with its exact geometry; series that cannot be
  read are named, with the reason, in the notes (and all of them refused when none can).
- :func:`write_seg` / :func:`read_seg`: a label map on a series' grid as a DICOM
  Segmentation that references the series (highdicom), and back onto exactly that grid.
- :mod:`.predict`: the two functions ``prosma predict`` calls for DICOM inputs.

Built on pydicom and highdicom (volume assembly, geometry, SEG encoding). Qt-free and
torch-free. Patient identifiers are never copied anywhere but into a SEG, where DICOM
requires them (highdicom copies the patient and study modules of the source).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..io import ImageData
from ..preprocess import InputError
from .scan import DICOM_SUFFIXES, Series, group_series, looks_like_dicom, read_headers
from .seg import read_seg, seg_segments, write_seg
from .volume import contrast_limits, read_series

__all__ = [
    "DICOM_SUFFIXES",
    "Series",
    "contrast_limits",
    "find_series",
    "looks_like_dicom",
    "read_dicom",
    "read_seg",
    "read_series",
    "seg_segments",
    "write_seg",
]


def find_series(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> tuple[list[Series], list[str]]:
    """The image series among DICOM files or folders (headers only): ``(series, notes)``.

    Raises:
        InputError: no DICOM image among them (the message says what they are instead).
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    headers, notes = read_headers(items)
    series, more = group_series(headers)
    return series, notes + more


def read_dicom(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> tuple[list[ImageData], list[str]]:
    """Read every image series among the paths.

    Returns:
        ``(images, notes)``: one image per series that could be read, in the order found;
        the notes name each series that was read and each one that was not, with why.

    Raises:
        InputError: not one series could be read (the message gives the reason of the first,
            and how many more were refused).
    """
    series, notes = find_series(paths)
    images: list[ImageData] = []
    refused: list[str] = []
    for s in series:
        try:
            images.append(read_series(s))
        except InputError as e:
            refused.append(str(e))
    if not images:
        more = f" ({len(refused) - 1} more series refused too)" if len(refused) > 1 else ""
        raise InputError(refused[0] + more)
    read = "; ".join(
        f"{img.meta['dicom']['label']} ({'×'.join(map(str, img.data.shape))})" for img in images
    )
    out = [f"read {len(images)} series: {read}"] if len(series) > 1 else []
    return images, out + [f"not read: {r}" for r in refused] + notes
