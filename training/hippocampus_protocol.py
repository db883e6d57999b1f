"""The hippocampus protocol (issue 15): look-alike check and one train / val / test split.

    python training/hippocampus_protocol.py [--data-root ../shared/data] [--check]

1. Reads the 260 MSD Task04 volumes (stored intensities, the project's reader), normalises
   each as the recipe does (``percentile`` 0 / 99.5), resamples it to 32x48x32 (trilinear)
   and correlates every pair of volumes (Pearson r), also against the other volume mirrored
   along each axis (a left and a right hippocampus of one subject are near mirror images).
   No pair reaches r > 0.90 (the highest is about 0.80), but volumes with consecutive
   numbers correlate more than others (median r 0.62 against 0.54) and are often each
   other's best match, as the two sides of one subject would be; so, to be safe, groups are
   the connected components of pairs with r > 0.90 *or* consecutive numbers:
   ``training/splits/hippocampus_groups.json`` (with the ten highest r for the record).
2. Writes ``training/splits/hippocampus_tvt_seed0.json``: train / val / test 70 / 10 / 20 %,
   every group on one side (:func:`napari_prosma.protocol.grouped_split`). The val part is
   for every choice (schedule, epoch, what to ship); the test part is evaluated once.

``--check`` recomputes everything and fails if a committed file differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from napari_prosma.datasets import read_dataset  # noqa: E402
from napari_prosma.preprocess import normalize  # noqa: E402
from napari_prosma.protocol import check_split, connected_groups, grouped_split  # noqa: E402

THRESHOLD = 0.90
GRID = (32, 48, 32)
SPEC = {"mode": "percentile", "lower": 0.0, "upper": 99.5}


def _resampled(images: list[np.ndarray]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    out = []
    for a in images:
        x = torch.from_numpy(normalize(a[None], SPEC))[None]
        out.append(F.interpolate(x, size=GRID, mode="trilinear", align_corners=False)[0, 0])
    v = torch.stack(out).flatten(1).double()
    v = v - v.mean(1, keepdim=True)
    return (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


def build(data_root: str | None) -> dict[str, str]:
    """Every protocol file's name and its JSON text."""
    import torch

    ds = read_dataset("hippocampus", data_root)
    ids = ds.ids
    base = _resampled(ds.images)
    r = base @ base.T
    np.fill_diagonal(r, -1)
    vols = [torch.from_numpy(a) for a in ds.images]
    for ax in range(3):  # against every volume mirrored along one axis
        m = _resampled([v.flip(ax).numpy() for v in vols])
        rm = base @ m.T
        np.fill_diagonal(rm, -1)
        r = np.maximum(r, np.maximum(rm, rm.T))
    iu = np.triu_indices(len(ids), 1)
    pairs = [(int(i), int(j), float(r[i, j])) for i, j in zip(*iu) if r[i, j] > THRESHOLD]
    num = np.array([int(i.rsplit("_", 1)[1]) for i in ids])
    cons = np.abs(num[iu[0]] - num[iu[1]]) == 1
    links = pairs + [(int(i), int(j), float(r[i, j])) for i, j in zip(iu[0][cons], iu[1][cons])]
    groups = [g for g in connected_groups(len(ids), links) if len(g) > 1]
    top = np.argsort(r[iu])[::-1][:10]
    groups_doc = {
        "threshold": THRESHOLD,
        "n_images": len(ids),
        "rule": (
            f"pairs of volumes whose intensities (percentile-normalised, resampled to {GRID}) "
            f"correlate with r > {THRESHOLD}, as stored or with one mirrored along an axis "
            "(none does); groups: connected components of those pairs and of volumes with "
            "consecutive numbers (possibly the two sides of one subject)"
        ),
        "r_consecutive_median": round(float(np.median(r[iu][cons])), 4),
        "r_other_median": round(float(np.median(r[iu][~cons])), 4),
        "pairs": [[ids[i], ids[j], round(v, 4)] for i, j, v in pairs],
        "groups": [[ids[i] for i in g] for g in groups],
        "n_grouped": sum(len(g) for g in groups),
        "highest": [[ids[iu[0][k]], ids[iu[1][k]], round(float(r[iu][k]), 4)] for k in top],
        "r_percentiles_50_99_max": [
            round(float(np.percentile(r[iu], q)), 4) for q in (50, 99, 100)
        ],
    }
    s = grouped_split(ids, groups_doc["groups"], 0, 0.2, 0.1)
    check_split(s, groups_doc["groups"])
    split = {
        "dataset": "hippocampus",
        "seed": 0,
        "protocol": (
            "train / val / test 70 / 10 / 20 %, every look-alike group of "
            "hippocampus_groups.json on one side; val carved from training for every choice, "
            "test evaluated once at the end"
        ),
        **{k: sorted(s[k]) for k in ("train", "val", "test")},
    }
    return {
        "hippocampus_groups.json": json.dumps(groups_doc, indent=1) + "\n",
        "hippocampus_tvt_seed0.json": json.dumps(split, indent=1) + "\n",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    out = HERE / "splits"
    for name, text in build(args.data_root).items():
        path = out / name
        if args.check:
            if path.read_text() != text:
                raise SystemExit(f"{path} differs from what the protocol gives")
            print(f"{path}: unchanged")
        else:
            path.write_text(text)
            d = json.loads(text)
            print(path, {k: len(v) for k, v in d.items() if isinstance(v, list)})


if __name__ == "__main__":
    main()
