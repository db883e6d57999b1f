"""The ProSMA skip gate (paper §2.2, eqs. 1–5) and the baselines' skips.

Given an encoder feature ``x`` and a decoder feature ``g`` at the same resolution::

    q = W_x x,  k = W_g g                                  (1)  1x1 convs to C_a
    u = f_ms(ReLU(q + k)),  f_ms(v) = phi([D^(d1) v, ...])  (2)  depthwise dilated + 1x1 fuse
    z* = sign(u) * max(|u| - lambda, 0)                     (4)  prox of lambda*||.||_1, eq. 3
    lambda = softplus(theta),  theta in R^{C_a}                  learned per channel
    psi = sigmoid(Psi z*)                                        1x1 conv to one channel
    c = sigmoid(MLP(GAP(g)))                                     one value per skip channel
    x~ = x * c * psi                                        (5)

The ablations of Table 3 switch the spatial part (``psi``) and the channel part (``c``) on
or off; ``mode="attention"`` is an additive attention gate at the skip's own resolution (a
dense sigmoid, no sparsity; an ablation on the ProSMA backbone, not Oktay et al.'s network,
which is ``monai_attention_unet``), and ``mode="none"`` is a plain skip.

``mode="exact"`` is the full gate with **exact removal**: where z* is zero in every latent
channel at a location, psi is set to 0 there, so the skip passes nothing at that location
(in the paper's form psi = sigmoid(bias of Psi) ~ 0.5 there, and the skip still passes about
half of ``x * c``). Elsewhere it equals the paper's form.

``dead_slope`` (default 0: off) is a remedy for dead gates. Soft-thresholding has zero
gradient where ``|u| <= lambda``; once a stage's z* is zero everywhere, nothing upstream of
it (theta, W_x, W_g, f_ms) gets a gradient again. With ``dead_slope = a > 0`` the forward pass
is unchanged (the same exact zeros), but the backward pass lets ``a`` times the gradient
through the zeroed entries, as if ``z = a * (u - lambda * sign(u))`` there (a straight-through
estimator), and likewise through exact removal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .factories import conv, global_avgpool

GATE_MODES = ("full", "spatial", "channel", "none", "attention", "exact")

#: Gate modes with a sparse (soft-thresholded) field z*.
SPARSE_MODES = ("full", "spatial", "exact")


def soft_threshold(u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Proximal operator of ``lam * ||.||_1`` (eq. 4), applied per channel.

    Args:
        u: ``(N, C, *S)`` compatibility field.
        lam: ``(C,)`` non-negative thresholds, one per channel.

    Returns:
        ``(N, C, *S)`` with exact zeros where ``|u| <= lam``.
    """
    lam = lam.view(1, -1, *([1] * (u.ndim - 2)))
    return torch.sign(u) * F.relu(u.abs() - lam)


def soft_threshold_st(u: torch.Tensor, lam: torch.Tensor, slope: float) -> torch.Tensor:
    """:func:`soft_threshold` forward; backward also through the zeroed entries, at ``slope``.

    Args:
        u: ``(N, C, *S)`` compatibility field.
        lam: ``(C,)`` thresholds.
        slope: share of the gradient let through where ``|u| <= lam`` (0: plain prox).

    Returns:
        ``(N, C, *S)``, equal to ``soft_threshold(u, lam)`` (the same exact zeros).
    """
    z = soft_threshold(u, lam)
    if slope <= 0 or not torch.is_grad_enabled():
        return z
    lam_b = lam.view(1, -1, *([1] * (u.ndim - 2)))
    dead = (u.abs() <= lam_b).detach()
    ghost = (u - lam_b * torch.sign(u)) * dead * slope
    return z + (ghost - ghost.detach())


def theta_for_lambda(lam: float) -> float:
    """Inverse softplus: the ``theta`` whose ``softplus(theta)`` equals ``lam`` (> 0)."""
    if lam <= 0:
        raise ValueError("lambda must be positive")
    return lam + math.log(-math.expm1(-lam))


@dataclass
class GateMaps:
    """What one skip gate did, for inspection (all tensors detached by the caller if needed).

    Attributes:
        psi: ``(N, 1, *S)`` spatial mask in (0, 1), or None without a spatial gate.
        zero_frac: ``(N, C_a)`` fraction of exact zeros of z* per latent channel.
        zero_map: ``(N, 1, *S)`` fraction of latent channels of z* that are exactly zero.
        c: ``(N, C_x)`` channel gate in (0, 1), or None without a channel gate.
        lam: ``(C_a,)`` thresholds softplus(theta), or None without a sparse gate.
        z: ``(N, C_a, *S)`` the sparse field itself, only when asked for (memory heavy).
    """

    psi: torch.Tensor | None = None
    zero_frac: torch.Tensor | None = None
    zero_map: torch.Tensor | None = None
    c: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    z: torch.Tensor | None = None


