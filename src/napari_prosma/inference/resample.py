"""The working grid: resampling to the model's training spacing (3D) or input size (2D) and
back, and bringing the coarse gate maps onto the input grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard

#: Spacings within this relative difference of the card's are not resampled.
SPACING_TOLERANCE = 0.05
#: Largest zoom per axis between a scan's spacing and the model's: beyond it the spacing is
#: taken to be wrong (a header error), not resampled.
MAX_ZOOM = 64.0
#: A resampled grid may not grow past this many voxels (nor past the input, if larger).
MAX_WORK_VOXELS = 512**3


def card_input_size(card: ModelCard) -> tuple[int, ...] | None:
    """The fixed input size a 2D model was trained at, if its card says images are resized.

    Read from ``input_size`` in the card (kept in ``card.extra``) or in ``card.training``
    (``input_size`` or ``resize``), e.g. ``[256, 256]`` for the paper's BUSI/Kvasir protocol.
    """
    for src in (card.extra, card.training):
        for key in ("input_size", "resize"):
            v = src.get(key) if isinstance(src, dict) else None
            if isinstance(v, int):
                v = [v] * card.spatial_dims
            if (
                isinstance(v, Sequence)
                and len(v) == card.spatial_dims
                and all(isinstance(s, int) and s > 0 for s in v)
            ):
                return tuple(int(s) for s in v)
    return None


def working_shape(
    shape: Sequence[int], spacing: Sequence[float] | None, card: ModelCard
) -> tuple[tuple[int, ...], list[str]]:
    """The grid the network runs on for an input of ``shape`` (and notes on why).

    Args:
        shape: input spatial shape, napari order.
        spacing: input voxel spacing in the same order (mm), or None if unknown.
        card: the model card (``spacing`` for 3D models, ``input_size`` for resized 2D ones).

    Returns:
        ``(work_shape, notes)``; ``work_shape == shape`` when nothing is resampled.
    """
    shape = tuple(int(s) for s in shape)
    notes: list[str] = []
    size = card_input_size(card)
    if size is not None:
        if size != shape:
            notes.append(
                f"the image was resized from {_fmt(shape)} to {_fmt(size)} pixels, the size "
                "the model was trained at, and the result resized back"
            )
        return size, notes
    target = card.spacing
    if not target or len(target) != len(shape):
        return shape, notes
    if spacing is None:
        notes.append(
            f"the voxel spacing is unknown, so it was taken to be the model's training spacing "
            f"({_fmt(target, ' mm')})"
        )
        return shape, notes
    if len(spacing) != len(shape):
        raise ValueError(f"spacing {tuple(spacing)} does not match the {len(shape)}D image")
    ratio = [float(s) / float(t) for s, t in zip(spacing, target)]
    if all(abs(r - 1) <= SPACING_TOLERANCE for r in ratio):
        return shape, notes
    check_zoom(shape, spacing, target, ratio)
    work = tuple(max(1, round(n * r)) for n, r in zip(shape, ratio))
    notes.append(
        f"the volume was resampled from {_fmt(spacing, ' mm')} to the model's training spacing "
        f"{_fmt(target, ' mm')} ({_fmt(shape)} -> {_fmt(work)} voxels) and the result back to "
        "the original grid"
    )
    return work, notes


def check_zoom(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float], ratio: list[float]
) -> None:
    """Refuse a resampling that no real scan needs, before any grid is allocated.

    Raises:
        InputError: a spacing that is not a positive finite number, one more than
            :data:`MAX_ZOOM` times finer or coarser than the model's, or a working grid
            beyond :data:`MAX_WORK_VOXELS` voxels (and beyond the input's own size).
    """
    from ..preprocess import InputError

    sp = _fmt(tuple(float(s) for s in spacing), " mm")
    if not all(math.isfinite(r) and r > 0 for r in ratio):
        raise InputError(f"the voxel spacing {sp} is not a positive size; check the file's header")
    if any(r > MAX_ZOOM or r < 1 / MAX_ZOOM for r in ratio):
        raise InputError(
            f"the voxel spacing {sp} is more than {MAX_ZOOM:g} times finer or coarser than the "
            f"model's training spacing {_fmt(target, ' mm')}; it is not resampled (check the "
            "file's voxel size, or choose a model trained at this resolution)"
        )
    voxels = math.prod(n * r for n, r in zip(shape, ratio))
    if voxels > max(MAX_WORK_VOXELS, math.prod(shape)):
        raise InputError(
            f"resampling the volume from {sp} to the model's {_fmt(target, ' mm')} would make "
            f"a grid of {voxels:.3g} voxels (limit {MAX_WORK_VOXELS:.3g}); check the file's "
            "voxel size, or crop the volume"
        )


def _fmt(values: Sequence[float], unit: str = "") -> str:
    return "×".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + unit


def resize(t: torch.Tensor, size: Sequence[int], labels: bool = False) -> torch.Tensor:
    """Resample ``(N, C, *S)`` to ``size``: (bi/tri)linear, antialiased when shrinking in 2D;
    nearest for label maps. Returns ``t`` itself when the size already matches."""
    import torch.nn.functional as F

    size = tuple(int(s) for s in size)
    if tuple(t.shape[2:]) == size:
        return t
    if labels:
        return F.interpolate(t, size=size, mode="nearest-exact")
    mode = "bilinear" if len(size) == 2 else "trilinear"
    shrink = any(s < n for s, n in zip(size, t.shape[2:]))
    kwargs: dict[str, Any] = {"antialias": True} if mode == "bilinear" and shrink else {}
    dtype = t.dtype
    out = F.interpolate(t.float(), size=size, mode=mode, align_corners=False, **kwargs)
    return out.to(dtype)


def gate_to_grid(
    t: torch.Tensor, scale: int, padded: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """Bring a stitched gate map from its stage grid onto the network's input grid.

    Args:
        t: ``(N, 1, *P)`` map on the stage grid of the padded input (``P = padded / scale``).
        scale: the stage's downsampling factor.
        padded: the padded input shape the map covers.
        shape: the unpadded working shape to crop to.

    Returns:
        ``(N, 1, *shape)``: each coarse cell spread over the ``scale`` voxels it pooled.
    """
    import torch.nn.functional as F

    if scale != 1:
        mode = "bilinear" if len(padded) == 2 else "trilinear"
        t = F.interpolate(t, size=tuple(padded), mode=mode, align_corners=False)
    return t[(..., *(slice(0, s) for s in shape))]


def ceil_to(n: int, m: int) -> int:
    """Smallest multiple of ``m`` that is >= ``n``."""
    return int(math.ceil(n / m) * m)
