"""Pack datasets into ``_device/data/NAME.npz`` (git-ignored) for the GPU machine, which has
neither ``../shared`` nor nibabel. See :func:`napari_prosma.datasets.pack`.

    python training/pack_data.py busi kvasir hippocampus [--out _device/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_prosma.datasets import pack, read_dataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+")
    ap.add_argument("--data-root")
    ap.add_argument("--out", default=str(ROOT / "_device" / "data"))
    args = ap.parse_args()
    for name in args.names:
        p = pack(read_dataset(name, args.data_root), Path(args.out) / f"{name}.npz")
        print(f"{p}: {p.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
