"""The ``io/`` package of the redesign (issue 13 part 5): today's names still importable
from their old homes. (That its rooms import without Qt or torch, and stay within the size
limits, is checked for every core module in ``test_core_layout.py``.)"""

from __future__ import annotations


def test_old_names_still_work():
    from napari_prosma import _reader, errors, fs, io
    from napari_prosma.io import layers, read

    assert io.atomic_write is fs.atomic_write
    assert io.suffix_of is fs.suffix_of and io.stem_of is fs.stem_of
    assert io.WriteError is errors.WriteError is fs.WriteError
    assert issubclass(io.WriteError, OSError)
    for name in (
        "IO_KEY",
        "source_metadata",
        "image_data_from_layer",
        "_from_source_file",
        "_header",
    ):
        assert getattr(_reader, name) is getattr(layers, name)
    assert _reader.READ_SUFFIXES is read.READ_SUFFIXES
    for name in io.__all__:
        assert getattr(io, name) is not None
