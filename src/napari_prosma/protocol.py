"""A split protocol that cannot leak: look-alike groups and train / validation / test parts.

BUSI holds the same lesion more than once (with and without calipers, two lesions of one
exam, one image under both classes). :func:`duplicate_groups` finds such images from their
decoded pixels: every pair whose Pearson correlation at the training size exceeds
``threshold`` (and every exact duplicate) is joined, and the connected components are the
groups. :func:`grouped_split` then deals whole groups to train / validation / test, so a
test image never has a twin in training, stratified by class (the id's prefix, e.g.
``benign``, ``malignant``, ``normal``).

The validation part is carved from what would otherwise be training: every choice (the
epoch kept, which run ships) is made on it, and the test part is evaluated once, at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Fractions of all images (per class) that go to test and validation; the rest trains.
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


def correlation_pairs(images: np.ndarray, threshold: float = 0.90) -> list[tuple[int, int, float]]:
    """Index pairs ``(i, j, r)``, ``i < j``, whose pixel correlation ``r`` exceeds ``threshold``.

    Args:
        images: ``(N, ...)`` decoded images of one size (any dtype); each is flattened.
        threshold: Pearson correlation above which two images count as look-alikes.

    Returns:
        Pairs sorted by ``(i, j)``; exact duplicates (r = 1, or both constant and equal) are
        always included.
    """
    n = len(images)
    flat = np.asarray(images, dtype=np.float64).reshape(n, -1)
    centred = flat - flat.mean(1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1)
    z = centred / np.where(norm > 0, norm, 1.0)[:, None]
    r = (z @ z.T).astype(np.float64)
    same = np.zeros((n, n), dtype=bool)
    keys: dict[bytes, list[int]] = {}
    for i in range(n):
        keys.setdefault(np.asarray(images[i]).tobytes(), []).append(i)
    for idx in keys.values():
        for a in idx:
            for b in idx:
                same[a, b] = True
    out = []
    ii, jj = np.nonzero(np.triu((r > threshold) | same, k=1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        out.append((i, j, 1.0 if same[i, j] else float(r[i, j])))
    return out


def connected_groups(n: int, pairs: Sequence[tuple[int, int, float]]) -> list[list[int]]:
    """Connected components (union–find) of ``n`` items joined by ``pairs``; every item is
    in exactly one group, groups sorted by their smallest member."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j, _ in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def duplicate_groups(
    images: np.ndarray, ids: Sequence[str], threshold: float = 0.90
) -> dict[str, Any]:
    """Look-alike groups of a dataset from its decoded pixels.

    Args:
        images: ``(N, C, H, W)`` or ``(N, H, W)`` decoded images at one size.
        ids: the ``N`` image ids.
        threshold: correlation threshold (``r > threshold`` joins two images).

    Returns:
        ``{"threshold", "n_images", "pairs": [[id_a, id_b, r]], "exact": [[id_a, id_b]],
        "groups": [[ids] of the groups with more than one member], "n_grouped"}``.
    """
    if len(images) != len(ids):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    pairs = correlation_pairs(images, threshold)
    groups = [g for g in connected_groups(len(ids), pairs) if len(g) > 1]
    return {
        "threshold": threshold,
        "n_images": len(ids),
        "pairs": [[ids[i], ids[j], round(r, 4)] for i, j, r in pairs],
        "exact": [
            [ids[i], ids[j]]
            for i, j, _ in pairs
            if np.array_equal(np.asarray(images[i]), np.asarray(images[j]))
        ],
        "groups": [[ids[i] for i in g] for g in groups],
        "n_grouped": sum(len(g) for g in groups),
    }


def _stratum(group: Sequence[str]) -> str:
    classes = sorted({i.rsplit("_", 1)[0] for i in group})
    return "+".join(classes)


