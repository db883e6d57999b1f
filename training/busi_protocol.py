"""The leak-free BUSI protocol: look-alike groups from decoded pixels, and grouped splits.

    python training/busi_protocol.py [--data-root ../shared/data] [--check]

1. Decodes the 647 BUSI lesion images at 256x256 (the training size, the project's reader),
   correlates every pair of images (Pearson r of the pixels) and joins pairs with
   r > 0.90 and exact duplicates into groups (connected components):
   ``training/splits/busi_groups.json``.
2. Writes ``training/splits/busi_leakfree_seed{0,1,2}.json``: train / val / test of the
   ``busi_with_normal`` dataset (the 647 lesion images + the 67 normal images of
   ``busi-normal/``, which are grouped already: none has a look-alike among the others),
   each look-alike group on one side, stratified by class, 70 / 10 / 20 %.

``--check`` recomputes everything and fails if a committed file differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from napari_prosma.datasets import read_dataset  # noqa: E402
from napari_prosma.protocol import (  # noqa: E402
    TEST_FRACTION,
    VAL_FRACTION,
    check_split,
    duplicate_groups,
    grouped_split,
    write_or_check,
)

SEEDS = (0, 1, 2)
THRESHOLD = 0.90


def build(data_root: str | None) -> dict[str, str]:
    """Every protocol file's name and its JSON text."""
    lesion = read_dataset("busi", data_root)
    groups = duplicate_groups(lesion.images, lesion.ids, THRESHOLD)
    groups["rule"] = (
        f"pairs of BUSI images whose pixels correlate with r > {THRESHOLD} at 256x256 "
        "(decoded greyscale, the training size) or are identical; groups = connected "
        "components of those pairs"
    )
    files = {"busi_groups.json": json.dumps(groups, indent=1) + "\n"}
    everything = read_dataset("busi_with_normal", data_root)
    for seed in SEEDS:
        s = grouped_split(everything.ids, groups["groups"], seed, TEST_FRACTION, VAL_FRACTION)
        check_split(s, groups["groups"])
        split = {
            "dataset": "busi_with_normal",
            "seed": seed,
            "protocol": (
                "leak-free: every look-alike group of busi_groups.json on one side; "
                f"stratified by class (benign / malignant / normal / mixed groups); "
                f"test {TEST_FRACTION:.0%}, val {VAL_FRACTION:.0%} (carved from training, for "
                "every choice), train the rest; test evaluated once at the end"
            ),
            "groups_file": "training/splits/busi_groups.json",
            **s,
        }
        files[f"busi_leakfree_seed{seed}.json"] = json.dumps(split, indent=1) + "\n"
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root")
    ap.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = ap.parse_args()
    files = build(args.data_root)
    out = HERE / "splits"
    bad = write_or_check(files, out, args.check)
    g = json.loads(files["busi_groups.json"])
    print(
        f"{len(g['pairs'])} pairs (r > {THRESHOLD}), {len(g['exact'])} exact duplicate(s), "
        f"{len(g['groups'])} groups over {g['n_grouped']} of {g['n_images']} images"
    )
    for seed in SEEDS:
        s = json.loads(files[f"busi_leakfree_seed{seed}.json"])
        counts = {
            p: {c: sum(i.startswith(c) for i in s[p]) for c in ("benign", "malignant", "normal")}
            for p in ("train", "val", "test")
        }
        print(f"seed {seed}: {counts}")
    if bad:
        sys.exit(f"differs from the committed file(s): {', '.join(bad)}")


if __name__ == "__main__":
    main()
