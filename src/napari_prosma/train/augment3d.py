"""Spatial and intensity augmentation of 3D training batches on the GPU (nnU-Net-like).

Everything is a tensor operation with static shapes whose random draws are made on the
device, so a whole training step (gather, augment, forward, backward, optimiser) can still
be captured once in a CUDA graph. Each sample draws its own transform; a transform that is
"not applied" (its probability not met) is the identity, so every sample goes through the
same kernels.

- :func:`spatial`: rotation (±30° about each axis, p = 0.2 each), isotropic scaling
  (0.7-1.4, p = 0.2) and a random placement of the volume inside the patch (where the
  patch is larger than the volume), all in one ``affine_grid`` + ``grid_sample`` in voxel
  units (1 mm, isotropic); the image is sampled linearly, the labels by nearest neighbour;
  outside the volume both read 0, i.e. the background (the recipe's normalisation maps the
  image's minimum to 0, so padding and rotated-in corners are background, as at inference).
- :func:`intensity`: Gaussian noise (p 0.1), Gaussian blur (p 0.2, sigma 0.5-1 voxel),
  multiplicative brightness (p 0.15, 0.75-1.25), contrast (p 0.15, 0.75-1.25, range kept),
  low-resolution simulation (p 0.25: blended with a 2x down- and up-sampled copy) and gamma
  (p 0.3, 0.7-1.5, on the inverted image with p 0.1), as nnU-Net's default pipeline.

Deep supervision and elastic deformation are not implemented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Probabilities and ranges (nnU-Net's defaults where it has them).
P_ROT, MAX_ROT = 0.2, math.radians(30.0)
P_SCALE, SCALE = 0.2, (0.7, 1.4)
P_NOISE, NOISE_VAR = 0.1, 0.1
P_BLUR, BLUR_SIGMA = 0.2, (0.5, 1.0)
P_BRIGHT, BRIGHT = 0.15, (0.75, 1.25)
P_CONTRAST, CONTRAST = 0.15, (0.75, 1.25)
P_LOWRES = 0.25
P_GAMMA, GAMMA, P_GAMMA_INV = 0.3, (0.7, 1.5), 0.1

#: What a model card says about this augmentation.
DESCRIPTION = (
    "; on the GPU (augment3d): rotation ±30° per axis (p 0.2 each), scaling 0.7-1.4 (p 0.2), "
    "random placement in the patch, background (0) outside the volume; Gaussian noise (p 0.1), "
    "blur (p 0.2), brightness (p 0.15), contrast (p 0.15), low-resolution simulation (p 0.25), "
    "gamma (p 0.3, inverted p 0.1)"
)


def _rot(axis: int, a: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(B, 3, 3)`` by angles ``a`` ``(B,)`` about ``axis``."""
    b = a.shape[0]
    c, s = torch.cos(a), torch.sin(a)
    m = torch.zeros(b, 3, 3, device=a.device)
    i, j = [k for k in range(3) if k != axis]
    m[:, axis, axis] = 1.0
    m[:, i, i] = c
    m[:, j, j] = c
    m[:, i, j] = -s
    m[:, j, i] = s
    return m


