"""Residual and upsampling blocks shared by the 2D and 3D networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .factories import conv, interp_mode, norm


class ResBlock(nn.Module):
    """Two 3x3(x3) conv-norm layers with an identity (or 1x1 projected) shortcut.

    Shapes: ``(N, in_ch, *S) -> (N, out_ch, *S)``.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, norm_kind: str = "batch"):
        super().__init__()
        Conv = conv(spatial_dims)
        bias = norm_kind == "none"
        self.conv1 = Conv(in_ch, out_ch, 3, padding=1, bias=bias)
        self.norm1 = norm(norm_kind, spatial_dims, out_ch)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = norm(norm_kind, spatial_dims, out_ch)
        self.act = nn.ReLU(inplace=True)
        if in_ch != out_ch:
            self.skip = nn.Sequential(
                Conv(in_ch, out_ch, 1, bias=bias), norm(norm_kind, spatial_dims, out_ch)
            )
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class UpConv(nn.Module):
    """Bilinear/trilinear upsampling to a target size, then conv-norm-ReLU.

    Shapes: ``(N, in_ch, *S_low) -> (N, out_ch, *S_high)`` where ``S_high`` is given.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, norm_kind: str = "batch"):
        super().__init__()
        self.mode = interp_mode(spatial_dims)
        self.conv = conv(spatial_dims)(in_ch, out_ch, 3, padding=1, bias=norm_kind == "none")
        self.norm = norm(norm_kind, spatial_dims, out_ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        g = F.interpolate(g, size=size, mode=self.mode, align_corners=False)
        return self.act(self.norm(self.conv(g)))


def pad_to(x: torch.Tensor, padded: tuple[int, ...]) -> torch.Tensor:
    """``x`` ``(N, C, *S)`` zero-padded at the end of each spatial axis to ``padded``
    (the networks' padded input size; one helper for 2D and 3D)."""
    size = tuple(x.shape[2:])
    if tuple(padded) == size:
        return x
    pad: list[int] = []
    for s, p in zip(reversed(size), reversed(padded)):
        pad += [0, p - s]
    return F.pad(x, pad)
