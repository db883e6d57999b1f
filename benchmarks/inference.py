"""Inference speed: the project's engine against the plain path, in one process.

- ``plain``: what a user would write first: the same network and weights in eager float32
  (NCHW), through MONAI's ``sliding_window_inference`` with its default settings (overlap
  0.25, constant blending, one window per forward), on the model's patch size.
- ``engine``: ``napari_prosma.inference.predict_batch`` / ``predict`` with their defaults
  (Gaussian blending at overlap 0.5, bf16 autocast and channels-last where they help, many
  tiles per forward on CUDA); ``engine_fp32`` the same in float32, to separate the effect of
  precision from that of tiling on the agreement.

On CUDA: (a) 2D 256x256 images in batches (images/s), (b) one 512x512x128 volume with a 3D
model (s/volume); Dice between the label maps of plain and engine (target >= 0.99); peak
GPU memory; achieved fraction of the card's bf16 matmul peak, measured here. On the CPU:
seconds for one 512x512 2D image and one 128^3 volume with the default models.

Models: the bundled ones where present (``kvasir_prosma`` for 2D, the bundled 3D model for
3D), else freshly initialised ProSMA-UNets of "small" widths (said in the output: random
weights make the agreement check weak, since their logits sit near the decision boundary).

    python benchmarks/inference.py [--device auto|cuda|cpu] [--out results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.checkpoint import ModelCard, list_bundled  # noqa: E402
from napari_prosma.inference import load_model, predict, predict_batch  # noqa: E402
from napari_prosma.inference.bundled import default_model_name  # noqa: E402
from napari_prosma.nets import build_model  # noqa: E402
from napari_prosma.preprocess import prepare  # noqa: E402

IMAGENET = {
    "mode": "fixed",
    "scale": 255.0,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


#: (name, precision, tile) of the engine runs: defaults; float32; one whole-image tile
#: (what the engine would do with ``tile_size`` set to the image, for comparison).
VARIANTS_2D_CPU = (
    ("engine", "auto", None),
    ("engine_fp32", "fp32", None),
    ("engine_whole", "auto", "whole"),
)
VARIANTS_3D = (
    ("engine", "auto", None),
    ("engine_fp32", "fp32", None),
    ("engine_whole", "auto", "whole"),
)

# ---------------------------------------------------------------------------- set-up


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


def balance_head(model: torch.nn.Module, card: ModelCard, sample: np.ndarray) -> None:
    """Shift a random-init model's output biases so every class wins somewhere (about half
    the pixels foreground): its label maps are then not empty, and the agreement check
    between paths means something."""
    x = torch.from_numpy(
        prepare(sample, card.in_channels, card.spatial_dims, card.normalization)[0]
    )[None]
    with torch.inference_mode():
        logits = model(x)
        med = logits.transpose(0, 1).flatten(1).median(dim=1).values
        model.head.bias -= med


def model_2d() -> tuple[torch.nn.Module, ModelCard, str]:
    if "kvasir_prosma" in list_bundled():
        model, card = load_model("kvasir_prosma")
        return model, card, "bundled kvasir_prosma"
    kw = {"spatial_dims": 2, "in_channels": 3, "out_channels": 1, "widths": "small"}
    torch.manual_seed(0)
    model = build_model("prosma_unet", **kw).eval()
    card = ModelCard(
        "prosma_unet", dict(model.config), normalization=IMAGENET, patch_size=[256, 256]
    )
    balance_head(model, card, images_2d(1)[0])
    return (
        model,
        card,
        ("random-init ProSMA-UNet 2D, small widths, output bias balanced (no bundled model)"),
    )


def model_3d() -> tuple[torch.nn.Module, ModelCard, str]:
    name = default_model_name("volume")
    if name is not None:
        model, card = load_model(name)
        return model, card, f"bundled {name}"
    kw = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "widths": "small"}
    torch.manual_seed(0)
    model = build_model("prosma_unet", **kw).eval()
    card = ModelCard(
        "prosma_unet", dict(model.config), normalization={"mode": "zscore"}, patch_size=[96, 96, 96]
    )
    balance_head(model, card, smooth_field((64, 64, 64), seed=1))
    return (
        model,
        card,
        ("random-init ProSMA-UNet 3D, small widths, output bias balanced (no bundled model)"),
    )


def smooth_field(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smooth random structure (blobs at a few scales, made by upsampling coarse noise):
    images a network answers with spatially coherent labels. Fast for large volumes."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(shape)
    nd = len(shape)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(nd, "nearest")
    for scale, w in ((4, 0.3), (16, 1.0), (48, 1.5)):
        coarse = [max(2, s // scale) for s in shape]
        noise = torch.randn(1, 1, *coarse, generator=g)
        up = F.interpolate(noise, size=shape, mode=mode, align_corners=False)[0, 0]
        out += w * up
    return out.numpy()


def images_2d(n: int, size: int = 256) -> np.ndarray:
    """``(n, size, size, 3)`` uint8: Kvasir-SEG frames where the data are here, else blobs."""
    roots = (ROOT.parent / "shared" / "data", ROOT / "shared" / "data", ROOT / "_device" / "data")
    folder = next((r / "kvasir-seg" / "images" for r in roots if (r / "kvasir-seg").is_dir()), None)
    files = sorted(folder.glob("*.jpg"))[:n] if folder is not None else []
    if files:
        from PIL import Image

        imgs = [
            np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR))
            for f in files
        ]
        while len(imgs) < n:
            imgs += imgs[: n - len(imgs)]
        return np.stack(imgs)
    f = np.stack(
        [np.stack([smooth_field((size, size), 3 * i + c) for c in range(3)], -1) for i in range(n)]
    )
    return np.clip(128 + 60 * f / f.std(), 0, 255).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean foreground Dice over the classes present in either label map (pooled)."""
    classes = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    if not classes:
        return 1.0
    return float(
        np.mean(
            [2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c)) for c in classes]
        )
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_window(model: torch.nn.Module, shape: tuple[int, ...], device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.in_channels, *shape, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


def bf16_peak_tflops(device: torch.device, n: int = 8192, iters: int = 50) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


# ---------------------------------------------------------------------------- paths


def plain_labels(model, card, images: list[np.ndarray], device, chunk: int = 32) -> list:
    """The plain path: fp32 NCHW, MONAI defaults, roi = patch size, one window a forward."""
    from monai.inferers import sliding_window_inference

    model.to(device=device, memory_format=torch.contiguous_format).float()
    roi = (
        tuple(card.patch_size) if card.patch_size else tuple(images[0].shape[-card.spatial_dims :])
    )
    out = []
    for i in range(0, len(images), chunk):
        xs = [
            prepare(im, card.in_channels, card.spatial_dims, card.normalization)[0]
            for im in images[i : i + chunk]
        ]
        x = torch.from_numpy(np.stack(xs)).to(device)
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi, 1, model)
            lab = (logits[:, 0] > 0) if logits.shape[1] == 1 else logits.argmax(1)
            out += list(lab.to(torch.uint8).cpu().numpy())
    return out


