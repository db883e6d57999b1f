"""Issue 12, "beyond the list": real files from ``../shared/data``, damaged (truncated, bits
flipped, header fields set to NaN / 0 / huge), through the reader and ``prosma predict``.

Whatever the damage: the reader returns an image or raises :class:`InputError` (one plain
message); ``prosma predict`` exits 0 or 1 with one stderr line per refused file, no
traceback and nothing left under a real name (nor a temporary file) when it refuses; no
step allocates an absurd amount of memory (numpy/Python allocations traced, the network's
working grid bounded).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from file_mutations import NIFTI_FIELDS, flip_bits, read_bytes, set_nifti_field, write_bytes
from hardening_support import save_tiny
from napari_prosma.cli import main
from napari_prosma.inference import engine
from napari_prosma.inference.resample import MAX_WORK_VOXELS
from napari_prosma.io import read_image
from napari_prosma.preprocess import InputError

pytestmark = [pytest.mark.data, pytest.mark.slow]

#: Most memory (bytes) numpy and Python may hold at once while one damaged file is read and
#: segmented; the undamaged files need < 100 MB.
PEAK_LIMIT = 768 * 2**20
FILES = ("busi.png", "kvasir.jpg", "hippo.nii.gz", "hippo.nii", "busi.tif", "hippo.tif")
_VALUES = [float("nan"), float("inf"), 0.0, -1.0, 1e-4, 50.0, 1e38, 32767.0, -32768.0, 3.0]
_TIFF_TAGS = ("ImageWidth", "ImageLength", "XResolution", "StripByteCounts", "RowsPerStrip")


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> dict[str, Path]:
    """The undamaged files (copies, and TIFFs written from the same real images)."""
    import imageio.v3 as iio
    import nibabel as nib

    d = tmp_path_factory.mktemp("corpus")
    busi = shared_data / "busi" / "images" / "benign_001.png"
    hippo = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    shutil.copy(busi, d / "busi.png")
    shutil.copy(
        shared_data / "kvasir-seg" / "images" / "cju2htabevq9108015qjei0x7.jpg", d / "kvasir.jpg"
    )
    shutil.copy(hippo, d / "hippo.nii.gz")
    write_bytes(d / "hippo.nii", read_bytes(hippo))
    tifffile.imwrite(
        d / "busi.tif", iio.imread(busi), resolution=(10.0, 10.0), resolutionunit="CENTIMETER"
    )
    vol = np.asarray(nib.load(hippo).dataobj).T.copy()
    tifffile.imwrite(
        d / "hippo.tif",
        vol,
        imagej=True,
        resolution=(1.0, 1.0),
        metadata={"spacing": 1.0, "unit": "mm", "axes": "ZYX"},
    )
    return {n: d / n for n in FILES}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models, one per image kind (the file handling is under test, not the model)."""
    d = tmp_path_factory.mktemp("models")
    fixed = {"mode": "fixed", "scale": 255.0}
    return {
        "grey": save_tiny(d, "grey", normalization=fixed),
        "rgb": save_tiny(d, "rgb", in_channels=3, normalization=fixed),
        "volume": save_tiny(d, "vol", spatial_dims=3, spacing=[1.0, 1.0, 1.0]),
    }


_KIND = {"busi.png": "grey", "kvasir.jpg": "rgb", "busi.tif": "grey"}

_flips = st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 7)), min_size=1, max_size=8)


def damage(name: str) -> st.SearchStrategy[tuple]:
    """Truncation, bit flips (anywhere, or in the first 1 KB: the header, decompressed for
    .nii.gz) or a header field of the file's format set to NaN / 0 / huge."""
    if ".nii" in name:
        fields = sorted(NIFTI_FIELDS)
    elif name.endswith(".tif"):
        fields = [*_TIFF_TAGS, "spacing"]
    else:
        fields = []
    kinds = [
        st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
        st.tuples(st.just("flip"), _flips, st.booleans()),
    ]
    if fields:
        field = st.tuples(
            st.just("field"), st.sampled_from(fields), st.integers(0, 7), st.sampled_from(_VALUES)
        )
        kinds += [field, field]  # header fields: the damage the issue names first
    return st.one_of(*kinds)


