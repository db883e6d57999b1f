"""Input checks, channel layout and intensity normalisation shared by training, inference
and fine-tuning, so a model always sees images prepared the way its card says.

Normalisation specs (``ModelCard.normalization``):

- ``{"mode": "fixed", "scale": 255, "mean": [...], "std": [...]}``: ``(x / scale - mean) / std``
  per channel (8-bit photos: endoscopy, histology, ultrasound).
- ``{"mode": "zscore", "nonzero": false}``: per-image, per-channel ``(x - mean) / std``
  (MRI); with ``nonzero`` the statistics come from voxels != 0 only.
- ``{"mode": "ct_window", "window": [lo, hi]}``: clip Hounsfield units to the window and
  scale to [0, 1] (CT).
- ``{"mode": "percentile", "lower": 0.5, "upper": 99.5}``: per-image percentiles to [0, 1].
- ``{"mode": "none"}``: cast to float32 only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InputError  # lives in errors.py; re-exported here

NORMALIZATION_MODES = ("fixed", "zscore", "ct_window", "percentile", "none")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def check_finite(image: np.ndarray, what: str = "the image") -> None:
    """Refuse empty, non-numeric and NaN/Inf images with a plain message."""
    if image.size == 0:
        raise InputError(f"{what} is empty (shape {image.shape})")
    if image.dtype.kind not in "biuf":
        raise InputError(f"{what} has data type {image.dtype}, not numbers")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        n = int((~np.isfinite(image)).sum())
        raise InputError(f"{what} contains {n} NaN or infinite value(s); fix or mask them first")


def _guess_channels(a: np.ndarray, in_channels: int, spatial_dims: int) -> np.ndarray:
    """``a`` channel-first, its channel axis guessed from its shape (see
    :func:`to_channel_first`)."""
    if a.ndim == spatial_dims:
        a = a[None]
    elif spatial_dims == 2 and a.ndim == 3 and a.shape[-1] in (3, 4):
        a = np.moveaxis(a, -1, 0)
    elif spatial_dims == 2 and a.ndim == 3 and a.shape[0] in (1, 3, 4):
        pass
    elif spatial_dims == 3 and a.ndim == 4 and a.shape[0] == in_channels:
        pass
    elif spatial_dims == 3 and a.ndim == 4:
        raise InputError(
            f"this model segments a 3D volume (D, H, W) with {in_channels} channel(s); the "
            f"data has shape {a.shape}: a series of {a.shape[0]} volumes (time points or "
            "channels). Segment one volume at a time"
        )
    else:
        kind = (
            "2D image (H, W) or colour image (H, W, 3)"
            if spatial_dims == 2
            else ("3D volume (D, H, W)")
        )
        raise InputError(
            f"this model segments a {kind}; the data has shape {a.shape}"
            + (" (for a volume, segment one slice at a time)" if spatial_dims == 2 else "")
            + (" (a 2D image needs a 2D model)" if spatial_dims == 3 and a.ndim == 2 else "")
        )
    return a


def to_channel_first(
    image: np.ndarray,
    in_channels: int,
    spatial_dims: int,
    channel_axis: int | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Bring an image to ``(C, *S)`` with ``C == in_channels``.

    Args:
        image: 2D grey ``(H, W)``, 2D colour ``(H, W, 3|4)`` or ``(3|4, H, W)``, a volume
            ``(D, H, W)``, a multi-channel volume ``(C, D, H, W)`` with ``C == in_channels``,
            or any of these with ``channel_axis`` given. A 4D series whose first axis does
            not match ``in_channels`` (time points) is refused, never averaged.
        in_channels: channels the model expects.
        spatial_dims: 2 or 3.
        channel_axis: axis holding channels, if any (guessed for 2D colour images).

    Returns:
        ``(array, notes)``: the channel-first array (input dtype) and plain-words notes of
        what was adapted (alpha dropped, colour made grey).

    Raises:
        InputError: the layout cannot be matched to the model.
    """
    notes: list[str] = []
    a = np.asarray(image)
    check_finite(a)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if channel_axis is None:
        a = _guess_channels(a, in_channels, spatial_dims)
    else:
        if a.ndim != spatial_dims + 1:
            raise InputError(
                f"with a channel axis the data needs {spatial_dims + 1} dimensions, has {a.ndim}"
            )
        a = np.moveaxis(a, channel_axis, 0)
    if min(a.shape[1:]) < 1:
        raise InputError(f"the image is empty (shape {image.shape})")
    c = a.shape[0]
    if spatial_dims == 2 and c == 4 and in_channels in (1, 3):  # RGBA photo
        a = a[:3]
        c = 3
        notes.append("the alpha channel was ignored")
    if c == in_channels:
        return a, notes
    if spatial_dims == 2 and c == 3 and in_channels == 1:
        if np.array_equal(a[0], a[1]) and np.array_equal(a[0], a[2]):
            return a[:1], notes
        notes.append("the colour image was converted to greyscale for this greyscale model")
        grey = np.tensordot(_LUMA, a.astype(np.float32), axes=1)[None]
        return grey, notes
    what = {1: "greyscale (1 channel)", 3: "colour (RGB, 3 channels)"}
    raise InputError(
        f"the model expects {what.get(in_channels, f'{in_channels} channels')} but the image "
        f"has {c} channel(s); choose a model made for this kind of image"
    )


