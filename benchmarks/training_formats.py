"""Which precision / memory format trains fastest on this GPU? One CUDA-graph-captured
training step (batch 8, random data at the dataset's size, 0.5 BCE + Dice, Adam) of each
architecture, for fp32 (TF32) / bf16 autocast x NCHW / channels-last, plus the top CUDA
kernels of the slowest and fastest ProSMA variant. Prints a table; writes JSON with
``--out``, and with ``--best FILE`` the fastest ProSMA setting as ``--set`` arguments.

    python benchmarks/training_formats.py [--size 256] [--channels 1] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from napari_prosma.losses import bce_dice_loss
from napari_prosma.nets import build_model


def step_rate(
    arch: str,
    amp: bool,
    cl: bool,
    size: int,
    ch: int,
    steps: int = 40,
    profile: bool = False,
    dims: int = 2,
    widths: str = "small",
    batch: int = 8,
):  # type: ignore[no-untyped-def]
    dev = torch.device("cuda")
    model = build_model(arch, spatial_dims=dims, in_channels=ch, out_channels=1, widths=widths).to(
        dev
    )
    if cl:
        model = model.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    opt = torch.optim.Adam(
        model.parameters(), lr=torch.tensor(1e-4, device=dev), capturable=True, foreach=True
    )
    sp = tuple(size) if isinstance(size, list | tuple) else (size,) * dims
    x = torch.randn((batch, ch, *sp), device=dev)
    y = (torch.rand((batch, 1, *sp), device=dev) > 0.8).float()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)

    def body():  # type: ignore[no-untyped-def]
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            out = model(x)
        loss = bce_dice_loss(out, y)
        loss.backward()
        opt.step()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        body()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        g.replay()
    torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - t0)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                opt.zero_grad(set_to_none=True)
                body()
            torch.cuda.synchronize()
        table = p.key_averages().table(
            sort_by="cuda_time_total", row_limit=14, max_name_column_width=70
        )
    return rate, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--best")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dims3", action="store_true", help="also time the 3D ProSMA-UNet")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name()
    rows = []
    for arch in ("prosma_unet", "unet", "attention_unet"):
        for amp in (True, False):
            for cl in (True, False):
                if arch != "prosma_unet" and not amp:
                    continue
                r, _ = step_rate(arch, amp, cl, args.size, args.channels)
                rows.append({"arch": arch, "bf16": amp, "channels_last": cl, "images_per_s": r})
                print(
                    f"{arch:15s} bf16={amp!s:5s} channels_last={cl!s:5s} {r:7.0f} img/s", flush=True
                )
    rows3 = []
    if args.dims3:
        for widths in ("small", "tiny"):
            for cl in (False, True):
                r, _ = step_rate(
                    "prosma_unet",
                    True,
                    cl,
                    [32, 48, 32],
                    1,
                    steps=20,
                    dims=3,
                    widths=widths,
                    batch=16,
                )
                rows3.append(
                    {
                        "arch": "prosma_unet",
                        "dims": 3,
                        "widths": widths,
                        "bf16": True,
                        "channels_last": cl,
                        "patches_per_s": r,
                    }
                )
                print(
                    f"3D prosma {widths:5s} bf16 channels_last={cl!s:5s} {r:7.0f} patches/s "
                    "(32x48x32, batch 16)",
                    flush=True,
                )
    p = [r for r in rows if r["arch"] == "prosma_unet"]
    best = max(p, key=lambda r: r["images_per_s"])
    res = {
        "card": card,
        "torch": torch.__version__,
        "size": args.size,
        "batch": 8,
        "rows": rows,
        "rows_3d": rows3,
        "best_prosma": best,
    }
    if args.profile:
        for tag, r in (("current", p[0]), ("best", best)):
            _, table = step_rate(
                "prosma_unet",
                r["bf16"],
                r["channels_last"],
                args.size,
                args.channels,
                steps=5,
                profile=True,
            )
            print(f"--- {tag}: bf16={r['bf16']} channels_last={r['channels_last']}")
            print(table)
    print(f"best ProSMA setting on {card}: {best}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    if args.best:
        Path(args.best).write_text(
            f'--set amp="{"bf16" if best["bf16"] else "none"}" '
            f"--set channels_last={'true' if best['channels_last'] else 'false'}\n"
        )


if __name__ == "__main__":
    main()