def _uniform(r: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * r


def spatial(
    x: torch.Tensor, y: torch.Tensor, extent: torch.Tensor, n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate, scale and place ``x`` ``(B, 1, D, H, W)`` and labels ``y`` (same shape).

    Args:
        extent: ``(B, 3)`` the size of the volume's content in each patch (from the patch's
            first voxel; beyond it the patch holds padding). The content's centre is moved
            to a random position at which the unrotated content still fits the patch.
        n: ``(3,)`` the patch size as a tensor on the device (no host copy inside a CUDA
            graph).
    """
    b, dev = x.shape[0], x.device
    n = n.float()
    ext = extent.float().minimum(n)
    r = torch.rand(b, 9, device=dev)
    m = torch.eye(3, device=dev).expand(b, 3, 3)
    for ax in range(3):
        ang = _uniform(r[:, ax], -MAX_ROT, MAX_ROT) * (r[:, 3 + ax] < P_ROT)
        m = m @ _rot(ax, ang)
    scale = torch.where(r[:, 6] < P_SCALE, _uniform(r[:, 7], *SCALE), torch.ones_like(r[:, 7]))
    m = m / scale.view(b, 1, 1)  # output -> input: a scale > 1 enlarges the content
    c_in = ext / 2  # content centre, voxel units from the patch corner (voxel i at i + 0.5)
    c_out = ext / 2 + torch.rand(b, 3, device=dev) * (n - ext)
    # input = c_in + M (q - c_out) in voxels; affine_grid maps normalised output coordinates
    # n_out = 2 q / N - 1 to normalised input coordinates, in (W, H, D) order
    half = n / 2
    lin = m * half.view(1, 1, 3) / half.view(1, 3, 1)  # D^-1 M D
    off = (c_in + (m @ (half - c_out).unsqueeze(-1)).squeeze(-1)) / half - 1
    theta = torch.cat([lin.flip(1, 2), off.flip(1).unsqueeze(-1)], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    yf = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x, yf.round().to(y.dtype)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur (5 taps) of each sample with its own ``sigma`` ``(B,)``."""
    b = x.shape[0]
    t = torch.arange(-2, 3, device=x.device, dtype=torch.float32)
    k = torch.exp(-(t.view(1, 5) ** 2) / (2 * sigma.view(b, 1) ** 2))
    k = k / k.sum(1, keepdim=True)
    h = x.reshape(1, b, *x.shape[2:])
    for dim in range(3):
        shape = [b, 1, 1, 1, 1]
        shape[2 + dim] = 5
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = 2
        h = F.conv3d(F.pad(h, pad, mode="replicate"), k.view(shape), groups=b)
    return h.reshape(x.shape)


def intensity(x: torch.Tensor) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low resolution and gamma on ``x`` ``(B, 1, *S)``."""
    b, dev = x.shape[0], x.device
    r = torch.rand(b, 16, device=dev)

    def on(p: float, j: int) -> torch.Tensor:
        return (r[:, j] < p).view(b, 1, 1, 1, 1)

    def per(v: torch.Tensor) -> torch.Tensor:
        return v.view(b, 1, 1, 1, 1)

    flat = x.flatten(1)
    std = per(flat.std(1).clamp_min(1e-6))
    sd = torch.sqrt(_uniform(r[:, 1], 0.0, NOISE_VAR)) * std.view(b)
    x = torch.where(on(P_NOISE, 0), x + torch.randn_like(x) * per(sd), x)
    x = torch.where(on(P_BLUR, 2), _blur(x, _uniform(r[:, 3], *BLUR_SIGMA)), x)
    x = torch.where(on(P_BRIGHT, 4), x * per(_uniform(r[:, 5], *BRIGHT)), x)
    flat = x.flatten(1)
    lo, hi, mean = per(flat.amin(1)), per(flat.amax(1)), per(flat.mean(1))
    c = (x - mean) * per(_uniform(r[:, 7], *CONTRAST)) + mean
    x = torch.where(on(P_CONTRAST, 6), torch.minimum(torch.maximum(c, lo), hi), x)
    low = F.interpolate(F.avg_pool3d(x, 2, ceil_mode=True), size=x.shape[2:], mode="trilinear")
    x = torch.where(on(P_LOWRES, 8), torch.lerp(x, low, per(r[:, 9])), x)
    inv = on(P_GAMMA_INV, 10)
    xs = torch.where(inv, -x, x)
    flat = xs.flatten(1)
    lo, hi = per(flat.amin(1)), per(flat.amax(1))
    span = (hi - lo).clamp_min(1e-6)
    g = ((xs - lo) / span).clamp(0, 1) ** per(_uniform(r[:, 12], *GAMMA)) * span + lo
    g = torch.where(inv, -g, g)
    return torch.where(on(P_GAMMA, 11), g, x)