#: Process CPU seconds of the last :func:`timed` call's repeats (robust to other processes
#: on a shared CPU: wall time there also counts their load).
LAST_CPU_SECONDS: list[float] = []


def timed(fn, device, repeats: int) -> tuple[list[float], Any]:
    """Wall seconds of each of ``repeats`` calls, and the last result."""
    times, result = [], None
    LAST_CPU_SECONDS.clear()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t)
        LAST_CPU_SECONDS.append(time.process_time() - c)
    return times, result


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---------------------------------------------------------------------------- benchmarks


def bench_gpu_2d(device, n: int, repeats: int, peak: float) -> dict[str, Any]:
    model, card, what = model_2d()
    imgs = list(images_2d(n))
    flops = flops_per_window(model.to(device), (256, 256), device)
    res: dict[str, Any] = {"model": what, "images": n, "size": [256, 256]}
    plain_labels(model, card, imgs[:8], device)  # warm-up (cuDNN autotune)
    t, plain = timed(lambda: plain_labels(model, card, imgs, device), device, repeats)
    res["plain"] = {
        "images_per_s": n / min(t),
        "seconds": min(t),
        "peak_gpu_gb": peak_gb(device),
        "tflops": flops * n / min(t) / 1e12,
        "foreground_fraction": float(np.mean(np.stack(plain) > 0)),
    }
    for name, prec in (("engine", "auto"), ("engine_fp32", "fp32")):
        predict_batch(imgs[:64], model, card, device=device, precision=prec)  # warm-up
        t, preds = timed(
            lambda p=prec: predict_batch(imgs, model, card, device=device, precision=p),
            device,
            repeats,
        )
        labels = [p.labels for p in preds]
        res[name] = {
            "images_per_s": n / min(t),
            "seconds": min(t),
            "peak_gpu_gb": peak_gb(device),
            "tiles_per_image": preds[0].n_tiles,
            "tile": list(preds[0].tile_size),
            "precision": preds[0].precision,
            "tflops": flops * preds[0].n_tiles * n / min(t) / 1e12,
            "dice_vs_plain": dice(np.stack(labels), np.stack(plain)),
        }
        res[name]["fraction_of_peak"] = res[name]["tflops"] / peak
        res[name]["speedup_vs_plain"] = res[name]["images_per_s"] / res["plain"]["images_per_s"]
    res["plain"]["fraction_of_peak"] = res["plain"]["tflops"] / peak
    return res


