"""Byte-level edits of real image files for the header and fuzz tests: NIfTI-1 header
fields written as stored (nibabel would fix a 0 pixdim on save), truncations, bit flips."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

#: NIfTI-1 header fields: name -> (byte offset, struct code, count).
NIFTI_FIELDS = {
    "dim": (40, "h", 8),
    "datatype": (70, "h", 1),
    "bitpix": (72, "h", 1),
    "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1),
    "scl_slope": (112, "f", 1),
    "scl_inter": (116, "f", 1),
    "qform_code": (252, "h", 1),
    "sform_code": (254, "h", 1),
    "quatern": (256, "f", 6),
    "srow_x": (280, "f", 4),
    "srow_y": (296, "f", 4),
    "srow_z": (312, "f", 4),
}


def read_bytes(path: Path) -> bytearray:
    """A file's bytes, decompressed when it ends in ``.gz``."""
    raw = path.read_bytes()
    return bytearray(gzip.decompress(raw) if path.name.endswith(".gz") else raw)


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data``, gzip-compressed when ``path`` ends in ``.gz``; returns ``path``."""
    path.write_bytes(gzip.compress(bytes(data), mtime=0) if path.name.endswith(".gz") else data)
    return path


def set_nifti_field(buf: bytearray, name: str, index: int, value: float) -> None:
    """Set element ``index`` of a NIfTI-1 header field in place (the header's own byte
    order; integer fields are clipped to int16)."""
    offset, code, count = NIFTI_FIELDS[name]
    if not 0 <= index < count:
        raise IndexError(f"{name} has {count} values")
    order = "<" if struct.unpack("<i", bytes(buf[:4]))[0] == 348 else ">"
    size = struct.calcsize(code)
    if code == "h":
        value = int(max(-32768, min(32767, value)))
    struct.pack_into(order + code, buf, offset + index * size, value)


def edit_nifti(src: Path, dst: Path, **fields: tuple[int, float] | list[tuple[int, float]]) -> Path:
    """Copy the NIfTI ``src`` to ``dst`` with header fields set, e.g.
    ``edit_nifti(a, b, pixdim=(3, 0.0), sform_code=(0, 0))``."""
    buf = read_bytes(src)
    for name, edits in fields.items():
        for index, value in edits if isinstance(edits, list) else [edits]:
            set_nifti_field(buf, name, index, value)
    return write_bytes(dst, buf)


def pixdim_only(src: Path, dst: Path, **fields: tuple[int, float]) -> Path:
    """:func:`edit_nifti` with the sform switched off and the qform on, so that the
    geometry comes from ``pixdim`` (and the quaternion)."""
    return edit_nifti(src, dst, sform_code=(0, 0), qform_code=(0, 1), **fields)


def flip_bits(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    """``data`` with bit ``b`` of byte ``i`` flipped for each ``(i, b)`` (``i`` taken modulo
    the length)."""
    out = bytearray(data)
    for i, b in flips:
        out[i % len(out)] ^= 1 << (b % 8)
    return bytes(out)
