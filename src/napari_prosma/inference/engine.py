"""``predict``: card-driven preparation, tiled Gaussian-blended inference through MONAI
(one pass per device in :mod:`.window`), flip TTA, resampling, gate maps on the input
grid, out-of-memory fallback."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CancelFlag, Cancelled, cancel_check
from ..preprocess import InputError
from . import device as dev
from .accel import MODES
from .prep import prepare_on_device
from .resample import working_shape
from .tiling import choose_tile, default_batch_size, padded_shape, round_tile
from .types import Prediction
from .window import WindowOptions, run_window

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import ModelCard


def load_model(
    name_or_path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[torch.nn.Module, ModelCard]:
    """Load a bundled model by name or a checkpoint by path, in eval mode on ``device``.

    Args:
        name_or_path: anything :func:`napari_prosma.models.resolve_model` takes: a bundled
            model's name, a checkpoint path, a store version id or a version folder.
        device: ``"auto"``, ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Raises:
        CheckpointError: no such model, or a corrupt/mismatched checkpoint.
        InputError: the device does not exist here.
    """
    from ..checkpoint import load
    from ..models import resolve_model

    return load(resolve_model(name_or_path), device=dev.resolve_device(device))


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
    return_gates: bool | str = False,
    progress: Callable[[int, int], Any] | None = None,
    cancel: CancelFlag = None,
    batch_size: int | None = None,
    precision: str = "auto",
    accelerate: str = "none",
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
        return_gates: also return the gates of every decoder stage: True for their maps on
            the input grid and their numbers, ``"stats"`` for the numbers only (per-channel
            ``c``, ``zero_frac``, ``zero_frac_mean``, ``lam``; no map is stitched, so it costs
            almost nothing: what a gate-drift check needs).
        progress: called as ``progress(done, total)`` after each batch of tiles.
        cancel: callable or ``threading.Event``; checked between tile batches.
        batch_size: tiles per forward pass (default: many on CUDA, 1 on CPU).
        precision: ``"auto"`` (bf16 autocast on CUDA and on CPUs with native bf16, fp32
            elsewhere), ``"fp32"`` or ``"bf16"``.
        accelerate: on CUDA, ``"graph"`` replays the network from a captured CUDA graph and
            ``"compile"`` runs it through ``torch.compile`` (first call slow); ``"none"``
            (default) runs it eagerly. Both fall back to eager on failure (said in the
            notes), and apply only when no gates are returned.

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
        accelerate=accelerate,
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
    return_gates: bool | str = False,
    progress: Callable[[int, int], Any] | None = None,
    cancel: CancelFlag = None,
    batch_size: int | None = None,
    precision: str = "auto",
    accelerate: str = "none",
) -> list[Prediction]:
    """Segment several images of one shape together (tiles of all images share batches).

    Same arguments as :func:`predict`; ``images`` is a sequence (or a stacked array whose
    first axis indexes images). Returns one :class:`Prediction` per image.
    """
    t0 = time.perf_counter()
    cancelled = cancel_check(cancel)
    if cancelled():
        raise Cancelled()
    if not 0 <= overlap < 1:
        raise InputError(f"the tile overlap must be at least 0 and below 1, got {overlap}")
    if return_gates not in (False, True, "stats"):
        raise ValueError(f"return_gates must be False, True or 'stats', not {return_gates!r}")
    if accelerate not in MODES:
        raise ValueError(f"accelerate must be one of {MODES}, not {accelerate!r}")
    if len(images) == 0:
        return []
    device_ = dev.resolve_device(device)
    dev.autocast_dtype(device_, precision)  # refuse an unknown precision before any work
    prepared, notes = _prepare_all(images, card, channel_axis, device_)
    in_shape = tuple(prepared.shape[2:])
    work, grid_notes = working_shape(in_shape, spacing, card)
    notes += grid_notes
    t_prep = time.perf_counter()

    divisor = int(getattr(model, "divisor", 16))
    min_size = int(getattr(model, "min_size", divisor))
    tile = choose_tile(padded_shape(work, divisor, min_size), card, divisor, min_size, tile_size)
    # Pad only where the image is smaller than a tile: windows then lie inside the image,
    # as in MONAI. Padding up to a multiple of the network's divisor instead filled tiles
    # with zeros the model never saw in training and cost 2-6 Dice points on hippocampus.
    padded = tuple(max(int(w), int(t)) for w, t in zip(work, tile))
    widths = getattr(model, "config", {}).get("widths") or [32]
    opts = WindowOptions(
        device=device_,
        in_shape=in_shape,
        work=work,
        padded=padded,
        tile=tile,
        batch=int(batch_size) if batch_size else default_batch_size(device_, tile, widths),
        overlap=overlap,
        tta=tta,
        want_probs=return_probabilities,
        want_gates=bool(return_gates),
        want_gate_maps=return_gates is True,
        progress=progress,
        cancelled=cancelled,
        precision=precision,
        accelerate=accelerate,
    )
    outs, n_tiles, opts, adapted = _run_with_fallback(
        prepared, model, card, opts, divisor, min_size
    )
    extra = {n: None for o in outs for n in o.pop("_notes", [])}
    notes += adapted + [n for n in extra if n not in notes]
    if return_gates is True and not any(o["gates"] for o in outs):
        notes.append("this model has plain skip connections: it has no gates to show")
    t_end = time.perf_counter()
    return [
        _prediction(o, opts, n_tiles, notes, card, precision, t_prep - t0, t_end - t0) for o in outs
    ]


def _prediction(
    out: dict[str, Any],
    opts: WindowOptions,
    n_tiles: int,
    notes: list[str],
    card: ModelCard,
    precision: str,
    t_prepare: float,
    t_total: float,
) -> Prediction:
    """One image's outputs of :func:`run_window` as a :class:`Prediction`."""
    timings = {
        "prepare": t_prepare,
        "inference": out.pop("_t_infer"),
        "postprocess": out.pop("_t_post"),
        "total": t_total,
    }
    return Prediction(
        **out,
        device=opts.device.type,
        precision=_precision_name(opts.device, precision),
        notes=list(notes),
        timings=timings,
        tile_size=opts.tile,
        n_tiles=n_tiles,
        class_names=list(card.class_names),
    )


