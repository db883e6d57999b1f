"""The bundled cards' test numbers are what a user gets: a few of the card's own test cases
re-run through the evaluation (``inference.predict``) on the data as the plugin reads it
give the per-case Dice the card's raw evaluation file records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.data, pytest.mark.slow]


def test_hippocampus_card_is_measured_on_the_stored_intensities(shared_data):
    from napari_prosma.checkpoint import load
    from napari_prosma.datasets import read_dataset
    from napari_prosma.evaluation import evaluate

    model, card = load(REPO_ROOT / "models" / "hippocampus_prosma")
    test = card.metrics["test"]
    raw = json.loads((REPO_ROOT / test["raw"]).read_text())
    split = json.loads((REPO_ROOT / test["split"]["file"]).read_text())
    ids = split["test"][:4]
    data = read_dataset("hippocampus", shared_data).subset(ids)
    got = evaluate(model, card, data, device="cpu", with_hd95=False)
    want = {c["id"]: c for c in raw["cases"]}
    for case in got["cases"]:
        for cls in ("anterior", "posterior"):
            assert case[cls]["dice"] == pytest.approx(want[case["id"]][cls]["dice"], abs=1e-3)
    # the per-class means on the card are the raw file's
    for cls in ("anterior", "posterior"):
        mean = sum(c[cls]["dice"] for c in raw["cases"]) / len(raw["cases"])
        assert test["per_class"][cls]["dice"]["mean"] == pytest.approx(mean, abs=1e-6)
    assert test["failure_rate"]["n_failed"] == sum(
        min(c["anterior"]["dice"], c["posterior"]["dice"]) < 0.1 for c in raw["cases"]
    )