def normalize(x: np.ndarray, spec: Mapping[str, Any] | None) -> np.ndarray:
    """Normalise a channel-first image ``(C, *S)`` as ``spec`` says; returns float32.

    Raises:
        InputError: an unknown mode, a spec that does not fit the channels, or values too
            large for 32-bit floats (the result would hold infinities or NaN).
    """
    spec = dict(spec or {"mode": "none"})
    mode = spec.get("mode", "none")
    if mode not in NORMALIZATION_MODES:
        raise InputError(f"unknown normalisation mode {mode!r}; known: {NORMALIZATION_MODES}")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        out = _normalize(np.asarray(x, dtype=np.float32), spec, mode)
    if not np.isfinite(out).all():  # e.g. float64 values beyond the float32 range
        raise InputError(
            "the image's values are too large to compute with (beyond ±3.4e38 as 32-bit "
            "floats); rescale the image first"
        )
    return out


def _per_channel(values: Any, default: float, c: int, ndim: int) -> np.ndarray:
    """One value per channel, shaped to broadcast over ``(C, *S)``."""
    v = np.asarray(values if values is not None else [default] * c, dtype=np.float32)
    if v.size == 1:
        v = np.repeat(v, c)
    if v.size != c:
        raise InputError(f"normalisation lists {v.size} values for {c} channel(s)")
    return v.reshape((c,) + (1,) * (ndim - 1))


def _normalize(x: np.ndarray, spec: dict[str, Any], mode: str) -> np.ndarray:
    c = x.shape[0]
    if mode == "fixed":
        scale = float(spec.get("scale", 255.0))
        mean = _per_channel(spec.get("mean"), 0.0, c, x.ndim)
        std = _per_channel(spec.get("std"), 1.0, c, x.ndim)
        return (x / scale - mean) / std
    if mode == "zscore":
        out = np.empty_like(x)
        for i in range(c):
            ch = x[i]
            vals = ch[ch != 0] if spec.get("nonzero") and np.any(ch != 0) else ch
            # statistics in float64: a float32 variance of large values overflows to inf
            mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
            out[i] = (ch - mean) / max(std, 1e-8)
        return out
    if mode == "ct_window":
        lo, hi = (float(v) for v in spec.get("window", (-1000.0, 1000.0)))
        return (np.clip(x, lo, hi) - lo) / max(hi - lo, 1e-8)
    if mode == "percentile":
        lo_p, hi_p = float(spec.get("lower", 0.5)), float(spec.get("upper", 99.5))
        out = np.empty_like(x)
        for i in range(c):
            lo, hi = np.percentile(x[i], [lo_p, hi_p])
            out[i] = np.clip((x[i] - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
        return out
    return x  # "none"


#: Unsigned integer types whose bit depth the data type itself tells (8- and 16-bit files).
_BIT_DEPTHS = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}


def match_bit_depth(
    image: np.ndarray, spec: Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, list[str]]:
    """Fit a ``"fixed"`` normalisation's ``scale`` to the bit depth of ``image``.

    A model trained on 8-bit images (``scale`` 255) given a 16-bit image whose values go
    beyond 255 (a 16-bit PNG or TIFF) divides by 65535 instead, so the image keeps the
    brightness the model knows; a 16-bit model (``scale`` 65535) given an 8-bit image
    divides by 255. A 16-bit image whose values all fit in 0..255 holds 8-bit values and is
    left as it is. Other modes (z-score, percentile, CT window) do not depend on the bit
    depth and are returned unchanged.

    Args:
        image: the image as given, any layout (only its data type and values are used).
        spec: the model card's normalisation.

    Returns:
        ``(spec, notes)``: the spec to use (a copy when changed) and what was done.
    """
    if not spec or spec.get("mode") != "fixed" or image.size == 0:
        return (None if spec is None else dict(spec)), []
    scale = float(spec.get("scale", 255.0))
    model_bits = {255.0: 8, 65535.0: 16}.get(scale)
    bits = _BIT_DEPTHS.get(np.asarray(image).dtype)
    if model_bits is None or bits is None or bits == model_bits:
        return dict(spec), []
    hi = int(np.max(image))
    if bits > model_bits and hi <= scale:  # 8-bit values kept in a 16-bit file
        return dict(spec), []
    full = float(2**bits - 1)
    note = (
        f"the image holds {bits}-bit values (up to {hi}) and the model was trained on "
        f"{model_bits}-bit images: its values were divided by {full:g} instead of "
        f"{scale:g}, so that full scale means the same to the model"
    )
    return {**spec, "scale": full}, [note]


def prepare(
    image: np.ndarray,
    in_channels: int,
    spatial_dims: int,
    normalization: Mapping[str, Any] | None,
    channel_axis: int | None = None,
) -> tuple[np.ndarray, list[str]]:
    """:func:`to_channel_first` then :func:`normalize`: ``(C, *S)`` float32 and notes.

    A ``"fixed"`` normalisation is first fitted to the image's bit depth
    (:func:`match_bit_depth`): a 16-bit image is not divided by 255 as if it were 8-bit.
    """
    a, notes = to_channel_first(image, in_channels, spatial_dims, channel_axis)
    spec, depth_notes = match_bit_depth(np.asarray(image), normalization)
    return normalize(a, spec), notes + depth_notes
