"""Device choice and the per-device speed settings (autocast, memory format)."""

from __future__ import annotations

import contextlib
import functools
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


PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast
    roughly doubles convolution speed; elsewhere it would be emulated and slower."""
    import torch

    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except Exception:
        return False
    return False


def autocast_dtype(device: torch.device, precision: str | None = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for plain fp32.

    Args:
        device: where the network runs.
        precision: ``"auto"``: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs
            with native bf16 (inference); ``"fp32"``; ``"bf16"``; None: CUDA only, as
            ``"auto"`` was before CPU bf16 (what training and fine-tuning use).
    """
    import torch

    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp32" or device.type == "mps":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision is not None:
        if precision == "bf16" or cpu_has_native_bf16():
            return torch.bfloat16
    return None


def autocast(
    device: torch.device, precision: str | None = None
) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``device`` (see :func:`autocast_dtype`; the default,
    None, autocasts on CUDA only)."""
    import torch

    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


#: Layout of 3D networks at inference on CUDA: ``"ncdhw"`` (contiguous) or
#: ``"channels_last_3d"``; benchmarks set it to compare both in one process.
INFERENCE_LAYOUT_3D_CUDA = "ncdhw"


def memory_format(
    device: torch.device, spatial_dims: int, inference: bool = False
) -> torch.memory_format:
    """channels-last on CUDA and CPU (oneDNN and cuDNN both run it faster), contiguous on
    MPS. With ``inference``, 3D networks on CUDA use :data:`INFERENCE_LAYOUT_3D_CUDA`:
    NCDHW ran the bundled 3D model's inference 1.4x faster than channels-last-3d on an H200
    (issue 18), while its training steps there are faster channels-last-3d."""
    import torch

    if device.type not in ("cuda", "cpu"):
        return torch.contiguous_format
    if inference and spatial_dims == 3 and device.type == "cuda":
        if INFERENCE_LAYOUT_3D_CUDA == "ncdhw":
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


def is_oom(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it was raised from, as MONAI wraps them) is an
    accelerator out-of-memory error."""
    import torch

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
            return True
        exc, seen = exc.__cause__, seen + 1
    return False
