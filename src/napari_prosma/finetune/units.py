"""Training units: the user's corrections as images and class labels, the held-out
split, and the patches and batches the loop trains on (Qt-free; torch imported lazily).

A unit is one 2D image, one corrected slice of a volume (2D model) or the slab of
corrected slices of a volume (3D model). :func:`check_labels` is the one check of label
values, shared by the CLI, the widget and replay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..checkpoint import ModelCard
from ..preprocess import InputError, prepare
from .config import REPORT_SPLIT_MIN

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .config import FinetuneConfig
    from .replay import ReplaySet


class Unit(NamedTuple):
    """One training or held-out unit: an image (napari layout), its labels, its spacing."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...] | None = None


# ---------------------------------------------------------------------------- labels


def corrected_units(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    card: ModelCard,
    previous: Sequence[np.ndarray | None] | None = None,
    *,
    spacing: Sequence[Sequence[float] | None] | None = None,
    slice_axis: int = 0,
    notes: list[str] | None = None,
) -> list[Unit]:
    """Split the user's data into training units.

    A 2D model learns from 2D images and, for a volume, from its corrected slices along
    ``slice_axis``: those whose labels differ from the last prediction (``previous``), else
    all slices with any label. A 3D model learns from whole volumes, cropped to the slab of
    corrected slices along ``slice_axis``.

    Args:
        images: 2D grey ``(H, W)``, RGB ``(H, W, 3)`` or volumes ``(Z, Y, X)``.
        labels: integer labels on each image's grid.
        card: the model's card (dimensions, classes).
        previous: the last prediction per image (same grid), or None.
        spacing: per image, its voxel spacing in mm (napari order) or None when unknown.
        slice_axis: the volume axis slices are taken along (0, 1 or 2).
        notes: where to add what was done to the labels (0/255 masks taken as 0/1).

    Returns:
        Units ``(image, labels, spacing)``; a slice's spacing is its in-plane spacing;
        labels as int64 class numbers (:func:`check_labels`).

    Raises:
        InputError: shapes that don't match, label values that cannot be classes (see
            :func:`check_labels`), or nothing labelled.
    """
    if len(images) != len(labels):
        raise InputError(f"{len(images)} image(s) but {len(labels)} label image(s)")
    if slice_axis not in (0, 1, 2):
        raise InputError(f"slice_axis must be 0, 1 or 2, not {slice_axis}")
    previous = list(previous) if previous is not None else [None] * len(images)
    spacing = list(spacing) if spacing is not None else [None] * len(images)
    units: list[Unit] = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        img, lab = np.asarray(img), np.asarray(lab)
        lab, note = _check_pair(img, lab, card)
        if note and notes is not None and note not in notes:
            notes.append(note)
        prev = previous[k] if k < len(previous) else None
        sp = spacing[k] if k < len(spacing) else None
        sp = tuple(float(s) for s in sp) if sp is not None else None
        if lab.ndim == 3:
            units += _volume_units(img, lab, prev, sp, card, slice_axis)
        else:
            changed = prev is not None and np.shape(prev) == lab.shape and np.any(lab != prev)
            if changed or np.any(lab > 0) or prev is not None:
                units.append(Unit(img, lab, sp))
    if not units:
        raise InputError("no corrected or labelled image found: draw or correct labels first")
    return units


def _check_pair(img: np.ndarray, lab: np.ndarray, card: ModelCard) -> tuple[np.ndarray, str | None]:
    """Refuse labels not on the image's grid; returns :func:`check_labels` of them."""
    spatial = img.shape[:-1] if img.ndim == lab.ndim + 1 else img.shape
    if tuple(spatial) != tuple(lab.shape):
        raise InputError(
            f"the labels (shape {lab.shape}) do not match the image (shape {img.shape})"
        )
    return check_labels(lab, card)


