"""CPU check of a hippocampus model on the test part of ``hippocampus_tvt_seed0.json``
through the engine (:func:`napari_prosma.inference.predict`, float32), issue 15:

    python training/hippocampus_check.py models/hippocampus_prosma --out training/runs/threed/X.json

Per test volume: Dice per class (a) on the stored intensities (what ``napari_prosma.io``
gives the plugin), (b) on the intensities clipped to uint8 0..255 (what sessions 1-4's
reader gave training and evaluation), (c) on the stored volume padded with its minimum (the
background) by ``--pad`` voxels on every side, the labels cropped back: the padding
sensitivity. Writes per-case numbers and means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.checkpoint import load  # noqa: E402
from napari_prosma.datasets import read_dataset  # noqa: E402
from napari_prosma.inference import predict  # noqa: E402
from napari_prosma.metrics import case_metrics  # noqa: E402


def dice(model, card, img, gt, pad=0):  # type: ignore[no-untyped-def]
    a = np.pad(img, pad, constant_values=float(img.min())) if pad else img
    lab = np.asarray(predict(a, model, card, device="cpu", precision="fp32").labels)
    if pad:
        lab = lab[pad:-pad, pad:-pad, pad:-pad]
    m = case_metrics(lab, gt, [1, 2], None, False)["per_class"]
    return [float(m[c]["dice"]) for c in m]


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--split", default=str(ROOT / "training/splits/hippocampus_tvt_seed0.json"))
    ap.add_argument("--pad", type=int, default=4)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, card = load(a.model, device="cpu")
    ids = json.loads(Path(a.split).read_text())["test"][: a.limit]
    ds = read_dataset("hippocampus", ids=ids)
    rows, t0 = [], time.perf_counter()
    for i, gt in zip(ds.ids, ds.labels):
        img = ds.images[ds.ids.index(i)]
        rows.append(
            {
                "id": i,
                "shape": list(img.shape),
                "stored": dice(model, card, img, gt),
                "clipped_uint8": dice(model, card, np.clip(np.rint(img), 0, 255), gt),
                f"stored_padded_{a.pad}": dice(model, card, img, gt, a.pad),
            }
        )
        print(i, rows[-1], flush=True)
    keys = [k for k in rows[0] if k not in ("id", "shape")]
    means = {k: np.mean([r[k] for r in rows], 0).round(4).tolist() for k in keys}
    missed = {k: sum(min(r[k]) < 0.1 for r in rows) for k in keys}
    out = {
        "model": a.model,
        "model_sha256_card": card.extra.get("sha256") or None,
        "split": a.split,
        "engine": "napari_prosma.inference.predict, fp32, no TTA, CPU (1 thread)",
        "classes": ["anterior", "posterior"],
        "mean_dice": means,
        "cases_with_a_class_below_0.1": missed,
        "n": len(rows),
        "seconds": round(time.perf_counter() - t0, 1),
        "cases": rows,
    }
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("mean_dice", "cases_with_a_class_below_0.1", "n")}))


if __name__ == "__main__":
    main()
