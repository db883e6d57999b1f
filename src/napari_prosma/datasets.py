"""Readers for the four public datasets, their splits, and a compact packed form.

Every reader returns arrays exactly as training and evaluation see them:

- 2D sets (:class:`Dataset`): ``images`` uint8 ``(N, C, H, W)`` (C = 1 grey or 3 RGB),
  ``labels`` uint8 ``(N, H, W)`` with values {0, 1}, ``ids`` the file stems.
  Kvasir-SEG is resized here to 256×256 (images bilinear with antialiasing, masks
  thresholded at > 127 then nearest), BUSI (256²) and GlaS (512²) come resized already.
- Hippocampus (the same :class:`Dataset`): lists of float32 volumes (the stored
  intensities, unclipped: most files hold float32 values up to a few thousand, a few
  uint8) and uint8 labels {0, 1, 2}, axes ``(k, j, i)`` (the NIfTI array transposed, as
  :mod:`napari_prosma.io` reads volumes for napari and inference), spacing 1 mm.

``pack``/``load_packed`` store a dataset in one ``NAME.npz`` (2D: the original encoded
images + bit-packed masks; 3D: raw float32 volumes, uint8 labels) so a GPU machine needs
neither the original folder layout nor nibabel; reading the packed file gives identical
arrays (tested, and checked by a sha256 of the decoded images).

Splits (``training/splits/*.json``) are ``{"dataset", "seed", "train": [ids], "test": [ids]}``;
:func:`random_split` makes the 80/20 ones (numpy ``default_rng(seed).permutation`` of the
sorted ids, the first 20 % test).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import glas_official_split, random_split, read_split  # noqa: F401 (re-exported)

#: Dataset name -> (kind, channels, training size, class names, what it is).
DATASETS: dict[str, dict[str, Any]] = {
    "busi": {
        "dims": 2,
        "channels": 1,
        "size": 256,
        "classes": ["background", "lesion"],
        "title": "BUSI breast ultrasound (benign + malignant), 647 images",
    },
    "busi_with_normal": {
        "dims": 2,
        "channels": 1,
        "size": 256,
        "classes": ["background", "lesion"],
        "title": "BUSI breast ultrasound, 647 lesion images (benign + malignant) + 67 normal "
        "images without a lesion (empty masks)",
    },
    "kvasir": {
        "dims": 2,
        "channels": 3,
        "size": 256,
        "classes": ["background", "polyp"],
        "title": "Kvasir-SEG colonoscopy polyps, 1000 images",
    },
    "glas": {
        "dims": 2,
        "channels": 3,
        "size": 512,
        "classes": ["background", "gland"],
        "title": "GlaS colon gland histology, 165 images",
    },
    "hippocampus": {
        "dims": 3,
        "channels": 1,
        "size": None,
        "classes": ["background", "anterior", "posterior"],
        "title": "MSD Task04 Hippocampus, 260 cropped T1 MRI volumes",
    },
}

#: Dataset name -> its folder under the data root (the first, where it has several).
_FOLDER: dict[str, str] = {
    "busi": "busi",
    "busi_with_normal": "busi",
    "kvasir": "kvasir-seg",
    "glas": "glas",
    "hippocampus": "hippocampus",
}
#: Datasets read from more than one folder: every folder, in order.
_FOLDERS: dict[str, tuple[str, ...]] = {"busi_with_normal": ("busi", "busi-normal")}


def default_data_root() -> Path:
    """``$PROSMA_DATA`` if set, else ``../shared/data`` beside the repository checkout."""
    env = os.environ.get("PROSMA_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass
class Dataset:
    """Labelled cases of one dataset, 2D or 3D, as training and evaluation see them.

    Attributes:
        name: the dataset's name (a key of :data:`DATASETS`).
        images: 2D, uint8 ``(N, C, H, W)`` (as batches gather); 3D, volumes ``(k, j, i)``.
        labels: 2D, uint8 ``(N, H, W)`` {0, 1}; 3D, a list of uint8 volumes {0, 1, 2}.
        ids: the case ids (file stems), in order.
        spacing: per case ``[sk, sj, si]`` in mm; empty when not known (2D).
        meta: anything else (``size``); keys starting with ``_`` are dropped by ``subset``.
    """

    name: str
    images: Any
    labels: Any
    ids: list[str]
    spacing: list[list[float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dims(self) -> int:
        """2 for a stack of images, 3 for a list of volumes."""
        return 2 if isinstance(self.images, np.ndarray) else 3

    def image(self, i: int) -> np.ndarray:
        """Case ``i`` as napari sees it: ``(H, W)``, ``(H, W, 3)`` or the volume ``(k, j, i)``."""
        img = self.images[i]
        if self.dims == 2:
            return img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        return img

    def spacing_of(self, i: int) -> list[float] | None:
        """Case ``i``'s voxel spacing in mm, or None when not known."""
        return self.spacing[i] if self.spacing else None

    def subset(self, ids: Sequence[str]) -> Dataset:
        """The cases ``ids``, in that order (a copy)."""
        index = {k: i for i, k in enumerate(self.ids)}
        missing = [k for k in ids if k not in index]
        if missing:
            raise KeyError(f"{self.name}: {len(missing)} id(s) not in the data, e.g. {missing[0]}")
        sel = [index[k] for k in ids]
        if self.dims == 2:
            rows = np.array(sel, dtype=np.int64)
            images, labels = self.images[rows], self.labels[rows]
        else:
            images, labels = [self.images[i] for i in sel], [self.labels[i] for i in sel]
        spacing = [self.spacing[i] for i in sel] if self.spacing else []
        meta = {k: v for k, v in self.meta.items() if not k.startswith("_")}
        return Dataset(self.name, images, labels, list(ids), spacing, meta)


