"""Device choice and the per-device speed settings (autocast, memory format)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from ..preprocess import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICES = ("auto", "cuda", "mps", "cpu")


def mps_available() -> bool:
    """Whether Apple's Metal backend can be used."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``/``"cuda"``/``"cuda:1"``/``"mps"``/``"cpu"`` into a usable device.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU.

    Raises:
        InputError: a named device that this machine does not have (plain message).
    """
    import torch

    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("no CUDA GPU is available on this machine; choose 'cpu' or 'auto'")
        return torch.device(name)
    if name == "mps":
        if not mps_available():
            raise InputError("Apple MPS is not available on this machine; choose 'cpu' or 'auto'")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


def is_gpu(device: torch.device) -> bool:
    """Whether ``device`` is an accelerator (where out-of-memory may be retried on the CPU)."""
    return device.type != "cpu"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); plain fp32 elsewhere."""
    import torch

    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def memory_format(device: torch.device, spatial_dims: int) -> torch.memory_format:
    """channels-last on CUDA (tensor cores prefer it with autocast), contiguous elsewhere."""
    import torch

    if device.type != "cuda":
        return torch.contiguous_format
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def setup_backend(device: torch.device) -> None:
    """Let cuDNN pick the fastest kernels for the fixed tile shape."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def empty_cache(device: torch.device) -> None:
    """Return cached accelerator memory after an out-of-memory error."""
    import torch

    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and mps_available():
        with contextlib.suppress(Exception):
            torch.mps.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
