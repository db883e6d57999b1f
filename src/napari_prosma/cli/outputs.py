"""What ``prosma predict`` reads and writes, and how it keeps the two apart.

Three rules protect the user's files:

1. **An output never replaces an input of the same run.** Every output path of every input
   is known before anything is read (it follows from the file's name and suffix), and a
   run in which one of them is also an input (same path, or the same file through a link)
   is refused before any work, whatever ``--overwrite`` says.
2. **Outputs are recognised by a record, not by their names.** Each output folder holds
   :data:`MANIFEST`, a JSON list of the files ``prosma predict`` wrote there with their
   size and sha256. A later run that lists that folder as input skips those files (and
   says so), also when one was renamed inside the folder (its sha256 is in the record); a
   user's own ``scan_labels.png`` is not in the record and is read like any image. A name
   pattern (``*_labels.png``) would both hide the user's own masks and miss renamed outputs.
   An output moved to a folder without the record is not recognised.
3. **``--overwrite`` replaces only earlier outputs.** An existing file is replaced only if
   the record says ``prosma predict`` wrote it and its bytes are unchanged since; a file the
   user made or edited (a corrected label map) is never replaced.

The record is updated under a lock on its folder (where the system has ``flock``) and
written atomically, so two runs into one folder do not lose each other's entries.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The record of ``prosma predict``'s outputs in an output folder.
MANIFEST = "prosma_outputs.json"
MANIFEST_FORMAT = 1


# ---------------------------------------------------------------------------- names


def output_format(src: Path) -> str | None:
    """The format the reader will give ``src`` (by suffix): ``"nifti"``, ``"tiff"``,
    ``"png"``, ``"jpeg"`` or None. A DICOM series gives NIfTI (with the scanner's affine)
    when it is a volume, PNG for a single image."""
    from ..io import JPEG_SUFFIXES, NIFTI_SUFFIXES, PNG_SUFFIXES, TIFF_SUFFIXES, suffix_of

    series = getattr(src, "series", None)
    if series is not None:
        return "nifti" if len(series.headers) > 1 else "png"

    suf = suffix_of(src)
    for fmt, sufs in (
        ("nifti", NIFTI_SUFFIXES),
        ("tiff", TIFF_SUFFIXES),
        ("png", PNG_SUFFIXES),
        ("jpeg", JPEG_SUFFIXES),
    ):
        if suf in sufs:
            return fmt
    return None


def output_paths(
    src: Path,
    kind_fmt: str | None,
    out_dir: Path,
    *,
    probabilities: bool = False,
    tta: bool = False,
    gates: bool = False,
    dicom_seg: bool = False,
) -> dict[str, Path]:
    """Where the outputs of ``src`` go: labels always, the rest when asked for.

    Labels keep the input's kind (NIfTI, TIFF, else PNG); maps are NIfTI for NIfTI input
    and TIFF otherwise.
    """
    from ..io import stem_of

    stem = stem_of(src)
    nifti = kind_fmt == "nifti"
    lab_ext = ".nii.gz" if nifti else (".tif" if kind_fmt == "tiff" else ".png")
    map_ext = ".nii.gz" if nifti else ".tif"
    paths = {"labels": out_dir / f"{stem}_labels{lab_ext}"}
    if dicom_seg:  # a DICOM Segmentation referencing the source series (issue 17)
        paths["labels"] = out_dir / f"{stem}_seg.dcm"
    if probabilities:
        paths["probabilities"] = out_dir / f"{stem}_probabilities{map_ext}"
    if tta:
        paths["uncertainty"] = out_dir / f"{stem}_uncertainty{map_ext}"
    if gates:
        paths["gates_psi"] = out_dir / f"{stem}_gates_psi{map_ext}"
        paths["gates_zero"] = out_dir / f"{stem}_gates_zero{map_ext}"
        paths["gates_json"] = out_dir / f"{stem}_gates.json"
    return paths


def _identity(p: Path) -> tuple[Any, ...]:
    """What makes two paths the same file: device and inode when it exists, else the
    absolute path."""
    try:
        st = p.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(p.resolve()))


def refuse_outputs_over_inputs(plans: Iterable[tuple[Path, dict[str, Path]]]) -> None:
    """Refuse a run in which an output of one input is another (or the same) input.

    Raises:
        UserError: naming the input whose output would replace which input.
    """
    from ..errors import UserError
    from .text import printable

    plans = [(Path(os.fspath(src)), paths) for src, paths in plans]  # DICOM series: a path
    inputs = {}
    for src, _ in plans:
        inputs[_identity(src)] = src
        inputs[("path", str(src.resolve()))] = src
    for src, paths in plans:
        for p in paths.values():
            hit = inputs.get(_identity(p)) or inputs.get(("path", str(p.resolve())))
            if hit is not None:
                raise UserError(
                    f"the outputs of {printable(src.name)} would replace {printable(hit)}, "
                    "which is an input of this run; nothing was written: choose another "
                    "output folder (-o)"
                )


# ---------------------------------------------------------------------------- record


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The files ``prosma predict`` recorded in ``folder`` (name -> entry); empty when
    there is no record or it cannot be read."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return (
        {str(k): v for k, v in files.items() if isinstance(v, dict)}
        if isinstance(files, dict)
        else {}
    )


def is_own_output(path: Path, manifest: dict[str, dict[str, Any]] | None = None) -> bool:
    """Whether ``path`` is a file ``prosma predict`` wrote into its folder and nobody
    changed since (under its own name, or renamed: its size and sha256 are recorded)."""
    record = read_manifest(path.parent) if manifest is None else manifest
    if not record:
        return False
    try:
        size = path.stat().st_size
        entry = record.get(path.name)
        if entry is not None and entry.get("size") == size:
            return file_sha256(path) == entry.get("sha256")
        same_size = {e.get("sha256") for e in record.values() if e.get("size") == size}
        return bool(same_size) and file_sha256(path) in same_size
    except OSError:
        return False


def refuse_existing(paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse outputs that exist, unless ``overwrite`` and they are earlier outputs.

    Raises:
        FileExistsError: naming the file and what to do.
    """
    for p in paths.values():
        if not p.exists():
            continue
        if not overwrite:
            raise FileExistsError(f"{p} exists already; it is never overwritten (use --overwrite)")
        if not is_own_output(p):
            raise FileExistsError(
                f"{p} exists and was not written by prosma predict (or was changed since); "
                "it is never replaced, even with --overwrite: choose another output folder"
            )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` across processes (``flock`` on the folder itself,
    so no lock file is left behind); no lock where the system has none."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def record_outputs(folder: Path, files: Iterable[Path], source: Path, model: str) -> None:
    """Add ``files`` (just written into ``folder``) to its record; entries of files that
    are gone are dropped."""
    from ..fs import atomic_write_bytes

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    new = {
        p.name: {
            "size": p.stat().st_size,
            "sha256": file_sha256(p),
            "source": str(source),
            "model": model,
            "written": now,
        }
        for p in files
    }
    with _locked(folder):
        entries = {k: v for k, v in read_manifest(folder).items() if (folder / k).exists()}
        entries.update(new)
        data = {"format": MANIFEST_FORMAT, "written_by": "prosma predict", "files": entries}
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        atomic_write_bytes(folder / MANIFEST, text.encode())


# ---------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The files a run segments, as ``(file, relative output folder)``, and the earlier
    outputs it skipped, by folder."""

    files: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: dict[Path, list[Path]] = field(default_factory=dict)


class _Lister:
    """Collects inputs, skipping recorded outputs (each folder's record read once)."""

    def __init__(self) -> None:
        self.found = Inputs()
        self._records: dict[Path, dict[str, dict[str, Any]]] = {}

    def add(self, f: Path, rel: Path) -> None:
        folder = f.parent
        if folder not in self._records:
            self._records[folder] = read_manifest(folder)
        if is_own_output(f, self._records[folder]):
            self.found.skipped.setdefault(folder, []).append(f)
        else:
            self.found.files.append((f, rel))


def collect_inputs(inputs: list[str]) -> Inputs:
    """Expand files and folders (one level of sub-folders) into the files to segment.

    Files named explicitly are kept whatever their suffix (a wrong one is reported later);
    inside folders only supported image files are taken, hidden files skipped. Files that
    an earlier ``prosma predict`` wrote (see the module docstring) are skipped everywhere.
    """
    from ..dicom.predict import is_dicom_input, series_inputs
    from ..io import is_supported

    def image(f: Path) -> bool:
        return f.is_file() and not f.name.startswith(".") and is_supported(f)

    lister = _Lister()
    for item in inputs:
        p = Path(item).expanduser()
        if is_dicom_input(p, nested=False):  # a DICOM file or folder: one input per series
            lister.found.files += [(s, Path()) for s in series_inputs(p)]
            continue
        if not p.is_dir():
            lister.add(p, Path())
            continue
        for child in sorted(p.iterdir()):
            if image(child):
                lister.add(child, Path())
            elif child.is_dir() and is_dicom_input(child):
                lister.found.files += [(s, Path(child.name)) for s in series_inputs(child)]
            elif child.is_dir() and not child.name.startswith("."):
                for f in sorted(child.iterdir()):
                    if image(f):
                        lister.add(f, Path(child.name))
    return lister.found