class SkipGate(nn.Module):
    """Decoder-conditioned skip operator ``(x, g) -> (x~, GateMaps)``.

    Args:
        spatial_dims: 2 or 3.
        x_ch: channels C_x of the encoder feature (skip).
        g_ch: channels C_g of the (upsampled) decoder feature.
        mode: ``"full"`` (ProSMA: sparse spatial + channel), ``"spatial"`` (sparse spatial
            only), ``"channel"`` (channel only), ``"none"`` (plain skip) or ``"attention"``
            (Oktay's dense additive attention gate).
        att_ch: latent width C_a; default ``max(x_ch // 2, 8)``.
        dilations: dilation rates of the depthwise convs of f_ms.
        mlp_ratio: hidden width of the channel MLP as a fraction of C_g (at least 8).
        theta_init: initial theta (lambda = softplus(theta); -2.0 gives lambda ~ 0.127).
        dead_slope: gradient share let through zeroed entries (a dead-gate remedy; 0: off).
    """

    def __init__(
        self,
        spatial_dims: int,
        x_ch: int,
        g_ch: int,
        mode: str = "full",
        att_ch: int | None = None,
        dilations: Sequence[int] = (1, 2, 3),
        mlp_ratio: float = 0.25,
        theta_init: float = -2.0,
        dead_slope: float = 0.0,
    ):
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"unknown gate mode {mode!r}; choose one of {GATE_MODES}")
        if not dilations:
            raise ValueError("dilations must name at least one rate")
        self.mode = mode
        self.spatial_dims = spatial_dims
        self.use_spatial = mode in ("full", "spatial", "attention", "exact")
        self.sparse = mode in SPARSE_MODES
        self.use_channel = mode in ("full", "channel", "exact")
        self.exact = mode == "exact"
        self.dead_slope = float(dead_slope)
        Conv = conv(spatial_dims)
        att_ch = att_ch or max(x_ch // 2, 8)
        self.att_ch = att_ch
        if self.use_spatial:
            self.w_x = Conv(x_ch, att_ch, 1, bias=False)  # W_x, eq. 1
            self.w_g = Conv(g_ch, att_ch, 1, bias=True)  # W_g, eq. 1
            self.psi = Conv(att_ch, 1, 1, bias=True)  # Psi
        if self.sparse:
            self.dw = nn.ModuleList(  # D^(d): depthwise dilated convs, eq. 2
                Conv(att_ch, att_ch, 3, padding=d, dilation=d, groups=att_ch, bias=False)
                for d in dilations
            )
            self.fuse = Conv(att_ch * len(dilations), att_ch, 1, bias=True)  # phi
            self.theta = nn.Parameter(torch.full((att_ch,), float(theta_init)))
        if self.use_channel:
            hidden = max(round(g_ch * mlp_ratio), 8)
            self.gap = global_avgpool(spatial_dims)
            self.mlp = nn.Sequential(
                nn.Linear(g_ch, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, x_ch)
            )

    @property
    def lam(self) -> torch.Tensor | None:
        """``(C_a,)`` current thresholds softplus(theta), or None without a sparse gate."""
        return F.softplus(self.theta) if self.sparse else None

    def compatibility(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The multi-scale compatibility field u of eq. 2: ``(N, C_a, *S)``."""
        v = F.relu(self.w_x(x) + self.w_g(g))
        return self.fuse(torch.cat([d(v) for d in self.dw], dim=1))

    def forward(
        self, x: torch.Tensor, g: torch.Tensor, return_maps: bool = False, return_z: bool = False
    ) -> tuple[torch.Tensor, GateMaps | None]:
        """Gate the skip feature.

        Args:
            x: ``(N, C_x, *S)`` encoder feature.
            g: ``(N, C_g, *S)`` decoder feature at the same resolution.
            return_maps: also return a :class:`GateMaps`.
            return_z: include the full sparse field z* in the maps.

        Returns:
            ``(x~, maps)`` with ``x~`` of ``x``'s shape; ``maps`` is None unless asked for.
        """
        maps = GateMaps() if return_maps else None
        out = x
        if self.use_spatial:
            if self.sparse:
                lam = F.softplus(self.theta)
                z = soft_threshold_st(self.compatibility(x, g), lam, self.dead_slope)
            else:  # additive attention: psi = sigmoid(Psi(ReLU(q + k))), dense
                z = F.relu(self.w_x(x) + self.w_g(g))
            psi = torch.sigmoid(self.psi(z))
            if self.exact:
                psi = exact_removal(psi, z, self.dead_slope)
            out = out * psi
            if maps is not None:
                maps.psi = psi
                if self.sparse:
                    zero = z == 0
                    maps.zero_frac = zero.flatten(2).float().mean(-1)
                    maps.zero_map = zero.float().mean(1, keepdim=True)
                    maps.lam = lam
                    if return_z:
                        maps.z = z
        if self.use_channel:
            c = torch.sigmoid(self.mlp(self.gap(g).flatten(1)))
            out = out * c.view(*c.shape, *([1] * self.spatial_dims)).to(out.dtype)
            if maps is not None:
                maps.c = c
        return out, maps


def exact_removal(psi: torch.Tensor, z: torch.Tensor, slope: float = 0.0) -> torch.Tensor:
    """Set psi to exactly 0 where z* is zero in every latent channel.

    Args:
        psi: ``(N, 1, *S)`` spatial mask.
        z: ``(N, C_a, *S)`` sparse field z*.
        slope: share of psi's gradient let through at removed locations (straight-through;
            0: none). The forward value is unchanged by it.

    Returns:
        ``(N, 1, *S)``: psi where any channel of z* is non-zero, 0 elsewhere.
    """
    keep = (z != 0).any(1, keepdim=True).to(psi.dtype)
    out = psi * keep
    if slope > 0 and torch.is_grad_enabled():
        ghost = psi * (1 - keep) * slope
        out = out + (ghost - ghost.detach())
    return out
