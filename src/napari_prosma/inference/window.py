"""One tiled pass on one device: Gaussian-blended sliding windows through MONAI, flip TTA,
and the gate maps of every decoder stage, on the input grid.

:func:`run_window` is one attempt of :func:`~napari_prosma.inference.predict_batch` (which
retries it with smaller tiles or on the CPU after running out of memory); its settings are
one :class:`WindowOptions`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import Cancelled
from ..preprocess import InputError
from . import device as dev
from .accel import Forward
from .resample import gate_to_grid, resize
from .stitch import sliding_window
from .tiling import TilePredictor, aligned_overlap, count_windows, pad_to
from .types import StageGates

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard

#: Stitched outputs larger than this many float32 values are kept in host memory.
GPU_STITCH_LIMIT = 1 << 29


@dataclass(frozen=True)
class WindowOptions:
    """The settings of one tiled pass.

    Attributes:
        device: where the network runs.
        in_shape: spatial shape of the (prepared) input images, ``(*S)``.
        work: the working grid the network sees (the training spacing), ``(*W)``.
        padded: ``work`` padded up to at least one tile, ``(*P)``.
        tile: spatial tile edge per axis.
        batch: tiles per forward pass.
        overlap: fraction of tile overlap in [0, 1) (aligned to the gate grids here).
        tta: average over all axis flips and return the spread as uncertainty.
        want_probs: return the class probabilities.
        want_gates: return the per-channel gate values (``c``, ``zero_frac``, ``lam``).
        want_gate_maps: also the gate maps (psi, zero fraction) on the input grid.
        progress: ``progress(done, total)`` after each tile batch, or None.
        cancelled: returns True once the user asked to stop.
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        accelerate: ``"none"``, ``"graph"`` or ``"compile"`` (CUDA only; see
            :mod:`.accel`).
    """

    device: torch.device
    in_shape: tuple[int, ...]
    work: tuple[int, ...]
    padded: tuple[int, ...]
    tile: tuple[int, ...]
    batch: int
    overlap: float
    tta: bool = False
    want_probs: bool = False
    want_gates: bool = False
    want_gate_maps: bool = False
    progress: Callable[[int, int], Any] | None = None
    cancelled: Callable[[], bool] = lambda: False
    precision: str = "auto"
    accelerate: str = "none"


def stitch_device(device: torch.device, n_values: int) -> torch.device:
    """Where MONAI stitches the outputs: on the accelerator when they (and the copies made
    while resampling them) fit comfortably in its free memory, else in host memory."""
    import torch

    if device.type == "cpu":
        return device
    need = 3 * 4 * n_values  # float32 output + count map + a resampled copy
    if device.type == "cuda":
        try:
            free = torch.cuda.mem_get_info(device)[0]
        except Exception:
            free = 0
        ok = need < 0.3 * free and n_values <= GPU_STITCH_LIMIT
    else:
        ok = n_values <= GPU_STITCH_LIMIT // 4
    return device if ok else torch.device("cpu")


def run_window(
    prepared: torch.Tensor, model: torch.nn.Module, card: ModelCard, opts: WindowOptions
) -> tuple[list[dict[str, Any]], int]:
    """One attempt on one device.

    Args:
        prepared: ``(N, C, *S)`` float32 images (any device), normalised as the card says.
        model: the network (moved to ``opts.device`` here).
        card: its model card.
        opts: the pass's settings.

    Returns:
        One dict per image (``labels``, ``probabilities``, ``uncertainty``, ``gates``, the
        phase times ``_t_infer`` / ``_t_post`` and ``_notes``) and the number of tiles per
        image.

    Raises:
        Cancelled: ``opts.cancelled()`` turned True.
        InputError: the network produced NaN.
    """
    t0 = time.perf_counter()
    out, predictor, n_win = _stitch(prepared, model, card, opts)
    if opts.cancelled():
        raise Cancelled()
    t1 = time.perf_counter()
    results = _outputs(out, predictor, model, card, opts, int(prepared.shape[0]))
    t2 = time.perf_counter()
    note = predictor.forward.note() if hasattr(predictor.forward, "note") else None
    for r in results:
        r["_t_infer"], r["_t_post"] = t1 - t0, t2 - t1
        r["_notes"] = [note] if note else []
    return results, n_win


def _stitch(
    prepared: torch.Tensor, model: torch.nn.Module, card: ModelCard, opts: WindowOptions
) -> tuple[dict[str, Any], TilePredictor, int]:
    """The sliding-window pass: stitched ``(N, K, *P)`` maps by name, the predictor that
    pooled the per-tile gate values, and the number of windows per image.

    Full-resolution outputs are stitched by :func:`.stitch.sliding_window`; with gate maps
    (on coarser grids) MONAI's ``sliding_window_inference`` does it."""
    import torch

    device = opts.device
    fmt = dev.memory_format(device, len(opts.in_shape), inference=True)
    dev.setup_backend(device)
    # outside inference mode: parameters created here must stay usable for training
    # (fine-tuning the same model object after a prediction)
    with torch.inference_mode(False):
        model.to(device=device, memory_format=fmt)
    n_img = int(prepared.shape[0])
    x = pad_to(resize(prepared.to(device), opts.work), opts.padded)
    n_stages = int(getattr(model, "n_stages", 0))
    ov = aligned_overlap(opts.tile, opts.overlap, 2 ** max(n_stages - 1, 0))
    n_win = count_windows(opts.padded, opts.tile, ov)
    binary = card.out_channels == 1
    want_gates = opts.want_gates and n_stages > 0
    gate_maps = want_gates and opts.want_gate_maps
    predictor = TilePredictor(
        model,
        device=device,
        binary=binary,
        tta=opts.tta,
        gates=want_gates,
        gate_maps=gate_maps,
        n_images=n_img,
        memory_format=fmt,
        autocast=lambda: dev.autocast(device, opts.precision),
        progress=opts.progress,
        total=math.ceil(n_img * n_win / opts.batch),
        cancelled=opts.cancelled,
        forward=Forward(model, opts.accelerate, device, dev.autocast_dtype(device, opts.precision)),
    )
    k = 1 if binary else card.out_channels
    n_maps = k * (2 if opts.tta else 1) + (2 if gate_maps else 0)
    out_device = stitch_device(device, n_img * math.prod(opts.padded) * n_maps)
    if not gate_maps:
        x = x.contiguous(memory_format=fmt)  # once, not per batch
        return sliding_window(x, opts.tile, ov, opts.batch, predictor, out_device), predictor, n_win
    from monai.inferers import sliding_window_inference

    out = sliding_window_inference(
        x,
        opts.tile,
        opts.batch,
        predictor,
        overlap=ov,
        mode="gaussian",
        sw_device=device,
        device=out_device,
        with_coord=True,
    )
    return out, predictor, n_win