# ---------------------------------------------------------------------------- resizing


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize a uint8 ``(H, W)`` or ``(H, W, C)`` image to ``size`` (bilinear, antialiased,
    Pillow) — the one resize used for training data and, through the card, inference."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize a label image (nearest neighbour)."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if mask.shape[:2] == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))


# ---------------------------------------------------------------------------- readers


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) with Pillow."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        return np.asarray(im)


def _finish_image(data: bytes, channels: int, size: int) -> np.ndarray:
    """Decode and resize one image to its ``(C, H, W)`` training form."""
    img = resize_image(decode_image(data, channels), size)
    return (img if img.ndim == 3 else img[..., None]).transpose(2, 0, 1)


def _finish_mask(data: bytes, size: int) -> np.ndarray:
    return resize_mask((decode_image(data, 1) > 127).astype(np.uint8), size)


def _stems(folder: Path, suffix: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(f"*{suffix}"))


def _read_packed(path: Path, limit: int | None, ids: Sequence[str] | None) -> Dataset | None:
    """``path`` read by :func:`load_packed` (``ids``, then the first ``limit``); or None."""
    if not path.exists():
        return None
    ds = load_packed(path)
    if ids is not None:
        ds = ds.subset(list(ids))
    if limit:
        ds = ds.subset(ds.ids[:limit])
    return ds


def read_2d(
    name: str,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
) -> Dataset:
    """Read one of the 2D datasets (``busi``, ``kvasir``, ``glas``) from the original files,
    or from ``root/NAME.npz`` if a packed copy lies there.

    Args:
        name: dataset name.
        root: the data folder (default :func:`default_data_root`).
        limit: read only the first ``limit`` ids (sorted), for tests.
        ids: read only these ids, in this order (e.g. a few replay samples).
    """
    info = DATASETS[name]
    if info["dims"] != 2:
        raise ValueError(f"{name} is not a 2D dataset")
    root = Path(root) if root is not None else default_data_root()
    if (packed := _read_packed(root / f"{name}.npz", limit, ids)) is not None:
        return packed
    folders = [root / f for f in _FOLDERS.get(name, (_FOLDER[name],))]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"no {name} data at {folder}")
    img_suffix = ".png" if name.startswith("busi") else ".jpg"
    mask_suffix = ".jpg" if name == "kvasir" else ".png"
    home = {s: f for f in folders for s in _stems(f / "images", img_suffix)}
    ids = list(ids) if ids is not None else sorted(home)
    if limit:
        ids = ids[:limit]
    missing = [s for s in ids if s not in home]
    if missing:
        raise KeyError(f"{name}: {len(missing)} id(s) not in the data, e.g. {missing[0]}")
    size = info["size"]
    encoded = [(home[s] / "images" / f"{s}{img_suffix}").read_bytes() for s in ids]
    images = np.stack([_finish_image(b, info["channels"], size) for b in encoded])
    masks = np.stack(
        [_finish_mask((home[s] / "masks" / f"{s}{mask_suffix}").read_bytes(), size) for s in ids]
    )
    ds = Dataset(name, images, masks, ids, meta={"size": size})
    ds.meta["_encoded"] = encoded  # kept for pack(); dropped by subset()
    return ds


