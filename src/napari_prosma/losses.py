"""Training losses.

- :func:`bce_dice_loss`: U-KAN's ``BCEDiceLoss`` (the 2D protocol the paper follows):
  ``0.5 * BCE(logits, y) + (1 - mean_n dice_n)`` with a per-image soft Dice on sigmoid
  probabilities and smoothing 1e-5.
- :func:`dice_ce_loss`: nnU-Net-style multi-class loss: cross-entropy plus ``1 - `` the
  batch soft Dice averaged over the foreground classes (3D).

All losses are computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1e-5


def soft_dice_binary(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image soft Dice ``(N,)`` of ``sigmoid(logits)`` against a {0, 1} target."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return (2 * inter + SMOOTH) / (p.sum(1) + t.sum(1) + SMOOTH)


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.5
) -> torch.Tensor:
    """``bce_weight * BCE + (1 - mean soft Dice)``; ``logits`` and ``target`` ``(N, 1, *S)``."""
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), t)
    return bce_weight * bce + 1 - soft_dice_binary(logits, t).mean()


def dice_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, include_background: bool = False
) -> torch.Tensor:
    """Cross-entropy + (1 - batch soft Dice over the classes).

    Args:
        logits: ``(N, K, *S)``.
        target: ``(N, *S)`` or ``(N, 1, *S)`` integer labels in ``[0, K)``.
        include_background: average the Dice over class 0 too.
    """
    logits = logits.float()
    if target.ndim == logits.ndim:
        target = target[:, 0]
    target = target.long()
    ce = F.cross_entropy(logits, target)
    k = logits.shape[1]
    p = torch.softmax(logits, 1)
    classes = torch.arange(k, device=target.device).view(1, k, *([1] * (logits.ndim - 2)))
    onehot = (target.unsqueeze(1) == classes).float()  # no one_hot: it syncs (CUDA graphs)
    dims = (0, *range(2, logits.ndim))
    inter = (p * onehot).sum(dims)
    denom = p.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + SMOOTH) / (denom + SMOOTH)
    if not include_background:
        dice = dice[1:]
    return ce + 1 - dice.mean()


LOSSES = {"bce_dice": bce_dice_loss, "dice_ce": dice_ce_loss}