def _outputs(
    out: dict[str, Any],
    predictor: TilePredictor,
    model: torch.nn.Module,
    card: ModelCard,
    opts: WindowOptions,
    n_img: int,
) -> list[dict[str, Any]]:
    """Labels, probabilities, uncertainty and gates per image, on the input grid (numpy)."""
    import torch

    binary = card.out_channels == 1
    k = 1 if binary else card.out_channels
    crop = (slice(None), slice(None), *(slice(0, s) for s in opts.work))
    probs = resize(out["0_prob"][crop], opts.in_shape)
    if not bool(torch.isfinite(probs).all()):  # argmax of NaN would label it all background
        raise InputError(
            "the model produced invalid numbers (NaN) for this image: its intensities may be "
            "far outside what the model was trained on, or the model itself is broken"
        )
    if binary:
        labels = (probs[:, 0] > 0.5).to(torch.uint8)
    else:
        labels = probs.argmax(1).to(torch.uint8 if k <= 256 else torch.int32)
    unc = None
    if opts.tta:
        var = (resize(out["0_sq"][crop], opts.in_shape) - probs * probs).clamp_min(0)
        unc = var.mean(1).sqrt()
    # one transfer each to host memory, then split per image
    labels_np = labels.cpu().numpy()
    if labels_np.dtype != np.uint8:
        labels_np = labels_np.astype(np.uint16)
    probs_np = None
    if opts.want_probs:
        probs_np = (torch.cat([1 - probs, probs], dim=1) if binary else probs).float()
        probs_np = probs_np.cpu().numpy()
    unc_np = None if unc is None else unc.float().cpu().numpy()
    n_stages = int(getattr(model, "n_stages", 0))
    want_gates = opts.want_gates and n_stages > 0
    return [
        {
            "labels": labels_np[i],
            "probabilities": None if probs_np is None else probs_np[i],
            "uncertainty": None if unc_np is None else unc_np[i],
            "gates": _gates(out, predictor, model, i, n_stages, opts) if want_gates else [],
        }
        for i in range(n_img)
    ]


def _gates(
    out: dict[str, Any],
    predictor: TilePredictor,
    model: torch.nn.Module,
    i: int,
    n_stages: int,
    opts: WindowOptions,
) -> list[StageGates]:
    """Per-stage gate maps of image ``i`` on the input grid, finest stage first."""
    stages = []
    for s in range(1, n_stages + 1):
        scale = 2 ** (s - 1)
        g = StageGates(stage=s, scale=scale)
        for key, attr in ((f"{s}_psi", "psi"), (f"{s}_zero", "zero_map")):
            if key in out:
                t = gate_to_grid(out[key][i : i + 1], scale, opts.padded, opts.work)
                setattr(g, attr, resize(t, opts.in_shape)[0, 0].float().cpu().numpy())
        g.c, g.zero_frac = predictor.stage_stats(s, i)
        if g.zero_frac is not None:
            g.zero_frac_mean = float(np.mean(g.zero_frac))
        gates = getattr(model, "gates", None)  # built coarse -> fine
        gate = gates[n_stages - s] if gates is not None else None
        lam = getattr(gate, "lam", None)
        g.lam = None if lam is None else lam.detach().float().cpu().numpy()
        if any(v is not None for v in (g.psi, g.zero_map, g.c, g.lam)):
            stages.append(g)
    return stages