def _values(v: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(f"{x:g}" for x in v[:n].tolist())
    return shown + (f" and {v.size - n} more" if v.size > n else "")


def check_labels(
    lab: np.ndarray, card: ModelCard, what: str = "the labels"
) -> tuple[np.ndarray, str | None]:
    """The one check of label values, used by the CLI, the widget and replay alike.

    Labels are class numbers ``0 .. K-1`` (``K = max(out_channels, 2)``, 0 = background).
    A binary mask stored as ``{0, m}`` with ``m > 1`` (0/255, as Kvasir-SEG, BUSI and most
    tools store masks) is taken as ``{0, 1}`` for a binary model, and said. Whole-number
    floats are taken as integers.

    Args:
        lab: a label array ``(*S)`` of any numeric dtype.
        card: the model's card (number and names of its classes).
        what: how messages name the labels.

    Returns:
        ``(labels, note)``: int64 labels ``(*S)`` and a sentence for the user when the
        values were mapped (else None).

    Raises:
        InputError: non-numbers, NaN, fractional or negative values, or classes the model
            does not know; the message names the values.
    """
    lab = np.asarray(lab)
    k = max(card.out_channels, 2)
    names = ", ".join(card.class_names) or "?"
    if lab.dtype.kind == "b":
        return lab.astype(np.int64), None
    if lab.dtype.kind not in "iuf":
        raise InputError(f"{what} must be integers, not {lab.dtype}")
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all():
            raise InputError(f"{what} contain NaN or infinite values; labels are class numbers")
        frac = np.unique(lab[lab != np.round(lab)])
        if frac.size:
            raise InputError(
                f"{what} hold fractional values ({_values(frac)}); labels are whole class "
                f"numbers (0 = background, 1 … {k - 1} = {names}): round or threshold them first"
            )
    if lab.size and lab.min() < 0:
        neg = np.unique(lab[lab < 0])
        raise InputError(
            f"{what} hold negative values ({_values(neg)}); labels are class numbers "
            f"0 … {k - 1} ({names}); mark what is not labelled as 0 (background)"
        )
    out = lab.astype(np.int64)
    if not out.size or int(out.max()) < k:
        return out, None
    top = int(out.max())
    values = np.unique(out)
    if k == 2 and (values.tolist() == [0, top] or values.tolist() == [255]):
        fg = card.class_names[1] if len(card.class_names) > 1 else "foreground"
        return (out > 0).astype(np.int64), (
            f"{what} are stored as 0 and {top}: taken as 0 = background, {top} = {fg}"
        )
    raise InputError(
        f"{what} use class {top} but the model knows {k} classes ({names})"
        + (f"; values found: {_values(values.astype(float))}" if values.size > 1 else "")
    )


def _volume_units(
    img: np.ndarray,
    lab: np.ndarray,
    prev: np.ndarray | None,
    sp: tuple[float, ...] | None,
    card: ModelCard,
    axis: int,
) -> list[Unit]:
    """The corrected slices (2D model) or slab (3D model) of one volume."""
    others = tuple(a for a in range(3) if a != axis)
    rows = np.array([], int)
    if prev is not None and np.shape(prev) == lab.shape:
        rows = np.flatnonzero(np.any(lab != np.asarray(prev), axis=others))
    if rows.size == 0:
        rows = np.flatnonzero(np.any(lab > 0, axis=others))
    if rows.size == 0:
        return []
    if card.spatial_dims == 2:
        plane = None if sp is None else tuple(s for a, s in enumerate(sp) if a != axis)
        return [
            Unit(np.take(img, int(z), axis=axis), np.take(lab, int(z), axis=axis), plane)
            for z in rows
        ]
    sl: list[Any] = [slice(None)] * img.ndim
    sl[axis] = slice(int(rows.min()), int(rows.max()) + 1)
    return [Unit(img[tuple(sl)], lab[tuple(sl[:3])], sp)]


def split_units(
    n: int, fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int], list[int]]:
    """Indices ``(train, selection, report)`` of ``n`` units.

    ``round(n * fraction)`` units are held out (at least one when ``fraction > 0`` and
    ``n >= 2``; never all). With :data:`REPORT_SPLIT_MIN` or more, the first half of them
    (in random order) selects the kept state and the rest reports; with fewer, selection
    and report are the same units.
    """
    order = rng.permutation(n).tolist()
    n_hold = min(max(round(n * fraction), 1 if fraction > 0 and n >= 2 else 0), n - 1)
    hold = order[:n_hold]
    train = sorted(order[n_hold:])
    if n_hold >= REPORT_SPLIT_MIN:
        half = n_hold // 2
        return train, sorted(hold[:half]), sorted(hold[half:])
    return train, sorted(hold), sorted(hold)


# ---------------------------------------------------------------------------- tensors


