"""Networks: ProSMA-UNet and its baselines, one code path for 2D and 3D."""

from .gate import GATE_MODES, GateMaps, SkipGate, soft_threshold, theta_for_lambda
from .unet import ARCHITECTURES, PRESETS, ProSMAUNet, build_model

__all__ = [
    "ARCHITECTURES",
    "GATE_MODES",
    "PRESETS",
    "GateMaps",
    "ProSMAUNet",
    "SkipGate",
    "build_model",
    "soft_threshold",
    "theta_for_lambda",
]
