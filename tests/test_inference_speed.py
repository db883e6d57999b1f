"""The faster inference path (issue 18) against the one it replaced.

- preparation on the device (:mod:`napari_prosma.inference.prep`) gives the values of the
  numpy :func:`~napari_prosma.preprocess.prepare` for every normalisation mode and dtype;
- the engine's own stitching (:mod:`napari_prosma.inference.stitch`) gives MONAI's
  ``sliding_window_inference`` maps (same windows, same Gaussian);
- on real images (Kvasir-SEG photos, hippocampus MRI volumes) with the bundled models, the
  engine's labels equal those of the old path (numpy preparation, MONAI stitching), Dice >=
  0.999;
- the guarded CUDA-graph / compile forward falls back to the eager network when it fails.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from napari_prosma.checkpoint import ModelCard  # noqa: E402
from napari_prosma.inference import accel, predict  # noqa: E402
from napari_prosma.inference.prep import prepare_on_device  # noqa: E402
from napari_prosma.inference.resample import resize, working_shape  # noqa: E402
from napari_prosma.inference.stitch import gaussian_weight, sliding_window  # noqa: E402
from napari_prosma.inference.tiling import (  # noqa: E402
    TilePredictor,
    aligned_overlap,
    choose_tile,
    pad_to,
    padded_shape,
)
from napari_prosma.preprocess import InputError, prepare  # noqa: E402

CPU = torch.device("cpu")
IMAGENET = {"mode": "fixed", "scale": 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.2, 0.3, 0.4]}


def _card(in_ch: int, dims: int, norm: dict) -> ModelCard:
    kw = {"spatial_dims": dims, "in_channels": in_ch, "out_channels": 2}
    return ModelCard("prosma_unet", kw, normalization=norm)


def _cases():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    yield "rgb uint8 fixed", rgb, 3, 2, IMAGENET
    yield "rgba uint8", np.dstack([rgb, rgb[..., :1]]), 3, 2, IMAGENET
    yield "channel-first rgb", np.moveaxis(rgb, -1, 0).copy(), 3, 2, IMAGENET
    yield "rgb to grey", rgb, 1, 2, {"mode": "fixed", "scale": 255.0, "mean": [0.4], "std": [0.2]}
    u16 = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    yield "uint16 fixed (bit depth)", u16, 1, 2, {"mode": "fixed", "scale": 255.0}
    ct = rng.integers(-1024, 3000, (6, 20, 24)).astype(np.int16)
    yield "int16 ct window", ct, 1, 3, {"mode": "ct_window", "window": [-200, 300]}
    yield "int16 zscore", ct, 1, 3, {"mode": "zscore"}
    mri = rng.normal(300, 80, (6, 20, 24)) * (rng.random((6, 20, 24)) > 0.4)
    yield "float64 zscore nonzero", mri, 1, 3, {"mode": "zscore", "nonzero": True}
    yield "all-zero zscore nonzero", np.zeros((4, 8, 8)), 1, 3, {"mode": "zscore", "nonzero": True}
    yield "huge float zscore", mri * 1e30, 1, 3, {"mode": "zscore"}
    yield "percentile", mri.astype(np.float32), 1, 3, {"mode": "percentile"}
    yield "none", u16.astype(np.uint32), 1, 2, {"mode": "none"}
    yield "bool", u16 > 30000, 1, 2, None


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_prepare_on_device_matches_numpy_prepare(case):
    _, image, in_ch, dims, norm = case
    want, want_notes = prepare(image, in_ch, dims, norm)
    got, notes = prepare_on_device([image, image], _card(in_ch, dims, norm), None, CPU)
    assert got.dtype == torch.float32 and tuple(got.shape) == (2, *want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got[1].numpy(), want, rtol=2e-6, atol=2e-6 * scale)
    assert notes == want_notes


def test_prepare_on_device_refuses_what_prepare_refuses():
    card = _card(1, 2, {"mode": "zscore"})
    bad = np.ones((8, 8))
    bad[2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        prepare_on_device([bad], card, None, CPU)
    with pytest.raises(InputError, match="too large"):
        prepare_on_device([np.full((4, 4), 1e300)], _card(1, 2, {"mode": "none"}), None, CPU)
    with pytest.raises(InputError, match="share one shape"):
        prepare_on_device([np.ones((4, 4)), np.ones((4, 5))], card, None, CPU)


class _Conv:
    """A fixed random convolution standing in for a network, called as MONAI calls it."""

    def __init__(self, dims: int):
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.net = conv(2, 3, 3, padding=1).eval()

    def __call__(self, x, coords=None):
        with torch.inference_mode():
            y = self.net(x)
        return {"0_prob": torch.sigmoid(y)}


@pytest.mark.parametrize(
    "shape,tile,overlap",
    [
        ((70, 50), (32, 32), (0.5, 0.5)),
        ((64, 64), (64, 64), (0.5, 0.5)),  # one window: no blending
        ((20, 33, 40), (16, 16, 16), (0.5, 0.25, 0.0)),
    ],
)
@pytest.mark.parametrize("batch", [1, 5])
def test_stitching_matches_monai(shape, tile, overlap, batch):
    from monai.inferers import sliding_window_inference

    x = torch.randn(2, 2, *shape)
    fn = _Conv(len(shape))
    want = sliding_window_inference(
        x, tile, batch, fn, overlap=overlap, mode="gaussian", with_coord=True
    )["0_prob"]
    got = sliding_window(x, tile, overlap, batch, fn, CPU)["0_prob"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gaussian_is_made_once_per_tile_and_matches_monai():
    from monai.data.utils import compute_importance_map

    w = gaussian_weight((32, 48, 32), CPU)
    assert gaussian_weight([32, 48, 32], CPU) is w
    want = compute_importance_map((32, 48, 32), mode="gaussian", device="cpu")
    torch.testing.assert_close(w[0, 0], want)


def _old_path(image, model, card, spacing=None, overlap=0.5):
    """The engine before issue 18, at fp32 on the CPU: numpy preparation on the host and
    MONAI's stitching, one window a forward (labels, probabilities)."""
    from monai.inferers import sliding_window_inference

    x0, _ = prepare(image, card.in_channels, card.spatial_dims, card.normalization)
    in_shape = x0.shape[1:]
    work, _ = working_shape(in_shape, spacing, card)
    div, min_size = int(model.divisor), int(getattr(model, "min_size", model.divisor))
    tile = choose_tile(padded_shape(work, div, min_size), card, div, min_size)
    padded = tuple(max(int(w), int(t)) for w, t in zip(work, tile))
    x = pad_to(resize(torch.from_numpy(x0)[None], work), padded)
    ov = aligned_overlap(tile, overlap, 2 ** (model.n_stages - 1))
    predictor = TilePredictor(
        model,
        device=CPU,
        binary=card.out_channels == 1,
        tta=False,
        gates=False,
        n_images=1,
        memory_format=torch.contiguous_format,
        autocast=contextlib.nullcontext,
        progress=None,
        total=1,
        cancelled=lambda: False,
    )
    with torch.inference_mode():
        out = sliding_window_inference(
            x, tile, 1, predictor, overlap=ov, mode="gaussian", with_coord=True
        )
    crop = (slice(None), slice(None), *(slice(0, s) for s in work))
    probs = resize(out["0_prob"][crop], in_shape)[0]
    labels = probs[0] > 0.5 if card.out_channels == 1 else probs.argmax(0)
    return labels.numpy().astype(np.uint8), probs.numpy()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in either label map."""
    from napari_prosma.metrics import dice

    classes = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    return float(np.mean([dice(a == c, b == c) for c in classes])) if classes else 1.0


def _kvasir(shared_data, n=3):
    from PIL import Image

    files = sorted((shared_data / "kvasir-seg" / "images").glob("*.jpg"))[:n]
    if not files:
        pytest.skip("no Kvasir-SEG images in ../shared/data")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def _hippocampus(shared_data, n=2):
    from napari_prosma.io.read import read_image

    files = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[-n:]
    if not files:
        pytest.skip("no hippocampus volumes in ../shared/data")
    return [read_image(f) for f in files]


def _bundled(name):
    from napari_prosma.checkpoint import list_bundled
    from napari_prosma.inference import load_model

    if name not in list_bundled():
        pytest.skip(f"{name} is not bundled")
    return load_model(name)


@pytest.mark.parametrize("case", ["kvasir", "hippocampus"])
def test_engine_labels_equal_the_old_path_on_real_images(case, shared_data):
    model, card = _bundled("kvasir_prosma" if case == "kvasir" else "hippocampus_prosma")
    items = _kvasir(shared_data) if case == "kvasir" else _hippocampus(shared_data)
    for item in items:
        image = item if case == "kvasir" else np.asarray(item.data)
        spacing = None if case == "kvasir" else item.spacing
        want, want_p = _old_path(image, model, card, spacing)
        pred = predict(
            image, model, card, device="cpu", precision="fp32", spacing=spacing,
            return_probabilities=True,
        )  # fmt: skip
        assert pred.labels.shape == want.shape
        assert (want > 0).any(), "the reference found nothing: the comparison would be empty"
        assert _dice(pred.labels, want) >= 0.999
        k = slice(1, 2) if card.out_channels == 1 else slice(None)
        np.testing.assert_allclose(pred.probabilities[k], want_p, atol=1e-3)


def test_accelerated_forward_falls_back_to_eager_with_a_note(monkeypatch):
    net = torch.nn.Conv2d(1, 1, 1)
    fwd = accel.Forward(lambda x, return_gates=False: net(x), "graph", CPU, None)
    assert fwd.mode == "none"  # CUDA only
    fwd.mode = "graph"

    def broken(x):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(fwd, "_fast", broken)
    x = torch.randn(2, 1, 4, 4)
    with torch.inference_mode():
        torch.testing.assert_close(fwd(x), net(x))
    assert "capture failed" in fwd.note()
    with pytest.raises(ValueError, match="accelerate"):
        accel.Forward(net, "turbo", CPU, None)
    with pytest.raises(ValueError, match="accelerate"):
        predict(np.zeros((8, 8)), net, _card(1, 2, {"mode": "none"}), accelerate="turbo")
