"""Read images and volumes with their geometry; write labels and maps back with it.

Formats: PNG/JPEG (imageio), TIFF (tifffile, with its XResolution/YResolution and ImageJ
spacing), NIfTI ``.nii``/``.nii.gz`` (nibabel). Data come back in napari's axis order:
2D ``(H, W)`` grey or ``(H, W, 3)`` RGB, 3D ``(Z, Y, X)``.

NIfTI voxel arrays are indexed ``(i, j, k)``; napari shows ``(k, j, i)``, so the reader
reverses the axes and maps the affine to that order (world axes reversed too, so an
axis-aligned scan keeps a diagonal affine). The source affine and header are kept, and
:func:`write_labels` / :func:`write_image` give them back exactly.

Every write goes to a temporary file in the target folder that is then moved into place
(nothing half-written is ever left), and an existing file is never replaced unless
``overwrite=True``. Qt-free and torch-free.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings as pywarnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .preprocess import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES + PNG_SUFFIXES + JPEG_SUFFIXES
_MM_PER_UNIT = {2: 25.4, 3: 10.0}  # TIFF ResolutionUnit INCH, CENTIMETER -> mm
_NIFTI_UNIT_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3}
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
#: Voxel sizes a NIfTI scan can plausibly have (mm): from micro-CT to the thickest slices.
NIFTI_SPACING_MM = (1e-3, 20.0)
#: How much larger than its file a decoded image can be, by compression (deflate is bounded
#: by 1032:1, LZW with 12-bit codes by about 2600:1, PackBits by 64:1); None: no bound known.
_MAX_RATIO = {"none": 1.0, "deflate": 1032.0, "lzw": 2600.0, "packbits": 64.0}
#: EXIF orientation -> the numpy equivalent of what PIL.ImageOps.exif_transpose applies.
_EXIF_TRANSPOSE: dict[int, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    2: ("mirrored left-right", lambda a: a[:, ::-1]),
    3: ("rotated 180°", lambda a: a[::-1, ::-1]),
    4: ("mirrored top-bottom", lambda a: a[::-1]),
    5: ("flipped across its diagonal", lambda a: np.swapaxes(a, 0, 1)),
    6: ("rotated 90° clockwise", lambda a: np.rot90(a, -1)),
    7: ("flipped across its anti-diagonal", lambda a: np.swapaxes(a[::-1, ::-1], 0, 1)),
    8: ("rotated 90° counter-clockwise", lambda a: np.rot90(a, 1)),
}


@dataclass
class ImageData:
    """An image or volume in napari axis order, with the geometry it came with.

    Attributes:
        data: ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(Z, Y, X)`` volume.
        kind: ``"grey"``, ``"rgb"`` or ``"volume"``.
        spacing: voxel size per spatial axis, napari order (``(y, x)`` or ``(z, y, x)``).
        origin: world position of the first voxel, napari order (napari ``translate``).
        affine: ``(n+1, n+1)`` homogeneous index-to-world matrix in napari order
            (``n`` spatial axes); diagonal unless the scan is rotated or sheared.
        unit: unit of ``spacing``/``origin`` (``"mm"``, ``"um"``, ...) or None (pixels).
        path: the file it was read from, if any.
        format: ``"nifti"``, ``"tiff"``, ``"png"`` or ``"jpeg"``, or None.
        source_affine: NIfTI only: the file's own 4x4 affine (voxel ``(i, j, k)`` order).
        header: NIfTI only: the file's header (a ``nibabel.Nifti1Header``), restored on write.
        meta: format details a writer needs (NIfTI source shape, raw TIFF resolution tags).
        warnings: plain-words notes about what could not be shown or kept.
    """

    data: np.ndarray
    kind: str
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    affine: np.ndarray
    unit: str | None = None
    path: Path | None = None
    format: str | None = None
    source_affine: np.ndarray | None = None
    header: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the RGB axis: ``(H, W)`` or ``(Z, Y, X)``."""
        return tuple(self.data.shape[:2] if self.kind == "rgb" else self.data.shape)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.spatial_shape)

    def layer_kwargs(self) -> dict[str, Any]:
        """napari layer keyword arguments (``scale``, ``translate``, ``metadata``, ``rgb``)."""
        kw: dict[str, Any] = {
            "scale": tuple(self.spacing),
            "translate": tuple(self.origin),
            "metadata": {
                "affine": self.affine.copy(),
                "unit": self.unit,
                "path": str(self.path) if self.path else None,
                "warnings": list(self.warnings),
            },
        }
        if self.kind == "rgb":
            kw["rgb"] = True
        return kw


