"""Layer lookups by ``spatial_dims`` so 2D and 3D share one code path.

In the spirit of MONAI's ``networks/layers/factories.py``: every block asks for
``conv(spatial_dims)`` rather than naming ``nn.Conv2d`` or ``nn.Conv3d``.
"""

from __future__ import annotations

from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_BATCHNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCENORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_INTERP = {2: "bilinear", 3: "trilinear"}

NORMS = ("batch", "instance", "group", "none")


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def conv(spatial_dims: int) -> type[nn.Module]:
    """Return ``nn.Conv2d`` or ``nn.Conv3d``."""
    _check_dims(spatial_dims)
    return _CONV[spatial_dims]


def maxpool(spatial_dims: int) -> type[nn.Module]:
    """Return ``nn.MaxPool2d`` or ``nn.MaxPool3d``."""
    _check_dims(spatial_dims)
    return _MAXPOOL[spatial_dims]


def global_avgpool(spatial_dims: int) -> nn.Module:
    """Global average pooling to a 1-voxel map: ``(N, C, *S) -> (N, C, 1, ...)``."""
    _check_dims(spatial_dims)
    return _AVGPOOL[spatial_dims](1)


def interp_mode(spatial_dims: int) -> str:
    """``"bilinear"`` in 2D, ``"trilinear"`` in 3D."""
    _check_dims(spatial_dims)
    return _INTERP[spatial_dims]


def norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """Build a normalisation layer.

    Args:
        kind: ``"batch"``, ``"instance"`` (affine), ``"group"`` (8 groups or fewer) or ``"none"``.
        spatial_dims: 2 or 3.
        channels: number of feature channels.
    """
    _check_dims(spatial_dims)
    if kind == "batch":
        return _BATCHNORM[spatial_dims](channels)
    if kind == "instance":
        return _INSTANCENORM[spatial_dims](channels, affine=True)
    if kind == "group":
        groups = 8
        while channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")
