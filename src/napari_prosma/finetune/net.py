"""The network side of fine-tuning: which parameters train, the loss, BatchNorm
statistics kept fixed, and the held-out Dice measured through the inference engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import ModelCard
from ..preprocess import InputError
from .config import CANCEL_MESSAGE, TRAINABLE
from .units import Unit

if TYPE_CHECKING:  # pragma: no cover
    import torch


def trainable_parameters(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """Parameters to train for ``which`` in :data:`TRAINABLE`; the rest are frozen."""
    if which not in TRAINABLE:
        raise InputError(f"'trainable' must be one of {TRAINABLE}")
    if which == "all":
        params = list(model.parameters())
    else:
        mods = (
            [model.gates]
            if which == "gates"
            else [model.ups, model.gates, model.decoder, model.head]
        )
        params = [p for m in mods for p in m.parameters()]
    if not params:
        raise InputError(f"this model has nothing to train for {which!r} (plain skips?)")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def _loss_fn(card: ModelCard) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from ..losses import bce_dice_loss, dice_ce_loss

    if card.out_channels == 1:
        return lambda logits, y: bce_dice_loss(logits, (y > 0)[:, None].float())
    return lambda logits, y: dice_ce_loss(logits, y.long())


def _freeze_norm_stats(model: torch.nn.Module) -> None:
    """Keep BatchNorm running statistics fixed: a few patches would corrupt them."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def holdout_dice(
    model: Any,
    card: ModelCard,
    units: Sequence[Unit | tuple[np.ndarray, np.ndarray]],
    device: str,
    cancel: Any = None,
) -> float | None:
    """Mean foreground Dice of the model on held-out units, through the inference engine
    (resampled to the card's spacing / input size and back, as a user's image is).

    Raises:
        Cancelled: ``cancel`` was set during the evaluation.
    """
    from ..inference import Cancelled, predict
    from ..metrics import dice

    if not units:
        return None
    scores = []
    was_training = model.training
    model.eval()
    try:
        for u in units:
            img, lab = u[0], u[1]
            sp = u[2] if len(u) > 2 else None
            try:
                pred = predict(img, model, card, device=device, spacing=sp, cancel=cancel)
            except Cancelled:
                raise Cancelled(CANCEL_MESSAGE) from None
            if card.out_channels == 1:
                lab = (lab > 0).astype(np.uint8)
            classes = range(1, max(card.out_channels, 2))
            per = [dice(pred.labels == c, lab == c) for c in classes if np.any(lab == c)]
            if not per:  # nothing to find: perfect only if nothing was predicted
                per = [1.0 if not np.any(pred.labels > 0) else 0.0]
            scores.append(float(np.mean(per)))
    finally:
        model.train(was_training)
    return float(np.mean(scores))


def _release(net: Any) -> Any:
    """The trained network as a checkpoint stores it: every parameter trainable again,
    eval mode, plain memory layout."""
    import torch

    for p in net.parameters():
        p.grad = None  # the last step's gradients: as large as the weights trained
        p.requires_grad_(True)
    net.eval()
    return net.to(memory_format=torch.contiguous_format)


def free_device_memory(device: Any) -> None:
    """Empty the allocator's cache of a CUDA or MPS ``device`` (nothing on the CPU)."""
    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif kind == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "empty_cache"):
        torch.mps.empty_cache()