def _working(unit: Unit | tuple[Any, ...], card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """A training unit on the grid the network sees at inference: normalised ``(C, *S)``
    and integer labels ``(*S)``, resized to the card's ``input_size`` (2D models trained on
    resized images) or resampled to the card's ``spacing`` (3D models, when the unit's
    spacing is known and differs), exactly as :func:`napari_prosma.inference.predict`
    does (:func:`~napari_prosma.inference.resample.working_shape`, then ``resize``)."""
    from ..inference.resample import working_shape

    img, lab = unit[0], unit[1]
    sp = unit[2] if len(unit) > 2 else None
    x = prepare(img, card.in_channels, card.spatial_dims, card.normalization)[0]
    y = np.asarray(lab).astype(np.int64)
    work, _ = working_shape(y.shape, sp, card)
    if tuple(work) != tuple(y.shape):
        import torch

        from ..inference.resample import resize

        x = resize(torch.from_numpy(np.ascontiguousarray(x))[None], work)[0].numpy()
        y = resize(torch.from_numpy(y)[None, None].float(), work, labels=True)[0, 0]
        y = y.numpy().astype(np.int64)
    return x, y


def _patch_size(
    cfg: FinetuneConfig, card: ModelCard, shapes: list[tuple[int, ...]], dev: str
) -> tuple[int, ...]:
    sd = card.spatial_dims
    if cfg.patch_size is not None:
        p = tuple(int(v) for v in cfg.patch_size)
    elif card.patch_size:
        p = tuple(int(v) for v in card.patch_size)
    else:
        p = (256,) * sd if sd == 2 else (64,) * sd
    if dev == "cpu" and sd == 2 and cfg.patch_size is None:
        p = tuple(min(v, 192) for v in p)
    largest = np.max(np.array(shapes), axis=0)
    return tuple(int(min(v, s)) for v, s in zip(p, largest))


def _sample_patch(
    x: np.ndarray, y: np.ndarray, patch: Sequence[int], fg: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A patch ``(C, *patch)`` / ``(*patch)`` from ``x (C, *S)``, ``y (*S)``, zero-padded."""
    shape = y.shape
    pad = [(0, max(p - s, 0)) for p, s in zip(patch, shape)]
    if any(p[1] for p in pad):
        x = np.pad(x, [(0, 0), *pad])
        y = np.pad(y, pad)
        shape = y.shape
    if fg and np.any(y > 0):
        pts = np.argwhere(y > 0)
        centre = pts[rng.integers(len(pts))]
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, shape)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return x[(slice(None), *sl)], y[sl]


def _augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips of every spatial axis, a 90° rotation in-plane where square, and a
    random intensity scale/shift; ``x (B, C, *S)``, ``y (B, *S)``."""
    import torch

    sd = y.ndim - 1
    for ax in range(sd):
        if torch.rand((), generator=gen) < 0.5:
            x, y = x.flip(2 + ax), y.flip(1 + ax)
    if x.shape[-1] == x.shape[-2] and torch.rand((), generator=gen) < 0.5:
        x, y = x.transpose(-1, -2), y.transpose(-1, -2)
    b = x.shape[0]
    shape = (b, 1) + (1,) * sd
    scale = 1 + 0.1 * (2 * torch.rand(shape, generator=gen) - 1)
    shift = 0.1 * (2 * torch.rand(shape, generator=gen) - 1)
    return x * scale.to(x.device) + shift.to(x.device), y


def _batch(
    prep: list[tuple[np.ndarray, np.ndarray]],
    rep: list[tuple[np.ndarray, np.ndarray]],
    cfg: FinetuneConfig,
    patch: tuple[int, ...],
    rng: np.random.Generator,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One augmented batch ``x (B, C, *patch)``, ``y (B, *patch)``: the user's patches and
    ``n_rep`` replay patches; each part foreground-centred in ``fg_fraction`` of its
    patches. Returns ``(x, y, n_rep)``."""
    import torch

    n_rep = _n_replay(cfg.batch_size, cfg.replay_fraction, rng) if rep else 0
    xs, ys = [], []
    for pool, count in ((prep, cfg.batch_size - n_rep), (rep, n_rep)):
        n_fg = math.ceil(count * cfg.fg_fraction)
        for b in range(count):
            x, y = pool[int(rng.integers(len(pool)))]
            px, py = _sample_patch(x, y, patch, b < n_fg, rng)
            xs.append(px)
            ys.append(py)
    xb, yb = _augment(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), gen)
    return xb, yb, n_rep


def _n_replay(batch: int, fraction: float, rng: np.random.Generator) -> int:
    """Replay patches in a batch: ``batch * fraction`` on average (the fractional part at
    random), leaving at least one patch of the user's when the batch has two or more."""
    want = batch * fraction
    n = int(want)
    if rng.random() < want - n:
        n += 1
    return min(n, batch - 1) if batch > 1 else n


def _replay_units(
    replay: ReplaySet | Sequence[tuple[Any, ...]] | None, card: ModelCard
) -> tuple[list[Unit], dict[str, Any]]:
    """Replay samples as units, and what the card records about them."""
    if replay is None:
        return [], {"used": False, "n_samples": 0, "source": None, "message": "replay is off"}
    if hasattr(replay, "record"):
        record = replay.record()
        items = list(replay.units)
    else:
        items = list(replay)
        record = {
            "used": bool(items),
            "n_samples": len(items),
            "source": "given by the caller",
            "message": f"replaying {len(items)} samples given by the caller",
        }
    units = []
    for it in items:
        img, lab = np.asarray(it[0]), np.asarray(it[1])
        sp = it[2] if len(it) > 2 else None
        lab, _ = _check_pair(img, lab, card)
        units.append(Unit(img, lab, tuple(float(s) for s in sp) if sp is not None else None))
    return units, record
