"""The baseline half of ``benchmarks/speed.py``: an older ``napari_prosma`` (``--src``) timed
on the same inputs in its own process, so that the new engine and the one it replaced are
measured in one device call. Saves its label maps for the agreement check.

    python benchmarks/speed_base.py --src BASE/src --models DIR --data DIR --out base.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return times, out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--src", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--volume", default="128,512,512")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    sys.path.insert(0, args.src)
    import numpy as np
    import torch

    import napari_prosma
    from napari_prosma import checkpoint

    checkpoint.bundled_dir = lambda: Path(args.models)
    from napari_prosma.inference import load_model, predict, predict_batch

    res: dict = {"src": str(Path(napari_prosma.__file__).parent)}
    dev = torch.device(args.device)

    def save():
        args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")

    try:
        imgs = np.load(args.data / "kvasir256.npy")
        imgs = list(np.resize(imgs, (args.images, *imgs.shape[1:])))
        model, card = load_model("kvasir_prosma")
        predict_batch(imgs[:64], model, card, device=dev)
        t, preds = _timed(lambda: predict_batch(imgs, model, card, device=dev), 3)
        np.save(args.out.with_name("base_labels_2d.npy"), np.stack([q.labels for q in preds]))
        res["2d"] = {"seconds": t, "images_per_s": len(imgs) / min(t), "n": len(imgs)}
    except Exception:
        res["2d"] = {"error": traceback.format_exc()[-2000:]}
    save()
    try:
        from speed_data import smooth_volume  # this file's folder is on sys.path

        vol = smooth_volume(tuple(int(s) for s in args.volume.split(",")))
        model, card = load_model("hippocampus_prosma")
        predict(vol[:64, :96, :96], model, card, device=dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t, pred = _timed(lambda: predict(vol, model, card, device=dev), 2)
        np.save(args.out.with_name("base_labels_3d.npy"), pred.labels)
        res["3d"] = {"seconds": t, "n_tiles": pred.n_tiles, "tile": list(pred.tile_size)}
        if dev.type == "cuda":
            res["3d"]["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception:
        res["3d"] = {"error": traceback.format_exc()[-2000:]}
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
