"""GPU-resident training data and batch augmentation (no DataLoader).

The whole training set stays on the device as uint8 (2D) or float16 (3D, already
normalised); each step gathers a batch by index, augments it there and normalises it with
the card's spec, all as tensor operations with static shapes, so a step (gather, augment,
forward, backward, optimiser) can be captured once in a CUDA graph and replayed.

- 2D: per-image random horizontal flip, vertical flip and transpose, which together give
  the 8 flips/90° rotations (albumentations' ``RandomRotate90`` + ``Flip`` in U-KAN).
- 3D: random volumes (with replacement), a patch around a random foreground voxel for a
  ``fg_fraction`` of the batch (nnU-Net's oversampling) and a random patch otherwise, then
  random flips of each axis and, with ``permute_axes``, random axis transpositions; with
  ``augment="nnunet"`` first rotation, scaling and a random placement of the volume in the
  patch, and intensity augmentation afterwards (:mod:`napari_prosma.train.augment3d`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..preprocess import normalize


class Normalizer2D:
    """The ``fixed`` normalisation of :func:`napari_prosma.preprocess.normalize` on a GPU
    batch: ``(x / scale - mean) / std`` per channel (uint8 in, float32 out)."""

    def __init__(self, spec: Mapping[str, Any], channels: int, device: torch.device):
        if spec.get("mode") != "fixed":
            raise ValueError("GPU-side normalisation of 2D batches needs mode 'fixed'")
        self.scale = float(spec.get("scale", 255.0))

        def vec(v: Any, default: float) -> torch.Tensor:
            a = np.asarray(v if v is not None else [default] * channels, dtype=np.float32)
            if a.size == 1:
                a = np.repeat(a, channels)
            return torch.from_numpy(a).view(1, channels, 1, 1).to(device)

        self.mean = vec(spec.get("mean"), 0.0)
        self.std = vec(spec.get("std"), 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / self.scale - self.mean) / self.std


def dihedral_2d(
    x: torch.Tensor, y: torch.Tensor, rand: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and transposition per sample of ``x (B, C, H, W)``, ``y (B, 1, H, W)``.

    ``rand`` ``(B, 3)`` uniform draws in [0, 1) decide them (drawn here when None)."""
    b = x.shape[0]
    if rand is None:
        rand = torch.rand(b, 3, device=x.device)
    r = rand < 0.5
    for j, op in enumerate((lambda t: t.flip(-1), lambda t: t.flip(-2))):
        m = r[:, j].view(b, 1, 1, 1)
        x = torch.where(m, op(x), x)
        y = torch.where(m, op(y), y)
    if x.shape[-1] == x.shape[-2]:
        m = r[:, 2].view(b, 1, 1, 1)
        x = torch.where(m, x.transpose(-1, -2), x)
        y = torch.where(m, y.transpose(-1, -2), y)
    return x, y