def _damaged(src: Path, dst: Path, how: tuple) -> Path:
    """Write ``src`` damaged as ``how`` says to ``dst``."""
    if how[0] == "truncate":
        raw = src.read_bytes()
        dst.write_bytes(raw[: int(how[1] * len(raw))])
    elif how[0] == "flip":
        flips = [(i % 1024 if how[2] else i, b) for i, b in how[1]]
        if how[2] and dst.name.endswith(".gz"):
            write_bytes(dst, flip_bits(read_bytes(src), flips))
        else:
            dst.write_bytes(flip_bits(src.read_bytes(), flips))
    else:
        _, name, index, value = how
        shutil.copy(src, dst)
        if ".nii" in dst.name and name in NIFTI_FIELDS:
            buf = read_bytes(src)
            set_nifti_field(buf, name, min(index, NIFTI_FIELDS[name][2] - 1), value)
            write_bytes(dst, buf)
        elif dst.suffix == ".tif":
            _edit_tiff(dst, name, value)
    return dst


def _edit_tiff(path: Path, name: str, value: float) -> None:
    """Overwrite one tag (or the ImageJ slice spacing) of a TIFF's first page in place."""
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tags = tf.pages[0].tags
        if name == "spacing" and "ImageDescription" in tags:
            text = tags["ImageDescription"].value
            new = "\n".join(
                f"spacing={value}" if line.startswith("spacing=") else line
                for line in text.splitlines()
            )
            tags["ImageDescription"].overwrite(new)
        elif name in tags and math.isfinite(value):
            tag = tags[name]
            v = int(min(max(value, 0), 2**31 - 1))
            if name == "XResolution":
                tag.overwrite((v, 1))
            elif name == "StripByteCounts":
                tag.overwrite((v,) * len(tag.value))
            else:
                tag.overwrite(v)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@settings(
    max_examples=36,
    deadline=30_000,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_damaged_files_are_read_or_refused_in_one_line(corpus, models, monkeypatch, capsys, data):
    """Each example well under a second or two on 2 CPU cores (deadline 30 s: a damaged
    header must not make a long job either)."""
    name = data.draw(st.sampled_from(FILES), label="file")
    how = data.draw(damage(name), label="damage")
    grids: list[tuple[int, ...]] = []
    real = engine.working_shape

    def traced(*a, **k):
        work, notes = real(*a, **k)
        grids.append(tuple(work))
        return work, notes

    monkeypatch.setattr(engine, "working_shape", traced)
    with tempfile.TemporaryDirectory() as d:
        src = _damaged(corpus[name], Path(d) / name, how)
        tracemalloc.start()
        try:
            try:
                img = read_image(src)
            except InputError as e:
                assert str(e).strip(), "a refusal says why"
                img = None
            out = Path(d) / "out"
            kind = _KIND.get(name, "volume") if img is None else img.kind
            model = models.get(kind, models["grey"])
            capsys.readouterr()
            rc = main(
                ["predict", str(src), "-o", str(out), "--model", str(model), "--device", "cpu"]
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        err = capsys.readouterr().err
        written = _files(out)
    assert rc in (0, 1), (how, err)
    assert "Traceback" not in err and "memory" not in err, (how, err)
    assert peak < PEAK_LIMIT, (how, f"{peak / 2**20:.0f} MiB")
    assert all(math.prod(g) <= MAX_WORK_VOXELS for g in grids), (how, grids)
    assert not [p for p in written if ".tmp" in p.name or p.name.startswith(".")], written
    if rc == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prosma predict: "), (how, err)
        assert written == [], (how, written)
    else:
        assert err.strip() == "" and any("_labels" in p.name for p in written), (how, err)
