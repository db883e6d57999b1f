"""Metrics and losses against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_prosma.losses import bce_dice_loss, dice_ce_loss
from napari_prosma.metrics import (
    batch_dice_iou,
    case_metrics,
    dice,
    hd95,
    iou,
    summarize,
)


def test_dice_iou_by_hand():
    pred = np.array([[1, 1, 0], [0, 0, 0]], bool)
    gt = np.array([[1, 0, 0], [1, 0, 0]], bool)
    # tp 1, fp 1, fn 1
    assert dice(pred, gt) == pytest.approx(0.5)
    assert iou(pred, gt) == pytest.approx(1 / 3)


def test_empty_conventions():
    z = np.zeros((4, 4), bool)
    one = z.copy()
    one[1, 1] = True
    assert dice(z, z) == 1.0 and iou(z, z) == 1.0
    assert dice(one, z) == 0.0 and iou(z, one) == 0.0
    assert math.isnan(hd95(z, one))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_hd95_parallel_lines():
    a = np.zeros((5, 5), bool)
    b = np.zeros((5, 5), bool)
    a[0, :] = True
    b[3, :] = True  # every surface point is 3 px from the other line
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, a) == 0.0


def test_hd95_single_points():
    a = np.zeros((1, 6), bool)
    b = np.zeros((1, 6), bool)
    a[0, 0] = True
    b[0, 4] = True
    assert hd95(a, b) == pytest.approx(4.0)


def test_hd95_3d_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.random((8, 9, 10)) > 0.7
    b = rng.random((8, 9, 10)) > 0.7
    assert hd95(a, b) == pytest.approx(hd95(b, a))


def test_case_metrics_and_summary():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 1
    gt[2:, 2:] = 2
    pred = gt.copy()
    pred[0, 0] = 0  # class 1: tp 3, fn 1
    c = case_metrics(pred, gt, classes=(1, 2))
    assert c["per_class"]["1"]["dice"] == pytest.approx(6 / 7)
    assert c["per_class"]["2"]["dice"] == 1.0
    s = summarize([c, case_metrics(gt, gt, classes=(1, 2))], ["a", "b"])
    assert s["n_cases"] == 2
    assert s["per_class"]["a"]["dice"]["mean"] == pytest.approx((6 / 7 + 1) / 2)
    assert s["per_class"]["a"]["dice"]["std"] == pytest.approx((1 - 6 / 7) / 2)
    # pooled: tp 7, fp 0, fn 1
    assert s["per_class"]["a"]["dice_dataset"] == pytest.approx(14 / 15)
    assert s["mean_dice"] == pytest.approx(((6 / 7 + 1) / 2 + 1) / 2)


def test_batch_dice_iou_matches_numpy():
    rng = np.random.default_rng(1)
    p = rng.random((5, 6, 7)) > 0.5
    g = rng.random((5, 6, 7)) > 0.5
    p[0] = False
    g[0] = False  # both empty -> 1
    d, u, *_ = batch_dice_iou(torch.from_numpy(p), torch.from_numpy(g))
    for i in range(5):
        assert float(d[i]) == pytest.approx(dice(p[i], g[i]), abs=1e-6)
        assert float(u[i]) == pytest.approx(iou(p[i], g[i]), abs=1e-6)


def test_bce_dice_by_hand():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.ones(1, 1, 2, 2)
    bce = math.log(2)
    d = (2 * 2 + 1e-5) / (2 + 4 + 1e-5)
    assert float(bce_dice_loss(logits, target)) == pytest.approx(0.5 * bce + 1 - d, rel=1e-5)


def test_dice_ce_by_hand():
    logits = torch.zeros(1, 3, 2, 2)  # p = 1/3 for each class
    target = torch.ones(1, 2, 2, dtype=torch.long)
    ce = math.log(3)
    d1 = 2 * (4 / 3) / (4 / 3 + 4)
    d2 = 1e-5 / (4 / 3 + 1e-5)
    expected = ce + 1 - (d1 + d2) / 2
    assert float(dice_ce_loss(logits, target)) == pytest.approx(expected, rel=1e-5)
    # a (N, 1, *S) target gives the same
    assert float(dice_ce_loss(logits, target[:, None])) == pytest.approx(expected, rel=1e-5)


def test_perfect_prediction_has_low_loss():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 20
    assert float(bce_dice_loss(logits, target)) < 1e-3


def test_report_separates_cases_without_a_target_and_counts_failures():
    from napari_prosma.metrics import case_metrics, report

    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1  # 16 px
    perfect = case_metrics(gt, gt)
    miss = case_metrics(np.zeros_like(gt), gt)  # Dice 0, HD95 undefined
    half = np.zeros_like(gt)
    half[2:6, 2:4] = 1  # 8 of 16: Dice 2*8/24
    partial = case_metrics(half, gt)
    empty = np.zeros_like(gt)
    blob = np.zeros_like(gt)
    blob[0, 0] = 1  # 1 % of the image: above 0.5 %
    normal_fp = case_metrics(blob, empty)
    normal_ok = case_metrics(empty, empty)
    cases = [perfect, miss, partial, normal_fp, normal_ok]
    for c in cases:
        c["size"] = gt.size
    r = report(cases, ["lesion"], ukan_batch=2)
    e = r["per_class"]["lesion"]
    assert e["n_target"] == 3 and e["n_no_target"] == 2
    assert e["dice"]["mean"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert r["dice_mean"] == e["dice"]["mean"]  # the headline leaves out the empty cases
    assert e["failures"]["n_dice_0"] == 1 and e["failures"]["n_dice_below_0.5"] == 1
    assert e["hd95"]["n"] == 2 and e["hd95"]["n_left_out"] == 1
    assert e["pooled"]["dice"] == pytest.approx(2 * 24 / (2 * 24 + 0 + 24))
    # U-KAN: IoU pooled per batch of 2 (perfect + miss: 16/32; partial: 8/16), F1 = 2IoU/(1+IoU)
    iou_b = [0.5, 0.5]
    assert e["ukan_pooled"]["iou"] == pytest.approx(np.average(iou_b, weights=[2, 1]), abs=1e-5)
    assert e["ukan_pooled"]["dice"] == pytest.approx(2 * 0.5 / 1.5, abs=1e-5)
    nt = e["no_target"]
    assert nt["n"] == 2 and nt["n_fp"] == 1 and nt["fp_share"] == 0.5


def test_dice_distribution_and_percentile():
    from napari_prosma.metrics import dice_distribution, percentile_of

    d = dice_distribution([0.9, 0.0, 0.4, 0.8, 1.0], "polyp")
    assert d["n"] == 5 and d["dice_sorted"] == [0.0, 0.4, 0.8, 0.9, 1.0]
    assert d["dice_0"] == 0.2 and d["dice_below_0.5"] == 0.4 and d["median"] == 0.8
    assert percentile_of(0.9, d["dice_sorted"]) == 80.0
