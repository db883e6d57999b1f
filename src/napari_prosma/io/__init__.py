"""Read images and volumes with their geometry; write labels and maps back with it.

Rooms: :mod:`.read` (PNG/JPEG here, TIFF in :mod:`.tiff`, NIfTI in :mod:`.nifti`, the
checks a reader makes in :mod:`.checks`), :mod:`.write`, :mod:`.layers` (geometry ↔ napari
layer metadata) and :mod:`.image` (:class:`ImageData`). Today's public names are
re-exported here, so ``from napari_prosma.io import read_image`` keeps working; atomic
writes and suffix helpers live in :mod:`napari_prosma.fs`. Qt-free and torch-free.
"""

from __future__ import annotations

from ..errors import WriteError
from ..fs import atomic_write, stem_of, suffix_of
from ..preprocess import InputError
from .checks import NIFTI_SPACING_MM, check_decoded_size, check_nifti_geometry
from .image import (
    JPEG_SUFFIXES,
    NIFTI_SUFFIXES,
    PNG_SUFFIXES,
    SUPPORTED_SUFFIXES,
    TIFF_SUFFIXES,
    ImageData,
    from_array,
    is_supported,
)
from .read import READ_SUFFIXES, exif_orientation, read_image, read_series
from .write import label_dtype, write_image, write_labels

__all__ = [
    "JPEG_SUFFIXES",
    "NIFTI_SPACING_MM",
    "NIFTI_SUFFIXES",
    "PNG_SUFFIXES",
    "READ_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TIFF_SUFFIXES",
    "ImageData",
    "InputError",
    "WriteError",
    "atomic_write",
    "check_decoded_size",
    "check_nifti_geometry",
    "exif_orientation",
    "from_array",
    "is_supported",
    "label_dtype",
    "read_image",
    "read_series",
    "stem_of",
    "suffix_of",
    "write_image",
    "write_labels",
]
