"""Inference speed against the card's limit (issue 18), every figure from one device call.

Cases (CUDA): (a) 512 Kvasir-SEG frames at 256x256 through the bundled ``kvasir_prosma``;
(b) one 512x512x128 volume (smooth random blobs) through the bundled 3D model. For each:

- ``floor``: max(FLOPs / the card's bf16 matmul peak, bytes / HBM bandwidth), both peaks
  measured here; FLOPs by ``torch.utils.flop_counter``, bytes = every op's output written
  once and read once in the forward pass as it runs (bf16 autocast), i.e. an unfused floor;
- ``base``: the engine before this work (``--base-src``, run in a subprocess, same inputs);
- ``engine``: ``napari_prosma.inference`` now, eager / ``accelerate="graph"`` / ``"compile"``,
  and fp32 (the reference for the label agreement);
- ``network``: the network alone on ready batches (eager, CUDA graph, compiled);
- MONAI UNet / AttentionUnet (random init, same widths) alone and through the engine.
- 3D: layout (NCDHW vs channels-last-3d), CUDA graph, tile size and overlap options, with
  Dice against the default on real hippocampus volumes (``--data``).

Every case is guarded (an error is recorded and the rest runs) and the JSON is rewritten
after each case; a table is printed at the end. The CPU cases are ``speed_cpu.py``.

    python benchmarks/speed.py --out DIR --data DIR [--base-src OLD/src] [--budget 230]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from cpu_floor import window_cost  # noqa: E402
from speed_data import dice, smooth_volume  # noqa: E402

from napari_prosma import checkpoint  # noqa: E402
from napari_prosma.checkpoint import ModelCard  # noqa: E402
from napari_prosma.inference import accel, load_model, predict, predict_batch  # noqa: E402
from napari_prosma.inference import device as devmod  # noqa: E402
from napari_prosma.nets import build_model  # noqa: E402

WIDTHS = [16, 32, 64, 128, 256]
#: Where the cases run: "cuda", or "cpu" for ``--smoke`` (a check of this script only).
DEV = "cuda"
#: Batch of the network-alone cases and forwards per timed repeat (smaller in ``--smoke``).
NET_BATCH, INNER = 64, 10
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return times, out


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------- limits


def bf16_peak_tflops(n: int = 8192, iters: int = 40) -> float:
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t, _ = timed(lambda: [a @ b for _ in range(iters)], 2)
    return 2 * n**3 * iters / min(t) / 1e12


def hbm_tb_s(n_bytes: int = 2 << 30) -> float:
    a = torch.empty(n_bytes // 4, device=DEV)
    b = torch.empty_like(a)
    b.copy_(a)
    t, _ = timed(lambda: [b.copy_(a) for _ in range(10)], 2)
    return 2 * n_bytes * 10 / min(t) / 1e12


def floor_seconds(model, x, limits) -> dict[str, float]:
    cost = window_cost(model, x, bf16=True, device_type=DEV)
    flops, nbytes = cost["flops"], cost["bytes"]
    t_c = flops / (limits["bf16_tflops"] * 1e12)
    t_m = nbytes / (limits["hbm_tb_s"] * 1e12)
    return {"flops": flops, "bytes": nbytes, "compute_s": t_c, "memory_s": t_m, "s": max(t_c, t_m)}


# ---------------------------------------------------------------------------- network alone


def network_alone(model, x: torch.Tensor, mode: str, repeats: int = 5) -> dict[str, Any]:
    """Batches per second of the network on a ready batch ``x`` (bf16 autocast, layout as
    the engine uses it), eager or through :class:`accel.Forward`."""
    dims = x.ndim - 2
    fmt = devmod.memory_format(x.device, dims, inference=True)
    model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    fwd = accel.Forward(model, mode, x.device, torch.bfloat16)
    t_first = time.perf_counter()
    with torch.inference_mode(), torch.autocast(DEV, dtype=torch.bfloat16):
        fwd(x)
        sync()
        first = time.perf_counter() - t_first
        fwd(x)
        t, _ = timed(lambda: [fwd(x) for _ in range(INNER)], repeats)
    return {"batch_s": min(t) / INNER, "first_call_s": first, "fallback": fwd.failed}


# ---------------------------------------------------------------------------- cases


def case_2d_engine(ctx: dict, imgs: list[np.ndarray], model, card, modes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = ctx.get("base_labels_2d")
    ref = None
    for name, prec, acc in [("engine_fp32", "fp32", "none")] + [
        (f"engine_{m}", "auto", m) for m in modes
    ]:
        predict_batch(imgs[:64], model, card, device=DEV, precision=prec, accelerate=acc)
        reset_peak()
        t, preds = timed(
            lambda p=prec, a=acc: predict_batch(
                imgs, model, card, device=DEV, precision=p, accelerate=a
            ),
            3,
        )
        lab = np.stack([q.labels for q in preds])
        ref = lab if ref is None else ref
        r = {
            "images_per_s": len(imgs) / min(t),
            "seconds": t,
            "peak_gb": peak_gb(),
            "dice_vs_fp32": dice(lab, ref),
            "notes": preds[0].notes,
            "timings_last": preds[0].timings,
        }
        if base is not None:
            r["dice_vs_base"] = dice(lab, base)
        out[name] = r
    return out


def case_networks_2d(ctx, model, modes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    batch = NET_BATCH
    x = torch.randn(batch, 3, 256, 256, device=DEV)
    nets = {"prosma": model}
    for arch in ("monai_unet", "monai_attention_unet"):
        torch.manual_seed(0)
        kw = {"spatial_dims": 2, "in_channels": 3, "out_channels": 1, "widths": WIDTHS}
        nets[arch] = build_model(arch, **kw).eval().to(DEV)
    for name, net in nets.items():
        r: dict[str, Any] = {"floor": floor_seconds(net, x, ctx["limits"])}
        for m in modes:
            r[m] = network_alone(net, x, m)
            r[m]["images_per_s"] = batch / r[m]["batch_s"]
        r["floor"]["images_per_s"] = batch / r["floor"]["s"]
        out[name] = r
    return out


def case_monai_engine_2d(imgs, card) -> dict[str, Any]:
    out = {}
    for arch in ("monai_unet", "monai_attention_unet"):
        torch.manual_seed(0)
        kw = {"spatial_dims": 2, "in_channels": 3, "out_channels": 1, "widths": WIDTHS}
        net = build_model(arch, **kw).eval()
        c = ModelCard(
            arch, dict(net.config), normalization=card.normalization, patch_size=[256, 256]
        )
        for acc in ("none", "graph"):
            predict_batch(imgs[:64], net, c, device=DEV, accelerate=acc)
            t, _ = timed(
                lambda n=net, cc=c, a=acc: predict_batch(imgs, n, cc, device=DEV, accelerate=a), 3
            )
            out[f"{arch}_{acc}"] = {"images_per_s": len(imgs) / min(t), "seconds": t}
    return out


def run_3d(vol, model, card, **kw) -> tuple[list[float], Any]:
    predict(vol[:64, :96, :96], model, card, device=DEV, **kw)
    reset_peak()
    return timed(lambda: predict(vol, model, card, device=DEV, **kw), 2)


#: 3D variants: (name, layout, accelerate, tile, overlap, batch)
VARIANTS_3D = [
    ("engine", "ncdhw", "none", None, 0.5, None),
    ("engine_channels_last_3d", "channels_last_3d", "none", None, 0.5, None),
    ("engine_graph", "ncdhw", "graph", None, 0.5, None),
    ("engine_batch128", "ncdhw", "none", None, 0.5, 128),
    ("tile_64x96x64", "ncdhw", "none", (64, 96, 64), 0.5, None),
    ("tile_64x96x64_ov025", "ncdhw", "none", (64, 96, 64), 0.25, None),
    ("tile_128", "ncdhw", "none", (128, 128, 128), 0.5, 8),
    ("tile_128_ov025", "ncdhw", "none", (128, 128, 128), 0.25, 8),
    ("engine_fp32", "ncdhw", "none", None, 0.5, None),
]


def case_3d(ctx, vol, model, card, hippo: list[np.ndarray], deadline: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = ctx.get("base_labels_3d")
    default_hippo = None
    for name, layout, acc, tile, ov, batch in VARIANTS_3D:
        if elapsed() > deadline:
            out[name] = {"skipped": "time budget"}
            continue
        try:
            devmod.INFERENCE_LAYOUT_3D_CUDA = layout
            kw = dict(accelerate=acc, tile_size=tile, overlap=ov, batch_size=batch)
            if name == "engine_fp32":
                kw["precision"] = "fp32"
            t, pred = run_3d(vol, model, card, **kw)
            r = {"seconds": t, "n_tiles": pred.n_tiles, "tile": list(pred.tile_size)}
            r.update(peak_gb=peak_gb(), overlap=ov, batch=batch, layout=layout, notes=pred.notes)
            if base is not None:
                r["dice_vs_base_synthetic"] = dice(pred.labels, base)
            labs = [predict(h, model, card, device=DEV, **kw).labels for h in hippo]
            if default_hippo is None:
                default_hippo = labs
            r["dice_vs_default_hippocampus"] = [dice(a, b) for a, b in zip(labs, default_hippo)]
            out[name] = r
        except Exception:
            out[name] = {"error": traceback.format_exc()[-1500:]}
        finally:
            devmod.INFERENCE_LAYOUT_3D_CUDA = "ncdhw"
            torch.cuda.empty_cache()
    return out


def case_monai_3d(vol, deadline: float) -> dict[str, Any]:
    out = {}
    for arch in ("monai_unet", "monai_attention_unet"):
        if elapsed() > deadline:
            out[arch] = {"skipped": "time budget"}
            continue
        torch.manual_seed(0)
        kw = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "widths": WIDTHS}
        net = build_model(arch, **kw).eval()
        c = ModelCard(arch, dict(net.config), normalization={"mode": "zscore"}, patch_size=[96] * 3)
        t, pred = run_3d(vol, net, c)
        out[arch] = {"seconds": t, "n_tiles": pred.n_tiles, "tile": [96] * 3, "peak_gb": peak_gb()}
    return out


# ---------------------------------------------------------------------------- driver


def run_base(args, res) -> None:
    """The old engine in its own process (same inputs, same card)."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="speed-base-"))
    out = tmp / "base.json"
    cmd = [sys.executable, str(HERE / "speed_base.py"), "--src", str(args.base_src)]
    cmd += ["--models", str(checkpoint.bundled_dir()), "--data", str(args.data), "--out", str(out)]
    cmd += [
        "--images",
        str(args.images),
        "--volume",
        ",".join(map(str, args.volume)),
        "--device",
        DEV,
    ]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.base_timeout)
        res["base_stderr_tail"] = run.stderr[-1500:]
    except subprocess.TimeoutExpired:
        res["base_stderr_tail"] = "timed out"
    if out.exists():
        res["base"] = json.loads(out.read_text())
        shutil.copy2(out, args.out / "base.json")
    for k in ("2d", "3d"):
        f = tmp / f"base_labels_{k}.npy"
        if f.exists():
            res["_ctx"][f"base_labels_{k}"] = np.load(f)


