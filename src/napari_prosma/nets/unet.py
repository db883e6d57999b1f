"""ProSMA-UNet (and the U-Net / Attention U-Net baselines) for 2D and 3D.

Architecture (paper §2.1): an encoder of five resolution levels (max-pooling + residual
blocks) producing x_1..x_5, a residual bottleneck on x_5, and a decoder of four stages.
Stage s upsamples the decoder feature (bilinear/trilinear + conv) to x_s's grid, gates the
skip x_s with it, concatenates and refines with a residual block::

    g_s = ResBlock(Concat(G_s(x_s, Up(g_{s+1})), Up(g_{s+1})))

A 1x1 convolution maps the finest decoder feature to class logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .blocks import ResBlock, UpConv, pad_to
from .factories import NORMS, conv, maxpool
from .gate import GATE_MODES, GateMaps, SkipGate

#: Width presets. ``default`` is the paper-sized U-Net; ``small`` runs comfortably on a CPU.
PRESETS: dict[str, tuple[int, ...]] = {
    "default": (32, 64, 128, 256, 512),
    "medium": (24, 48, 96, 192, 384),
    "small": (16, 32, 64, 128, 256),
    "tiny": (8, 16, 32, 64, 128),
}

#: Architecture names and the gate each implies. ``unet`` and ``attention_unet`` are
#: ablations on the ProSMA backbone (its encoder/decoder, a plain or an additive-attention
#: skip), kept under these names for older cards; the real baselines are MONAI's networks.
ARCHITECTURES: dict[str, str] = {
    "prosma_unet": "full",
    "unet": "none",
    "attention_unet": "attention",
    "monai_unet": "none",
    "monai_attention_unet": "attention",
}

#: What each architecture name is, in plain words (tables, cards).
ARCH_TITLES: dict[str, str] = {
    "prosma_unet": "ProSMA-UNet",
    "unet": "ProSMA backbone, plain skip (ablation)",
    "attention_unet": "ProSMA backbone, additive attention skip (ablation)",
    "monai_unet": "U-Net (MONAI UNet, 2 residual units per level)",
    "monai_attention_unet": "Attention U-Net (MONAI AttentionUnet, Oktay et al.)",
}


class ProSMAUNet(nn.Module):
    """Dimension-generic ProSMA-UNet.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 grey / MRI / CT, 3 RGB).
        out_channels: classes including background (a single channel means sigmoid/binary).
        widths: feature widths of the resolution levels, finest first (default: 5 levels,
            ``PRESETS["default"]``); a preset name is accepted too.
        gate: skip gate mode, one of ``GATE_MODES`` (``"full"`` is ProSMA).
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        att_ratio: latent width C_a of each gate as a fraction of its skip channels (>= 8).
        dilations: dilation rates of the gate's depthwise convolutions.
        mlp_ratio: channel-gate MLP hidden width as a fraction of the decoder channels.
        theta_init: initial theta of every gate (lambda = softplus(theta)).
        dead_slope: dead-gate remedy of every gate (see :mod:`.gate`; 0: off).

    Input sizes that are not multiples of ``2 ** (levels - 1)`` (or smaller than twice that
    with instance norm) are zero-padded at the end of each axis and the outputs cropped
    back, so any size >= 1 works.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        widths: Sequence[int] | str = "default",
        gate: str = "full",
        norm: str = "batch",
        att_ratio: float = 0.5,
        dilations: Sequence[int] = (1, 2, 3),
        mlp_ratio: float = 0.25,
        theta_init: float = -2.0,
        dead_slope: float = 0.0,
    ):
        super().__init__()
        if isinstance(widths, str):
            if widths not in PRESETS:
                raise ValueError(f"unknown width preset {widths!r}; choose one of {list(PRESETS)}")
            widths = PRESETS[widths]
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths must list at least two positive widths, got {widths}")
        if gate not in GATE_MODES:
            raise ValueError(f"unknown gate {gate!r}; choose one of {GATE_MODES}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")
        self.config: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "widths": list(widths),
            "gate": gate,
            "norm": norm,
            "att_ratio": att_ratio,
            "dilations": list(dilations),
            "mlp_ratio": mlp_ratio,
            "theta_init": theta_init,
        }
        if dead_slope:  # recorded only when used, so older cards stay valid
            self.config["dead_slope"] = dead_slope
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.divisor = 2 ** (len(widths) - 1)
        # instance norm needs more than one voxel at the bottleneck
        self.min_size = 2 * self.divisor if norm == "instance" else self.divisor

        self.pool = maxpool(spatial_dims)(2)
        self.encoder = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.encoder.append(ResBlock(spatial_dims, prev, w, norm))
            prev = w
        self.bottleneck = ResBlock(spatial_dims, widths[-1], widths[-1], norm)

        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoder = nn.ModuleList()
        g_ch = widths[-1]
        for x_ch in reversed(widths[:-1]):  # coarse -> fine
            self.ups.append(UpConv(spatial_dims, g_ch, x_ch, norm))
            self.gates.append(
                SkipGate(
                    spatial_dims,
                    x_ch,
                    x_ch,
                    mode=gate,
                    att_ch=max(round(x_ch * att_ratio), 8),
                    dilations=dilations,
                    mlp_ratio=mlp_ratio,
                    theta_init=theta_init,
                    dead_slope=dead_slope,
                )
            )
            self.decoder.append(ResBlock(spatial_dims, 2 * x_ch, x_ch, norm))
            g_ch = x_ch
        self.head = conv(spatial_dims)(widths[0], out_channels, 1)

    @property
    def n_stages(self) -> int:
        """Number of gated decoder stages (4 for the paper's five levels)."""
        return len(self.gates)

    def padded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial shape the network actually runs at for an input of ``shape``."""
        d = self.divisor
        return tuple(max(int(math.ceil(s / d) * d), self.min_size) for s in shape)

    def forward(
        self, x: torch.Tensor, return_gates: bool = False, return_z: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[GateMaps]]:
        """Segment a batch.

        Args:
            x: ``(N, in_channels, *S)`` with ``len(S) == spatial_dims``.
            return_gates: also return the gate maps of every decoder stage.
            return_z: include the full sparse fields z* in the gate maps (memory heavy).

        Returns:
            logits ``(N, out_channels, *S)``; with ``return_gates`` a tuple
            ``(logits, gates)`` where ``gates[i]`` is the :class:`GateMaps` of decoder stage
            ``i + 1`` (stage 1 at full resolution, stage 4 at 1/8), each map cropped to the
            grid of its skip feature for the unpadded input.
        """
        if x.ndim != self.spatial_dims + 2:
            axes = "N, C, D, H, W" if self.spatial_dims == 3 else "N, C, H, W"
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D tensor ({axes}), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"the model expects {self.in_channels} channel(s), the input has {x.shape[1]}"
            )
        size = tuple(x.shape[2:])
        padded = self.padded_shape(size)
        x = pad_to(x, padded)

        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            if i:
                h = self.pool(h)
            h = block(h)
            skips.append(h)
        g = self.bottleneck(skips.pop())

        maps: list[GateMaps] = []
        for up, gate, dec in zip(self.ups, self.gates, self.decoder):
            x_s = skips.pop()
            g_up = up(g, x_s.shape[2:])
            x_t, m = gate(x_s, g_up, return_maps=return_gates, return_z=return_z)
            g = dec(torch.cat([x_t, g_up], dim=1))
            if m is not None:
                maps.append(m)
        logits = self.head(g)
        if padded != size:
            logits = logits[(..., *(slice(0, s) for s in size))]
        if not return_gates:
            return logits
        maps.reverse()  # finest stage first
        for level, m in enumerate(maps):
            grid = tuple(math.ceil(s / 2**level) for s in size)
            crop = (..., *(slice(0, s) for s in grid))
            for name in ("psi", "zero_map", "z"):
                t = getattr(m, name)
                if t is not None:
                    setattr(m, name, t[crop])
        return logits, maps


def build_model(arch: str = "prosma_unet", **kwargs: Any) -> nn.Module:
    """Build a network by architecture name.

    Args:
        arch: ``"prosma_unet"``, the backbone ablations ``"unet"`` (plain skips) and
            ``"attention_unet"``, or MONAI's ``"monai_unet"`` / ``"monai_attention_unet"``.
        **kwargs: :class:`ProSMAUNet` arguments; ``gate`` defaults to the one ``arch``
            implies and may be set for ablations of ``prosma_unet``. MONAI networks take
            ``spatial_dims``, ``in_channels``, ``out_channels``, ``widths`` and ``norm``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHITECTURES)}")
    if arch.startswith("monai_"):
        from .monai_nets import MonaiNet

        gate = kwargs.pop("gate", ARCHITECTURES[arch])
        if gate != ARCHITECTURES[arch]:
            raise ValueError(f"{arch} has no gate option")
        allowed = {"spatial_dims", "in_channels", "out_channels", "widths", "norm"}
        extra = sorted(set(kwargs) - allowed)
        if extra:
            raise ValueError(f"{arch} does not take {', '.join(extra)}")
        return MonaiNet(arch, **kwargs)
    kwargs.setdefault("gate", ARCHITECTURES[arch])
    if arch != "prosma_unet" and kwargs["gate"] != ARCHITECTURES[arch]:
        raise ValueError(f"{arch} implies gate={ARCHITECTURES[arch]!r}")
    return ProSMAUNet(**kwargs)
