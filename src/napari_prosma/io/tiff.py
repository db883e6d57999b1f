"""TIFF reading (tifffile): resolution tags, ImageJ and OME metadata, one series at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..preprocess import InputError
from .checks import _corrupt, _positive, _quiet, check_decoded_size
from .image import ImageData, _classify, _diag_affine

_MM_PER_UNIT = {2: 25.4, 3: 10.0}  # TIFF ResolutionUnit INCH, CENTIMETER -> mm
#: OME length units (``PhysicalSizeXUnit``; the OME default is µm) in mm.
_OME_UNIT_MM = {
    "m": 1e3,
    "cm": 10.0,
    "mm": 1.0,
    "µm": 1e-3,
    "\u03bcm": 1e-3,
    "um": 1e-3,
    "nm": 1e-6,
    "pm": 1e-9,
    "Å": 1e-7,
    "in": 25.4,
}


def _read_tiff(p: Path, series: int | None = None) -> ImageData:
    import tifffile

    warnings: list[str] = []
    try:
        with _quiet("tifffile"), tifffile.TiffFile(p) as tf:
            if not tf.series:
                raise ValueError("no image in the file")
            _check_series_kind(tf, tf.series[0])
            if series is None and len(tf.series) > 1:
                raise InputError(_series_list(p, tf.series))
            k = series or 0
            if not 0 <= k < len(tf.series):
                raise InputError(f"{p.name} has no image series {k} (it has {len(tf.series)})")
            s = tf.series[k]
            page = s.keyframe
            check_decoded_size(p, tuple(s.shape), s.dtype.itemsize, _tiff_compression(page))
            a = np.asarray(s.asarray())
            axes = s.axes
            tags = page.tags
            xres = tags["XResolution"].value if "XResolution" in tags else None
            yres = tags["YResolution"].value if "YResolution" in tags else None
            runit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
            ij = tf.imagej_metadata or {}
            if not ij and tf.shaped_metadata:  # tifffile's own JSON (non-ImageJ dtypes)
                ij = {k: v for k, v in tf.shaped_metadata[0].items() if k in ("spacing", "unit")}
            ome = _ome_sizes(tf.ome_metadata, k, warnings) if tf.is_ome else {}
    except InputError:
        raise
    except Exception as e:
        raise _corrupt(p, "TIFF", e) from None
    a, kind, more, axes = _classify(p, a, rgb_last=axes.endswith("S"), axes=axes)
    warnings += more
    meta: dict[str, Any] = {"tiff_resolution": (xres, yres), "tiff_resolutionunit": runit}
    if series is not None:
        meta["tiff_series"] = (k, None)
    sy, sx, unit = _tiff_pixel_size(xres, yres, runit, ij, warnings)
    if "X" in ome and "Y" in ome:
        sy, sx, unit = ome["Y"], ome["X"], "mm"
        meta["spacing_from"] = "ome"
    if kind == "volume":
        sz = _tiff_slice_spacing(ij, ome, axes, unit, warnings)
        spacing: tuple[float, ...] = (sz, sy, sx)
    else:
        spacing = (sy, sx)
    origin = (0.0,) * len(spacing)
    return ImageData(
        a,
        kind,
        spacing,
        origin,
        _diag_affine(spacing, origin),
        unit=unit,
        format="tiff",
        meta=meta,
        warnings=warnings,
    )


def _tiff_series_count(p: Path) -> int:
    import tifffile

    try:
        with _quiet("tifffile"), tifffile.TiffFile(p) as tf:
            return len(tf.series)
    except Exception:  # read_image names the problem
        return 1


def _series_list(p: Path, series: list[Any]) -> str:
    rows = []
    for k, s in enumerate(series[:8]):
        name = f" {s.name!r}" if getattr(s, "name", "") else ""
        rows.append(f"{k}: {'×'.join(map(str, s.shape))} {s.dtype} ({s.axes}){name}")
    more = f"; and {len(series) - 8} more" if len(series) > 8 else ""
    return (
        f"{p.name} holds {len(series)} image series ({'; '.join(rows)}{more}); only one can be "
        "segmented at a time: open the file in napari (one layer per series) or save each "
        "series as its own file"
    )


def _check_series_kind(tf: Any, s: Any) -> None:
    """Refuse a TIFF whose ImageJ/OME/shaped metadata tifffile could not follow: it then
    falls back to reading the pages it finds (a truncated ImageJ stack became one slice)."""
    declared = [k for k in ("shaped", "ome", "imagej") if getattr(tf, f"is_{k}", False)]
    if declared and str(s.kind).lower() not in declared:
        raise ValueError(f"its {declared[0]} metadata describe pages that are not all there")


def _tiff_compression(page: Any) -> str | None:
    """The key of ``_MAX_RATIO`` for a TIFF page's compression (None: unbounded)."""
    code = int(getattr(page, "compression", 1))
    return {1: "none", 5: "lzw", 8: "deflate", 32946: "deflate", 32773: "packbits"}.get(code)


