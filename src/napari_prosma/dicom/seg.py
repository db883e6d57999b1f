"""Labels on a DICOM series' grid -> a DICOM Segmentation (SEG), and back (highdicom).

The SEG references the source series instance by instance (so a viewer lays it over the
series), holds one segment per label value named from the model card's ``class_names``,
and identifies the algorithm: the model's name, a version (the model version when the
caller knows it, else ``sha256:`` and the start of the weights hash) and the full weights
hash among its parameters. Labels painted by hand without a model become ``MANUAL``
segments.

Patient and study attributes: highdicom copies the patient, study and frame-of-reference
modules of the source, as a SEG must carry them; nothing else of the source (no
institution, no operator, no description) is added, and this module logs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..io import ImageData, atomic_write
from ..preprocess import InputError

#: Default segmented property category (SNOMED CT "Anatomical structure"); a card may name
#: its own per class in ``extra["dicom_codes"][class] = {"category": [scheme, value,
#: meaning], "type": [...]}``.
DEFAULT_CATEGORY = ("SCT", "91723000", "Anatomical Structure")
#: Private coding scheme for the segmented property type when the card names none.
PRIVATE_SCHEME = "99PROSMA"
SEG_SERIES_OFFSET = 1000


def _dicom(like: ImageData) -> dict[str, Any]:
    info = like.meta.get("dicom") if like is not None else None
    if not isinstance(info, dict) or not info.get("files"):
        raise InputError(
            "a DICOM Segmentation references its source series: these labels do not belong "
            "to an image read from DICOM (save them as NIfTI or TIFF instead)"
        )
    return info


def to_source_grid(labels: np.ndarray, like: ImageData) -> np.ndarray:
    """Labels on the shown grid (the layer's) -> ``(slices, rows, columns)`` on the source
    grid, slice order as in ``like.meta["dicom"]["frames"]`` (axes permuted/flipped only)."""
    info = _dicom(like)
    lab = np.asarray(labels)
    if tuple(lab.shape) != tuple(like.spatial_shape):
        raise InputError(
            f"labels of shape {lab.shape} do not fit the image grid {like.spatial_shape}"
        )
    if lab.ndim == 2:
        return lab[None]
    return _regrid(
        lab,
        info["shown_affine_lps"],
        info["source_affine_lps"],
        info["source_shape"],
        info["frame_of_reference_uid"],
    )


def _regrid(
    a: np.ndarray,
    affine: np.ndarray,
    to_affine: np.ndarray,
    to_shape: tuple[int, ...],
    frame_uid: str | None,
) -> np.ndarray:
    import highdicom as hd

    vol = hd.Volume(
        a, affine=np.asarray(affine), coordinate_system="PATIENT", frame_of_reference_uid=frame_uid
    )
    geom = hd.VolumeGeometry(
        affine=np.asarray(to_affine),
        spatial_shape=tuple(to_shape),
        coordinate_system="PATIENT",
        frame_of_reference_uid=frame_uid,
    )
    return np.ascontiguousarray(vol.match_geometry(geom).array)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.dtype.kind == "b":
        lab = lab.astype(np.uint8)
    if lab.dtype.kind not in "iu":
        if lab.dtype.kind != "f" or not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise InputError(f"labels must be whole numbers, got data type {lab.dtype}")
    lo, hi = (int(lab.min()), int(lab.max())) if lab.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise InputError(f"label values must lie in 0..65535, found {lo}..{hi}")
    return lab.astype(np.uint8 if hi <= 255 else np.uint16)


def _segments(values: list[int], card: Any, version: str | None, algorithm_type: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    names = list(getattr(card, "class_names", None) or [])
    codes_of = dict((getattr(card, "extra", None) or {}).get("dicom_codes", {}))
    algo = None
    if card is not None:
        digest = str(getattr(card, "weights_sha256", "") or "")
        params = {"weights_sha256": digest or "unknown", "architecture": str(card.architecture)}
        if getattr(card, "parent_hash", None):
            params["parent_sha256"] = str(card.parent_hash)
        algo = hd.AlgorithmIdentificationSequence(
            name=str(card.name)[:64],
            family=codes.DCM.ArtificialIntelligence,
            version=(version or (f"sha256:{digest[:16]}" if digest else "unknown"))[:64],
            source=f"napari-prosma {__version__}",
            parameters=params,
        )
    out = []
    for v in values:
        name = names[v] if v < len(names) else f"label {v}"
        own = codes_of.get(name, {})
        cat = hd.sr.CodedConcept(*_code(own.get("category"), DEFAULT_CATEGORY))
        typ = hd.sr.CodedConcept(*_code(own.get("type"), (PRIVATE_SCHEME, f"L{v}", name)))
        out.append(
            hd.seg.SegmentDescription(
                segment_number=v,
                segment_label=name[:64],
                segmented_property_category=cat,
                segmented_property_type=typ,
                algorithm_type=algorithm_type if algo is not None else "MANUAL",
                algorithm_identification=algo,
            )
        )
    return out


def _code(given: Any, default: tuple[str, str, str]) -> tuple[str, str, str]:
    scheme, value, meaning = given if given else default
    return str(value), str(scheme), str(meaning)


def _sources(info: dict[str, Any]) -> list[Any]:
    """The source headers, checked against what was read (no pixel data)."""
    import pydicom

    out = []
    for f, uid in zip(info["files"], info["sop_uids"]):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (OSError, Exception) as e:
            raise InputError(
                f"the source file {Path(f).name} can no longer be read ({type(e).__name__}); "
                "the SEG must reference it"
            ) from None
        if str(ds.SOPInstanceUID) != uid:
            raise InputError(f"the source file {Path(f).name} changed since it was opened")
        out.append(ds)
    return out


def write_seg(
    path: str | os.PathLike[str],
    labels: np.ndarray,
    like: ImageData,
    card: Any = None,
    *,
    version: str | None = None,
    algorithm_type: str = "AUTOMATIC",
    overwrite: bool = False,
) -> Path:
    """Write labels on ``like``'s grid as a DICOM Segmentation of its source series.

    Args:
        path: the ``.dcm`` file to write (atomically; never clobbered unless ``overwrite``).
        labels: integer labels, ``like.spatial_shape`` (the layer's grid), 0 = background.
        like: the image read by :func:`napari_prosma.dicom.read_dicom`.
        card: the model card (class names, name, weights hash), or None for labels painted
            by hand (``MANUAL`` segments named ``label k``).
        version: the model's version id, when known.
        algorithm_type: ``AUTOMATIC`` (a model's output) or ``SEMIAUTOMATIC`` (edited).

    Returns:
        The path written.

    Raises:
        InputError: not a DICOM image, labels that do not fit, a source that changed.
    """
    import highdicom as hd

    info = _dicom(like)
    src = to_source_grid(_check_labels(labels), like)
    datasets = _sources(info)
    frames = info["frames"]
    if info["multiframe"]:
        sources, pixels = datasets, np.zeros_like(src)
        for k, (_, f) in enumerate(frames):
            pixels[f - 1] = src[k]
    else:
        sources, pixels = [datasets[i] for i, _ in frames], src
    # segment numbers must run 1..n (highdicom, PS3.3 C.8.20.2): label k is segment k
    top = max(
        int(pixels.max()) if pixels.size else 0, len(getattr(card, "class_names", None) or []) - 1
    )
    values = list(range(1, top + 1))
    if not values:
        raise InputError("the labels are empty and the model names no class: nothing to save")
    name = str(getattr(card, "name", "") or "manual")
    number = _series_number(datasets[0])
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type="BINARY",
        segment_descriptions=_segments(values, card, version, algorithm_type),
        series_instance_uid=hd.UID(),
        series_number=number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-prosma",
        manufacturer_model_name=name[:64],
        software_versions=__version__,
        device_serial_number=str(getattr(card, "weights_sha256", "") or "none")[:16],
        content_label="PROSMA",
        content_description=f"{name} segmentation"[:64],
        series_description=f"{name} segmentation"[:64],
    )
    return atomic_write(
        path, lambda tmp: seg.save_as(tmp, enforce_file_format=True), overwrite=overwrite
    )


def _series_number(ds: Any) -> int:
    try:
        return SEG_SERIES_OFFSET + int(ds.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        return SEG_SERIES_OFFSET


def read_seg(path: str | os.PathLike[str], like: ImageData) -> np.ndarray:
    """Read a SEG made on ``like``'s series back onto exactly ``like``'s (shown) grid.

    Returns:
        Integer labels, ``like.spatial_shape``; each voxel holds its segment number.

    Raises:
        InputError: not a SEG, or a SEG of another series.
    """
    import highdicom as hd

    info = _dicom(like)
    try:
        seg = hd.seg.segread(path)
    except Exception as e:
        raise InputError(
            f"{Path(path).name} is not a readable DICOM Segmentation ({type(e).__name__})"
        ) from None
    refs = {str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])}
    if info["series_uid"] not in refs:
        raise InputError(f"{Path(path).name} was made on another series")
    frames = info["frames"]
    if info["multiframe"]:
        src = seg.get_pixels_by_source_frame(
            info["sop_uids"][0],
            source_frame_numbers=[f for _, f in frames],
            combine_segments=True,
            relabel=False,
        )
    else:
        src = seg.get_pixels_by_source_instance(
            [info["sop_uids"][i] for i, _ in frames], combine_segments=True, relabel=False
        )
    if like.spatial_dims == 2:
        return src[0]
    return _regrid(
        src,
        info["source_affine_lps"],
        info["shown_affine_lps"],
        info["shown_shape"],
        info["frame_of_reference_uid"],
    )


def seg_segments(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The segments of a SEG: number, label, algorithm type, name, version, parameters."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = []
    for item in ds.SegmentSequence:
        algo = (item.get("SegmentationAlgorithmIdentificationSequence") or [None])[0]
        out.append(
            {
                "number": int(item.SegmentNumber),
                "label": str(item.SegmentLabel),
                "algorithm_type": str(item.SegmentAlgorithmType),
                "algorithm": None if algo is None else str(algo.AlgorithmName),
                "version": None if algo is None else str(algo.AlgorithmVersion),
                "parameters": None if algo is None else str(algo.get("AlgorithmParameters", "")),
            }
        )
    return out
