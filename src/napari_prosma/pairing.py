"""Pair image files with their label files by name (Qt-free).

A label file belongs to the image of the same stem, or of its stem without one of the usual
suffixes (:data:`LABEL_SUFFIXES`: ``case1_mask.png`` labels ``case1.png``). Files are never
paired by their order in a folder: an image without labels, labels without an image, or an
image with more than one candidate are refused, and the message lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .preprocess import InputError

#: Suffixes of a label file's stem that name the image it belongs to (case-insensitive).
LABEL_SUFFIXES = ("_mask", "_label", "_labels", "_seg")
_SHOWN = 8  # file names listed per problem at most


def _stem(path: Path) -> str:
    from .io import stem_of

    return stem_of(path)


def label_keys(stem: str) -> set[str]:
    """The image stems a label file of this stem may belong to (itself, and without a
    suffix of :data:`LABEL_SUFFIXES`)."""
    keys = {stem}
    low = stem.lower()
    for suf in LABEL_SUFFIXES:
        if low.endswith(suf) and len(stem) > len(suf):
            keys.add(stem[: -len(suf)])
    return keys


def split_folder(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Images and label files of one folder: a file is a label file when its stem is
    another file's stem plus a suffix of :data:`LABEL_SUFFIXES`."""
    stems = {_stem(p) for p in files}
    labels = [p for p in files if (label_keys(_stem(p)) - {_stem(p)}) & stems]
    return [p for p in files if p not in labels], labels


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def pair_by_stem(
    images: Sequence[Path], labels: Sequence[Path], *, strict: bool = True
) -> list[tuple[Path, Path]]:
    """Pair each image with its one label file by stem (see the module docstring).

    Args:
        images: image files.
        labels: label files.
        strict: refuse unmatched or ambiguous files (else leave them out).

    Returns:
        ``(image, labels)`` pairs in the order of ``images``.

    Raises:
        InputError: (``strict``) an image without labels, labels without an image, or an
            image with several label files; the message lists the files.
    """
    by_key: dict[str, list[Path]] = {}
    for lab in labels:
        for key in label_keys(_stem(lab)):
            by_key.setdefault(key, []).append(lab)
    pairs, lonely, ambiguous = [], [], []
    claimed: set[Path] = set()
    for img in images:
        found = by_key.get(_stem(img), [])
        claimed.update(found)
        if len(found) == 1:
            pairs.append((img, found[0]))
        elif found:
            ambiguous.append(f"{img.name} ({', '.join(p.name for p in found)})")
        else:
            lonely.append(img)
    orphans = [lab for lab in labels if lab not in claimed]
    if strict and (lonely or orphans or ambiguous):
        parts = []
        if lonely:
            parts.append(f"no label file for {_names(lonely)}")
        if orphans:
            parts.append(f"no image for {_names(orphans)}")
        if ambiguous:
            parts.append(f"more than one label file for {'; '.join(ambiguous[:_SHOWN])}")
        raise InputError(
            "cannot pair the images with their labels by file name: "
            + "; ".join(parts)
            + ". Name each label file after its image (the same name, or with "
            + ", ".join(LABEL_SUFFIXES)
            + " before the extension)"
        )
    return pairs
