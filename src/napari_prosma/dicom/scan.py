"""Find DICOM files, read their headers only, and group the images into series.

Nothing here reads pixel data: a folder is sorted and every refusal that the headers can
decide (not an image, pixels compressed in a way nothing here decodes) is made before a
single frame is decoded. Patient attributes are never copied out of the headers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..preprocess import InputError

#: File name suffixes napari offers to this reader (DICOM files often have none: open the
#: folder then).
DICOM_SUFFIXES = (".dcm", ".dicom")
_PREAMBLE = 128
#: Storage classes that hold pixel data but are not images to segment, with what they are.
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": (
        "a DICOM Segmentation (SEG), not an image: open the image series it was made on"
    ),
    "1.2.840.10008.5.1.4.1.1.66.7": (
        "a DICOM Label Map Segmentation, not an image: open the image series it was made on"
    ),
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT Dose (a radiotherapy dose grid), not an image",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT Structure Set (contours), not an image",
    "1.2.840.10008.5.1.4.1.1.30": "a Parametric Map, not an image",
}
#: pydicom's plugin names -> what to ``pip install``.
_PIP_NAMES = {"gdcm": "python-gdcm"}


@dataclass
class Header:
    """What the reader needs of one DICOM file (no pixel data, no patient attributes)."""

    path: Path
    ds: Any  # pydicom Dataset read with stop_before_pixels=True

    @property
    def series_uid(self) -> str:
        return str(self.ds.get("SeriesInstanceUID", ""))


@dataclass
class Series:
    """The image files of one SeriesInstanceUID (headers only), in the order found."""

    uid: str
    headers: list[Header] = field(default_factory=list)

    @property
    def first(self) -> Any:
        return self.headers[0].ds

    @property
    def label(self) -> str:
        """A short name: modality, series number and description (no patient data)."""
        ds = self.first
        parts = [str(ds.get("Modality", "") or ""), f"series {ds.get('SeriesNumber', '?')}"]
        desc = str(ds.get("SeriesDescription", "") or "").strip()
        if desc:
            parts.append(repr(desc))
        return " ".join(p for p in parts if p)

    @property
    def n_images(self) -> int:
        return sum(int(h.ds.get("NumberOfFrames", 1) or 1) for h in self.headers)


def has_preamble(path: str | os.PathLike[str]) -> bool:
    """Whether a file starts like a DICOM Part 10 file (``DICM`` after 128 bytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(_PREAMBLE)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _files_under(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def looks_like_dicom(path: str | os.PathLike[str], probe: int = 64) -> bool:
    """Cheap check for napari's reader hook: a DICOM file, or a folder whose first ``probe``
    files include one."""
    p = Path(path)
    if p.is_file():
        return has_preamble(p)
    if not p.is_dir():
        return False
    for i, f in enumerate(_files_under(p)):
        if i >= probe:
            return False
        if has_preamble(f):
            return True
    return False


def read_headers(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Header], list[str]]:
    """Headers of every DICOM file among ``paths`` (files, or folders searched recursively).

    A file named explicitly must be DICOM; inside folders other files (README, DICOMDIR
    indexes, thumbnails) are passed over and counted in the notes.

    Returns:
        ``(headers, notes)``.

    Raises:
        FileNotFoundError: a path that does not exist.
        InputError: a named file that is not DICOM or is unreadable; no DICOM file at all.
    """
    headers: list[Header] = []
    skipped = 0
    for item in paths:
        p = Path(item).expanduser()
        if not p.exists():
            raise FileNotFoundError(2, "no such file or folder", str(p))
        explicit = p.is_file()
        for f in [p] if explicit else _files_under(p):
            ds = _header(f, explicit)
            if ds is None:
                skipped += 1
                continue
            if str(ds.get("SOPClassUID", "")) == "1.2.840.10008.1.3.10":  # DICOMDIR
                skipped += 1
                continue
            headers.append(Header(f, ds))
    if not headers:
        where = ", ".join(Path(p).name for p in paths)
        raise InputError(f"no DICOM files found in {where}")
    notes = [f"{skipped} file(s) that are not DICOM images were passed over"] if skipped else []
    return headers, notes


def _header(f: Path, explicit: bool) -> Any:
    """The header of a DICOM file, or None for a file in a folder that is not DICOM.

    Files without the Part 10 preamble (old exports) are read only when named explicitly
    or named ``*.dcm``/``*.dicom``, and only if they parse into a DICOM object.
    """
    import pydicom

    preamble = has_preamble(f)
    if not preamble and not (explicit or f.name.lower().endswith(DICOM_SUFFIXES)):
        return None
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=not preamble)
    except Exception as e:
        if not preamble and not explicit:
            return None
        what = "corrupt or truncated" if preamble else "not a DICOM file"
        raise InputError(
            f"{f.name} could not be read as DICOM: {what} ({type(e).__name__})"
        ) from None
    if not preamble and "SOPClassUID" not in ds:
        if explicit:
            raise InputError(f"{f.name} is not a DICOM file (no DICM header, no SOP class)")
        return None
    return ds


def what_it_is(ds: Any) -> str | None:
    """Why a dataset is not an image to segment, in words, or None when it is one."""
    sop = str(ds.get("SOPClassUID", ""))
    if sop in _NOT_IMAGES:
        return _NOT_IMAGES[sop]
    if "Rows" not in ds or "Columns" not in ds:
        name = getattr(ds.get("SOPClassUID"), "name", "") or "object"
        return f"a {name} (no pixel data), not an image"
    return None


def decode_problem(ds: Any) -> str | None:
    """Why this file's pixels cannot be decoded here, with what would decode them, or None."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None or not uid.is_compressed:
        return None
    what = f"{uid.name} ({uid})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"its pixels are stored as {what}, which no Python DICOM decoder reads"
    if decoder.is_available:
        return None
    options = [_pip_names(m) for m in decoder.missing_dependencies]
    hint = "; or ".join(o for o in options if o) or "a pydicom pixel-data plugin"
    return f"its pixels are compressed as {what}, which cannot be decoded here: pip install {hint}"


def _pip_names(missing: str) -> str:
    """``'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1'`` ->
    ``'pylibjpeg pylibjpeg-libjpeg'``; ``'gdcm - requires gdcm>=3.0.10'`` -> ``'python-gdcm'``."""
    plugin, _, needs = missing.partition(" - requires ")
    names = [re.split(r"[<>=!~ ]", part.strip())[0] for part in needs.split(" and ")]
    names = [_PIP_NAMES.get(n, n) for n in names if n] or [_PIP_NAMES.get(plugin, plugin)]
    return " ".join(names)


def group_series(headers: Sequence[Header]) -> tuple[list[Series], list[str]]:
    """Image series among ``headers``; the other objects are named in the notes.

    Raises:
        InputError: nothing among them is an image (the message says what they are), or
            the images cannot be decoded here (the message names the package that would).
    """
    by_uid: dict[str, Series] = {}
    refused: list[str] = []
    for h in headers:
        why = what_it_is(h.ds) or decode_problem(h.ds)
        if why:
            refused.append(f"{h.path.name}: {why}")
            continue
        by_uid.setdefault(h.series_uid, Series(h.series_uid)).headers.append(h)
    if not by_uid:
        more = f" (and {len(refused) - 1} more like it)" if len(refused) > 1 else ""
        raise InputError(refused[0] + more)
    notes = []
    if refused:
        notes.append(
            f"not read: {refused[0]}" + (f" (+{len(refused) - 1} more)" if len(refused) > 1 else "")
        )
    return list(by_uid.values()), notes
