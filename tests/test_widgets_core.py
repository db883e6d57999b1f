"""The Qt-free core the widgets use: planning a run and placing results
(``inference.plan``), the gates and their sparsity range (``inference.gates``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from napari_prosma.inference import Prediction, StageGates
from napari_prosma.inference import gates as ig
from napari_prosma.inference import plan as ip
from napari_prosma.preprocess import InputError


@pytest.mark.parametrize(
    "module",
    [
        "napari_prosma.inference.plan",
        "napari_prosma.inference.gates",
        "napari_prosma._widgets._core",
    ],
)
def test_core_imports_without_qt_or_torch(module):
    import subprocess

    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('torch', 'qtpy', 'PyQt6', 'napari') if m in sys.modules]; "
        "print(bad); sys.exit(bool(bad))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_plan_2d_image_and_volume_modes():
    img = np.zeros((20, 30))
    plan = ip.plan_input(img, rgb=False, spatial_dims=2)
    assert plan.mode == "image" and plan.grid == (20, 30)
    rgb = np.zeros((20, 30, 3))
    assert ip.plan_input(rgb, rgb=True, spatial_dims=2).grid == (20, 30)
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    assert ip.plan_input(vol, rgb=False, spatial_dims=3).mode == "image"
    plan = ip.plan_input(vol, rgb=False, spatial_dims=2, spacing=(5.0, 1.0, 0.5))
    assert plan.mode == "slices" and plan.spacing == (1.0, 0.5)
    plan = ip.plan_input(
        vol, rgb=False, spatial_dims=2, scope="slice", point=(2.4, 0, 0), spacing=(5.0, 1.0, 0.5)
    )
    assert plan.mode == "slice" and plan.slice_index == 2
    np.testing.assert_array_equal(plan.data, vol[2])
    plan = ip.plan_input(
        vol, rgb=False, spatial_dims=2, scope="slice", point=(0, 0, 99), slice_axis=2
    )
    assert plan.slice_index == 5 and plan.data.shape == (4, 5)


@pytest.mark.parametrize(
    ("shape", "dims", "scope", "words"),
    [
        ((20, 30), 3, "whole", "3D volumes"),
        ((4, 20, 30), 3, "slice", "whole volume"),
        ((2, 4, 20, 30), 2, "whole", "spatial dimension"),
        ((5,), 2, "whole", "spatial dimension"),
    ],
)
def test_plan_refuses_with_plain_words(shape, dims, scope, words):
    with pytest.raises(InputError, match=words):
        ip.plan_input(np.zeros(shape), rgb=False, spatial_dims=dims, scope=scope, point=(0, 0, 0))


def test_place_slice_into_existing():
    plan = ip.InputPlan("slice", None, (3, 4, 5), slice_axis=0, slice_index=1)
    existing = np.zeros((3, 4, 5), np.uint8)
    existing[2] = 7
    out = ip.place(plan, np.ones((4, 5), np.uint8), existing)
    assert out[1].min() == 1 and out[2].min() == 7 and out[0].max() == 0
    assert existing[1].max() == 0  # the layer's data is not changed in place
    fresh = ip.place(plan, np.ones((4, 5), np.uint8), np.zeros((9, 9)))
    assert fresh.shape == (3, 4, 5) and fresh.sum() == 20
    whole = ip.InputPlan("image", None, (4, 5))
    v = np.ones((4, 5))
    assert ip.place(whole, v, existing) is v


def _pred(means):
    return Prediction(
        labels=np.zeros((2, 2), np.uint8),
        gates=[StageGates(stage=s + 1, scale=2**s, zero_frac_mean=m) for s, m in enumerate(means)],
    )


def test_gate_sparsity_range_round_trip():
    rng = ig.gate_sparsity_range([_pred([0.2, 0.5]), _pred([0.3, 0.4])], margin=0.05)
    assert rng == {
        "stage1": [pytest.approx(0.15), pytest.approx(0.35)],
        "stage2": [pytest.approx(0.35), pytest.approx(0.55)],
    }
    parsed = ig.parse_sparsity_range(rng)
    assert set(parsed) == {1, 2}
    inside = [ig.GateStage(1, 1, zero_frac_mean=0.2), ig.GateStage(2, 2, zero_frac_mean=0.5)]
    assert ig.sparsity_warnings(rng, inside) == []
    outside = [ig.GateStage(1, 1, zero_frac_mean=0.9), ig.GateStage(2, 2, zero_frac_mean=0.1)]
    warns = ig.sparsity_warnings(rng, outside)
    assert len(warns) == 2
    assert "stage 1" in warns[0] and "more than" in warns[0]
    assert "stage 2" in warns[1] and "fewer than" in warns[1]


def test_parse_sparsity_range_is_lenient():
    parsed = ig.parse_sparsity_range(
        {
            "stage1": [0.1, 0.2],
            "2": (0.3, 0.4),
            3: [0.5, 0.6],
            "stage4": "bad",
            "stage5": [0.9, 0.1],
            "x": [0, 1],
        }
    )
    assert parsed == {1: (0.1, 0.2), 2: (0.3, 0.4), 3: (0.5, 0.6)}
    assert ig.parse_sparsity_range(None) == {}
    assert ig.sparsity_warnings(None, [ig.GateStage(1, 1, zero_frac_mean=0.5)]) == []


def test_slice_values_and_descriptions():
    zm = np.zeros((3, 4, 4), np.float32)
    zm[1] = 1.0
    g = ig.GateStage(
        1,
        1,
        psi=np.full((3, 4, 4), 0.8, np.float32),
        zero_map=zm,
        zero_frac_mean=1 / 3,
        c=np.array([0.2, 0.4]),
    )
    assert ig.slice_sparsity(g, 0, 1) == 1.0 and ig.slice_sparsity(g, 0, 0) == 0.0
    c, per_slice = ig.slice_channel_gate(g, 1)
    assert not per_slice and c is g.c
    g.c_slices = np.array([[0.1, 0.1], [0.9, 0.9], [0.5, 0.5]])
    c, per_slice = ig.slice_channel_gate(g, 1)
    assert per_slice and c[0] == 0.9
    (line,) = ig.describe_gates([g])
    assert "Stage 1 (full res.)" in line and "33%" in line and "100%" in line
    assert ig.fmt_range(0.0, 0.001) == "0.0%–0.1%"
    # a value just outside the range is never printed equal to its bound (the 3D shot read
    # "0% ..., fewer than on any training image (0%–1%)")
    (below,) = ig.sparsity_warnings(
        {"stage1": [0.003, 0.012]}, [ig.GateStage(1, 1, zero_frac_mean=0.002)]
    )
    assert "0.2% of the gate's responses" in below and "(0.3%–1.2%)" in below
    (above,) = ig.sparsity_warnings(
        {"stage2": [0.13, 0.171]}, [ig.GateStage(2, 2, zero_frac_mean=0.174)]
    )
    assert "17.4% of" in above and "(13.0%–17.1%)" in above
    (far,) = ig.sparsity_warnings({"stage1": [0.2, 0.4]}, [ig.GateStage(1, 1, zero_frac_mean=0.9)])
    assert "90% of" in far and "(20%–40%)" in far
    assert ig.fmt_range(0.1, 0.5) == "10%–50%"
