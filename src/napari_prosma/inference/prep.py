"""Card-driven preparation on the device the network runs on.

:func:`prepare_on_device` gives what :func:`napari_prosma.preprocess.prepare` gives (the same
layout checks, bit-depth fitting and normalisation), but uploads each image in its own data
type (one byte a pixel for 8-bit photos) and normalises it there, in torch: on a GPU the
numpy normalisation on the CPU was two thirds of the engine's time for 2D images. Values
agree with :func:`~napari_prosma.preprocess.prepare` to float32 rounding (``tests``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..preprocess import (
    NORMALIZATION_MODES,
    InputError,
    match_bit_depth,
    normalize,
    to_channel_first,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard

#: Data types torch cannot hold: converted to float32 on the host first (as numpy would).
_HOST_CAST = (np.dtype(np.uint32), np.dtype(np.uint64))
#: Values per chunk for the float64 statistics of a z-score (bounded extra memory).
_STAT_CHUNK = 1 << 24


def prepare_on_device(
    images: Sequence[np.ndarray] | np.ndarray,
    card: ModelCard,
    channel_axis: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, list[str]]:
    """All images as one ``(N, C, *S)`` float32 tensor on ``device``, normalised as the
    card says, and the notes of the first image.

    Raises:
        InputError: as :func:`~napari_prosma.preprocess.prepare`, and when the images do
            not share one shape.
    """
    arrays, specs, notes = [], [], []
    for im in images:
        a, n = to_channel_first(im, card.in_channels, card.spatial_dims, channel_axis)
        spec, depth_notes = match_bit_depth(np.asarray(im), card.normalization)
        arrays.append(a)
        specs.append(spec)
        notes = notes or list(n) + depth_notes
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputError(f"images segmented together must share one shape, got {sorted(shapes)}")
    mode = dict(card.normalization or {"mode": "none"}).get("mode", "none")
    if mode not in NORMALIZATION_MODES:
        raise InputError(f"unknown normalisation mode {mode!r}; known: {NORMALIZATION_MODES}")
    if mode == "percentile":  # per-image quantiles: numpy's, then one upload of float32
        arrays = [normalize(a, s) for a, s in zip(arrays, specs)]
    x = upload(arrays, device)
    if mode != "percentile":
        x = normalize_tensor(x, specs)
    import torch

    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InputError(
            "the image's values are too large to compute with (beyond ±3.4e38 as 32-bit "
            "floats); rescale the image first"
        )
    return x, notes


def upload(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """``(N, C, *S)`` on ``device`` in the arrays' own data type (uint16 through int32 on
    the device; uint32/uint64 as float32). Channel-last arrays (colour photos seen through
    ``moveaxis``) are copied in their memory order and permuted on the device."""
    import torch

    dtype = np.result_type(*arrays)
    if dtype in _HOST_CAST:
        arrays = [a.astype(np.float32) for a in arrays]
        dtype = np.dtype(np.float32)
    last = [np.moveaxis(a, 0, -1) for a in arrays]
    channel_last = arrays[0].shape[0] > 1 and all(v.flags.c_contiguous for v in last)
    host = np.stack(last if channel_last else arrays).astype(dtype, copy=False)
    if dtype == np.uint16:  # torch's uint16 lacks ops: move the bits as int16, widen there
        t = torch.from_numpy(host.view(np.int16)).to(device).to(torch.int32) & 0xFFFF
    else:
        t = torch.from_numpy(np.ascontiguousarray(host)).to(device)
    if channel_last:
        t = t.movedim(-1, 1)
    return t.contiguous()


def normalize_tensor(x: torch.Tensor, specs: list[Mapping[str, Any] | None]) -> torch.Tensor:
    """:func:`~napari_prosma.preprocess.normalize` of each image of ``(N, C, *S)``, in torch
    on ``x``'s device; returns float32 (a new tensor). Images that share a spec are done in
    one operation (all of them, usually), except z-scores (per-image statistics)."""
    import torch

    x = x.to(torch.float32)
    out = torch.empty_like(x)
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(repr(sorted(dict(spec or {}).items())), []).append(i)
    for idx in groups.values():
        sel = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else idx
        out[sel] = _normalize_group(x[sel], dict(specs[idx[0]] or {"mode": "none"}))
    return out


def _normalize_group(x: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """One normalisation spec applied to every image of ``(n, C, *S)`` float32."""
    import torch

    mode = spec.get("mode", "none")
    c, nd = x.shape[1], x.ndim - 2
    if mode == "fixed":
        scale = float(spec.get("scale", 255.0))
        mean = _per_channel(spec.get("mean"), 0.0, c)
        std = _per_channel(spec.get("std"), 1.0, c)
        shape = (1, c, *(1,) * nd)
        a = torch.tensor(1.0 / (scale * std), dtype=torch.float32).view(shape).to(x.device)
        b = torch.tensor(-mean / std, dtype=torch.float32).view(shape).to(x.device)
        return torch.addcmul(b, x, a)
    if mode == "zscore":
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            for ch in range(c):
                mean, std = _zscore_stats(x[i, ch], bool(spec.get("nonzero")))
                torch.sub(x[i, ch], mean, out=out[i, ch]).div_(max(std, 1e-8))
        return out
    if mode == "ct_window":
        lo, hi = (float(v) for v in spec.get("window", (-1000.0, 1000.0)))
        return (x.clamp(lo, hi) - lo) / max(hi - lo, 1e-8)
    return x  # "none"


def _per_channel(values: Any, default: float, c: int) -> np.ndarray:
    v = np.asarray(values if values is not None else [default] * c, dtype=np.float64)
    if v.size == 1:
        v = np.repeat(v, c)
    if v.size != c:
        raise InputError(f"normalisation lists {v.size} values for {c} channel(s)")
    return v


def _zscore_stats(ch: torch.Tensor, nonzero: bool) -> tuple[float, float]:
    """Mean and (population) standard deviation of one channel in float64, over its
    non-zero voxels when ``nonzero`` and any exist; computed in chunks, so the float64
    copy never exceeds :data:`_STAT_CHUNK` values."""
    import torch

    flat = ch.reshape(-1)
    chunks = flat.split(_STAT_CHUNK)
    masks = [c != 0 for c in chunks] if nonzero else None
    n = sum(int(m.sum()) for m in masks) if masks else flat.numel()
    if masks is not None and n == 0:
        masks, n = None, flat.numel()
    total = torch.zeros((), dtype=torch.float64, device=ch.device)
    for k, c in enumerate(chunks):
        v = c.double() if masks is None else c[masks[k]].double()
        total += v.sum()
    mean = total / n
    sq = torch.zeros((), dtype=torch.float64, device=ch.device)
    for k, c in enumerate(chunks):
        v = c.double() if masks is None else c[masks[k]].double()
        sq += (v - mean).square().sum()
    return float(mean), float((sq / n).sqrt())
