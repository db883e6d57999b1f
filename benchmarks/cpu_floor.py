"""The compute and memory floor of the CPU cases of ``speed_cpu.py`` (issue 18): this CPU's
matmul peak and copy bandwidth at the threads torch uses, measured in the same process, and
each window's FLOPs and bytes (``torch.utils.flop_counter``; bytes = every op's output
written once and read once, an unfused floor). The floor of a case is
``windows x max(FLOPs / peak, bytes / bandwidth)``: no engine of this network on this CPU
can be faster than that, whatever it does with the windows it runs.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cpu_limits(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured peaks: bf16 and fp32 matmul GFLOP/s (n x n) and copy GB/s (256 MiB)."""
    out: dict[str, float] = {"threads": torch.get_num_threads()}
    for name, dt in (("bf16_gflops", torch.bfloat16), ("fp32_gflops", torch.float32)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        out[name] = 2 * n**3 / _best(lambda a=a, b=b: a @ b, repeats) / 1e9
    src = torch.empty(64 << 20)  # 256 MiB of fp32
    dst = torch.empty_like(src)
    out["copy_gb_s"] = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), repeats) / 1e9
    return out


def window_cost(
    model: torch.nn.Module, x: torch.Tensor, bf16: bool, device_type: str = "cpu"
) -> dict[str, float]:
    """FLOPs and bytes of one forward pass of ``x`` (shape (B, C, *tile)) under the engine's
    precision (bf16 autocast on ``device_type`` when ``bf16``); bytes = every op's outputs,
    written once and read once. ``speed.py`` counts its CUDA floors with it too."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    n_bytes = [0]

    class Bytes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    n_bytes[0] += t.numel() * t.element_size()
            return out

    with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        with FlopCounterMode(display=False) as fc:
            model(x)
        with Bytes():
            model(x)
    return {"flops": float(fc.get_total_flops()), "bytes": 2.0 * n_bytes[0]}


def floor(cost: dict[str, float], n_windows: int, limits: dict[str, Any], bf16: bool) -> dict:
    """The floor of ``n_windows`` windows of ``cost`` on a CPU of ``limits``, seconds."""
    peak = limits["bf16_gflops"] if bf16 else limits["fp32_gflops"]
    compute = n_windows * cost["flops"] / (peak * 1e9)
    memory = n_windows * cost["bytes"] / (limits["copy_gb_s"] * 1e9)
    return {"compute_s": compute, "memory_s": memory, "s": max(compute, memory)}