def grouped_split(
    ids: Sequence[str],
    groups: Sequence[Sequence[str]],
    seed: int,
    test_fraction: float = TEST_FRACTION,
    val_fraction: float = VAL_FRACTION,
) -> dict[str, list[str]]:
    """Deal whole look-alike groups to ``train`` / ``val`` / ``test``, stratified by class.

    Groups (singletons for ids in no group) are shuffled with ``default_rng(seed)`` within
    each stratum (the class prefixes of their members) and each goes to the part furthest
    below its share of that stratum (ties: test, then val, then train), so every part gets
    about its fraction of every class and no group is ever cut.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.
    """
    ids = sorted(ids)
    known = set(ids)
    member: dict[str, int] = {}
    all_groups: list[list[str]] = []
    for g in groups:
        g = sorted(i for i in g if i in known)
        if not g:
            continue
        if any(i in member for i in g):
            raise ValueError("an id is in more than one group")
        for i in g:
            member[i] = len(all_groups)
        all_groups.append(g)
    for i in ids:
        if i not in member:
            member[i] = len(all_groups)
            all_groups.append([i])
    strata: dict[str, list[list[str]]] = {}
    for g in all_groups:
        strata.setdefault(_stratum(g), []).append(g)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    share = {"test": test_fraction, "val": val_fraction, "train": 1 - test_fraction - val_fraction}
    if min(share.values()) < 0:
        raise ValueError("test and validation fractions must leave something to train on")
    for name in sorted(strata):
        gs = strata[name]
        total = sum(len(g) for g in gs)
        got = dict.fromkeys(parts, 0)
        for k in rng.permutation(len(gs)):
            g = gs[int(k)]
            part = max(parts, key=lambda p: share[p] * total - got[p])
            parts[part] += g
            got[part] += len(g)
    return {k: sorted(v) for k, v in parts.items()}


def check_split(split: Mapping[str, Any], groups: Sequence[Sequence[str]] = ()) -> None:
    """Refuse a split whose parts overlap, or that cuts a look-alike group.

    Raises:
        ValueError: naming the first offending id or group.
    """
    parts = [p for p in ("train", "val", "test") if split.get(p)]
    where: dict[str, str] = {}
    for p in parts:
        for i in split[p]:
            if i in where:
                raise ValueError(f"{i} is in both {where[i]!r} and {p!r}")
            where[i] = p
    for g in groups:
        sides = {where[i] for i in g if i in where}
        if len(sides) > 1:
            raise ValueError(f"look-alike group {list(g)} is cut across {sorted(sides)}")


# ---------------------------------------------------------------------------- split files


def random_split(ids: Sequence[str], seed: int, test_fraction: float = 0.2) -> dict[str, Any]:
    """The 80/20 split of a seed: sorted ids permuted by ``default_rng(seed)``, first
    ``round(test_fraction * N)`` to test."""
    ids = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_test = round(test_fraction * len(ids))
    test = sorted(ids[i] for i in perm[:n_test])
    train = sorted(ids[i] for i in perm[n_test:])
    return {"seed": seed, "test_fraction": test_fraction, "train": train, "test": test}


def glas_official_split(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """GlaS's official split: train 85 / test = testA 60 + testB 20."""
    from .datasets import default_data_root

    root = Path(root) if root is not None else default_data_root()
    s = json.loads((root / "glas" / "split.json").read_text())
    return {"seed": None, "train": sorted(s["train"]), "test": sorted(s["testA"] + s["testB"])}


def read_split(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a split file and check it has non-empty train and test lists and that its parts
    (``train``, ``test`` and, where present, ``val``) are disjoint."""
    s = json.loads(Path(path).read_text())
    for k in ("train", "test"):
        if not s.get(k):
            raise ValueError(f"split {path} has no {k!r} ids")
    parts = [k for k in ("train", "val", "test") if s.get(k)]
    for a, k in enumerate(parts):
        for b in parts[a + 1 :]:
            overlap = set(s[k]) & set(s[b])
            if overlap:
                raise ValueError(f"split {path}: {len(overlap)} id(s) in both {k} and {b}")
    return s


def write_or_check(
    files: Mapping[str, str], folder: str | os.PathLike[str], check: bool = False
) -> list[str]:
    """Write each ``{name: text}`` of a protocol script into ``folder`` (atomically), or with
    ``check`` write nothing and return the names whose committed file is missing or
    differs (empty when all match)."""
    from .fs import atomic_write_bytes

    bad = []
    for name, text in files.items():
        path = Path(folder) / name
        if check:
            if not path.exists() or path.read_text() != text:
                bad.append(name)
        else:
            atomic_write_bytes(path, text.encode())
    return bad
