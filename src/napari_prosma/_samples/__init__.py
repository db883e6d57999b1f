"""Small real sample images shipped with the plugin, with their ground truth.

Sources and licences are in ``ATTRIBUTION.md`` beside this file. The loaders are napari-free:
each returns a list of ``(data, layer_kwargs, layer_type)`` tuples (napari's LayerDataTuple),
the image first and its ground-truth labels second, with the file's scale and translate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class SampleInfo:
    """One shipped sample: file names, a title, what its labels mean, and the id of the
    dataset item it was made from (``ATTRIBUTION.md``; the id the splits use)."""

    image: str
    label: str
    title: str
    class_names: tuple[str, ...]
    display: tuple[tuple[str, Any], ...] = ()
    source_id: str = ""


SAMPLES: dict[str, SampleInfo] = {
    "kvasir_polyp": SampleInfo(
        "kvasir_polyp.jpg",
        "kvasir_polyp_mask.png",
        "Colonoscopy polyp (Kvasir-SEG)",
        ("background", "polyp"),
        source_id="cju0rx1idathl0835detmsp84",
    ),
    "busi_benign": SampleInfo(
        "busi_benign.png",
        "busi_benign_mask.png",
        "Breast ultrasound, benign lesion (BUSI)",
        ("background", "lesion"),
        (("colormap", "gray"),),
        source_id="benign_100",
    ),
    "hippocampus_mri": SampleInfo(
        "hippocampus_mri.nii.gz",
        "hippocampus_mri_label.nii.gz",
        "Hippocampus MRI, cropped (MSD Task04)",
        ("background", "anterior", "posterior"),
        (("colormap", "gray"),),
        source_id="hippocampus_222",
    ),
    "spleen_ct": SampleInfo(
        "spleen_ct.nii.gz",
        "spleen_ct_label.nii.gz",
        "Abdominal CT, spleen (MSD Task09, crop)",
        ("background", "spleen"),
        (("colormap", "gray"), ("contrast_limits", (-160.0, 240.0))),
    ),
}


def sample_path(name: str) -> Path:
    """Path of a sample's image file (see :data:`SAMPLES`)."""
    return HERE / _info(name).image


def _info(name: str) -> SampleInfo:
    if name not in SAMPLES:
        raise KeyError(f"no sample named {name!r}; choose one of {', '.join(SAMPLES)}")
    return SAMPLES[name]


def load_sample(name: str) -> tuple[Any, np.ndarray]:
    """A sample as ``(ImageData, ground_truth)``; labels are uint8 on the image's grid."""
    from ..io import read_image

    info = _info(name)
    image = read_image(HERE / info.image)
    gt = read_image(HERE / info.label).data
    if gt.ndim == 3 and image.kind != "volume":  # a mask saved in colour
        gt = gt[..., 0]
    if name in ("kvasir_polyp", "busi_benign"):  # masks stored as 0 / 255
        gt = gt > 127
    return image, np.asarray(gt).astype(np.uint8)


def layers(name: str) -> list[tuple[Any, dict[str, Any], str]]:
    """A sample as napari LayerDataTuples: the image, then its ground-truth labels."""
    info = _info(name)
    image, gt = load_sample(name)
    kw = image.layer_kwargs()
    kw["metadata"]["sample"] = name
    img_kw = {"name": info.title, **kw, **dict(info.display)}
    lab_kw = {
        "name": f"{info.title}: ground truth",
        "scale": kw["scale"],
        "translate": kw["translate"],
        "metadata": {**kw["metadata"], "class_names": list(info.class_names)},
        "opacity": 0.5,
    }
    return [(image.data, img_kw, "image"), (gt, lab_kw, "labels")]


def kvasir_polyp() -> list[tuple[Any, dict[str, Any], str]]:
    """Colonoscopy frame with a polyp (RGB, 288×337) and its manual mask."""
    return layers("kvasir_polyp")


def busi_benign() -> list[tuple[Any, dict[str, Any], str]]:
    """Breast ultrasound with a benign lesion (grey, 256×256) and its manual mask."""
    return layers("busi_benign")


def hippocampus_mri() -> list[tuple[Any, dict[str, Any], str]]:
    """Cropped T1 MRI around the hippocampus (36×49×34 at 1 mm) and its manual labels."""
    return layers("hippocampus_mri")


def spleen_ct() -> list[tuple[Any, dict[str, Any], str]]:
    """Abdominal CT crop (26×166×164 at 5×0.79×0.79 mm, HU) and its manual spleen label."""
    return layers("spleen_ct")
