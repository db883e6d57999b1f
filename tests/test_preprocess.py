"""Channel layout and normalisation shared by training and inference."""

from __future__ import annotations

import numpy as np
import pytest

from napari_prosma.preprocess import InputError, normalize, prepare, to_channel_first


def test_layouts_2d():
    grey = np.zeros((5, 7), np.uint8)
    assert to_channel_first(grey, 1, 2)[0].shape == (1, 5, 7)
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    a, notes = to_channel_first(rgb, 3, 2)
    assert a.shape == (3, 5, 7) and np.array_equal(a[1], rgb[..., 1]) and not notes
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], -1)
    a, notes = to_channel_first(rgba, 3, 2)
    assert a.shape == (3, 5, 7) and "alpha" in notes[0]
    a, notes = to_channel_first(rgb, 1, 2)
    assert a.shape == (1, 5, 7) and "greyscale" in notes[0]
    same = np.repeat(grey[..., None], 3, -1)
    a, notes = to_channel_first(same, 1, 2)
    assert a.shape == (1, 5, 7) and not notes


def test_layouts_3d_and_errors():
    vol = np.zeros((4, 5, 6), np.int16)
    assert to_channel_first(vol, 1, 3)[0].shape == (1, 4, 5, 6)
    with pytest.raises(InputError, match="expects colour"):
        to_channel_first(np.zeros((5, 7)), 3, 2)
    with pytest.raises(InputError, match="segment one slice"):
        to_channel_first(np.zeros((4, 5, 6, 7)), 1, 2)
    with pytest.raises(InputError, match="2D model"):
        to_channel_first(np.zeros((5, 7)), 1, 3)
    with pytest.raises(InputError, match="empty"):
        to_channel_first(np.zeros((0, 7)), 1, 2)
    bad = np.ones((4, 4), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        to_channel_first(bad, 1, 2)


def test_normalisations():
    x = np.arange(24, dtype=np.float32).reshape(1, 4, 6) * 10
    z = normalize(x, {"mode": "zscore"})
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    f = normalize(np.full((3, 2, 2), 255.0), {"mode": "fixed", "mean": [0.5] * 3, "std": [0.5] * 3})
    assert np.allclose(f, 1.0)
    ct = normalize(
        np.array([[[-2000.0, 40.0, 3000.0]]]), {"mode": "ct_window", "window": [-160, 240]}
    )
    assert np.allclose(ct, [[[0.0, 0.5, 1.0]]])
    p = normalize(x, {"mode": "percentile", "lower": 0, "upper": 100})
    assert p.min() == 0 and p.max() == 1
    with pytest.raises(InputError, match="unknown normalisation"):
        normalize(x, {"mode": "magic"})
    a, _ = prepare(np.full((3, 3), 7, np.uint16), 1, 2, {"mode": "zscore"})
    assert a.dtype == np.float32 and np.all(a == 0)  # constant image: no division by zero
