"""Gaussian-blended sliding windows on the device, without MONAI's per-call overheads.

:func:`sliding_window` visits the same windows in the same order as MONAI's
``sliding_window_inference`` (``_get_scan_interval`` / ``dense_patch_slices``) and blends
them with the same Gaussian (``compute_importance_map``: sigma = 0.125 of the tile, clamped
at 1e-3), so the stitched maps match MONAI's to float rounding (``tests``). What it adds:

- the Gaussian weights and the map of their sums are made once per tile shape and device
  (:func:`gaussian_weight` is cached), not once per call;
- when one window covers the whole image (2D models that resize to their input size, small
  crops) the windows are whole images: batches are slices of the input, and no weighting,
  count map or division is done (the weights would cancel);
- outputs stay on the device the maps are stitched on; nothing is copied to the host per
  batch unless the maps are too large for the accelerator.

It stitches full-resolution outputs only (the class probabilities and, with TTA, their mean
squares); gate maps on coarser grids go through MONAI (:mod:`.window`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: MONAI's default Gaussian sigma, as a fraction of the tile edge.
SIGMA_SCALE = 0.125


def scan_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI places them (the last one clamped so that
    the window ends at the image's edge)."""
    if tile >= size:
        return [0]
    step = max(int(tile * (1 - overlap)), 1)
    n = math.ceil((size - tile) / step) + 1
    return [min(i * step, size - tile) for i in range(n)]


def window_slices(
    shape: Sequence[int], tile: Sequence[int], overlap: Sequence[float]
) -> list[tuple[slice, ...]]:
    """Every window's spatial slices, in MONAI's order (last axis fastest)."""
    import itertools

    axes = [scan_starts(int(s), int(t), float(o)) for s, t, o in zip(shape, tile, overlap)]
    return [
        tuple(slice(a, a + min(int(t), int(s))) for a, t, s in zip(starts, tile, shape))
        for starts in itertools.product(*axes)
    ]


@functools.lru_cache(maxsize=16)
def _gaussian(tile: tuple[int, ...], device: str) -> torch.Tensor:
    import torch

    w = None
    for i, n in enumerate(tile):
        sigma = n * SIGMA_SCALE
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float, device=device)
        x = torch.exp(x**2 / (-2 * sigma**2))
        w = x if w is None else w.unsqueeze(-1) * x[(None,) * i]
    w = w.clamp(min=max(float(w.min()), 1e-3))
    return w[None, None]


def gaussian_weight(tile: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(1, 1, *tile)`` float32 Gaussian blending weights on ``device`` (cached: made once
    per tile shape and device). Callers must not modify it."""
    return _gaussian(tuple(int(t) for t in tile), str(device))


def sliding_window(
    x: torch.Tensor,
    tile: Sequence[int],
    overlap: Sequence[float],
    batch: int,
    predictor: Callable[[torch.Tensor, list], dict[str, torch.Tensor]],
    out_device: torch.device,
) -> dict[str, torch.Tensor]:
    """Run ``predictor`` on Gaussian-blended windows of ``x`` and stitch its outputs.

    Args:
        x: ``(N, C, *P)`` input on the device the network runs on, each spatial axis at
            least the tile.
        tile: window shape.
        overlap: per-axis overlap fraction (see :func:`scan_starts`).
        batch: windows per call of ``predictor``.
        predictor: called as MONAI calls it with ``with_coord=True``: a ``(B, C, *tile)``
            batch and, per window, ``[slice(n, n + 1), slice(None), *spatial slices]``;
            returns ``(B, K, *tile)`` maps by name.
        out_device: where the stitched maps are kept.

    Returns:
        ``(N, K, *P)`` float32 maps by name, on ``out_device``.
    """
    shape = tuple(int(s) for s in x.shape[2:])
    slices = window_slices(shape, tile, overlap)
    if len(slices) == 1:
        return _whole(x, batch, predictor, out_device, slices[0])
    return _blend(x, slices, batch, predictor, out_device)


def _whole(x, batch, predictor, out_device, window) -> dict[str, torch.Tensor]:
    """One window per image: run the images in batches and concatenate."""
    import torch

    parts: dict[str, list] = {}
    n = int(x.shape[0])
    for i in range(0, n, batch):
        coords = [[slice(b, b + 1), slice(None), *window] for b in range(i, min(i + batch, n))]
        res = predictor(x[i : i + batch], coords)
        for k, v in res.items():
            parts.setdefault(k, []).append(v.float().to(out_device))
    return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}


def _blend(x, slices, batch, predictor, out_device) -> dict[str, torch.Tensor]:
    """Several windows per image: weight each output by the Gaussian, add it into the
    stitched maps, divide by the summed weights at the end."""
    import torch

    n_win, n_img = len(slices), int(x.shape[0])
    tile = tuple(s.stop - s.start for s in slices[0])
    w = gaussian_weight(tile, x.device)
    w_out = gaussian_weight(tile, out_device)
    count = torch.zeros((1, 1, *x.shape[2:]), device=out_device)
    for s in slices:
        count[(slice(None), slice(None), *s)] += w_out
    out: dict[str, torch.Tensor] = {}
    total = n_img * n_win
    for i in range(0, total, batch):
        idx = range(i, min(i + batch, total))
        coords = [[slice(j // n_win, j // n_win + 1), slice(None), *slices[j % n_win]] for j in idx]
        win = torch.cat([x[tuple(c)] for c in coords]) if len(coords) > 1 else x[tuple(coords[0])]
        res: dict[str, Any] = predictor(win, coords)
        for k, v in res.items():
            v = (v.float() * w).to(out_device)
            if k not in out:
                out[k] = torch.zeros((n_img, v.shape[1], *x.shape[2:]), device=out_device)
            buf = out[k]
            for c, p in zip(coords, v):
                buf[(c[0].start, slice(None), *c[2:])] += p
    for v in out.values():
        v /= count
    return out