def _prepare_all(
    images: Sequence[np.ndarray] | np.ndarray,
    card: ModelCard,
    channel_axis: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, list[str]]:
    """All images as one ``(N, C, *S)`` float32 tensor, normalised as the card says on
    ``device`` (on the CPU when that runs out of memory), and the notes of the first (all
    share one shape, else :class:`InputError`)."""
    try:
        return prepare_on_device(images, card, channel_axis, device)
    except Exception as e:
        if not (dev.is_gpu(device) and dev.is_oom(e)):
            raise
    dev.empty_cache(device)
    import torch

    return prepare_on_device(images, card, channel_axis, torch.device("cpu"))


def _run_with_fallback(
    prepared: torch.Tensor,
    model: torch.nn.Module,
    card: ModelCard,
    opts: WindowOptions,
    divisor: int,
    min_size: int,
) -> tuple[list[dict[str, Any]], int, WindowOptions, list[str]]:
    """:func:`run_window`, retried after running out of memory as :func:`_fallback` says.

    Returns the outputs, the tiles per image, the options of the attempt that worked and
    notes on what was adapted. The model's train/eval mode is restored afterwards.
    """
    import torch

    first_tile, attempt, said = opts.tile, 0, []
    was_training = model.training
    model.eval()
    try:
        while True:
            try:
                with torch.inference_mode():
                    outs, n_tiles = run_window(prepared, model, card, opts)
                break
            except Exception as e:
                if not dev.is_oom(e):
                    raise
                dev.empty_cache(opts.device)
                step = _fallback(opts.device, first_tile, attempt, divisor, min_size, opts.padded)
                attempt += 1
                if step is None:
                    raise InputError(
                        "ran out of memory even on the CPU with small tiles; close other "
                        "programs or crop the image"
                    ) from None
                device_, tile, batch, note = step
                opts = dataclasses.replace(opts, device=device_, tile=tile, batch=batch)
                said.append(note)
    finally:
        model.train(was_training)
    return outs, n_tiles, opts, said


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