def bench_gpu_3d(device, shape: tuple[int, ...], repeats: int, peak: float) -> dict[str, Any]:
    model, card, what = model_3d()
    vol = smooth_field(shape)
    spacing = tuple(card.spacing) if card.spacing else None
    res: dict[str, Any] = {"model": what, "shape_zyx": list(shape)}
    roi = tuple(card.patch_size or (96, 96, 96))
    flops = flops_per_window(model.to(device), roi, device)
    plain_labels(model, card, [vol[: roi[0], : roi[1], : roi[2]]], device)  # warm-up
    t, plain = timed(lambda: plain_labels(model, card, [vol], device), device, repeats)
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    n_plain = len(dense_patch_slices(shape, roi, _get_scan_interval(shape, roi, 3, (0.25,) * 3)))
    res["plain"] = {
        "seconds": min(t),
        "peak_gpu_gb": peak_gb(device),
        "windows": n_plain,
        "tflops": flops * n_plain / min(t) / 1e12,
        "foreground_fraction": float(np.mean(plain[0] > 0)),
    }
    res["plain"]["fraction_of_peak"] = res["plain"]["tflops"] / peak
    for name, prec, tile in VARIANTS_3D:
        tile = shape if tile == "whole" else tile
        predict(vol[: roi[0], : roi[1], : roi[2]], model, card, device=device, precision=prec)
        t, pred = timed(
            lambda p=prec, ts=tile: predict(
                vol, model, card, device=device, precision=p, spacing=spacing, tile_size=ts
            ),
            device,
            repeats,
        )
        tile_flops = flops_per_window(model, pred.tile_size, device)
        res[name] = {
            "seconds": min(t),
            "peak_gpu_gb": peak_gb(device),
            "windows": pred.n_tiles,
            "tile": list(pred.tile_size),
            "precision": pred.precision,
            "tflops": tile_flops * pred.n_tiles / min(t) / 1e12,
            "dice_vs_plain": dice(pred.labels, plain[0]),
            "speedup_vs_plain": res["plain"]["seconds"] / min(t),
            "notes": pred.notes,
        }
        res[name]["fraction_of_peak"] = res[name]["tflops"] / peak
    return res


def bench_cpu(repeats: int) -> dict[str, Any]:
    cpu = torch.device("cpu")
    out: dict[str, Any] = {}
    model, card, what = model_2d()
    img = images_2d(1, 512)[0]
    r: dict[str, Any] = {"model": what, "shape": list(img.shape)}
    for name, prec, tile in VARIANTS_2D_CPU:
        tile = img.shape[:2] if tile == "whole" else tile
        predict(img, model, card, device=cpu, precision=prec, tile_size=tile)  # warm-up
        t, pred = timed(
            lambda p=prec, ts=tile: predict(
                img, model, card, device=cpu, precision=p, tile_size=ts
            ),
            cpu,
            repeats,
        )
        r[name] = {
            "seconds_min": min(t),
            "seconds_median": statistics.median(t),
            "cpu_seconds_min": min(LAST_CPU_SECONDS),
            "tiles": pred.n_tiles,
            "tile": list(pred.tile_size),
            "precision": pred.precision,
            "notes": pred.notes,
        }
    plain_labels(model, card, [img], cpu)
    t, _ = timed(lambda: plain_labels(model, card, [img], cpu), cpu, repeats)
    r["plain"] = {
        "seconds_min": min(t),
        "seconds_median": statistics.median(t),
        "cpu_seconds_min": min(LAST_CPU_SECONDS),
    }
    out["2d_512"] = r

    model, card, what = model_3d()
    vol = smooth_field((128, 128, 128))
    spacing = tuple(card.spacing) if card.spacing else None
    r = {"model": what, "shape": [128, 128, 128]}
    for name, prec, tile in VARIANTS_3D:
        tile = vol.shape if tile == "whole" else tile
        t, pred = timed(
            lambda p=prec, ts=tile: predict(
                vol, model, card, device=cpu, precision=p, spacing=spacing, tile_size=ts
            ),
            cpu,
            max(1, repeats - 1),
        )
        r[name] = {
            "seconds_min": min(t),
            "seconds_median": statistics.median(t),
            "cpu_seconds_min": min(LAST_CPU_SECONDS),
            "tiles": pred.n_tiles,
            "tile": list(pred.tile_size),
            "precision": pred.precision,
            "notes": pred.notes,
        }
    out["3d_128"] = r
    return out


