"""The real baselines: MONAI's ``UNet`` and ``AttentionUnet`` (Oktay et al.'s gate), in the
same pipeline as ProSMA-UNet.

They are wrapped only so that the trainer, the checkpoint loader and the inference engine
treat them like :class:`~napari_prosma.nets.ProSMAUNet`: the same constructor keywords
(``spatial_dims``, ``in_channels``, ``out_channels``, ``widths``, ``norm``), any input size
(zero-padded to a multiple of ``2 ** (levels - 1)`` and cropped back) and
``return_gates=True`` answered with an empty list (no sparse gate to show). MONAI is
imported only when one of them is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .blocks import pad_to

#: Architecture name -> MONAI class name.
MONAI_ARCHITECTURES = {"monai_unet": "UNet", "monai_attention_unet": "AttentionUnet"}

_NORM = {"batch": "BATCH", "instance": "INSTANCE"}


class MonaiNet(nn.Module):
    """A MONAI U-Net family network with ProSMA-UNet's calling conventions.

    Args:
        arch: ``"monai_unet"`` (``UNet``, 2 residual units per level, PReLU) or
            ``"monai_attention_unet"`` (``AttentionUnet``, Oktay's additive attention gates).
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (one channel: sigmoid/binary).
        widths: feature widths per level, finest first (a preset name is accepted).
        norm: ``"batch"`` or ``"instance"`` (``UNet`` only; ``AttentionUnet`` always uses
            batch norm).
    """

    def __init__(
        self,
        arch: str = "monai_unet",
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        widths: Sequence[int] | str = "small",
        norm: str = "batch",
    ):
        super().__init__()
        from monai.networks import nets

        from .unet import PRESETS

        if arch not in MONAI_ARCHITECTURES:
            raise ValueError(f"unknown MONAI architecture {arch!r}")
        if isinstance(widths, str):
            if widths not in PRESETS:
                raise ValueError(f"unknown width preset {widths!r}; choose one of {list(PRESETS)}")
            widths = PRESETS[widths]
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths must list at least two positive widths, got {widths}")
        strides = [2] * (len(widths) - 1)
        if arch == "monai_unet":
            if norm not in _NORM:
                raise ValueError(f"norm {norm!r} is not available for monai_unet")
            self.net = nets.UNet(
                spatial_dims,
                in_channels,
                out_channels,
                channels=widths,
                strides=strides,
                num_res_units=2,
                norm=_NORM[norm],
            )
        else:
            self.net = nets.AttentionUnet(
                spatial_dims, in_channels, out_channels, channels=widths, strides=strides
            )
        self.arch = arch
        self.config: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "widths": widths,
            "norm": norm if arch == "monai_unet" else "batch",
        }
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.divisor = 2 ** (len(widths) - 1)
        self.min_size = self.divisor
        self.n_stages = 0

    def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial shape the network runs at for an input of ``shape``."""
        d = self.divisor
        return tuple(max(int(math.ceil(s / d) * d), self.min_size) for s in shape)

    def forward(
        self, x: torch.Tensor, return_gates: bool = False, return_z: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list]:
        """Logits ``(N, out_channels, *S)`` of ``x`` ``(N, in_channels, *S)``; with
        ``return_gates`` a tuple ``(logits, [])``."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected ({self.in_channels} channel(s), {self.spatial_dims}D) input, got "
                f"shape {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        padded = self.padded_shape(size)
        x = pad_to(x, padded)
        logits = self.net(x)
        if padded != size:
            logits = logits[(..., *(slice(0, s) for s in size))]
        return (logits, []) if return_gates else logits