def _ome_sizes(xml: str | None, index: int, warnings: list[str]) -> dict[str, float]:
    """PhysicalSizeX/Y/Z (in mm) of the ``index``-th OME image, by axis letter."""
    import xml.etree.ElementTree as ET

    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        warnings.append("its OME metadata could not be parsed; physical sizes were ignored")
        return {}
    pixels = [e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"]
    if index >= len(pixels):
        return {}
    out: dict[str, float] = {}
    for ax in "XYZ":
        raw = pixels[index].get(f"PhysicalSize{ax}")
        if raw is None:
            continue
        unit = pixels[index].get(f"PhysicalSize{ax}Unit", "µm")
        v = _positive(raw)
        if v is None or unit not in _OME_UNIT_MM:
            what = f"{raw!r}" if v is None else f"{raw} {unit} (unit not understood)"
            warnings.append(f"its OME PhysicalSize{ax} {what} was ignored")
            continue
        out[ax] = v * _OME_UNIT_MM[unit]
    return out


def _tiff_pixel_size(
    xres: Any, yres: Any, runit: int, ij: dict[str, Any], warnings: list[str]
) -> tuple[float, float, str | None]:
    """``(y, x, unit)`` from the resolution tags and ImageJ's unit (1, 1, None: unknown)."""

    def per_px(r: Any) -> float | None:
        if r is None:
            return None
        num, den = (r, 1) if np.isscalar(r) else r
        v = _positive(float(den) / float(num)) if float(num) else None
        if v is None:
            warnings.append(
                f"its resolution tag {r} is unusable; the pixel size is unknown and taken as 1"
            )
        return v

    sx, sy = per_px(xres), per_px(yres)
    unit: str | None = None
    if ij.get("unit") and str(ij["unit"]).lower() not in ("pixel", "pixels", ""):
        unit = {"micron": "um", "\\u00B5m": "um", "µm": "um"}.get(str(ij["unit"]), str(ij["unit"]))
    elif runit in _MM_PER_UNIT and sx and sy and (xres, yres) != ((1, 1), (1, 1)):
        sx, sy, unit = sx * _MM_PER_UNIT[runit], sy * _MM_PER_UNIT[runit], "mm"
    return sy or 1.0, sx or 1.0, unit


def _tiff_slice_spacing(
    ij: dict[str, Any], ome: dict[str, float], axes: str, unit: str | None, warnings: list[str]
) -> float:
    """The slice spacing of a TIFF volume: OME PhysicalSizeZ (mm), else ImageJ's."""
    if "Z" in ome and axes[:1] in ("Z", ""):
        if unit == "mm":  # X and Y came from the OME metadata too
            return ome["Z"]
        warnings.append("its OME PhysicalSizeZ was ignored: the pixel size in x/y is not given")
    if "spacing" in ij:
        sz = _positive(ij["spacing"])
        if sz is not None:
            return sz
        warnings.append(
            f"the slice spacing in its metadata ({ij['spacing']!r}) is unusable; it is "
            "unknown and was taken as 1"
        )
        return 1.0
    warnings.append("the slice spacing is unknown and was taken as 1")
    return 1.0
