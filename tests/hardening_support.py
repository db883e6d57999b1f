"""Helpers of the hardening tests (issue #7): tiny models, disc images, and file-system
faults that work whether or not the tests run as root.

Imported by ``tests/test_hardening_*.py`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

WIDTHS = [4, 8, 16]  # 2 gated stages, divisor 4: fast on 2 CPU cores


def tiny_model(spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, **card_kw):
    """A random-init ProSMA-UNet and its card (eval mode, CPU)."""
    import torch

    from napari_prosma.checkpoint import ModelCard
    from napari_prosma.nets import build_model

    torch.manual_seed(0)
    kw = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "widths": list(WIDTHS),
    }
    net = build_model("prosma_unet", **kw).eval()
    card_kw.setdefault("normalization", {"mode": "zscore"})
    card_kw.setdefault("class_names", ["background", "thing"][: max(out_channels, 2)])
    return net, ModelCard("prosma_unet", net.config, name="tiny", **card_kw)


def save_tiny(folder: Path, name: str = "tiny", **kw) -> Path:
    """Save :func:`tiny_model` as ``folder/name.safetensors`` + ``.json``; returns the weights."""
    from napari_prosma.checkpoint import save

    net, card = tiny_model(**kw)
    card.name = name
    return save(net, folder / name, card)


def disc_images(
    n: int, size: int = 32, seed: int = 0, margin: int = 10, radius: tuple[int, int] = (4, 8)
) -> tuple[list, list]:
    """Bright discs on noise (uint8) and their labels: an easy task a random model gets
    wrong. Centres keep ``margin`` pixels from the border; radii in ``[radius[0], radius[1])``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        cy, cx = rng.integers(margin, size - margin, 2).tolist()
        r = int(rng.integers(*radius))
        lab = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        images.append((rng.normal(60, 15, (size, size)) + 120 * lab).clip(0, 255).astype(np.uint8))
        labels.append(lab)
    return images, labels


def smooth_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth float32 image with a little noise (structure for the network to see)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img = sum(np.sin(g / (5.0 + 2 * i)) for i, g in enumerate(grids))
    return (img + 0.3 * rng.standard_normal(shape)).astype(np.float32)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def hidden_or_temp(folder: Path) -> list[Path]:
    """Files a crashed or failed write could leave: temporary or hidden names."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[str]:
    """Make ``folder`` read-only for the code under test; yields how (``"chmod"`` or
    ``"simulated"``).

    Without root, ``chmod 0555`` blocks writes for real. Root ignores permissions, so there
    every way of creating or changing a file or folder under ``folder`` (``open`` for
    writing, ``os.open`` with ``O_CREAT``, ``os.mkdir``, ``os.link``, ``os.replace`` or
    ``os.rename`` into it) raises ``EROFS`` as a read-only disk would. The test runs either
    way; it is never skipped.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_root():
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield "chmod"
        finally:
            folder.chmod(mode)
        return
    with _refuse_writes_under(folder, errno.EROFS, "Read-only file system"):
        yield "simulated"


@contextlib.contextmanager
def _refuse_writes_under(folder: Path, code: int, text: str) -> Iterator[None]:
    import builtins
    import io

    root = os.path.realpath(folder)

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return False
        try:
            p = os.path.realpath(os.fspath(path))  # type: ignore[arg-type]
        except TypeError:
            return False
        return p == root or p.startswith(root + os.sep)

    def refuse(path: object) -> OSError:
        return OSError(code, text, os.fspath(path))  # type: ignore[arg-type]

    real_open, real_os_open = builtins.open, os.open
    real_mkdir, real_link, real_replace, real_rename = os.mkdir, os.link, os.replace, os.rename

    def fake_open(file, mode="r", *a, **k):  # type: ignore[no-untyped-def]
        if any(m in mode for m in "wax+") and inside(file):
            raise refuse(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):  # type: ignore[no-untyped-def]
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise refuse(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):  # type: ignore[no-untyped-def]
        if inside(path):
            raise refuse(path)
        return real_mkdir(path, *a, **k)

    def guard_dst(real):  # type: ignore[no-untyped-def]
        def fn(src, dst, *a, **k):  # type: ignore[no-untyped-def]
            if inside(dst):
                raise refuse(dst)
            return real(src, dst, *a, **k)

        return fn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", fake_open)
        mp.setattr(io, "open", fake_open)
        mp.setattr(os, "open", fake_os_open)
        mp.setattr(os, "mkdir", fake_mkdir)
        mp.setattr(os, "link", guard_dst(real_link))
        mp.setattr(os, "replace", guard_dst(real_replace))
        mp.setattr(os, "rename", guard_dst(real_rename))
        yield


@contextlib.contextmanager
def disk_full_at_fsync() -> Iterator[list[str]]:
    """Every ``os.fsync`` fails with ``ENOSPC``, as on a full disk whose writes were
    buffered (the data never reached it). Yields the list of fsync'ed paths' descriptors
    seen (for asserting the fault was hit)."""
    hits: list[str] = []

    def fsync(fd: int) -> None:
        hits.append(str(fd))
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        yield hits
