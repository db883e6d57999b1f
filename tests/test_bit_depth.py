"""Issue 12 item 6: a 16-bit image is not divided by 255 as if it were 8-bit.

A model trained on 8-bit images (card normalisation ``fixed``, ``scale`` 255) given a 16-bit
PNG of the same scan saw values up to 257 times too bright: Dice against the manual mask
fell from 0.95 to 0.29 and nothing was said. The scale now follows the image's bit depth,
and a note says so.
"""

from __future__ import annotations

import numpy as np
import pytest

from hardening_support import smooth_image, tiny_model
from napari_prosma.inference import predict
from napari_prosma.preprocess import match_bit_depth, prepare

FIXED = {"mode": "fixed", "scale": 255.0, "mean": [0.449], "std": [0.226]}


def test_a_16_bit_image_is_scaled_by_its_own_range():
    img8 = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
    img16 = img8.astype(np.uint16) * 257  # the same picture, full 16-bit range
    x8, notes8 = prepare(img8, 1, 2, FIXED)
    x16, notes16 = prepare(img16, 1, 2, FIXED)
    np.testing.assert_allclose(x16, x8, atol=1e-5)
    assert notes8 == []
    assert len(notes16) == 1 and "16-bit" in notes16[0] and "65535" in notes16[0]


def test_8_bit_values_in_a_16_bit_file_are_taken_as_they_are():
    img = (np.arange(64) * 4).reshape(8, 8)
    spec, notes = match_bit_depth(img.astype(np.uint16), FIXED)
    assert spec["scale"] == 255.0 and notes == []
    np.testing.assert_allclose(
        prepare(img.astype(np.uint16), 1, 2, FIXED)[0],
        prepare(img.astype(np.uint8), 1, 2, FIXED)[0],
    )


def test_a_16_bit_model_given_an_8_bit_image_divides_by_255():
    spec, notes = match_bit_depth(np.full((4, 4), 200, np.uint8), {**FIXED, "scale": 65535})
    assert spec["scale"] == 255.0 and "8-bit" in notes[0]


@pytest.mark.parametrize(
    "spec", [{"mode": "zscore"}, {"mode": "percentile"}, {"mode": "none"}, None]
)
def test_other_normalisations_do_not_depend_on_the_bit_depth(spec):
    img = np.full((4, 4), 40000, np.uint16)
    out, notes = match_bit_depth(img, spec)
    assert out == (None if spec is None else spec) and notes == []


def test_float_and_signed_images_keep_the_card_scale():
    """Only uint8/uint16 tell a bit depth; floats and signed values are left alone."""
    for a in (np.full((4, 4), 300.0, np.float32), np.full((4, 4), 300, np.int16)):
        assert match_bit_depth(a, FIXED) == (FIXED, [])


def test_predict_segments_a_16_bit_image_like_the_8_bit_one():
    """Through the engine (CLI, widgets and fine-tuning share it): same labels and
    probabilities, and the note reaches the prediction."""
    model, card = tiny_model(2, normalization=dict(FIXED))
    s = smooth_image((48, 48), seed=1)
    img8 = np.round((s - s.min()) / (s.max() - s.min()) * 255).astype(np.uint8)
    ref = predict(img8, model, card, device="cpu", return_probabilities=True)
    got = predict(
        img8.astype(np.uint16) * 257, model, card, device="cpu", return_probabilities=True
    )
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=1e-4)
    assert any("16-bit" in n for n in got.notes)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.mark.data
@pytest.mark.slow
def test_16_bit_busi_png_segments_like_the_8_bit_one(shared_data, tmp_path, capsys):
    """Real BUSI images scaled ×257 to 16-bit PNGs, segmented by ``prosma predict`` with
    the bundled busi_prosma model: Dice against the manual masks as for the 8-bit files
    (before the fix the 16-bit Dice was near 0)."""
    import imageio.v3 as iio

    from napari_prosma.checkpoint import list_bundled
    from napari_prosma.cli import main

    if "busi_prosma" not in list_bundled():
        pytest.skip("the bundled busi_prosma model is not installed")
    names = ["benign_001.png", "benign_100.png", "malignant_010.png"]
    for bits in (8, 16):
        (tmp_path / f"in{bits}").mkdir()
        for n in names:
            a = iio.imread(shared_data / "busi" / "images" / n)
            a = a.astype(np.uint16) * 257 if bits == 16 else a
            iio.imwrite(tmp_path / f"in{bits}" / n, a)
        args = ["predict", str(tmp_path / f"in{bits}"), "-o", str(tmp_path / f"out{bits}")]
        assert main([*args, "--model", "busi_prosma", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("16-bit values") == len(names)  # said, once per 16-bit file
    dice = {8: [], 16: []}
    for bits in (8, 16):
        for n in names:
            mask = iio.imread(shared_data / "busi" / "masks" / n) > 127
            lab = iio.imread(tmp_path / f"out{bits}" / n.replace(".png", "_labels.png")) > 0
            dice[bits].append(_dice(lab, mask))
    assert np.mean(dice[8]) > 0.85, dice
    np.testing.assert_allclose(dice[16], dice[8], atol=0.01)