class Data2D:
    """Training images ``(N, C, H, W)`` uint8 and masks ``(N, H, W)`` on ``device``."""

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        normalization: Mapping[str, Any],
        device: torch.device,
    ):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.masks = torch.from_numpy(np.ascontiguousarray(masks)).to(device)[:, None]
        self.n = self.images.shape[0]
        self.norm = Normalizer2D(normalization, self.images.shape[1], device)
        self.device = device

    def batch(
        self,
        idx: torch.Tensor,
        augment: bool = True,
        channels_last: bool = False,
        rand: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather, augment and normalise: float32 ``x (B, C, H, W)`` and ``y (B, 1, H, W)``
        (``rand``: the augmentation draws, see :func:`dihedral_2d`)."""
        x = self.images.index_select(0, idx)
        y = self.masks.index_select(0, idx)
        if augment:
            x, y = dihedral_2d(x, y, rand)
        x = self.norm(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.float()


class Data3D:
    """Normalised volumes padded to one shape on ``device``, with foreground coordinates
    for oversampling.

    Args:
        images, labels: lists of ``(X, Y, Z)`` arrays (uint8 images, integer labels).
        normalization: the card's spec, applied per volume on the CPU with
            :func:`~napari_prosma.preprocess.normalize` (exactly as inference does).
        patch: patch size (3 ints).
        fg_fraction: fraction of each batch centred on a foreground voxel.
        permute_axes: randomly transpose axes (needs a cubic patch).
        augment: ``"flips"`` (flips only) or ``"nnunet"`` (spatial + intensity as well).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        normalization: Mapping[str, Any],
        patch: Sequence[int],
        device: torch.device,
        fg_fraction: float = 0.33,
        permute_axes: bool = False,
        augment: str = "flips",
    ):
        if augment not in ("flips", "nnunet"):
            raise ValueError(f"unknown 3D augmentation {augment!r}; choose 'flips' or 'nnunet'")
        self.augment = augment
        self.patch = tuple(int(p) for p in patch)
        if permute_axes and len(set(self.patch)) != 1:
            raise ValueError("permute_axes needs a cubic patch")
        self.permute_axes = permute_axes
        self.fg_fraction = fg_fraction
        shapes = np.array([a.shape for a in images])
        full = np.maximum(shapes.max(0), self.patch)
        n = len(images)
        # pad value 0, as inference pads (the background where the normalisation maps the
        # image's minimum to 0, as the hippocampus recipe's percentile mode with lower = 0)
        vol = np.zeros((n, *full), np.float16)
        lab = np.zeros((n, *full), np.uint8)
        coords, counts = [], []
        for i, (a, b) in enumerate(zip(images, labels)):
            x = normalize(np.asarray(a)[None], normalization)[0]
            sl = tuple(slice(0, s) for s in a.shape)
            vol[i][sl] = x
            lab[i][sl] = b
            fg = np.argwhere(np.asarray(b) > 0)
            if fg.size == 0:
                fg = np.array([[s // 2 for s in a.shape]])
            coords.append(fg)
            counts.append(len(fg))
        self.device = device
        self.n = n
        self.vol = torch.from_numpy(vol).to(device)
        self.lab = torch.from_numpy(lab).to(device)
        self.shapes = torch.from_numpy(shapes).to(device)
        self.fg = torch.from_numpy(np.concatenate(coords)).to(device)
        self.fg_count = torch.tensor(counts, device=device)
        self.fg_offset = torch.tensor(np.cumsum([0, *counts[:-1]]), device=device)
        self.full = torch.tensor(full, device=device)
        self.ar = [torch.arange(p, device=device) for p in self.patch]
        self.patch_t = torch.tensor(self.patch, device=device)  # no host copies in a graph

    def batch(self, b: int, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of ``b`` patches: float ``x`` and labels ``y``, ``(b, 1, *patch)``."""
        dev = self.device
        r = torch.rand(b, 8, device=dev)
        vi = (r[:, 0] * self.n).long().clamp_max(self.n - 1)
        shp = self.shapes[vi]  # (b, 3)
        patch = self.patch_t
        hi = (shp - patch).clamp_min(0)  # start range per axis
        rand_start = (r[:, 1:4] * (hi + 1)).long().minimum(hi)
        k = (r[:, 4] * self.fg_count[vi]).long().minimum(self.fg_count[vi] - 1)
        centre = self.fg[self.fg_offset[vi] + k]
        fg_start = (centre - patch // 2).clamp_min(0).minimum(hi)
        use_fg = (torch.arange(b, device=dev) < round(self.fg_fraction * b)).view(b, 1)
        start = torch.where(use_fg, fg_start, rand_start)
        ix = start[:, 0, None] + self.ar[0]
        iy = start[:, 1, None] + self.ar[1]
        iz = start[:, 2, None] + self.ar[2]
        bi = vi.view(b, 1, 1, 1)
        sel = (bi, ix.view(b, -1, 1, 1), iy.view(b, 1, -1, 1), iz.view(b, 1, 1, -1))
        x = self.vol[sel][:, None].float()
        y = self.lab[sel][:, None]
        if augment and self.augment == "nnunet":
            from .augment3d import spatial

            x, y = spatial(x, y, (shp - start).minimum(patch), patch)
        if augment:
            flips = torch.rand(b, 6, device=dev) < 0.5
            for j, ax in enumerate((-1, -2, -3)):
                m = flips[:, j].view(b, 1, 1, 1, 1)
                x = torch.where(m, x.flip(ax), x)
                y = torch.where(m, y.flip(ax), y)
            if self.permute_axes:
                for j, (a0, a1) in enumerate(((-1, -2), (-2, -3), (-1, -3))):
                    m = flips[:, 3 + j].view(b, 1, 1, 1, 1)
                    x = torch.where(m, x.transpose(a0, a1), x)
                    y = torch.where(m, y.transpose(a0, a1), y)
        if augment and self.augment == "nnunet":
            from .augment3d import intensity

            x = intensity(x)
        return x, y
