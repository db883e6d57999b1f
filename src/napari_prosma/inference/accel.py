"""Optional faster forward passes of the network on CUDA: a captured CUDA graph, or
``torch.compile``; both guarded (any failure falls back to the eager network, said once in
the prediction's notes).

- ``"graph"``: the forward pass at a fixed batch shape is captured once into a CUDA graph
  and replayed (no kernel-launch cost; a smaller last batch is padded into the captured
  one). The graph's memory stays reserved until :func:`clear` or the model is freed.
- ``"compile"``: ``torch.compile`` (Inductor) of the network, at a fixed batch shape (the
  last batch padded likewise); the first call compiles (tens of seconds).

Graphs and compiled modules are kept per model in a weak map, keyed by the input shape,
autocast dtype and the parameters' storage (moving or replacing the weights starts anew;
weights updated in place, as fine-tuning does, are used as they are).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

MODES = ("none", "graph", "compile")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear(model: Any = None) -> None:
    """Forget the graphs / compiled modules of ``model`` (all models when None)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


class Forward:
    """``forward(x, return_gates=False)``: the network, accelerated as ``mode`` says when
    no gates are asked for and the device is CUDA; eager otherwise.

    Args:
        model: the network (eval mode, on ``device``).
        mode: ``"none"``, ``"graph"`` or ``"compile"``.
        device: where it runs.
        dtype: the autocast dtype the caller runs under (None: fp32).
    """

    def __init__(self, model: torch.nn.Module, mode: str, device: torch.device, dtype: Any):
        if mode not in MODES:
            raise ValueError(f"accelerate must be one of {MODES}, not {mode!r}")
        self.model = model
        self.mode = mode if device.type == "cuda" else "none"
        self.device = device
        self.dtype = dtype
        self.failed: str | None = None

    def __call__(self, x: torch.Tensor, return_gates: bool = False) -> Any:
        if self.mode == "none" or return_gates or self.failed:
            return self.model(x, return_gates=return_gates)
        try:
            return self._fast(x)
        except Exception as e:  # a capture or compile failure: eager from now on
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            clear(self.model)
            return self.model(x)

    def note(self) -> str | None:
        """A plain-words note when the accelerated path failed and eager ran instead."""
        if not self.failed:
            return None
        return f"the {self.mode} forward pass failed ({self.failed}); the network ran eagerly"

    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        runners = _CACHE.setdefault(self.model, {})
        params = tuple(p.data_ptr() for p in self.model.parameters())
        key = (self.mode, tuple(x.shape[1:]), x.dtype, self.dtype, params)
        runner = runners.get(key)
        if runner is None or x.shape[0] > runner.batch:
            for k in [k for k in runners if k[-1] != params or k == key]:
                del runners[k]  # moved or replaced weights, or a larger batch: free them
            make = _Graph if self.mode == "graph" else _Compiled
            runner = runners[key] = make(self.model, x, self.device, self.dtype)
        return runner(x)


class _Padded:
    """A runner with one static input of ``batch`` rows; smaller batches are copied into
    its first rows and the same rows of the output returned (each row is independent of the
    others in eval mode)."""

    def __init__(self, x: torch.Tensor):
        import torch

        self.batch = int(x.shape[0])
        fmt = _format_of(x)
        self.static = torch.zeros_like(x).contiguous(memory_format=fmt)

    def fill(self, x: torch.Tensor) -> int:
        n = int(x.shape[0])
        self.static[:n].copy_(x)
        return n


class _Graph(_Padded):
    def __init__(self, model: torch.nn.Module, x: torch.Tensor, device: torch.device, dtype):
        import torch

        super().__init__(x)
        self.fill(x)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuDNN autotuning and allocator pools outside
                with _autocast(device, dtype):
                    model(self.static)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), _autocast(device, dtype):
            self.out = model(self.static)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = self.fill(x)
        self.graph.replay()
        return self.out[:n]  # valid until the next replay: callers consume it at once


class _Compiled(_Padded):
    def __init__(self, model: torch.nn.Module, x: torch.Tensor, device: torch.device, dtype):
        import torch

        super().__init__(x)
        self.fn = torch.compile(model, dynamic=False)
        self.device, self.dtype = device, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = self.fill(x) if x.shape[0] != self.batch else None
        with _autocast(self.device, self.dtype):
            out = self.fn(self.static if n is not None else x)
        return out if n is None else out[:n]


def _autocast(device: torch.device, dtype: Any):
    """Autocast without its weight-cast cache (required inside a captured graph: cached
    casts would live outside the graph's memory and be freed after capture)."""
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    import torch

    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
