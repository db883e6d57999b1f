"""``prosma demo``: segments a shipped sample and prints the Dice against its ground truth."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import napari_prosma.checkpoint as checkpoint
from napari_prosma._samples import SAMPLES, layers, load_sample
from napari_prosma.cli import main
from napari_prosma.cli.demo import DEMO_MODELS, dice
from napari_prosma.models import read_model_card

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_and_prints_dice(tmp_path, capsys):
    rc = main(["demo", "-o", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    m = re.search(r"Dice against the sample's manual ground truth \(\w+\): (\d\.\d{3})", out)
    assert m and 0.0 <= float(m.group(1)) <= 1.0, out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and all(n.endswith(".png") for n in written)
    assert str(tmp_path) in out
    # a second run never overwrites the first one's files
    assert main(["demo", "-o", str(tmp_path), "--device", "cpu"]) == 0
    assert len(list(tmp_path.iterdir())) == 4


@pytest.mark.parametrize("name", ["kvasir_prosma", "busi_prosma"])
def test_demo_bundled_models_segment_their_held_out_sample(tmp_path, capsys, name):
    """The shipped weights, not only the pipeline: each 2D model outlines its sample (held out
    from its training split) well, and the demo puts that one frame beside the model's
    test-set distribution from its card. Measured at shipping: kvasir 0.872 (percentile 32
    of its 200 test images, mean 0.831; session 9's leak-free reship and sample), busi 0.927
    (percentile 67 of 129, mean 0.754)."""
    if name not in checkpoint.list_bundled():
        pytest.skip(f"{name} is not bundled in this installation")
    assert main(["demo", "--model", name, "-o", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"with model {name}" in out
    m = re.search(r"manual ground truth \(\w+\): (\d\.\d{3})", out)
    assert m and float(m.group(1)) > 0.85, out
    d = re.search(r"on its (\d+) held-out test images the \w+ Dice was mean (\d\.\d{3})", out)
    assert d and int(d.group(1)) >= 100 and 0.6 < float(d.group(2)) < float(m.group(1)), out
    assert re.search(r"sits at percentile \d+ of them", out), out
    assert re.search(r"Skip stage 1: passes on average \d\.\d\d of x \(psi·c\)", out), out


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_samples_are_outside_their_models_training_and_validation_parts(name):
    """The Dice the demo prints is a held-out one: the sample's source item is in neither the
    training nor the validation part of the split named in the shipped card (session 9: the
    earlier Kvasir-SEG sample was in the training part of the leak-free splits)."""
    if name not in checkpoint.list_bundled():
        pytest.skip(f"{name} is not bundled in this installation")
    card = read_model_card(name)
    split_file = REPO / card.training["split"]["file"]
    if not split_file.exists():
        pytest.skip(f"{split_file} is not in this installation")
    split = json.loads(split_file.read_text())
    sid = SAMPLES[DEMO_MODELS[name]].source_id
    assert sid and sid in split["test"]
    assert sid not in split["train"] and sid not in split.get("val", [])


def test_demo_model_not_bundled_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint, "list_bundled", lambda: ["busi_prosma"])
    assert main(["demo", "--model", "kvasir_prosma", "-o", str(tmp_path)]) == 2
    assert "not bundled" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_demo_without_bundled_models_says_untrained(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint, "list_bundled", lambda: [])
    assert main(["demo", "-o", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "MEANINGLESS" in out and "Dice" in out


def test_dice():
    a = np.array([[0, 1, 1], [0, 0, 1]])
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert abs(dice(a, np.array([[0, 1, 0], [0, 0, 0]])) - 0.5) < 1e-9


def test_samples_load_with_ground_truth():
    for name in SAMPLES:
        image, truth = load_sample(name)
        assert truth.shape == image.spatial_shape and truth.dtype == np.uint8
        assert truth.max() >= 1
        (data, img_kw, t1), (lab, lab_kw, t2) = layers(name)
        assert (t1, t2) == ("image", "labels")
        assert data is image.data or np.array_equal(data, image.data)
        np.testing.assert_array_equal(lab, truth)
        assert img_kw["scale"] == lab_kw["scale"] and img_kw["translate"] == lab_kw["translate"]
    ct, _ = load_sample("spleen_ct")
    assert ct.spacing[0] == 5.0 and abs(ct.spacing[1] - 0.7949) < 1e-3
