"""Training losses.

- :func:`bce_dice_loss`: U-KAN's ``BCEDiceLoss`` (the 2D protocol the paper follows):
  ``0.5 * BCE(logits, y) + (1 - mean_n dice_n)`` with a per-image soft Dice on sigmoid
  probabilities and smoothing 1e-5.
- :func:`bce_dice_empty_loss`: the same for images with a lesion; an image whose mask is
  empty gets an image-level "nothing here" term instead of its Dice (issue 14, measured
  reason: with smoothing 1e-5 the per-image Dice of an empty mask is about 0 for any
  prediction that is not exactly empty, so ``1 - dice`` is a constant about 1 with no
  gradient, and only the pixel-averaged BCE teaches the model about normal scans).
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


#: Share of the image whose mean top logit the "nothing here" term scores: the 0.5 % of
#: the image that counts a normal scan as "painted" (issue 14).
PAINTED_SHARE = 0.005


def bce_dice_empty_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 0.5,
    share: float = PAINTED_SHARE,
) -> torch.Tensor:
    """``bce_weight * BCE + mean_n l_n``: ``l_n = 1 - dice_n`` for an image with a lesion;
    for an image with an empty mask ``l_n = softplus(m_n)``, the BCE against "no lesion" of
    ``m_n``, the mean of its top ``share`` of logits (a normal scan counts as painted when
    more than 0.5 % of it is lesion, i.e. when about ``m_n > 0``).

    Args:
        logits: ``(N, 1, *S)``.
        target: ``(N, 1, *S)`` in {0, 1}.
        bce_weight: weight of the pixel-averaged BCE.
        share: fraction of the pixels in the image-level score (at least one pixel).

    Returns:
        the scalar loss (float32). A batch without empty masks gives
        :func:`bce_dice_loss`'s value.
    """
    z = logits.float()
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(z, t)
    flat = z.flatten(1)
    k = max(1, round(share * flat.shape[1]))
    top = flat.topk(k, dim=1).values.mean(1)  # (N,)
    empty = (t.flatten(1).amax(1) == 0).float()  # no boolean indexing: it syncs (CUDA graphs)
    per_image = empty * F.softplus(top) + (1 - empty) * (1 - soft_dice_binary(z, t))
    return bce_weight * bce + per_image.mean()


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


LOSSES = {
    "bce_dice": bce_dice_loss,
    "bce_dice_empty": bce_dice_empty_loss,
    "dice_ce": dice_ce_loss,
}
