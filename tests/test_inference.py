"""The inference engine on small random models (CPU, fast)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_prosma.checkpoint import ModelCard
from napari_prosma.inference import Cancelled, predict, predict_batch
from napari_prosma.inference import device as devmod
from napari_prosma.inference.tiling import aligned_overlap, count_windows
from napari_prosma.nets import build_model
from napari_prosma.preprocess import InputError

WIDTHS_2D = (8, 16, 32, 64)  # 3 gated stages, divisor 8
WIDTHS_3D = (4, 8, 16)


def make(spatial_dims=2, in_channels=1, out_channels=3, widths=WIDTHS_2D, **card_kw):
    kw = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "widths": list(widths),
    }
    torch.manual_seed(0)
    model = build_model("prosma_unet", **kw).eval()
    card_kw.setdefault("normalization", {"mode": "zscore"})
    return model, ModelCard("prosma_unet", kw, **card_kw)


def smooth_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img = sum(np.sin(g / (7.0 + 3 * i)) for i, g in enumerate(grids))
    return (img + 0.3 * rng.standard_normal(shape)).astype(np.float32)


def test_tiled_equals_whole_image():
    model, card = make()
    img = smooth_image((96, 128))
    whole = predict(img, model, card, device="cpu", return_probabilities=True)
    tiled = predict(img, model, card, device="cpu", return_probabilities=True, tile_size=48)
    assert whole.n_tiles == 1 and tiled.n_tiles > 4
    diff = np.abs(whole.probabilities - tiled.probabilities)
    assert diff.max() < 0.02, diff.max()
    assert (whole.labels == tiled.labels).mean() > 0.995


@pytest.mark.parametrize(
    ("shape", "tile", "dims"),
    [((37, 53), 32, 2), ((5, 7), None, 2), ((19, 23, 29), 16, 3)],
)
def test_blended_output_finite_on_input_grid(shape, tile, dims):
    model, card = make(dims, widths=WIDTHS_2D if dims == 2 else WIDTHS_3D)
    pred = predict(
        smooth_image(shape),
        model,
        card,
        device="cpu",
        tile_size=tile,
        return_probabilities=True,
    )
    assert pred.labels.shape == shape and pred.labels.dtype == np.uint8
    assert pred.probabilities.shape == (3, *shape)
    assert np.isfinite(pred.probabilities).all()
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(pred.labels, pred.probabilities.argmax(0))


def test_gate_maps_on_input_grid_and_match_the_network():
    model, card = make()
    shape = (48, 64)  # a multiple of the divisor: one whole tile, no padding
    img = smooth_image(shape)
    pred = predict(img, model, card, device="cpu", return_gates=True, precision="fp32")
    assert pred.precision == "fp32"
    assert [g.stage for g in pred.gates] == [1, 2, 3]
    assert [g.scale for g in pred.gates] == [1, 2, 4]
    for g, c_a, c_x in zip(pred.gates, (8, 8, 16), WIDTHS_2D[:3]):
        assert g.psi.shape == shape and g.zero_map.shape == shape
        assert 0 < g.psi.min() and g.psi.max() < 1
        assert 0 <= g.zero_map.min() and g.zero_map.max() <= 1
        assert g.zero_frac.shape == (c_a,) and g.lam.shape == (c_a,)
        assert g.c.shape == (c_x,)
        assert g.zero_frac_mean == pytest.approx(g.zero_frac.mean())
    # stage 1 runs at full resolution: its psi must equal the network's own
    x = torch.from_numpy((img - img.mean()) / img.std())[None, None]
    with torch.no_grad():
        _, maps = model(x, return_gates=True)
    np.testing.assert_allclose(pred.gates[0].psi, maps[0].psi[0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.gates[0].c, maps[0].c[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.gates[1].zero_frac, maps[1].zero_frac[0].numpy(), atol=1e-6)


def test_tta_gives_uncertainty():
    model, card = make()
    img = smooth_image((40, 56))
    plain = predict(img, model, card, device="cpu")
    assert plain.uncertainty is None
    pred = predict(img, model, card, device="cpu", tta=True, return_probabilities=True)
    assert pred.uncertainty.shape == img.shape
    assert np.isfinite(pred.uncertainty).all() and pred.uncertainty.min() >= 0
    assert pred.uncertainty.max() > 1e-4  # a random net is not flip-invariant
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-4)


def test_binary_model_thresholds_sigmoid_and_returns_two_classes():
    model, card = make(in_channels=3, out_channels=1, normalization={"mode": "fixed"})
    img = (np.random.default_rng(1).random((32, 40, 3)) * 255).astype(np.uint8)
    pred = predict(img, model, card, device="cpu", return_probabilities=True)
    assert pred.probabilities.shape == (2, 32, 40)
    np.testing.assert_array_equal(pred.labels, (pred.probabilities[1] > 0.5).astype(np.uint8))


def test_progress_counts_and_cancel_mid_run():
    model, card = make()
    img = smooth_image((96, 96))
    calls = []
    pred = predict(
        img, model, card, device="cpu", tile_size=32, progress=lambda d, t: calls.append((d, t))
    )
    total = calls[0][1]
    # one call per tile batch; on the CPU small tiles run several to a batch (issue 18)
    assert pred.n_tiles > total > 1 and calls[-1] == (total, total)
    calls.clear()
    pred = predict(img, model, card, device="cpu", tile_size=32, batch_size=1,
                   progress=lambda d, t: calls.append((d, t)))  # fmt: skip
    assert calls[0][1] == pred.n_tiles and calls[-1] == (pred.n_tiles, pred.n_tiles)

    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        if done == 2:
            stop.set()

    with pytest.raises(Cancelled):
        predict(img, model, card, device="cpu", tile_size=32, progress=progress, cancel=stop,
                batch_size=1)  # fmt: skip
    assert seen == [1, 2]  # stopped between tile batches, not at the end
    with pytest.raises(Cancelled):
        predict(img, model, card, device="cpu", cancel=lambda: True)


def _oom_once(model, times=1):
    real = model.forward
    state = {"left": times}

    def forward(*a, **k):
        if state["left"] > 0:
            state["left"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(*a, **k)

    model.forward = forward


def test_simulated_oom_retries_with_smaller_tiles(monkeypatch):
    model, card = make()
    img = smooth_image((64, 64))
    ref = predict(img, model, card, device="cpu", tile_size=64, return_probabilities=True)
    monkeypatch.setattr(devmod, "is_gpu", lambda d: True)  # pretend the CPU is a GPU
    _oom_once(model)
    pred = predict(img, model, card, device="cpu", tile_size=64, return_probabilities=True)
    assert any("smaller tiles" in n for n in pred.notes), pred.notes
    assert pred.tile_size == (32, 32)
    assert np.abs(pred.probabilities - ref.probabilities).max() < 0.05


def test_simulated_oom_falls_back_to_cpu(monkeypatch):
    model, card = make()
    img = smooth_image((64, 64))
    monkeypatch.setattr(devmod, "is_gpu", lambda d: True)  # pretend the CPU is a GPU
    _oom_once(model, times=2)  # the first try and the smaller-tile retry both fail
    pred = predict(img, model, card, device="cpu", tile_size=64)
    assert any("smaller tiles" in n for n in pred.notes), pred.notes
    assert any("fell back to the CPU" in n for n in pred.notes), pred.notes
    assert pred.device == "cpu" and pred.labels.shape == (64, 64)
    assert pred.tile_size == (64, 64)  # the CPU has room for the original tiles


def test_oom_on_cpu_gives_plain_error():
    model, card = make()
    _oom_once(model, times=10)
    with pytest.raises(InputError, match="ran out of memory"):
        predict(smooth_image((32, 32)), model, card, device="cpu", tile_size=16)


def test_bad_inputs_raise_input_error():
    model, card = make()
    with pytest.raises(InputError, match="2 channel"):
        predict(np.zeros((32, 32, 2), np.float32), model, card, device="cpu", channel_axis=-1)
    rgb = np.zeros((32, 32, 3), np.uint8) + np.array([10, 200, 30], np.uint8)
    grey = predict(rgb, model, card, device="cpu")  # colour to a grey model: converted, said
    assert any("greyscale" in n for n in grey.notes), grey.notes
    nan = smooth_image((32, 32))
    nan[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predict(nan, model, card, device="cpu")
    with pytest.raises(InputError):
        predict(smooth_image((8, 32, 32)), model, card, device="cpu")
    with pytest.raises(InputError, match="overlap"):
        predict(smooth_image((32, 32)), model, card, device="cpu", overlap=1.0)
    rgb_model, rgb_card = make(in_channels=3)
    with pytest.raises(InputError, match="expects colour"):
        predict(smooth_image((32, 32)), rgb_model, rgb_card, device="cpu")


def test_resampling_to_training_spacing_and_back():
    model, card = make(3, widths=WIDTHS_3D, spacing=[2.0, 1.0, 1.0])
    img = smooth_image((9, 30, 26))
    pred = predict(
        img,
        model,
        card,
        device="cpu",
        spacing=(4.0, 1.0, 1.0),
        return_probabilities=True,
        return_gates=True,
    )
    assert pred.labels.shape == img.shape and pred.probabilities.shape == (3, *img.shape)
    assert all(g.psi.shape == img.shape for g in pred.gates)
    assert any("resampled" in n and "18×30×26" in n for n in pred.notes), pred.notes
    same = predict(img, model, card, device="cpu", spacing=(2.0, 1.0, 1.0))
    assert not same.notes
    unknown = predict(img, model, card, device="cpu")
    assert any("spacing is unknown" in n for n in unknown.notes)


def test_card_input_size_resizes_2d_and_back():
    model, card = make(extra={"input_size": [32, 32]})
    pred = predict(smooth_image((50, 70)), model, card, device="cpu", return_gates=True)
    assert pred.labels.shape == (50, 70) and pred.gates[0].psi.shape == (50, 70)
    assert any("resized from 50×70 to 32×32" in n for n in pred.notes)


def test_batch_equals_single_and_model_mode_restored():
    model, card = make()
    imgs = [smooth_image((40, 48), seed=s) for s in range(3)]
    model.train()
    batch = predict_batch(
        imgs,
        model,
        card,
        device="cpu",
        batch_size=4,
        tile_size=32,
        return_probabilities=True,
        return_gates=True,
    )
    assert model.training  # restored
    for im, b in zip(imgs, batch):
        one = predict(
            im,
            model,
            card,
            device="cpu",
            tile_size=32,
            return_probabilities=True,
            return_gates=True,
        )
        np.testing.assert_allclose(b.probabilities, one.probabilities, atol=1e-5)
        np.testing.assert_allclose(b.gates[2].c, one.gates[2].c, atol=1e-5)


def test_plain_unet_has_no_gates_and_says_so():
    kw = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "widths": [8, 16, 32]}
    model = build_model("unet", **kw).eval()
    pred = predict(
        smooth_image((32, 32)), model, ModelCard("unet", kw), device="cpu", return_gates=True
    )
    assert pred.gates == [] and any("no gates" in n for n in pred.notes)


def test_aligned_overlap_steps_on_the_coarse_grid():
    for tile, ov in ((96, 0.5), (64, 0.25), (80, 0.3), (48, 0.0)):
        (o,) = aligned_overlap((tile,), ov, 8)
        step = int(tile * (1 - o))
        assert step % 8 == 0 and 0 <= o < 1
    assert count_windows((128, 128), (64, 64), (0.5, 0.5)) == 9
    assert count_windows((64,), (64,), (0.5,)) == 1


def test_unknown_device_is_a_plain_error():
    model, card = make()
    with pytest.raises(InputError, match="unknown device"):
        predict(smooth_image((16, 16)), model, card, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            predict(smooth_image((16, 16)), model, card, device="cuda")


def test_bf16_close_to_fp32():
    model, card = make()
    img = smooth_image((48, 64))
    ref = predict(img, model, card, device="cpu", precision="fp32", return_probabilities=True)
    low = predict(img, model, card, device="cpu", precision="bf16", return_probabilities=True)
    assert low.precision == "bf16"
    assert np.abs(low.probabilities - ref.probabilities).max() < 0.05
    with pytest.raises(InputError, match="precision"):
        predict(img, model, card, device="cpu", precision="int8")


def test_windows_stay_inside_an_image_larger_than_the_tile():
    """A volume a little larger than the tile is not zero-padded up to the network's divisor:
    padding filled tiles with zeros the model never saw and cost Dice on real data."""
    import torch

    from napari_prosma.checkpoint import ModelCard
    from napari_prosma.inference import predict
    from napari_prosma.nets import build_model

    torch.manual_seed(0)
    net = build_model(spatial_dims=3, in_channels=1, out_channels=3, widths="tiny").eval()
    card = ModelCard(architecture="prosma_unet", arch_kwargs=net.config, patch_size=[32, 32, 32])
    vol = np.random.default_rng(0).normal(size=(35, 37, 33)).astype(np.float32)
    seen = []
    orig = net.forward

    padded_tiles = []

    def spy(x, *a, **k):
        seen.append(tuple(x.shape[2:]))
        # a tile reaching into zero padding has an all-zero last plane along some axis
        for t in x[:, 0]:
            if any(bool((t.select(ax, -1) == 0).all()) for ax in range(3)):
                padded_tiles.append(tuple(x.shape))
        return orig(x, *a, **k)

    net.forward = spy
    pred = predict(vol, net, card, device="cpu", precision="fp32")
    assert pred.labels.shape == vol.shape
    assert seen and all(s == (32, 32, 32) for s in seen)
    assert padded_tiles == []
    # 2 windows per axis (0 and size - 32) at overlap 0.5: tiles stay within the volume
    assert pred.n_tiles == 8


def test_gate_stats_without_maps_match_the_full_gates():
    """``return_gates="stats"``: the same per-stage numbers as ``True`` (what a gate-drift
    check reads), no map stitched."""
    model, card = make()
    img = smooth_image((64, 80))
    full = predict(img, model, card, device="cpu", return_gates=True, tile_size=32)
    stats = predict(img, model, card, device="cpu", return_gates="stats", tile_size=32)
    assert len(stats.gates) == len(full.gates) == 3
    for a, b in zip(full.gates, stats.gates):
        assert b.psi is None and b.zero_map is None and a.psi is not None
        assert b.zero_frac_mean == pytest.approx(a.zero_frac_mean)
        np.testing.assert_allclose(b.c, a.c)
        np.testing.assert_allclose(b.lam, a.lam)
    np.testing.assert_array_equal(stats.labels, full.labels)
    with pytest.raises(ValueError, match="return_gates"):
        predict(img, model, card, device="cpu", return_gates="maps")