def from_array(data: np.ndarray, spacing: tuple[float, ...] | None = None) -> ImageData:
    """Wrap a bare array (2D grey, ``(H, W, 3)`` RGB or 3D volume) with unit geometry."""
    a = np.asarray(data)
    kind = (
        "rgb"
        if a.ndim == 3 and a.shape[-1] in (3, 4) and spacing is None
        else ("grey" if a.ndim == 2 else "volume")
    )
    n = 2 if kind in ("grey", "rgb") else 3
    sp = tuple(float(s) for s in (spacing or (1.0,) * n))
    return ImageData(a, kind, sp, (0.0,) * n, _diag_affine(sp, (0.0,) * n))


def _diag_affine(spacing: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    n = len(spacing)
    a = np.eye(n + 1)
    a[:n, :n] = np.diag(spacing)
    a[:n, n] = origin
    return a


def suffix_of(path: str | os.PathLike[str]) -> str:
    """Lower-case suffix, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | os.PathLike[str]) -> str:
    """File name without its (possibly double, ``.nii.gz``) suffix."""
    name = Path(path).name
    suf = suffix_of(path)
    return name[: len(name) - len(suf)] if suf else name


def is_supported(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`read_image` knows the file's format by its suffix."""
    return suffix_of(path) in SUPPORTED_SUFFIXES


# ---------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike[str], series: int | None = None) -> ImageData:
    """Read a PNG, JPEG, TIFF or NIfTI file with its geometry.

    Args:
        path: the file.
        series: TIFF only: which image series to read. A TIFF holding several series is
            refused unless one is named (:func:`read_series` reads them all).

    Raises:
        FileNotFoundError: no such file.
        InputError: an unsupported format, or a corrupt/truncated/unusable file (the
            message names the file).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        if p.is_dir():
            raise InputError(f"{p} is a folder, not an image file")
        raise FileNotFoundError(2, "no such file", str(p))
    suf = suffix_of(p)
    if suf in NIFTI_SUFFIXES:
        img = _read_nifti(p)
    elif suf in TIFF_SUFFIXES:
        img = _read_tiff(p, series)
    elif suf in PNG_SUFFIXES + JPEG_SUFFIXES:
        img = _read_plain(p, "png" if suf in PNG_SUFFIXES else "jpeg")
    else:
        raise InputError(
            f"{p.name}: unsupported format {suf or '(no suffix)'}; "
            "use PNG, JPEG, TIFF or NIfTI (.nii, .nii.gz)"
        )
    img.path = p
    if img.data.size == 0:
        raise InputError(f"{p.name} holds an empty image (shape {img.data.shape})")
    return img


def read_series(path: str | os.PathLike[str]) -> list[ImageData]:
    """Every image series of a file, in order: several for a multi-series TIFF (each
    with ``meta["tiff_series"] = (index, count)``), else the one image."""
    p = Path(path).expanduser()
    n = _tiff_series_count(p) if suffix_of(p) in TIFF_SUFFIXES and p.is_file() else 1
    if n <= 1:
        return [read_image(p)]
    out = []
    for k in range(n):
        img = read_image(p, series=k)
        img.meta["tiff_series"] = (k, n)
        out.append(img)
    return out


def _corrupt(p: Path, what: str, e: BaseException) -> InputError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if detail.startswith("Could not find a backend"):  # imageio: no decoder took it
        detail = f"not a {what} file"
    return InputError(f"{p.name} could not be read as {what}: corrupt or truncated ({detail})")


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


def _classify(
    p: Path, a: np.ndarray, rgb_last: bool, axes: str = ""
) -> tuple[np.ndarray, str, list[str], str]:
    """Squeeze singleton axes and decide grey / rgb / volume.

    Returns ``(array, kind, warnings, axes)``: ``axes`` is ``axes`` (one letter per input
    axis, e.g. tifffile's ``"ZYX"``) with the squeezed axes dropped, or ``""``.
    """
    warnings: list[str] = []
    if a.ndim > 2:
        # keep the two image axes (and the colour axis): a 1-pixel or 1-row RGB image
        # (1, 1, 3) / (1, W, 3) must not become a grey (1, 3) / (W, 3) image
        colour = rgb_last and a.shape[-1] in (3, 4)
        last = a.ndim - (3 if colour else 2)
        keep = [i for i, s in enumerate(a.shape) if s != 1 or i >= last]
        if len(axes) == a.ndim:
            axes = "".join(axes[i] for i in keep)
        a = a.reshape([a.shape[i] for i in keep])
    if len(axes) != a.ndim:
        axes = ""
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.ndim == 2:
        return a, "grey", warnings, axes
    if a.ndim == 3 and rgb_last and a.shape[-1] in (3, 4):
        if a.shape[-1] == 4:
            warnings.append("the alpha (transparency) channel was dropped")
            a = a[..., :3]
        return a, "rgb", warnings, axes
    if a.ndim == 3:
        return a, "volume", warnings, axes
    raise InputError(
        f"{p.name} has {a.ndim} dimensions (shape {a.shape}); only 2D images and 3D volumes "
        "are supported (split time series or channels first)"
    )


def exif_orientation(path: str | os.PathLike[str]) -> int:
    """The EXIF orientation tag of a JPEG or PNG (1, the default, when it has none)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            raw = im.info.get("exif")  # a PNG's eXIf chunk after the pixels is not sought
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(0x0112, 1) or 1)
    except Exception:  # unreadable EXIF: the pixels are read (or refused) on their own
        return 1


def _read_plain(p: Path, fmt: str) -> ImageData:
    import imageio.v3 as iio
    from PIL import Image

    try:
        a = np.asarray(iio.imread(p))  # imageio ignores the EXIF orientation (rotate=False)
    except Image.DecompressionBombError as e:
        raise InputError(f"{p.name} is too large to read safely ({e})") from None
    except Exception as e:
        raise _corrupt(p, fmt.upper(), e) from None
    if a.ndim == 3 and a.shape[-1] == 2:  # grey + alpha
        a = a[..., 0]
    notes: list[str] = []
    orientation = exif_orientation(p) if a.ndim in (2, 3) else 1
    if orientation in _EXIF_TRANSPOSE:
        what, transpose = _EXIF_TRANSPOSE[orientation]
        a = np.ascontiguousarray(transpose(a))
        notes.append(
            f"the image was {what}, as its EXIF orientation tag ({orientation}) asks, so that "
            "it and its labels look as image viewers show the file"
        )
    a, kind, warnings, _ = _classify(p, a, rgb_last=True)
    if kind == "volume":  # animated PNG / multi-frame: refuse rather than guess
        raise InputError(f"{p.name} holds several frames; save one frame per file")
    img = from_array(a)
    img.kind, img.format, img.warnings = kind, fmt, notes + warnings
    if orientation != 1:
        img.meta["exif_orientation"] = orientation
    return img


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


def _positive(v: Any) -> float | None:
    """``v`` as a finite positive float, else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


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


def _read_nifti(p: Path) -> ImageData:
    import nibabel as nib

    try:
        # nibabel logs the header fixes it makes (checked below) and warns about NaN maths
        with _quiet("nibabel.global"), pywarnings.catch_warnings(), np.errstate(all="ignore"):
            pywarnings.simplefilter("ignore")
            img = nib.load(str(p))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(f"{p.name} is not a NIfTI-1/2 image")
        with nib.openers.ImageOpener(str(p)) as f:  # as stored: load() turns pixdim 0 into 1
            raw = type(img.header).from_fileobj(f, check=False)
        hdr = img.header
        slope, inter = hdr.get_slope_inter()
        scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
        check_decoded_size(
            p,
            tuple(img.shape),
            img.get_data_dtype().itemsize,
            "deflate" if suffix_of(p) == ".nii.gz" else "none",
            out_itemsize=8 if scaled else 0,
        )
        a = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except Exception as e:
        raise _corrupt(p, "NIfTI", e) from None
    if a.dtype.fields is not None:
        raise InputError(f"{p.name} holds RGB/structured NIfTI data, which is not supported")
    src_shape = a.shape
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim > 3:
        raise InputError(
            f"{p.name} is a {a.ndim}D NIfTI (shape {src_shape}); only 2D images and 3D "
            "volumes are supported (split the time points or channels first)"
        )
    src_affine = np.asarray(img.affine, dtype=np.float64)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    n = a.ndim
    if n < 2:
        raise InputError(f"{p.name} has shape {src_shape}; it is not an image")
    unit_name = hdr.get_xyzt_units()[0]
    scale = _NIFTI_UNIT_MM.get(unit_name, 1.0)
    check_nifti_geometry(p, raw, src_affine, n, scale)
    a = np.ascontiguousarray(np.transpose(a))  # (i, j[, k]) -> ([k,] j, i)
    m = src_affine[:n, :n]
    rev = np.eye(n)[::-1]
    lin = rev @ m @ rev  # world axes reversed too: axis-aligned stays diagonal
    aff = np.eye(n + 1)
    aff[:n, :n] = lin
    aff[:n, n] = src_affine[:n, 3][::-1]
    spacing = tuple(float(v) * scale for v in np.linalg.norm(lin, axis=0))
    origin = tuple(float(v) * scale for v in aff[:n, n])
    warnings: list[str] = []
    off = lin - np.diag(np.diag(lin))
    if np.abs(off).max() > 1e-4 * max(np.abs(lin).max(), 1e-12):
        warnings.append(
            "the scan is stored rotated or sheared relative to the scanner axes; it is shown "
            "with its voxel spacing and origin only (the full affine is kept and restored on save)"
        )
    if n == 2 and np.abs(src_affine[:2, 2:3]).max() > 0 and src_shape[2:3] not in ((), (1,)):
        warnings.append("a 2D NIfTI with an unusual affine; the third axis was dropped")
    return ImageData(
        a,
        "volume" if n == 3 else "grey",
        spacing,
        origin,
        aff,
        unit="mm",
        format="nifti",
        source_affine=src_affine,
        header=img.header.copy(),
        meta={"nifti_shape": src_shape, "nifti_class": type(img).__name__},
        warnings=warnings,
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


# ---------------------------------------------------------------------------- writing


class WriteError(OSError):
    """A file could not be written in full (a writer library reported a short write, as
    on a full disk or past a file size limit); the message is meant for the user."""


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then move it into place.

    Args:
        path: final file name.
        write: writes the whole file to the path it is given (same suffix as ``path``).
        overwrite: replace an existing file; otherwise an existing ``path`` is an error and
            a file that appears meanwhile is never clobbered.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists already; it is never overwritten (choose another output or "
            "pass overwrite / --overwrite)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{stem_of(path)}.", suffix=".tmp" + suffix_of(path), dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            write(tmp)
        except OSError as e:
            if e.errno is not None:  # the system's own error says what happened
                raise
            detail = str(e).strip() or type(e).__name__
            raise WriteError(
                f"{path.name} could not be written in full ({detail}): the disk may be full "
                "or the file too large; nothing was kept"
            ) from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobber
            except FileExistsError:
                raise FileExistsError(f"{path} appeared while writing; left untouched") from None
            except OSError:  # no hard links on this file system
                if path.exists():
                    raise FileExistsError(f"{path} exists already; left untouched") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
