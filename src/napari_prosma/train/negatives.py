"""Lesion-free crops of lesion images as extra "nothing to find" training images (issue 14).

BUSI has 647 lesion images and only 67 normal scans (47 in a training part), and a model
trained on them paints a lesion on most unseen normal scans: it has learned that every image
holds one. The tissue around a lesion is breast tissue without a lesion, so a square crop
that stays clear of the lesion, resized back to the training size, is one more image with
an empty mask. A crop is a zoom (up to ``size / min_side``, 2x at the defaults), which the
model has not seen otherwise; what the crops do is measured in ``training/RESULTS.md``.
"""

from __future__ import annotations

import numpy as np

from ..datasets import resize_image

#: Crop sides tried, largest first, as a fraction of the image's shorter side.
SIDES = (0.875, 0.75, 0.625, 0.5)


def _blocked(mask: np.ndarray, margin: int) -> np.ndarray:
    """Integral image ``(H + 1, W + 1)`` of the mask dilated by a ``margin`` square: a
    window is clear of the lesion when its sum is 0."""
    from scipy.ndimage import binary_dilation

    dil = binary_dilation(mask > 0, np.ones((2 * margin + 1,) * 2, bool))
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    ii[1:, 1:] = dil.cumsum(0).cumsum(1)
    return ii


def _free_corners(blocked: np.ndarray, side: int, stride: int) -> np.ndarray:
    """Top-left corners ``(K, 2)`` of the ``side``-square windows, on a ``stride`` grid,
    whose sum in the integral image ``blocked`` (:func:`_blocked`) is 0."""
    h, w = blocked.shape[0] - 1, blocked.shape[1] - 1
    y0, x0 = np.meshgrid(
        np.arange(0, h - side + 1, stride), np.arange(0, w - side + 1, stride), indexing="ij"
    )
    ii = blocked
    total = ii[y0 + side, x0 + side] - ii[y0, x0 + side] - ii[y0 + side, x0] + ii[y0, x0]
    free = total == 0
    return np.stack([y0[free], x0[free]], axis=1)


def negative_crops(
    images: np.ndarray,
    labels: np.ndarray,
    per_image: int = 1,
    margin: int | None = None,
    stride: int | None = None,
    max_dark: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesion-free square crops of the images with a lesion, resized to the image size.

    For each image with a non-empty mask, the largest side of :data:`SIDES` that has a
    window clear of the lesion (by ``margin`` pixels) is used, and up to ``per_image``
    distinct such windows are drawn at random; windows whose pixels are more than
    ``max_dark`` near black (< 5, outside the ultrasound sector) are passed over.

    Args:
        images: uint8 ``(N, C, H, W)``.
        labels: ``(N, H, W)``, 0 = background.
        per_image: crops drawn per image with a lesion (0: none).
        margin: pixels kept between a crop and the lesion (default: 1/32 of the shorter
            side, 8 px at 256²).
        stride: grid step of the candidate windows (default: as ``margin``).
        max_dark: largest share of near-black pixels in a crop.
        seed: seed of the draw.

    Returns:
        ``(crops, masks, source)``: uint8 ``(M, C, H, W)``, all-zero ``(M, H, W)`` of
        ``labels``' dtype, and int64 ``(M,)`` the index of the image each crop came from.
    """
    n, c, h, w = images.shape
    rng = np.random.default_rng(seed)
    crops, source = [], []
    short = min(h, w)
    margin = max(1, round(short / 32)) if margin is None else margin
    stride = max(1, round(short / 32)) if stride is None else stride
    for i in range(n if per_image > 0 else 0):
        if not labels[i].any():
            continue
        blocked = _blocked(labels[i], margin)  # once per image, for every side
        for frac in SIDES:
            side = round(frac * short)
            corners = _free_corners(blocked, side, stride)
            if len(corners) == 0:
                continue
            kept = 0
            for j in rng.permutation(len(corners)):
                y, x = corners[j]
                win = images[i, :, y : y + side, x : x + side]
                if (win.max(axis=0) < 5).mean() > max_dark:
                    continue
                hwc = np.ascontiguousarray(win.transpose(1, 2, 0))
                out = resize_image(hwc[..., 0] if c == 1 else hwc, (h, w))
                crops.append(out[None] if out.ndim == 2 else out.transpose(2, 0, 1))
                source.append(i)
                kept += 1
                if kept == per_image:
                    break
            break  # the largest side with a free window decides
    if not crops:
        empty = np.zeros((0, c, h, w), dtype=np.uint8)
        return empty, np.zeros((0, h, w), dtype=labels.dtype), np.zeros(0, dtype=np.int64)
    masks = np.zeros((len(crops), h, w), dtype=labels.dtype)
    return np.stack(crops).astype(np.uint8), masks, np.asarray(source, dtype=np.int64)
