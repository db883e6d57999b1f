"""Dataset readers, packing, splits and GPU-side augmentation/normalisation (on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_prosma.datasets import (
    load_packed,
    pack,
    random_split,
    read_dataset,
    read_split,
)
from napari_prosma.preprocess import normalize
from napari_prosma.train import NORMALIZATION
from napari_prosma.train.augment import Data3D, Normalizer2D, dihedral_2d

REPO = Path(__file__).resolve().parents[1]
SPLITS = REPO / "training" / "splits"


@pytest.mark.data
@pytest.mark.parametrize(
    "name, channels, size", [("busi", 1, 256), ("kvasir", 3, 256), ("glas", 3, 512)]
)
def test_read_2d(shared_data, name, channels, size):
    ds = read_dataset(name, shared_data, limit=2)
    assert ds.images.shape == (2, channels, size, size)
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.uint8
    assert ds.labels.shape == (2, size, size)
    assert set(np.unique(ds.labels)) <= {0, 1}
    assert ds.labels.any(axis=(1, 2)).all()  # every image has a lesion / polyp / gland


@pytest.mark.data
def test_read_hippocampus_axis_order(shared_data):
    import nibabel as nib

    ds = read_dataset("hippocampus", shared_data, limit=2)
    assert len(ds) == 2 and ds.spacing[0] == [1.0, 1.0, 1.0]
    raw = np.asarray(
        nib.load(str(shared_data / "hippocampus/labelsTr" / f"{ds.ids[0]}.nii.gz")).dataobj
    )
    np.testing.assert_array_equal(ds.labels[0], raw.T)  # (k, j, i) as napari_prosma.io
    assert set(np.unique(ds.labels[0])) == {0, 1, 2}
    assert ds.images[0].dtype == np.float32
    img = np.asarray(
        nib.load(str(shared_data / "hippocampus/imagesTr" / f"{ds.ids[0]}.nii.gz")).dataobj
    )
    np.testing.assert_array_equal(ds.images[0], img.T.astype(np.float32))  # not clipped


@pytest.mark.data
def test_pack_roundtrip(shared_data, tmp_path):
    for name in ("kvasir", "hippocampus"):
        ds = read_dataset(name, shared_data, limit=3)
        back = load_packed(pack(ds, tmp_path / f"{name}.npz"))
        assert back.ids == ds.ids
        if name == "kvasir":
            np.testing.assert_array_equal(back.images, ds.images)
            np.testing.assert_array_equal(back.labels, ds.labels)
            assert back.meta["decoded_identical"]
        else:
            for a, b in zip(back.images + back.labels, ds.images + ds.labels):
                np.testing.assert_array_equal(a, b)
        # a packed file in the data root is read instead of the originals
        again = read_dataset(name, tmp_path)
        assert again.ids == ds.ids


def test_random_split_rule():
    ids = [f"c{i:03d}" for i in range(50)]
    s = random_split(ids, 3)
    assert len(s["test"]) == 10 and len(s["train"]) == 40
    assert not set(s["test"]) & set(s["train"])
    assert s == random_split(list(reversed(ids)), 3)  # order of the input does not matter
    assert s["test"] != random_split(ids, 4)["test"]


@pytest.mark.data
def test_committed_splits_follow_the_rule(shared_data):
    folders = {
        "busi": ("busi/images", ".png"),
        "kvasir": ("kvasir-seg/images", ".jpg"),
        "glas": ("glas/images", ".jpg"),
    }
    for name, (folder, suf) in folders.items():
        ids = sorted(p.stem for p in (shared_data / folder).glob(f"*{suf}"))
        for seed in (0, 1, 2):
            s = read_split(SPLITS / f"{name}_seed{seed}.json")
            assert s["test"] == random_split(ids, seed)["test"]
            assert sorted(s["train"] + s["test"]) == ids
    off = json.loads((SPLITS / "glas_official.json").read_text())
    assert len(off["train"]) == 85 and len(off["test"]) == 80


def test_gpu_normalisation_matches_preprocess():
    rng = np.random.default_rng(0)
    for spec, c in ((NORMALIZATION["busi"], 1), (NORMALIZATION["kvasir"], 3)):
        x = rng.integers(0, 256, (2, c, 5, 6), dtype=np.uint8)
        gpu = Normalizer2D(spec, c, torch.device("cpu"))(torch.from_numpy(x)).numpy()
        for i in range(2):
            np.testing.assert_allclose(gpu[i], normalize(x[i], spec), rtol=1e-6, atol=1e-6)


def test_dihedral_keeps_image_and_mask_aligned():
    x = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4).repeat(4, 1, 1, 1)
    xa, ya = dihedral_2d(x.clone(), x.clone())
    assert torch.equal(xa, ya)
    base = x[0, 0]
    variants = []
    for t in (base, base.T):
        for k in range(4):
            variants.append(torch.rot90(t, k))
    for i in range(0, 8, 2):  # each output is one of the 8 symmetries of its input
        assert any(torch.equal(xa[i, 0], v) for v in variants)


def test_data3d_patches_and_foreground_oversampling():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, s, dtype=np.uint8) for s in ((20, 30, 25), (18, 26, 30))]
    labels = [np.zeros(s, np.uint8) for s in ((20, 30, 25), (18, 26, 30))]
    labels[0][15:18, 25:28, 20:23] = 1
    labels[1][2:4, 3:5, 4:6] = 2
    d = Data3D(
        images, labels, {"mode": "zscore"}, (16, 16, 16), torch.device("cpu"), fg_fraction=0.5
    )
    x, y = d.batch(8)
    assert x.shape == (8, 1, 16, 16, 16) and y.shape == (8, 1, 16, 16, 16)
    assert x.dtype == torch.float32
    assert all(bool((y[i] > 0).any()) for i in range(4))  # the first half is centred on fg
    # normalised per volume exactly as inference does
    full = torch.from_numpy(normalize(images[0][None], {"mode": "zscore"})[0]).half().float()
    assert torch.allclose(d.vol[0, :20, :30, :25].float(), full)


# ---------------------------------------------------------------------------- leak-free protocol


def test_duplicate_groups_from_pixels():
    from napari_prosma.protocol import duplicate_groups

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (5, 1, 16, 16)).astype(np.uint8)
    images = np.concatenate([base, base[:1], np.clip(base[2:3] + 3, 0, 255)])  # 5 = 0, 6 ~ 2
    ids = [f"benign_{i:03d}" for i in range(7)]
    g = duplicate_groups(images, ids, 0.90)
    assert g["groups"] == [["benign_000", "benign_005"], ["benign_002", "benign_006"]]
    assert g["exact"] == [["benign_000", "benign_005"]] and g["n_grouped"] == 4
    assert duplicate_groups(base, ids[:5], 0.90)["groups"] == []  # unrelated noise


def test_grouped_split_never_cuts_a_group_and_keeps_the_shares():
    from napari_prosma.protocol import check_split, grouped_split

    ids = [f"benign_{i:03d}" for i in range(60)] + [f"normal_{i:03d}" for i in range(20)]
    groups = [ids[i : i + 3] for i in range(0, 30, 3)] + [["benign_050", "normal_000"]]
    for seed in range(5):
        s = grouped_split(ids, groups, seed, 0.2, 0.1)
        check_split(s, groups)
        assert sorted(s["train"] + s["val"] + s["test"]) == sorted(ids)
        for cls, n in (("normal", 19), ("benign", 59)):  # the mixed group is its own stratum
            got = {p: sum(i.startswith(cls) for i in s[p]) for p in s}
            assert abs(got["test"] - 0.2 * n) <= 3 and abs(got["val"] - 0.1 * n) <= 3
    cut = {"train": ["benign_000"], "test": ["benign_001", "benign_002"]}
    with pytest.raises(ValueError, match="cut across"):
        check_split(cut, groups)
    with pytest.raises(ValueError, match="both"):
        check_split({"train": ["benign_000"], "val": ["benign_000"]})


def test_committed_leakfree_splits_keep_every_look_alike_group_on_one_side():
    from napari_prosma.protocol import check_split

    root = Path(__file__).resolve().parents[1] / "training" / "splits"
    groups = json.loads((root / "busi_groups.json").read_text())
    assert len(groups["groups"]) == 87 and groups["exact"] == [["benign_433", "malignant_145"]]
    named = {
        ("benign_333", "malignant_077"),
        ("benign_399", "malignant_093"),
        ("benign_233", "benign_299"),
    }
    for a, b in named:  # the pairs, each in one group
        assert any(a in g and b in g for g in groups["groups"]), (a, b)
    for seed in (0, 1, 2):
        s = json.loads((root / f"busi_leakfree_seed{seed}.json").read_text())
        check_split(s, groups["groups"])
        assert s["dataset"] == "busi_with_normal"
        assert len(s["train"]) + len(s["val"]) + len(s["test"]) == 647 + 67
        for part in ("train", "val", "test"):
            assert any(i.startswith("normal") for i in s[part])


@pytest.mark.data
def test_busi_with_normal_reads_both_folders_and_the_script_reproduces_the_files(shared_data):
    ds = read_dataset("busi_with_normal", shared_data)
    assert len(ds) == 714 and ds.images.shape[1:] == (1, 256, 256)
    normal = [i for i, k in enumerate(ds.ids) if k.startswith("normal")]
    assert len(normal) == 67 and not ds.labels[normal].any() and ds.labels[:10].any()
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "training" / "busi_protocol.py"
    r = subprocess.run(
        [sys.executable, str(script), "--check", "--data-root", str(shared_data)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "87 groups over 200 of 647 images" in r.stdout
