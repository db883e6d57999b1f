"""Write the committed split files: ``training/splits/{dataset}_seed{0,1,2}.json`` (random
80/20, :func:`napari_prosma.datasets.random_split`) and ``glas_official.json``.

    python training/make_splits.py [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_prosma.datasets import DATASETS, glas_official_split, random_split, read_dataset

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root")
    args = ap.parse_args()
    out = HERE / "splits"
    out.mkdir(exist_ok=True)
    for name in DATASETS:
        ids = read_dataset(name, args.data_root).ids
        for seed in (0, 1, 2):
            s = {"dataset": name, **random_split(ids, seed)}
            (out / f"{name}_seed{seed}.json").write_text(json.dumps(s, indent=1) + "\n")
            print(name, seed, len(s["train"]), len(s["test"]))
    s = {
        "dataset": "glas",
        "official": "train 85 / testA 60 + testB 20",
        **glas_official_split(args.data_root),
    }
    (out / "glas_official.json").write_text(json.dumps(s, indent=1) + "\n")
    print("glas official", len(s["train"]), len(s["test"]))


if __name__ == "__main__":
    main()
