"""``prosma predict`` over several workers: threads (``--devices``) against processes.

A folder of small volumes (the hippocampus sample, rolled so that no two are alike) is
segmented by a freshly initialised small 3D ProSMA-UNet (random weights: this measures
scheduling, not accuracy) in four ways, each a fresh ``prosma predict`` process, so the
times include importing torch and loading the model:

- ``one``: one worker (``--device DEV``);
- ``threads``: ``--devices DEV,DEV,...`` (one process, one worker thread and model each);
- ``processes``: as many ``prosma predict`` processes side by side, each given its share
  of the files (what a shell loop or a batch system would do);
- ``*_1thread``: each of these with ``OMP_NUM_THREADS=1`` (torch's own thread pool of
  one thread per worker, so that workers do not compete for the cores with their pools).

Every variant's label files are compared with those of ``one`` (byte for byte). The
machine's load average is recorded beside each time: on a shared machine it says how far
the numbers can be trusted.

    python benchmarks/predict_devices.py [--device cpu] [--workers 2] [--files 8]
        [--repeats 2] [--out benchmarks/results/predict_devices_cpu.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MAIN = "import sys; from napari_prosma.cli import main; sys.exit(main(sys.argv[1:]))"


def make_inputs(folder: Path, n: int, tile: int = 1) -> Path:
    """``n`` volumes (the sample repeated ``tile`` times along each axis) and a small
    random 3D model; returns the model's checkpoint."""
    import nibabel as nib
    import numpy as np
    import torch

    from napari_prosma._samples import sample_path
    from napari_prosma.checkpoint import ModelCard, save
    from napari_prosma.nets import build_model

    ref = nib.load(sample_path("hippocampus_mri"))
    vol = np.tile(np.asarray(ref.dataobj, dtype=np.float32), (tile, tile, tile))
    (folder / "in").mkdir(parents=True)
    for i in range(n):
        shifted = np.roll(vol, (3 * i, 5 * i), axis=(0, 1))
        nib.save(nib.Nifti1Image(shifted, ref.affine), folder / "in" / f"v{i:02d}.nii.gz")
    torch.manual_seed(0)
    kw = dict(spatial_dims=3, in_channels=1, out_channels=3, widths=[8, 16, 32])
    card = ModelCard(
        "prosma_unet",
        kw,
        name="bench3d",
        normalization={"mode": "zscore"},
        class_names=["background", "a", "b"],
    )
    return save(build_model("prosma_unet", **kw), folder / "model", card)


def _cmd(inputs: list[str], out: Path, model: Path, where: list[str]) -> list[str]:
    head = [sys.executable, "-c", MAIN, "predict", *inputs]
    return [*head, "-o", str(out), "--model", str(model), "-q", *where]


def run_variant(name: str, folder: Path, model: Path, device: str, k: int, out: Path) -> float:
    """Wall seconds of one variant, from the first process started to the last ended."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    files = sorted(str(p) for p in (folder / "in").iterdir())
    if name.startswith("one"):
        cmds = [_cmd(files, out, model, ["--device", device])]
    elif name.startswith("threads"):
        cmds = [_cmd(files, out, model, ["--devices", ",".join([device] * k)])]
    else:
        cmds = [_cmd(files[i::k], out, model, ["--device", device]) for i in range(k)]
    if name.endswith("_1thread"):
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env) for c in cmds]
    codes = [p.wait() for p in procs]
    secs = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"{name}: prosma predict failed ({codes})")
    return secs


def label_hashes(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.glob("*_labels.nii.gz"))
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tile", type=int, default=1, help="repeat the volume N times per axis")
    ap.add_argument("--variants", help="comma-separated subset (default: all six)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/predict_devices_cpu.json"))
    args = ap.parse_args()
    import torch

    variants = [f"{v}{t}" for v in ("one", "threads", "processes") for t in ("", "_1thread")]
    if args.variants:
        variants = [v for v in args.variants.split(",") if v in variants]
        assert variants and variants[0] == "one", "the variants start with 'one'"
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    same: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_inputs(folder, args.files, args.tile)
        for r in range(args.repeats):
            ref = None
            for v in variants:  # interleaved, so that a change of load hits all alike
                out = folder / f"out_{v}_{r}"
                load = os.getloadavg()[0]
                secs = run_variant(v, folder, model, args.device, args.workers, out)
                rows[v].append({"seconds": round(secs, 2), "load_before": round(load, 2)})
                hashes = label_hashes(out)
                ref = ref or hashes
                same[v] = same.get(v, True) and hashes == ref and len(hashes) == args.files
                print(f"repeat {r} {v}: {secs:.1f} s (load average {load:.1f})", flush=True)
                shutil.rmtree(out)
    med = {v: round(statistics.median(x["seconds"] for x in rows[v]), 2) for v in variants}
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores"
        if args.device == "cpu"
        else torch.cuda.get_device_name(0),
        "device": args.device,
        "workers": args.workers,
        "files": args.files,
        "volume": "x".join(str(d * args.tile) for d in (34, 49, 36))
        + " (hippocampus sample, rolled"
        + (f", tiled {args.tile}x per axis)" if args.tile > 1 else ")"),
        "model": "random-init ProSMA-UNet 3D, widths [8, 16, 32]",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "median_seconds": med,
        "speedup_vs_one": {v: round(med["one"] / med[v], 2) for v in variants},
        "labels_identical_to_one": same,
        "runs": rows,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "speedup_vs_one")}, indent=1))


if __name__ == "__main__":
    main()
