"""The CPU cases of ``benchmarks/speed.py`` (issue 18): one 512x512 Kvasir-SEG frame with
``kvasir_prosma``, one hippocampus crop and one 512x512x128 volume with the bundled 3D model,
timed through the engine of ``--src`` (run it once with the old ``src`` and once with the
new one: each run is its own process; the labels are saved for the agreement check). Each
case also gets its floor on this CPU (``cpu_floor.py``: measured matmul peak and copy
bandwidth, the windows' FLOPs and bytes), measured in the same run.

    python benchmarks/speed_cpu.py --src src --data DATA --out new.json [--compare old.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def vm_hwm_gb() -> float | None:
    """The process's peak resident memory (VmHWM), GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--src", required=True)
    p.add_argument("--models", type=Path, help="folder of the bundled models to use")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compare", type=Path, help="JSON of an earlier run: Dice of its labels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--volume", type=int, nargs=3, default=[128, 512, 512])
    p.add_argument("--cases", nargs="*", default=["2d_512", "hippocampus", "volume"])
    p.add_argument("--variants", nargs="*", default=[], help="extra 3D volume variants")
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.src).resolve()))
    sys.path.insert(0, str(HERE))
    import numpy as np
    import torch
    from cpu_floor import cpu_limits, floor, window_cost

    from napari_prosma import checkpoint
    from napari_prosma.inference import load_model, predict

    if args.models:
        checkpoint.bundled_dir = lambda: args.models

    res: dict = {
        "env": {
            "device_name": f"{cpu_name()} ({os.cpu_count()} cores)",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "src": args.src,
            "load_before": os.getloadavg(),
        }
    }
    res["limits"] = cpu_limits()
    labels: dict[str, np.ndarray] = {}
    costs: dict[tuple, dict] = {}

    def add_floor(r: dict, model, card) -> None:
        bf16 = r["precision"] == "bf16"
        key = (id(model), tuple(r["tile"]), bf16)
        if key not in costs:
            x = torch.zeros(1, card.in_channels, *r["tile"])
            costs[key] = window_cost(model, x, bf16)
        r["window_cost"] = costs[key]
        r["floor"] = floor(costs[key], r["n_tiles"], res["limits"], bf16)

    old = {}
    if args.compare and args.compare.with_suffix(".npz").exists():
        old = dict(np.load(args.compare.with_suffix(".npz")))

    def run(case, path, fn, repeats, model, card):
        try:
            times, cpu, pred = [], [], None
            for _ in range(repeats):
                t, c = time.perf_counter(), time.process_time()
                pred = fn()
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            r = {"seconds": times, "cpu_seconds": min(cpu), "n_tiles": pred.n_tiles}
            r.update(tile=list(pred.tile_size), precision=pred.precision, peak_rss_gb=vm_hwm_gb())
            add_floor(r, model, card)
            key = f"{case}/{path}"
            labels[key] = pred.labels
            if key in old:
                from speed_data import dice

                r["dice_vs_base"] = dice(pred.labels, old[key])
            res.setdefault(case, {})[path] = r
        except Exception:
            res.setdefault(case, {})[path] = {"error": traceback.format_exc()[-1500:]}
        args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"{case}/{path}: {res[case][path].get('seconds', 'error')}", flush=True)

    if "2d_512" in args.cases:
        frame = np.load(args.data / "kvasir256.npy")[0]
        img = np.asarray(torch.nn.functional.interpolate(
            torch.from_numpy(frame).permute(2, 0, 1)[None].float(), size=(512, 512), mode="bilinear"
        )[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8))  # fmt: skip
        model, card = load_model("kvasir_prosma")
        predict(img, model, card, device="cpu")
        run(
            "2d_512",
            "engine",
            lambda: predict(img, model, card, device="cpu"),
            args.repeats,
            model,
            card,
        )
    if "hippocampus" in args.cases:
        crop = np.load(sorted(args.data.glob("hippocampus_*.npy"))[0])
        model, card = load_model("hippocampus_prosma")
        predict(crop, model, card, device="cpu")
        run(
            "hippocampus",
            "engine",
            lambda: predict(crop, model, card, device="cpu"),
            args.repeats,
            model,
            card,
        )
    if "volume" in args.cases:
        from speed_data import smooth_volume

        vol = smooth_volume(tuple(args.volume))
        model, card = load_model("hippocampus_prosma")
        run("volume", "engine", lambda: predict(vol, model, card, device="cpu"), 1, model, card)
        for v in args.variants:  # "TILEZxTILEYxTILEX@OVERLAP"
            tile, ov = v.split("@")
            ts = tuple(int(t) for t in tile.split("x"))
            run(
                "volume",
                v,
                lambda t=ts, o=float(ov): predict(
                    vol, model, card, device="cpu", tile_size=t, overlap=o
                ),
                1,
                model,
                card,
            )
    res["env"]["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    np.savez_compressed(args.out.with_suffix(".npz"), **labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
