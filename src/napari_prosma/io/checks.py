"""Checks a reader makes before it trusts a file: sizes its header promises, the
geometry of a NIfTI header, plain messages for corrupt files, quiet libraries."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..preprocess import InputError

#: Voxel sizes a NIfTI scan can plausibly have (mm): from micro-CT to the thickest slices.
NIFTI_SPACING_MM = (1e-3, 20.0)
#: How much larger than its file a decoded image can be, by compression (deflate is bounded
#: by 1032:1, LZW with 12-bit codes by about 2600:1, PackBits by 64:1); None: no bound known.
_MAX_RATIO = {"none": 1.0, "deflate": 1032.0, "lzw": 2600.0, "packbits": 64.0}


def _corrupt(p: Path, what: str, e: BaseException) -> InputError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if detail.startswith("Could not find a backend"):  # imageio: no decoder took it
        detail = f"not a {what} file"
    return InputError(f"{p.name} could not be read as {what}: corrupt or truncated ({detail})")


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a library's logger (its complaints about a bad file would reach stderr
    beside the one plain message the user gets)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _positive(v: Any) -> float | None:
    """``v`` as a finite positive float, else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _nbytes_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _memory_bytes() -> int | None:
    """Physical memory of this computer, or None where the system does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - e.g. Windows
        return None


def check_decoded_size(
    p: Path,
    shape: tuple[int, ...],
    itemsize: int,
    compression: str | None,
    out_itemsize: int = 0,
) -> None:
    """Refuse a header that promises more data than its file can hold, or more memory
    than this computer has, before anything is allocated.

    Args:
        p: the file (its size on disk bounds what it can hold).
        shape: the array shape its header states.
        itemsize: bytes per value as stored.
        compression: a key of ``_MAX_RATIO`` (``"none"``, ``"deflate"``, ...), or None for
            a compression whose expansion has no known bound (only memory is checked).
        out_itemsize: bytes per value once decoded, when larger (scaled NIfTI: float64).

    Raises:
        InputError: corrupt/truncated header, or an image too large for memory.
    """
    n = math.prod(int(s) for s in shape)
    stored = n * int(itemsize)
    ratio = _MAX_RATIO.get(compression) if compression else None
    size = p.stat().st_size
    if ratio is not None and stored > size * ratio + (65536 if ratio > 1 else 0):
        raise InputError(
            f"{p.name} could not be read: its header describes {'×'.join(map(str, shape))} "
            f"values ({_nbytes_text(stored)}), more than a file of {_nbytes_text(size)} can "
            "hold: corrupt or truncated"
        )
    need = n * max(int(itemsize), int(out_itemsize))
    mem = _memory_bytes()
    if mem and need > mem // 2:
        raise InputError(
            f"{p.name} ({'×'.join(map(str, shape))} values) would need {_nbytes_text(need)} "
            f"of memory, more than half of this computer's {_nbytes_text(mem)}; crop or "
            "downsample it first"
        )


def check_nifti_geometry(p: Path, hdr: Any, affine: np.ndarray, n: int, mm: float) -> None:
    """Refuse a NIfTI whose geometry is absurd, naming the header field at fault.

    Args:
        p: the file (for the message).
        hdr: its header as stored (nibabel's loader replaces a 0 pixdim by 1, silently).
        affine: the ``4×4`` affine nibabel chose (sform, else qform, else from pixdim).
        n: spatial axes in use (2 or 3).
        mm: millimetres per header unit.

    Raises:
        InputError: a NaN, zero, negative or implausible voxel size (outside
            :data:`NIFTI_SPACING_MM`), a non-finite or degenerate affine.
    """
    source = (
        "sform" if int(hdr["sform_code"]) > 0 else "qform" if int(hdr["qform_code"]) > 0 else ""
    )
    if source != "sform":  # the affine comes from pixdim, where nibabel turns 0 into 1
        pixdim = [float(v) for v in hdr["pixdim"][1 : n + 1]]
        bad = [v for v in pixdim if not (math.isfinite(v) and v > 0)]
        if bad:
            raise InputError(
                f"{p.name}: its header gives the voxel size (pixdim) as "
                f"{'×'.join(f'{v:g}' for v in pixdim)}; a size of {bad[0]:g} is not a real "
                "voxel size, so the scan's geometry is unknown: fix the header"
            )
    where = f"its {source} affine" if source else "its pixdim"
    cols = affine[:3, :n]  # the world step of each voxel axis in use
    if not np.isfinite(cols).all() or not np.isfinite(affine[:3, 3]).all():
        raise InputError(f"{p.name}: {where} holds NaN or infinite values: fix the header")
    sizes = np.linalg.norm(cols, axis=0) * mm
    lo, hi = NIFTI_SPACING_MM
    text = "×".join(f"{v:.4g}" for v in sizes)
    if not ((sizes >= lo) & (sizes <= hi)).all():
        raise InputError(
            f"{p.name}: {where} gives a voxel size of {text} mm, which no scan has (expected "
            f"{lo:g} to {hi:g} mm per voxel); fix the header"
            + (f" (its unit is {hdr.get_xyzt_units()[0]!r})" if mm != 1.0 else "")
        )
    sv = np.linalg.svd(cols / np.linalg.norm(cols, axis=0), compute_uv=False)
    if sv[-1] <= 1e-6:
        raise InputError(f"{p.name}: {where} is degenerate (its axes are parallel): fix the header")
