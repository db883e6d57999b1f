"""Build the self-contained device job of ``benchmarks/speed.py``.

Writes ``JOB/`` with ``src/`` and ``benchmarks/`` of this checkout, ``base/src/`` of a git
revision (the engine to compare with, default ``main``), the bundled models named below,
``data/`` (16 Kvasir-SEG frames at 256x256 and 4 hippocampus volumes, all from the *train*
parts of the seed-0 splits), a ``run.sh`` and a ``README``.

    python benchmarks/speed_pack.py JOB [--base main] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("kvasir_prosma", "hippocampus_prosma")

RUN_SH = """#!/bin/bash
# Inference speed job (benchmarks/speed.py); run from the repository root: bash JOB/run.sh
set -u
JOB=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/speed"
SITE=/tmp/site-speed
python3 -m pip install -q --no-index --no-deps --target $SITE _device/whl/*.whl 2>&1 | tail -2
MODELS=$JOB/models; [ -d "$MODELS" ] || MODELS=$PWD/models
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv \\
    > "$OUT/speed/nvidia_smi.txt" 2>&1
PYTHONPATH=$SITE:$JOB/src timeout 225 python3 $JOB/benchmarks/speed.py --out "$OUT/speed" \\
    --data $JOB/data --base-src $JOB/base/src --models "$MODELS" --budget 205 \\
    2>&1 | tee "$OUT/speed/speed.log"
rm -f "$OUT/speed"/*.npy
ls -la "$OUT/speed"
"""

README = """speed job (issue 18, helper `speed`): inference engine now vs `{base}` on the GPU.
At most 240 s: pip install of _device/whl (MONAI, safetensors; needed) ~5 s, then a hard
`timeout 225` (cases past 205 s are skipped; the JSON is rewritten after each case, so a cut
run still reports). Run alone on the GPU (timings). Writes $OUT/speed/speed_gpu.json,
base.json, speed.log, nvidia_smi.txt. Carry: _device/jobs/speed and _device/whl.
Models: this folder's models/ ({models}, 27 MiB of the job's size); if carry room is short,
delete _device/jobs/speed/models and carry the repository's models/ instead (run.sh then
reads ./models). Command (repo root):
    bash _device/jobs/speed/run.sh
"""


def pack_data(shared: Path, out: Path) -> None:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    split = json.loads((ROOT / "training/splits/kvasir_seed0.json").read_text())
    frames = []
    for name in split["train"][:16]:
        f = shared / "kvasir-seg" / "images" / f"{name}.jpg"
        frames.append(np.asarray(Image.open(f).convert("RGB").resize((256, 256), Image.BILINEAR)))
    np.save(out / "kvasir256.npy", np.stack(frames))
    sys.path.insert(0, str(ROOT / "src"))
    from napari_prosma.io.read import read_image

    split = json.loads((ROOT / "training/splits/hippocampus_seed0.json").read_text())
    for name in split["train"][:4]:
        im = read_image(shared / "hippocampus" / "imagesTr" / f"{name}.nii.gz")
        np.save(out / f"{name}.npy", np.asarray(im.data, dtype=np.float32))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("job", type=Path)
    p.add_argument("--base", default="main", help="git revision of the engine to compare")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--no-models", action="store_true", help="use the repository's models/")
    args = p.parse_args()
    job = args.job
    if job.exists():
        shutil.rmtree(job)
    (job / "base").mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_models", "_samples", "_widgets")
    shutil.copytree(ROOT / "src", job / "src", ignore=ignore)
    shutil.copytree(
        ROOT / "benchmarks",
        job / "benchmarks",
        ignore=shutil.ignore_patterns("results", "__pycache__"),
    )
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", args.base, "src"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(job / "base")], input=tar.stdout, check=True)
    for sub in ("_samples", "_widgets"):
        shutil.rmtree(job / "base" / "src" / "napari_prosma" / sub, ignore_errors=True)
    if not args.no_models:
        (job / "models").mkdir()
        for m in MODELS:
            for ext in (".json", ".safetensors"):
                shutil.copy2(ROOT / "models" / f"{m}{ext}", job / "models" / f"{m}{ext}")
    pack_data(args.shared, job / "data")
    (job / "run.sh").write_text(RUN_SH)
    (job / "README").write_text(README.format(base=args.base, models=", ".join(MODELS)))
    size = sum(f.stat().st_size for f in job.rglob("*") if f.is_file())
    print(f"wrote {job} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
