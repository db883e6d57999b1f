"""The leak-free protocol for Table 1's other two datasets (issue 14): Kvasir-SEG and GlaS.

    python training/table1_protocol.py [--data-root ../shared/data] [--check]

- **Kvasir-SEG** (1000 frames, several per colonoscopy video): look-alike groups from
  decoded pixels exactly as BUSI's (``training/busi_protocol.py``): every pair of frames
  whose pixels correlate with r > 0.90 at the training size (256x256, grey) joined, groups
  = connected components (``training/splits/kvasir_groups.json``); then train / val / test
  70 / 10 / 20 % with every group on one side (``kvasir_leakfree_seed{0,1,2}.json``).
- **GlaS** keeps its official test part (testA + testB, 80 images); the validation part
  (15 % of the 85 official training images) is carved from training with look-alike groups
  (r > 0.90 at 512x512) kept whole (``glas_groups.json``, ``glas_official_val_seed{0,1,2}.json``).

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
from napari_prosma.protocol import (  # noqa: E402
    TEST_FRACTION,
    VAL_FRACTION,
    check_split,
    duplicate_groups,
    glas_official_split,
    grouped_split,
    write_or_check,
)

SEEDS = (0, 1, 2)
THRESHOLD = 0.90
GLAS_VAL = 0.15


def grey(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` float32 grey of ``(N, H, W)`` or ``(N, H, W, 3)``/``(N, 3, H, W)`` images."""
    a = np.asarray(images, dtype=np.float32)
    if a.ndim == 4:
        a = a.mean(axis=-1) if a.shape[-1] == 3 else a.mean(axis=1)
    return a


def _groups(name: str, data_root: str | None) -> tuple[list[str], dict]:
    ds = read_dataset(name, data_root)
    g = duplicate_groups(grey(ds.images), ds.ids, THRESHOLD)
    g["rule"] = (
        f"pairs of {name} images whose grey pixels correlate with r > {THRESHOLD} at the "
        "training size or are identical; groups = connected components of those pairs"
    )
    return list(ds.ids), g


def kvasir_files(data_root: str | None) -> dict[str, str]:
    ids, groups = _groups("kvasir", data_root)
    files = {"kvasir_groups.json": json.dumps(groups, indent=1) + "\n"}
    # grouped_split stratifies by the id's prefix before the last "_": one stratum here
    pre = {f"kvasir_{i}": i for i in ids}
    pg = [[f"kvasir_{i}" for i in g] for g in groups["groups"]]
    for seed in SEEDS:
        s = grouped_split(list(pre), pg, seed, TEST_FRACTION, VAL_FRACTION)
        s = {k: sorted(pre[i] for i in v) for k, v in s.items()}
        check_split(s, groups["groups"])
        files[f"kvasir_leakfree_seed{seed}.json"] = _split_json("kvasir", seed, s)
    return files


def glas_files(data_root: str | None) -> dict[str, str]:
    _, groups = _groups("glas", data_root)
    files = {"glas_groups.json": json.dumps(groups, indent=1) + "\n"}
    official = glas_official_split(data_root)
    train = sorted(official["train"])
    member = {i: k for k, g in enumerate(groups["groups"]) for i in g}
    units: list[list[str]] = []
    seen: set[int] = set()
    for i in train:
        if i in member:
            k = member[i]
            if k not in seen:
                seen.add(k)
                units.append(sorted(j for j in groups["groups"][k] if j in set(train)))
        else:
            units.append([i])
    for seed in SEEDS:
        val: list[str] = []
        for k in np.random.default_rng(seed).permutation(len(units)):
            if len(val) >= round(GLAS_VAL * len(train)):
                break
            val += units[int(k)]
        s = {
            "train": sorted(set(train) - set(val)),
            "val": sorted(val),
            "test": sorted(official["test"]),
        }
        check_split(s, groups["groups"])
        files[f"glas_official_val_seed{seed}.json"] = _split_json("glas", seed, s, official=True)
    return files


def _split_json(dataset: str, seed: int, s: dict, official: bool = False) -> str:
    how = (
        f"GlaS's official test part (testA + testB); val = {GLAS_VAL:.0%} of the official "
        "training images, look-alike groups whole; test evaluated once at the end"
        if official
        else f"leak-free: every look-alike group of {dataset}_groups.json on one side; test "
        f"{TEST_FRACTION:.0%}, val {VAL_FRACTION:.0%} (carved from training, for every "
        "choice), train the rest; test evaluated once at the end"
    )
    split = {
        "dataset": dataset,
        "seed": seed,
        "protocol": how,
        "groups_file": f"training/splits/{dataset}_groups.json",
        **s,
    }
    return json.dumps(split, indent=1) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root")
    ap.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = ap.parse_args()
    files = {**kvasir_files(args.data_root), **glas_files(args.data_root)}
    out = HERE / "splits"
    bad = write_or_check(files, out, args.check)
    for ds in ("kvasir", "glas"):
        g = json.loads(files[f"{ds}_groups.json"])
        print(
            f"{ds}: {len(g['pairs'])} pairs (r > {THRESHOLD}), {len(g['exact'])} exact, "
            f"{len(g['groups'])} groups over {g['n_grouped']} of {g['n_images']} images"
        )
    for name in sorted(files):
        if "seed" in name:
            s = json.loads(files[name])
            print(name, {p: len(s[p]) for p in ("train", "val", "test")})
    if bad:
        sys.exit(f"differs from the committed file(s): {', '.join(bad)}")


if __name__ == "__main__":
    main()
