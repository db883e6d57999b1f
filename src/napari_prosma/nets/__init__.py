"""Networks: ProSMA-UNet and its baselines, one code path for 2D and 3D."""

from .gate import (
    GATE_MODES,
    SPARSE_MODES,
    GateMaps,
    SkipGate,
    exact_removal,
    soft_threshold,
    soft_threshold_st,
    theta_for_lambda,
)
from .unet import ARCH_TITLES, ARCHITECTURES, PRESETS, ProSMAUNet, build_model

__all__ = [
    "ARCHITECTURES",
    "ARCH_TITLES",
    "GATE_MODES",
    "PRESETS",
    "SPARSE_MODES",
    "GateMaps",
    "ProSMAUNet",
    "SkipGate",
    "build_model",
    "exact_removal",
    "soft_threshold",
    "soft_threshold_st",
    "theta_for_lambda",
]