def read_hippocampus(
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
) -> Dataset:
    """Read MSD Task04 Hippocampus (``imagesTr``/``labelsTr``) or ``root/hippocampus.npz``
    (all volumes, the first ``limit``, or the ``ids`` given)."""
    root = Path(root) if root is not None else default_data_root()
    if (packed := _read_packed(root / "hippocampus.npz", limit, ids)) is not None:
        return packed
    import nibabel as nib

    folder = root / "hippocampus"
    if not folder.is_dir():
        raise FileNotFoundError(f"no hippocampus data at {folder}")
    if ids is None:
        ids = sorted(p.name[: -len(".nii.gz")] for p in (folder / "imagesTr").glob("*.nii.gz"))
    ids = list(ids)
    if limit:
        ids = ids[:limit]
    images, labels, spacing = [], [], []
    for stem in ids:
        im = nib.load(str(folder / "imagesTr" / f"{stem}.nii.gz"))
        lb = nib.load(str(folder / "labelsTr" / f"{stem}.nii.gz"))
        # (i, j, k) -> (k, j, i): the order napari_prosma.io gives napari and inference
        a = np.ascontiguousarray(np.transpose(np.asarray(im.dataobj)))
        b = np.ascontiguousarray(np.transpose(np.asarray(lb.dataobj)))
        if a.shape != b.shape:
            raise ValueError(f"{stem}: image {a.shape} and label {b.shape} differ")
        # the values as stored: sessions 1-4 clipped them to uint8 0..255, which saturated
        # most volumes (float32 up to a few thousand) while inference saw the raw values
        images.append(a.astype(np.float32))
        labels.append(b.astype(np.uint8))
        spacing.append([float(s) for s in im.header.get_zooms()[:3]][::-1])
    return Dataset("hippocampus", images, labels, ids, spacing)


def read_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
) -> Dataset:
    """Read any of the four datasets by name (all of it, the first ``limit`` ids, or the
    ``ids`` given)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if name == "hippocampus":
        return read_hippocampus(root, limit, ids)
    return read_2d(name, root, limit, ids)


# ---------------------------------------------------------------------------- packing


def pack(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` to one ``.npz``; returns the path.

    2D sets read from the original files keep their images as the original PNG/JPEG bytes
    (decoded and resized again by :func:`load_packed` with the same code, and checked against
    a sha256 of the arrays), masks bit-packed at the training size: about the size of the
    original files. Volumes are stored raw and compressed.
    """
    import hashlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    if ds.dims == 2:
        encoded = ds.meta.get("_encoded")
        meta = {
            "kind": "2d",
            "name": ds.name,
            "ids": ds.ids,
            "meta": {k: v for k, v in ds.meta.items() if not k.startswith("_")},
            "mask_shape": list(ds.labels.shape),
            "channels": int(ds.images.shape[1]),
            "images_sha256": hashlib.sha256(np.ascontiguousarray(ds.images)).hexdigest(),
        }
        if encoded is not None and len(encoded) == len(ds):
            meta["encoded_lengths"] = [len(b) for b in encoded]
            arrays["encoded"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        else:
            arrays["images"] = ds.images
        arrays["masks"] = np.packbits(ds.labels.astype(bool), axis=None)
    else:
        meta = {
            "kind": "3d",
            "name": ds.name,
            "ids": ds.ids,
            "meta": ds.meta,
            "shapes": [list(a.shape) for a in ds.images],
            "spacing": ds.spacing,
        }
        arrays["images"] = np.concatenate([a.ravel() for a in ds.images])
        arrays["labels"] = np.concatenate([a.ravel() for a in ds.labels])
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def load_packed(path: str | os.PathLike[str]) -> Dataset:
    """Read a file written by :func:`pack` (2D images are decoded and resized here; the
    result's ``meta["decoded_identical"]`` says whether they match the packing machine's)."""
    import hashlib

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        if meta["kind"] == "2d":
            shape = tuple(meta["mask_shape"])
            masks = np.unpackbits(z["masks"], count=int(np.prod(shape))).reshape(shape)
            if "encoded" in z.files:
                blob = z["encoded"].tobytes()
                size = meta["meta"].get("size") or shape[1]
                images, off = [], 0
                for n in meta["encoded_lengths"]:
                    images.append(_finish_image(blob[off : off + n], meta["channels"], size))
                    off += n
                images = np.stack(images)
            else:
                images = z["images"]
            m = dict(meta["meta"])
            digest = hashlib.sha256(np.ascontiguousarray(images)).hexdigest()
            m["decoded_identical"] = digest == meta["images_sha256"]
            return Dataset(meta["name"], images, masks, meta["ids"], meta=m)
        flat_i, flat_l = z["images"], z["labels"]
    images, labels, off = [], [], 0
    for s in meta["shapes"]:
        n = int(np.prod(s))
        images.append(flat_i[off : off + n].reshape(s))
        labels.append(flat_l[off : off + n].reshape(s))
        off += n
    return Dataset(meta["name"], images, labels, meta["ids"], meta["spacing"], meta["meta"])
