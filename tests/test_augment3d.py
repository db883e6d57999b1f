"""The 3D recipe of issue 15: GPU batch augmentation (augment3d), the poly schedule, the
hippocampus normalisation (background at 0) and the train / val / test split."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_prosma.train import augment3d as A  # noqa: E402
from napari_prosma.train.augment import Data3D  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _box(b=3, n=(12, 16, 10), ext=(6, 8, 5)):  # type: ignore[no-untyped-def]
    x = torch.zeros(b, 1, *n)
    x[:, :, : ext[0], : ext[1], : ext[2]] = 1.0
    y = torch.zeros(b, 1, *n, dtype=torch.uint8)
    y[:, :, 1:5, 2:6, 1:4] = 2
    return x, y, torch.tensor([list(ext)] * b), torch.tensor(n)


def test_spatial_is_the_identity_without_rotation_scaling_or_room(monkeypatch):
    monkeypatch.setattr(A, "P_ROT", 0.0)
    monkeypatch.setattr(A, "P_SCALE", 0.0)
    torch.manual_seed(0)
    x = torch.rand(2, 1, 12, 16, 10)
    y = (x > 0.5).to(torch.uint8)
    n = torch.tensor(x.shape[2:])
    xo, yo = A.spatial(x, y, n.expand(2, 3), n)  # content fills the patch: nowhere to move
    assert torch.allclose(xo, x, atol=1e-5) and torch.equal(yo, y)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_spatial_moves_labels_with_the_image_and_pads_with_background(monkeypatch, p):
    monkeypatch.setattr(A, "P_ROT", p)
    monkeypatch.setattr(A, "P_SCALE", p)
    torch.manual_seed(1)
    x, y, ext, n = _box()
    xo, yo = A.spatial(x, y, ext, n)
    assert set(torch.unique(yo).tolist()) <= {0, 2}
    lab = yo > 0
    assert lab.any()
    assert (xo[lab] > 0.5).float().mean() > 0.95  # labels stay inside the image content
    assert (xo == 0).any()  # outside the content: the background value, 0
    if p == 0.0:  # placement only: the content is moved, not lost
        assert torch.allclose(xo.sum((1, 2, 3, 4)), x.sum((1, 2, 3, 4)), rtol=1e-3)


def test_intensity_is_the_identity_when_nothing_is_drawn(monkeypatch):
    for k in ("P_NOISE", "P_BLUR", "P_BRIGHT", "P_CONTRAST", "P_LOWRES", "P_GAMMA"):
        monkeypatch.setattr(A, k, 0.0)
    x = torch.rand(3, 1, 8, 10, 6)
    assert torch.equal(A.intensity(x), x)
    for k in ("P_NOISE", "P_BLUR", "P_BRIGHT", "P_CONTRAST", "P_LOWRES", "P_GAMMA"):
        monkeypatch.setattr(A, k, 1.0)
    out = A.intensity(x)
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, x)


def test_blur_keeps_a_constant_image():
    x = torch.full((2, 1, 7, 8, 9), 3.0)
    assert torch.allclose(A._blur(x, torch.tensor([0.5, 1.0])), x, atol=1e-5)


def test_data3d_nnunet_batches_cover_the_whole_crop():
    rng = np.random.default_rng(0)
    shapes = ((20, 30, 25), (18, 26, 30))
    images = [rng.uniform(10, 900, s).astype(np.float32) for s in shapes]
    labels = [np.zeros(s, np.uint8) for s in shapes]
    labels[0][5:9, 6:10, 7:11] = 1
    labels[1][2:6, 3:7, 4:8] = 2
    spec = {"mode": "percentile", "lower": 0.0, "upper": 99.5}
    d = Data3D(images, labels, spec, (32, 32, 32), torch.device("cpu"), 0.0, augment="nnunet")
    x, y = d.batch(6)
    assert x.shape == y.shape == (6, 1, 32, 32, 32)
    assert torch.isfinite(x).all() and set(torch.unique(y).tolist()) <= {0, 1, 2}
    assert float(d.vol.float().min()) == 0.0  # background (the minimum) = the pad value
    with pytest.raises(ValueError, match="augmentation"):
        Data3D(images, labels, spec, (32, 32, 32), torch.device("cpu"), augment="elastic")


def test_hippocampus_normalisation_puts_the_minimum_at_zero():
    from napari_prosma.preprocess import normalize
    from napari_prosma.train import NORMALIZATION

    img = np.random.default_rng(0).uniform(37.0, 2500.0, (1, 9, 10, 11)).astype(np.float32)
    out = normalize(img, NORMALIZATION["hippocampus"])
    assert out.min() == 0.0 and out.max() == 1.0  # zero padding = the darkest voxel


def test_poly_schedule():
    from napari_prosma.train import TrainConfig, lr_at

    cfg = TrainConfig(lr=1e-3, min_lr=1e-6, epochs=100, lr_schedule="poly")
    lrs = [lr_at(cfg, e) for e in range(101)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-6)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[50] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5**0.9)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig.from_dict({"lr_schedule": "step"})


def test_hippocampus_split_is_disjoint_and_keeps_groups_together():
    from napari_prosma.protocol import check_split

    s = json.loads((REPO / "training/splits/hippocampus_tvt_seed0.json").read_text())
    g = json.loads((REPO / "training/splits/hippocampus_groups.json").read_text())
    check_split(s, g["groups"])
    ids = s["train"] + s["val"] + s["test"]
    assert len(ids) == len(set(ids)) == 260
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (183, 27, 50)
    assert g["pairs"] == [] and max(r for *_, r in g["highest"]) < g["threshold"]
