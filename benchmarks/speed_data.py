"""Inputs shared by ``benchmarks/speed.py`` and ``speed_base.py`` (numpy and torch only, so
either ``napari_prosma`` can be imported beside it)."""

from __future__ import annotations

import numpy as np


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A float32 volume of smooth random blobs at a few scales (MRI-like intensities around
    300), the same on every machine for a given seed (made on the CPU)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(shape)
    for scale, w in ((4, 0.3), (16, 1.0), (48, 1.5)):
        coarse = [max(2, s // scale) for s in shape]
        noise = torch.randn(1, 1, *coarse, generator=g)
        out += w * F.interpolate(noise, size=shape, mode="trilinear", align_corners=False)[0, 0]
    return (300 + 80 * out).numpy()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in either label map (1.0 if none)."""
    classes = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    if not classes:
        return 1.0
    d = [2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c)) for c in classes]
    return float(np.mean(d))