# ---------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    lines = [f"device: {results['device_name']}"]
    if "gpu_2d" in results:
        g = results["gpu_2d"]
        lines += [
            f"(a) 2D {g['images']} images 256x256, {g['model']}",
            f"  {'path':12s} {'img/s':>9s} {'speedup':>8s} {'peak GB':>8s} "
            f"{'TFLOP/s':>8s} {'of peak':>8s} {'Dice':>6s}",
        ]
        for k in ("plain", "engine", "engine_fp32"):
            v = g[k]
            lines.append(
                f"  {k:12s} {v['images_per_s']:9.1f} {v.get('speedup_vs_plain', 1):8.2f} "
                f"{v['peak_gpu_gb'] or 0:8.2f} {v['tflops']:8.2f} {v['fraction_of_peak']:8.1%} "
                f"{v.get('dice_vs_plain', 1):6.3f}"
            )
    if "gpu_3d" in results:
        g = results["gpu_3d"]
        lines += [
            f"(b) 3D volume {g['shape_zyx']} (z, y, x), {g['model']}",
            f"  {'path':12s} {'s/vol':>9s} {'speedup':>8s} {'peak GB':>8s} "
            f"{'TFLOP/s':>8s} {'of peak':>8s} {'Dice':>6s}",
        ]
        for k in ("plain", "engine", "engine_fp32", "engine_whole"):
            v = g[k]
            lines.append(
                f"  {k:12s} {v['seconds']:9.2f} {v.get('speedup_vs_plain', 1):8.2f} "
                f"{v['peak_gpu_gb'] or 0:8.2f} {v['tflops']:8.2f} {v['fraction_of_peak']:8.1%} "
                f"{v.get('dice_vs_plain', 1):6.3f}"
            )
    if "cpu" in results:
        for key, title in (("2d_512", "CPU 512x512 2D image"), ("3d_128", "CPU 128^3 volume")):
            c = results["cpu"][key]
            lines.append(f"{title}, {c['model']}:")
            for k in ("engine", "engine_fp32", "engine_whole", "plain"):
                if k in c:
                    v = c[k]
                    extra = (
                        f" ({v['precision']}, {v['tiles']} tile(s) {v['tile']})"
                        if ("tiles" in v)
                        else ""
                    )
                    lines.append(
                        f"  {k:12s} {v['seconds_min']:7.2f} s (median "
                        f"{v['seconds_median']:.2f}, CPU time {v['cpu_seconds_min']:.2f} s)"
                        f"{extra}"
                    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="fewer images and repeats")
    p.add_argument("--images", type=int, default=512, help="2D images on the GPU")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    device = torch.device("cuda" if cuda else "cpu")
    repeats = 2 if args.quick else args.repeats
    results: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "bundled_models": list_bundled(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import monai

        results["monai"] = monai.__version__
    except ImportError:
        pass
    if cuda:
        peak = bf16_peak_tflops(device)
        results["bf16_matmul_peak_tflops"] = peak
        results["gpu_2d"] = bench_gpu_2d(device, 128 if args.quick else args.images, repeats, peak)
        torch.cuda.empty_cache()
        results["gpu_3d"] = bench_gpu_3d(device, (128, 512, 512), repeats, peak)
    else:
        results["load_average_before"] = os.getloadavg()
        results["cpu"] = bench_cpu(repeats)
        results["load_average_after"] = os.getloadavg()
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
