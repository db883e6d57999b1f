"""The Qt-free part of the widgets (planning a run, placing results, gate sparsity range)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from napari_prosma._widgets import _core
from napari_prosma.inference import Prediction, StageGates
from napari_prosma.preprocess import InputError


def test_core_imports_without_qt_or_torch():
    assert "napari_prosma._widgets._core" in sys.modules
    import subprocess

    code = ("import sys, napari_prosma._widgets._core; "
            "bad = [m for m in ('torch', 'qtpy', 'PyQt6', 'napari') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_plan_2d_image_and_volume_modes():
    img = np.zeros((20, 30))
    plan = _core.plan_input(img, rgb=False, spatial_dims=2)
    assert plan.mode == "image" and plan.grid == (20, 30)
    rgb = np.zeros((20, 30, 3))
    assert _core.plan_input(rgb, rgb=True, spatial_dims=2).grid == (20, 30)
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    assert _core.plan_input(vol, rgb=False, spatial_dims=3).mode == "image"
    plan = _core.plan_input(vol, rgb=False, spatial_dims=2, spacing=(5.0, 1.0, 0.5))
    assert plan.mode == "slices" and plan.spacing == (1.0, 0.5)
    plan = _core.plan_input(vol, rgb=False, spatial_dims=2, scope="slice",
                            point=(2.4, 0, 0), spacing=(5.0, 1.0, 0.5))
    assert plan.mode == "slice" and plan.slice_index == 2
    np.testing.assert_array_equal(plan.data, vol[2])
    plan = _core.plan_input(vol, rgb=False, spatial_dims=2, scope="slice",
                            point=(0, 0, 99), slice_axis=2)
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
        _core.plan_input(np.zeros(shape), rgb=False, spatial_dims=dims, scope=scope,
                         point=(0, 0, 0))


def test_place_slice_into_existing():
    plan = _core.InputPlan("slice", None, (3, 4, 5), slice_axis=0, slice_index=1)
    existing = np.zeros((3, 4, 5), np.uint8)
    existing[2] = 7
    out = _core.place(plan, np.ones((4, 5), np.uint8), existing)
    assert out[1].min() == 1 and out[2].min() == 7 and out[0].max() == 0
    assert existing[1].max() == 0  # the layer's data is not changed in place
    fresh = _core.place(plan, np.ones((4, 5), np.uint8), np.zeros((9, 9)))
    assert fresh.shape == (3, 4, 5) and fresh.sum() == 20
    whole = _core.InputPlan("image", None, (4, 5))
    v = np.ones((4, 5))
    assert _core.place(whole, v, existing) is v


def _pred(means):
    return Prediction(
        labels=np.zeros((2, 2), np.uint8),
        gates=[StageGates(stage=s + 1, scale=2**s, zero_frac_mean=m) for s, m in enumerate(means)],
    )


def test_gate_sparsity_range_round_trip():
    rng = _core.gate_sparsity_range([_pred([0.2, 0.5]), _pred([0.3, 0.4])], margin=0.05)
    assert rng == {"stage1": [pytest.approx(0.15), pytest.approx(0.35)],
                   "stage2": [pytest.approx(0.35), pytest.approx(0.55)]}
    parsed = _core.parse_sparsity_range(rng)
    assert set(parsed) == {1, 2}
    inside = [_core.GateStage(1, 1, zero_frac_mean=0.2), _core.GateStage(2, 2, zero_frac_mean=0.5)]
    assert _core.sparsity_warnings(rng, inside) == []
    outside = [_core.GateStage(1, 1, zero_frac_mean=0.9), _core.GateStage(2, 2, zero_frac_mean=0.1)]
    warns = _core.sparsity_warnings(rng, outside)
    assert len(warns) == 2
    assert "stage 1" in warns[0] and "more than" in warns[0]
    assert "stage 2" in warns[1] and "fewer than" in warns[1]


def test_parse_sparsity_range_is_lenient():
    parsed = _core.parse_sparsity_range(
        {"stage1": [0.1, 0.2], "2": (0.3, 0.4), 3: [0.5, 0.6], "stage4": "bad",
         "stage5": [0.9, 0.1], "x": [0, 1]}
    )
    assert parsed == {1: (0.1, 0.2), 2: (0.3, 0.4), 3: (0.5, 0.6)}
    assert _core.parse_sparsity_range(None) == {}
    assert _core.sparsity_warnings(None, [_core.GateStage(1, 1, zero_frac_mean=0.5)]) == []


def test_slice_values_and_descriptions():
    zm = np.zeros((3, 4, 4), np.float32)
    zm[1] = 1.0
    g = _core.GateStage(1, 1, psi=np.full((3, 4, 4), 0.8, np.float32), zero_map=zm,
                        zero_frac_mean=1 / 3, c=np.array([0.2, 0.4]))
    assert _core.slice_sparsity(g, 0, 1) == 1.0 and _core.slice_sparsity(g, 0, 0) == 0.0
    c, per_slice = _core.slice_channel_gate(g, 1)
    assert not per_slice and c is g.c
    g.c_slices = np.array([[0.1, 0.1], [0.9, 0.9], [0.5, 0.5]])
    c, per_slice = _core.slice_channel_gate(g, 1)
    assert per_slice and c[0] == 0.9
    (line,) = _core.describe_gates([g])
    assert "Stage 1 (full res.)" in line and "33%" in line and "100%" in line
    assert _core.fmt_range(0.0, 0.001) == "0.0%–0.1%"
    assert _core.fmt_range(0.1, 0.5) == "10%–50%"
