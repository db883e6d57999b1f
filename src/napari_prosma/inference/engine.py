"""``predict``: card-driven preparation, tiled Gaussian-blended inference through MONAI,
flip TTA, resampling, gate maps on the input grid, out-of-memory fallback."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..preprocess import InputError, prepare
from . import device as dev
from .resample import gate_to_grid, resize, working_shape
from .tiling import (
    TilePredictor,
    aligned_overlap,
    choose_tile,
    count_windows,
    default_batch_size,
    pad_to,
    padded_shape,
    round_tile,
)
from .types import Cancelled, Prediction, StageGates

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard

CancelFlag = Callable[[], bool] | threading.Event | None
#: Stitched outputs larger than this many float32 values are kept in host memory.
GPU_STITCH_LIMIT = 1 << 29


def load_model(
    name_or_path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[torch.nn.Module, ModelCard]:
    """Load a bundled model by name or a checkpoint by path, in eval mode on ``device``.

    Args:
        name_or_path: a bundled model's name (see ``checkpoint.list_bundled``) or a path.
        device: ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Raises:
        CheckpointError: no such model, or a corrupt/mismatched checkpoint.
        InputError: the device does not exist here.
    """
    from ..checkpoint import load, resolve

    return load(resolve(name_or_path), device=dev.resolve_device(device))


def _cancel_check(cancel: CancelFlag) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set  # type: ignore[union-attr]
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError("cancel must be a callable or a threading.Event")


def predict(
    image: np.ndarray,
    model: torch.nn.Module,
    card: ModelCard,
    *,
    spacing: Sequence[float] | None = None,
    channel_axis: int | None = None,
    device: str | torch.device = "auto",
    tile_size: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    tta: bool = False,
    return_probabilities: bool = False,
    return_gates: bool = False,
    progress: Callable[[int, int], Any] | None = None,
    cancel: CancelFlag = None,
    batch_size: int | None = None,
    precision: str = "auto",
) -> Prediction:
    """Segment one image or volume.

    Args:
        image: ``(H, W)`` grey, ``(H, W, 3)`` RGB (or ``(3, H, W)``), or ``(Z, Y, X)``.
        model: a :class:`~napari_prosma.nets.ProSMAUNet` (moved to the chosen device; it is
            run in eval mode and its train/eval mode restored afterwards).
        card: its model card: normalisation, patch size, training spacing / input size.
        spacing: voxel spacing of ``image`` per spatial axis (mm, same axis order); for a
            3D model whose card has a training ``spacing`` the volume is resampled to it and
            the result back to the input grid.
        channel_axis: axis of ``image`` holding channels, if not the usual place.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cuda"``, ``"mps"`` or ``"cpu"``.
        tile_size: tile edge(s); default the card's ``patch_size``, else the whole image if
            small, else 256² / 96³ (rounded to a multiple of the network's divisor).
        overlap: fraction of tile overlap, in [0, 1); tiles are blended with Gaussian weights.
        tta: also average over all axis flips (4 in 2D, 8 in 3D) and return an uncertainty.
        return_probabilities: also return per-class probabilities.
        return_gates: also return the gate maps of every decoder stage on the input grid.
        progress: called as ``progress(done, total)`` after each batch of tiles.
        cancel: callable or ``threading.Event``; checked between tile batches.
        batch_size: tiles per forward pass (default: many on CUDA, 1 on CPU).
        precision: ``"auto"`` (bf16 autocast on CUDA and on CPUs with native bf16, fp32
            elsewhere), ``"fp32"`` or ``"bf16"``.

    Returns:
        A :class:`Prediction` on the input grid.

    Raises:
        InputError: an image the model cannot take (wrong channels, NaN, wrong dimensions).
        Cancelled: ``cancel`` was set; nothing is returned or kept.
    """
    return predict_batch(
        [image],
        model,
        card,
        spacing=spacing,
        channel_axis=channel_axis,
        device=device,
        tile_size=tile_size,
        overlap=overlap,
        tta=tta,
        return_probabilities=return_probabilities,
        return_gates=return_gates,
        progress=progress,
        cancel=cancel,
        batch_size=batch_size,
        precision=precision,
    )[0]


def predict_batch(
    images: Sequence[np.ndarray] | np.ndarray,
    model: torch.nn.Module,
    card: ModelCard,
    *,
    spacing: Sequence[float] | None = None,
    channel_axis: int | None = None,
    device: str | torch.device = "auto",
    tile_size: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    tta: bool = False,
    return_probabilities: bool = False,
    return_gates: bool = False,
    progress: Callable[[int, int], Any] | None = None,
    cancel: CancelFlag = None,
    batch_size: int | None = None,
    precision: str = "auto",
) -> list[Prediction]:
    """Segment several images of one shape together (tiles of all images share batches).

    Same arguments as :func:`predict`; ``images`` is a sequence (or a stacked array whose
    first axis indexes images). Returns one :class:`Prediction` per image.
    """
    import torch

    t0 = time.perf_counter()
    cancelled = _cancel_check(cancel)
    if cancelled():
        raise Cancelled()
    if not 0 <= overlap < 1:
        raise InputError(f"the tile overlap must be at least 0 and below 1, got {overlap}")
    if len(images) == 0:
        return []
    prepared, notes = [], []
    for im in images:
        x, n = prepare(im, card.in_channels, card.spatial_dims, card.normalization, channel_axis)
        prepared.append(x)
        notes = notes or list(n)
    shapes = {x.shape for x in prepared}
    if len(shapes) > 1:
        raise InputError(f"images segmented together must share one shape, got {sorted(shapes)}")
    in_shape = tuple(prepared[0].shape[1:])
    work, grid_notes = working_shape(in_shape, spacing, card)
    notes += grid_notes
    t_prep = time.perf_counter()

    device_ = dev.resolve_device(device)
    dev.autocast_dtype(device_, precision)  # refuse an unknown precision before any work
    divisor = int(getattr(model, "divisor", 16))
    min_size = int(getattr(model, "min_size", divisor))
    tile = choose_tile(padded_shape(work, divisor, min_size), card, divisor, min_size, tile_size)
    # Pad only where the image is smaller than a tile: windows then lie inside the image,
    # as in MONAI. Padding up to a multiple of the network's divisor instead filled tiles
    # with zeros the model never saw in training and cost 2-6 Dice points on hippocampus.
    padded = tuple(max(int(w), int(t)) for w, t in zip(work, tile))
    widths = getattr(model, "config", {}).get("widths") or [32]
    batch = int(batch_size) if batch_size else default_batch_size(device_, tile, widths)
    was_training = model.training
    model.eval()
    first_tile, attempt = tile, 0
    try:
        while True:
            try:
                with torch.inference_mode():
                    outs, n_tiles = _run(
                        prepared,
                        model,
                        card,
                        device_,
                        in_shape,
                        work,
                        padded,
                        tile,
                        batch,
                        overlap,
                        tta,
                        return_probabilities,
                        return_gates,
                        progress,
                        cancelled,
                        precision,
                    )
                break
            except Exception as e:
                if not dev.is_oom(e):
                    raise
                dev.empty_cache(device_)
                step = _fallback(device_, first_tile, attempt, divisor, min_size, padded)
                attempt += 1
                if step is None:
                    raise InputError(
                        "ran out of memory even on the CPU with small tiles; close other "
                        "programs or crop the image"
                    ) from None
                device_, tile, batch, note = step
                notes.append(note)
    finally:
        model.train(was_training)
    if return_gates and not any(o["gates"] for o in outs):
        notes.append("this model has plain skip connections: it has no gates to show")
    t_end = time.perf_counter()
    results = []
    for o in outs:
        timings = {
            "prepare": t_prep - t0,
            "inference": o.pop("_t_infer"),
            "postprocess": o.pop("_t_post"),
            "total": t_end - t0,
        }
        results.append(
            Prediction(
                **o,
                device=device_.type,
                precision=_precision_name(device_, precision),
                notes=list(notes),
                timings=timings,
                tile_size=tile,
                n_tiles=n_tiles,
                class_names=list(card.class_names),
            )
        )
    return results


def _stitch_device(device: torch.device, n_values: int) -> torch.device:
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


def _precision_name(device: torch.device, precision: str) -> str:
    dtype = dev.autocast_dtype(device, precision)
    return "fp32" if dtype is None else str(dtype).replace("torch.", "").replace("bfloat", "bf")


def _fallback(
    device: torch.device,
    tile: tuple[int, ...],
    attempt: int,
    divisor: int,
    min_size: int,
    padded: tuple[int, ...],
) -> tuple[torch.device, tuple[int, ...], int, str] | None:
    """The next, more frugal attempt after out-of-memory number ``attempt`` (0-based).

    First half-size tiles one at a time on the same accelerator, then the CPU with the
    original tiles; None when nothing is left to try.
    """
    import torch

    if not dev.is_gpu(device) or attempt > 1:
        return None
    if attempt == 0:
        smaller = round_tile([t // 2 for t in tile], padded, divisor, min_size)
        return (
            device,
            smaller,
            1,
            f"the {device.type.upper()} ran out of memory, so it was retried with smaller tiles "
            f"({'×'.join(map(str, smaller))}, one at a time)",
        )
    return (
        torch.device("cpu"),
        tile,
        1,
        f"fell back to the CPU after the {device.type.upper()} ran out of memory (slower)",
    )


def _run(
    prepared: list[np.ndarray],
    model: torch.nn.Module,
    card: ModelCard,
    device: torch.device,
    in_shape: tuple[int, ...],
    work: tuple[int, ...],
    padded: tuple[int, ...],
    tile: tuple[int, ...],
    batch: int,
    overlap: float,
    tta: bool,
    want_probs: bool,
    want_gates: bool,
    progress: Callable[[int, int], Any] | None,
    cancelled: Callable[[], bool],
    precision: str,
) -> tuple[list[dict[str, Any]], int]:
    """One attempt on one device; returns per-image output dicts (numpy) and tiles/image."""
    import torch
    from monai.inferers import sliding_window_inference

    t0 = time.perf_counter()
    nd = len(in_shape)
    fmt = dev.memory_format(device, nd)
    dev.setup_backend(device)
    # outside inference mode: parameters created here must stay usable for training
    # (fine-tuning the same model object after a prediction)
    with torch.inference_mode(False):
        model.to(device=device, memory_format=fmt)
    n_img = len(prepared)
    x = torch.from_numpy(np.stack(prepared)).to(device)
    x = pad_to(resize(x, work), padded)
    n_stages = int(getattr(model, "n_stages", 0))
    align = 2 ** max(n_stages - 1, 0)
    ov = aligned_overlap(tile, overlap, align)
    n_win = count_windows(padded, tile, ov)
    total = math.ceil(n_img * n_win / batch)
    binary = card.out_channels == 1
    want_gates = want_gates and n_stages > 0
    predictor = TilePredictor(
        model,
        device=device,
        binary=binary,
        tta=tta,
        gates=want_gates,
        n_images=n_img,
        memory_format=fmt,
        autocast=lambda: dev.autocast(device, precision),
        progress=progress,
        total=total,
        cancelled=cancelled,
    )
    k = 1 if binary else card.out_channels
    n_out = n_img * math.prod(padded) * (k * (2 if tta else 1) + (2 if want_gates else 0))
    out_device = _stitch_device(device, n_out)
    out = sliding_window_inference(
        x,
        tile,
        batch,
        predictor,
        overlap=ov,
        mode="gaussian",
        sw_device=device,
        device=out_device,
        with_coord=True,
    )
    del x
    if cancelled():
        raise Cancelled()
    t1 = time.perf_counter()
    crop = (slice(None), slice(None), *(slice(0, s) for s in work))
    probs = resize(out["0_prob"][crop], in_shape)
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
    if tta:
        var = (resize(out["0_sq"][crop], in_shape) - probs * probs).clamp_min(0)
        unc = var.mean(1).sqrt()
    # one transfer each to host memory, then split per image
    labels_np = labels.cpu().numpy()
    if labels_np.dtype != np.uint8:
        labels_np = labels_np.astype(np.uint16)
    probs_np = None
    if want_probs:
        probs_np = (torch.cat([1 - probs, probs], dim=1) if binary else probs).float()
        probs_np = probs_np.cpu().numpy()
    unc_np = None if unc is None else unc.float().cpu().numpy()
    results: list[dict[str, Any]] = []
    for i in range(n_img):
        results.append(
            {
                "labels": labels_np[i],
                "probabilities": None if probs_np is None else probs_np[i],
                "uncertainty": None if unc_np is None else unc_np[i],
                "gates": _gates(out, predictor, model, i, n_stages, padded, work, in_shape)
                if want_gates
                else [],
            }
        )
    t2 = time.perf_counter()
    for r in results:
        r["_t_infer"], r["_t_post"] = t1 - t0, t2 - t1
    return results, n_win


def _gates(
    out: dict[str, Any],
    predictor: TilePredictor,
    model: torch.nn.Module,
    i: int,
    n_stages: int,
    padded: tuple[int, ...],
    work: tuple[int, ...],
    in_shape: tuple[int, ...],
) -> list[StageGates]:
    """Per-stage gate maps of image ``i`` on the input grid, finest stage first."""
    stages = []
    for s in range(1, n_stages + 1):
        scale = 2 ** (s - 1)
        g = StageGates(stage=s, scale=scale)
        for key, attr in ((f"{s}_psi", "psi"), (f"{s}_zero", "zero_map")):
            if key in out:
                t = gate_to_grid(out[key][i : i + 1], scale, padded, work)
                setattr(g, attr, resize(t, in_shape)[0, 0].float().cpu().numpy())
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