#: Cases not to run (``--skip``).
SKIP: set[str] = set()


def guarded(res: dict, key: str, fn, save) -> None:
    if key in SKIP:
        return
    t = time.perf_counter()
    try:
        res[key] = fn()
    except Exception:
        res[key] = {"error": traceback.format_exc()[-2000:]}
    if isinstance(res[key], dict):
        res[key]["_case_seconds"] = time.perf_counter() - t
    save()
    print(f"[{elapsed():6.1f} s] {key} done", flush=True)


def environment() -> dict[str, Any]:
    env = {"torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    env["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    env["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        import monai

        env["monai"] = monai.__version__
    except ImportError:
        env["monai"] = None
    env["bundled"] = checkpoint.list_bundled()
    return env


def gpu_main(args) -> dict[str, Any]:
    res: dict[str, Any] = {"env": environment(), "_ctx": {}}

    def save():
        data = {k: v for k, v in res.items() if k != "_ctx"}
        (args.out / "speed_gpu.json").write_text(json.dumps(data, indent=2, default=str) + "\n")

    if DEV == "cuda":
        limits = lambda: {"bf16_tflops": bf16_peak_tflops(), "hbm_tb_s": hbm_tb_s()}  # noqa: E731
    else:
        limits = lambda: {"bf16_tflops": 1.0, "hbm_tb_s": 0.05, "smoke": True}  # noqa: E731
    guarded(res, "limits", limits, save)
    res["_ctx"]["limits"] = res["limits"]
    if args.base_src:
        guarded(res, "base_run", lambda: run_base(args, res) or {"ok": True}, save)
    imgs = list(np.resize(np.load(args.data / "kvasir256.npy"), (args.images, 256, 256, 3)))
    model2, card2 = load_model("kvasir_prosma")
    guarded(
        res,
        "engine_2d",
        lambda: case_2d_engine(res["_ctx"], imgs, model2, card2, ("none", "graph")),
        save,
    )
    guarded(
        res,
        "networks_2d",
        lambda: case_networks_2d(res["_ctx"], model2.to(DEV), ("none", "graph")),
        save,
    )
    guarded(res, "monai_engine_2d", lambda: case_monai_engine_2d(imgs, card2), save)
    vol = smooth_volume(tuple(args.volume))
    hippo = [np.load(f) for f in sorted(args.data.glob("hippocampus_*.npy"))]
    model3, card3 = load_model("hippocampus_prosma")
    res["model_3d"] = {
        "name": card3.name,
        "patch_size": card3.patch_size,
        "normalization": card3.normalization,
    }
    guarded(
        res,
        "engine_3d",
        lambda: case_3d(res["_ctx"], vol, model3, card3, hippo, args.budget - 70),
        save,
    )
    guarded(res, "network_3d", lambda: network_3d(res["_ctx"], model3, card3), save)
    guarded(res, "monai_3d", lambda: case_monai_3d(vol, args.budget - 50), save)
    if elapsed() < args.budget - 45:  # compile last: tens of seconds, may not fit
        guarded(res, "compile_2d", lambda: compile_2d(imgs, model2, card2), save)
    res["total_seconds"] = elapsed()
    save()
    return res


def network_3d(ctx, model, card) -> dict[str, Any]:
    tile = tuple(card.patch_size or (96, 96, 96))
    x = torch.randn(NET_BATCH, 1, *tile, device=DEV)
    model.to(DEV)
    r: dict[str, Any] = {
        "tile": list(tile),
        "batch": NET_BATCH,
        "floor": floor_seconds(model, x, ctx["limits"]),
    }
    for layout in ("ncdhw", "channels_last_3d"):
        devmod.INFERENCE_LAYOUT_3D_CUDA = layout
        for m in ("none", "graph"):
            r[f"{layout}_{m}"] = network_alone(model, x, m, repeats=3)
    devmod.INFERENCE_LAYOUT_3D_CUDA = "ncdhw"
    return r


def compile_2d(imgs, model, card) -> dict[str, Any]:
    x = torch.randn(NET_BATCH, 3, 256, 256, device=DEV)
    r: dict[str, Any] = {"network": network_alone(model.to(DEV), x, "compile", repeats=3)}
    r["network"]["images_per_s"] = NET_BATCH / r["network"]["batch_s"]
    predict_batch(imgs[:64], model, card, device=DEV, accelerate="compile")
    t, preds = timed(lambda: predict_batch(imgs, model, card, device=DEV, accelerate="compile"), 3)
    r["engine"] = {"images_per_s": len(imgs) / min(t), "seconds": t, "notes": preds[0].notes}
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON")
    p.add_argument("--data", type=Path, required=True, help="kvasir256.npy, hippocampus_*.npy")
    p.add_argument("--base-src", type=Path, help="the older napari_prosma's src/ to compare")
    p.add_argument("--models", type=Path, help="folder of the bundled models to use")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--volume", type=int, nargs=3, default=[128, 512, 512])
    p.add_argument("--budget", type=float, default=230, help="seconds; late cases are skipped")
    p.add_argument("--base-timeout", type=float, default=70)
    p.add_argument("--smoke", action="store_true", help="run the GPU cases tiny on the CPU")
    p.add_argument("--skip", nargs="*", default=[], help="cases not to run (JSON keys)")
    args = p.parse_args()
    SKIP.update(args.skip)
    if args.smoke:
        global DEV, NET_BATCH, INNER
        DEV, NET_BATCH, INNER = "cpu", 2, 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.models:
        checkpoint.bundled_dir = lambda: args.models
    res = gpu_main(args)
    from speed_table import table

    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
