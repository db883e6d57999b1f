"""Tiles: their size, their overlap, and the per-tile-batch predictor MONAI's
``sliding_window_inference`` calls (flip TTA, gate maps, progress and cancel)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .resample import ceil_to
from .types import Cancelled

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard

#: Tile size when the card names no patch size and the image is too big to run whole.
DEFAULT_TILE = {2: (256, 256), 3: (96, 96, 96)}
#: Images up to this many pixels/voxels run as one tile when the card names no patch size.
WHOLE_IMAGE_LIMIT = {2: 1024 * 1024, 3: 160**3}
#: Voxels per tile batch on CUDA (the batch size is this over the tile's voxels).
CUDA_BATCH_VOXELS = {2: 64 * 256 * 256, 3: 4 * 96**3}
#: Voxels per tile batch on the CPU: oneDNN runs small tiles about twice as fast per tile in
#: batches (hippocampus crop, 8 tiles of 32x48x32: 1.4-1.6 CPU-s at batch 4, 2.5-3.2 at 1 on
#: the busy 2-core dev machine, issue 18); at most 4 tiles: 8 went past the bounded-memory
#: test's limit (16x the image) and was no faster.
CPU_BATCH_VOXELS = {2: 4 * 256 * 256, 3: 4 * 32 * 48 * 32}
CPU_MAX_BATCH = 4


def round_tile(
    tile: Sequence[int], padded: Sequence[int], divisor: int, min_size: int
) -> tuple[int, ...]:
    """Make a tile fit the network (a multiple of ``divisor``, at least ``min_size``) and
    the padded image (never larger)."""
    out = []
    for t, p in zip(tile, padded):
        t = max(int(t), 1)
        t = max(round(t / divisor) * divisor, divisor, min_size)
        out.append(min(t, int(p)))
    return tuple(out)


def choose_tile(
    padded: Sequence[int],
    card: ModelCard,
    divisor: int,
    min_size: int,
    tile_size: int | Sequence[int] | None = None,
) -> tuple[int, ...]:
    """The spatial tile size: ``tile_size`` if given, else the card's ``patch_size``, else
    the whole image if it is small, else 256² / 96³; rounded to suit the network."""
    nd = len(padded)
    if tile_size is not None:
        tile = [int(tile_size)] * nd if isinstance(tile_size, int) else list(tile_size)
        if len(tile) != nd:
            raise ValueError(f"tile_size {tuple(tile)} does not match the {nd}D image")
    elif card.patch_size and len(card.patch_size) == nd:
        tile = list(card.patch_size)
    elif math.prod(padded) <= WHOLE_IMAGE_LIMIT[nd]:
        tile = list(padded)
    else:
        tile = list(DEFAULT_TILE[nd])
    return round_tile(tile, padded, divisor, min_size)


def aligned_overlap(tile: Sequence[int], overlap: float, align: int) -> tuple[float, ...]:
    """Per-axis overlap whose tile step is a multiple of ``align``, so every tile starts on
    the grid of the coarsest gate map (exact stitching of the low-resolution outputs)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    out = []
    for t in tile:
        step = max(int(t * (1 - overlap)) // align * align, align)
        step = min(step, t)
        # MONAI takes int(t * (1 - o)) as the step: aim half a voxel above it against rounding
        out.append(0.0 if step >= t else 1 - (step + 0.5) / t)
    return tuple(out)


def count_windows(shape: Sequence[int], tile: Sequence[int], overlap: Sequence[float]) -> int:
    """How many tiles MONAI runs on one image (its ``_get_scan_interval`` logic)."""
    n = 1
    for s, t, o in zip(shape, tile, overlap):
        step = t if t == s else max(int(t * (1 - o)), 1)
        n *= 1 if t >= s else math.ceil((s - t) / step) + 1
    return n


def default_batch_size(device: torch.device, tile: Sequence[int], widths: Sequence[int]) -> int:
    """Tiles per forward pass: many on CUDA (fills the GPU), up to 4 small ones on the CPU
    (see :data:`CPU_BATCH_VOXELS`), one on MPS."""
    if device.type not in ("cuda", "cpu"):
        return 1
    nd = len(tile)
    width_factor = max(widths[0] / 32, 0.25) if widths else 1.0
    budget = CUDA_BATCH_VOXELS if device.type == "cuda" else CPU_BATCH_VOXELS
    n = budget[nd] / (math.prod(tile) * width_factor)
    return int(min(max(n, 1), 64 if device.type == "cuda" else CPU_MAX_BATCH))


def flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """All 2**d combinations of flipped spatial axes of an ``(N, C, *S)`` tensor."""
    axes = range(2, 2 + spatial_dims)
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


class TilePredictor:
    """The predictor MONAI calls on each batch of tiles.

    Returns a dict of outputs MONAI blends with its Gaussian weights, keyed so that sorting
    the keys visits finer outputs first (MONAI requires it for mixed scales):
    ``"0_prob"`` (foreground probability for a binary model, else class probabilities),
    ``"0_sq"`` (their mean square over flips, TTA only), and per gate stage ``s`` (1-based)
    ``f"{s}_psi"`` and ``f"{s}_zero"`` on that stage's grid. Per-image channel gates and
    per-channel zero fractions are averaged over tiles in ``self.c_sum``/``self.zf_sum``.

    Args:
        model: the network (on the tiles' device, eval mode).
        device: where tiles run.
        binary: single-output model (sigmoid) rather than softmax.
        tta: average over all axis flips.
        gates: also run the gates' outputs and pool their per-channel values.
        gate_maps: also return the gate maps for MONAI to stitch (with ``gates``).
        n_images: images in the whole batch (for the per-image statistics).
        memory_format: layout for the tiles (channels-last on CUDA).
        autocast: context manager factory for mixed precision.
        progress: ``progress(done, total)`` after each tile batch.
        total: the number of tile batches, for ``progress``.
        cancelled: returns True when the user asked to stop.
        forward: what runs the network, ``forward(x, return_gates=...)`` (default the
            model itself; :class:`~napari_prosma.inference.accel.Forward` for a captured
            or compiled one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        binary: bool,
        tta: bool,
        gates: bool,
        gate_maps: bool = True,
        n_images: int,
        memory_format: torch.memory_format,
        autocast: Callable[[], Any],
        progress: Callable[[int, int], Any] | None,
        total: int,
        cancelled: Callable[[], bool],
        forward: Callable[..., Any] | None = None,
    ):
        self.model = model
        self.forward = forward if forward is not None else model
        self.device = device
        self.binary = binary
        self.flips = flip_sets(model.spatial_dims) if tta else [()]
        self.gates = gates
        self.gate_maps = gate_maps
        self.n_images = n_images
        self.memory_format = memory_format
        self.autocast = autocast
        self.progress = progress
        self.total = total
        self.cancelled = cancelled
        self.done = 0
        self.c_sum: dict[int, torch.Tensor] = {}
        self.zf_sum: dict[int, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        logits = logits.float()
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=1)

    def __call__(self, x: torch.Tensor, coords: Sequence[Sequence[slice]]) -> dict[str, Any]:

        if self.cancelled():
            raise Cancelled()
        x = x.contiguous(memory_format=self.memory_format)
        out: dict[str, torch.Tensor] = {}
        mean = sq = None
        for flip in self.flips:
            xin = x.flip(flip) if flip else x
            with self.autocast():
                res = self.forward(xin, return_gates=self.gates and not flip)
            logits, maps = res if isinstance(res, tuple) else (res, None)
            p = self._activate(logits)
            if flip:
                p = p.flip(flip)
            mean = p if mean is None else mean + p
            if len(self.flips) > 1:
                sq = p * p if sq is None else sq + p * p
            if maps is not None:
                self._collect(maps, coords, out)
        n = len(self.flips)
        out["0_prob"] = mean / n if n > 1 else mean
        if sq is not None:
            out["0_sq"] = sq / n
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        return out

    def _collect(self, maps: list, coords: Sequence[Sequence[slice]], out: dict) -> None:
        import torch

        idx = torch.tensor([int(c[0].start) for c in coords], device=self.device)
        if self.counts is None:
            self.counts = torch.zeros(self.n_images, device=self.device)
        self.counts.index_add_(0, idx, torch.ones(len(idx), device=self.device))
        for s, m in enumerate(maps, start=1):
            if self.gate_maps and m.psi is not None:
                out[f"{s}_psi"] = m.psi.float()
            if self.gate_maps and m.zero_map is not None:
                out[f"{s}_zero"] = m.zero_map.float()
            for name, acc in (("c", self.c_sum), ("zero_frac", self.zf_sum)):
                v = getattr(m, name)
                if v is None:
                    continue
                v = v.float()
                if s not in acc:
                    acc[s] = torch.zeros(self.n_images, v.shape[1], device=self.device)
                acc[s].index_add_(0, idx, v)

    def stage_stats(self, stage: int, image: int) -> tuple[Any, Any]:
        """``(c, zero_frac)`` of one stage for one image, averaged over its tiles (numpy or
        None)."""
        if self.counts is None:
            return None, None
        n = max(float(self.counts[image]), 1.0)
        c = self.c_sum.get(stage)
        zf = self.zf_sum.get(stage)
        return (
            None if c is None else (c[image] / n).cpu().numpy(),
            None if zf is None else (zf[image] / n).cpu().numpy(),
        )


def pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``(N, C, *S)`` at the end of each spatial axis up to ``shape``."""
    import torch.nn.functional as F

    pad: list[int] = []
    for s, p in zip(reversed(t.shape[2:]), reversed(tuple(shape))):
        pad += [0, int(p) - int(s)]
    return F.pad(t, pad) if any(pad) else t


def padded_shape(shape: Sequence[int], divisor: int, min_size: int) -> tuple[int, ...]:
    """``shape`` rounded up to a multiple of ``divisor`` and at least ``min_size``."""
    return tuple(max(ceil_to(int(s), divisor), min_size) for s in shape)
