"""The Qt-free plain-words helpers of the widgets (napari_prosma.report, .preflight)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_prosma import preflight, report
from napari_prosma.models import read_model_card


def test_model_fit_by_kind():
    busi, kvasir, hippo = (
        read_model_card(n) for n in ("busi_prosma", "kvasir_prosma", "hippocampus_prosma")
    )
    assert report.model_fit(busi, "grey") == "" and report.model_fit(busi, "volume") == ""
    assert "colour" in report.model_fit(busi, "rgb") or "greyscale" in report.model_fit(busi, "rgb")
    assert report.model_fit(kvasir, "rgb") == "" and report.model_fit(kvasir, "grey")
    assert "3D" in report.model_fit(hippo, "grey") and report.model_fit(hippo, "volume") == ""


def test_sizes_per_class_in_mm2_ml_or_pixels():
    lab = np.zeros((4, 5), np.uint8)
    lab[:2, :2] = 1
    lab[3, :] = 2
    m = report.measure_classes(lab, ["bg", "a", "b"], (0.5, 0.2))
    assert [(x.name, x.count) for x in m] == [("a", 4), ("b", 5)]
    assert m[0].size == pytest.approx(0.4) and m[0].unit == "mm²"
    vol = np.ones((10, 10, 10), np.uint8)
    (v,) = report.measure_classes(vol, ["bg", "organ"], (2.0, 1.0, 1.0))
    assert v.size == pytest.approx(2.0) and v.unit == "mL"
    text = report.measures_summary(report.measure_classes(lab, ["bg", "a", "b"], None))
    assert "4 pixels" in text and "spacing unknown" in text


def test_ct_detection_and_window():
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 1500, size=(8, 32, 32)).astype(np.int16)
    assert report.looks_like_ct(ct)
    assert not report.looks_like_ct(rng.random((8, 32, 32)).astype(np.float32))
    assert not report.looks_like_ct(rng.integers(0, 255, (32, 32)).astype(np.uint8))
    assert report.ct_window(None) == report.CT_SOFT_TISSUE
    card = read_model_card("busi_prosma")
    card.normalization = {"mode": "ct_window", "window": [-100, 200]}
    assert report.ct_window(card) == (-100.0, 200.0)


def test_card_summary_and_mismatch_warning(monkeypatch):
    monkeypatch.setattr(preflight, "_MEASURED", {})  # no rate measured by earlier runs
    hippo = read_model_card("hippocampus_prosma")
    text = report.card_summary(hippo)
    assert (
        "Modality: MRI" in text and "anterior 0.88 ± 0.04 (n=50)" in text
    )  # the session-6 model, 50 test volumes
    est = preflight.estimate_run(hippo, (26, 166, 164), (5.0, 0.79, 0.79))
    assert est.work_shape[0] == 130 and est.n_tiles >= 100 and est.seconds > 60
    warn = preflight.run_warning(hippo, (26, 166, 164), (5.0, 0.79, 0.79), est, image_is_ct=True)
    assert "looks like CT" in warn and "26×166×164 → 130×" in warn and "min" in warn
    near = preflight.estimate_run(hippo, (35, 50, 35), (1.0, 1.0, 1.0))
    warn = preflight.run_warning(hippo, (35, 50, 35), (1.0, 1.0, 1.0), near, image_is_ct=False)
    assert warn == ""


def test_card_summary_says_how_much_of_the_set_the_model_trained_on():
    """The data line names the whole set (Kvasir-SEG, 1000 images); the model trained on
    its split's training part only, and the summary says so."""
    kvasir = read_model_card("kvasir_prosma")
    sp = kvasir.training["split"]
    line = next(x for x in report.card_summary(kvasir).splitlines() if x.startswith("Trained"))
    assert f"split: {sp['n_train']} train / {sp['n_val']} validation / {sp['n_test']} test" in line
    bare = dataclasses.replace(kvasir, training={"data": "some images"})
    assert "Trained on: some images\n" in report.card_summary(bare) + "\n"
    assert "split:" not in report.card_summary(bare)


def test_prediction_and_truth_colours_differ():
    pred, truth = report.class_colours(3), report.class_colours(3, "truth")
    assert pred[0][3] == 0 and truth[0][3] == 0
    assert all(pred[k] != truth[k] for k in (1, 2))


def test_a_fine_tuned_version_does_not_show_its_parents_test_dice_as_its_own():
    """The parent's test numbers describe the parent on its test set: a fine-tuned card
    keeps them as ``parent_test`` and its summary says this version has none of its own."""
    from napari_prosma.finetune import FinetuneConfig
    from napari_prosma.finetune.lineage import child_card

    busi = read_model_card("busi_prosma")
    child = child_card(
        busi,
        FinetuneConfig(),
        [{"sha256": "0" * 64}],
        {"before": 0.1, "after": 0.3},
        {},
        task="Spleen in abdominal CT slices",
        class_names=["spleen"],
    )
    assert "test" not in child.metrics and child.metrics["parent_test"] == busi.metrics["test"]
    text = report.card_summary(child)
    assert "Test Dice: not measured for this version (its parent's" in text
    assert "Test Dice: lesion" not in text and "Task: Spleen in abdominal CT slices" in text
