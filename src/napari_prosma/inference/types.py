"""Result types of the inference engine (numpy only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import Cancelled  # noqa: F401  (lives in errors.py; re-exported)


@dataclass
class StageGates:
    """What the skip gate of one decoder stage did, on the input's grid.

    Attributes:
        stage: decoder stage, 1 (finest, full resolution) .. n (coarsest).
        scale: how much coarser the gate's own grid is than the network input (2**(stage-1)).
        psi: ``(*S)`` spatial gate psi in (0, 1), resampled to the input grid; None when the
            gate has no spatial part.
        zero_map: ``(*S)`` fraction of latent channels of z* that are exactly zero; None
            without a sparse gate.
        zero_frac: ``(C_a,)`` fraction of exact zeros of z* per latent channel (averaged over
            tiles); None without a sparse gate.
        zero_frac_mean: mean of ``zero_frac`` (the stage's overall exact-zero sparsity).
        c: ``(C_x,)`` channel gate in (0, 1) (averaged over tiles); None without one.
        lam: ``(C_a,)`` learned thresholds lambda = softplus(theta); None without a sparse gate.
    """

    stage: int
    scale: int
    psi: np.ndarray | None = None
    zero_map: np.ndarray | None = None
    zero_frac: np.ndarray | None = None
    zero_frac_mean: float | None = None
    c: np.ndarray | None = None
    lam: np.ndarray | None = None


@dataclass
class Prediction:
    """The result of :func:`napari_prosma.inference.predict`.

    Attributes:
        labels: ``(*S)`` integer labels on the input grid (uint8, or uint16 beyond 255 classes).
        probabilities: ``(K, *S)`` float32 per-class probabilities (K = number of classes,
            2 for a binary model: background, foreground), or None unless asked for.
        uncertainty: ``(*S)`` float32 spread of the flip-TTA predictions (standard deviation
            of the class probabilities across flips and overlapping tiles, root-mean-square
            over classes; 0 = all agree), or None without TTA.
        gates: one :class:`StageGates` per decoder stage, finest first (empty unless asked
            for, or when the model has plain skips).
        device: the device that produced the result (``"cpu"``, ``"cuda"``, ``"mps"``).
        precision: the arithmetic the network ran in (``"fp32"``, ``"bf16"``, ``"float16"``).
        notes: plain-words notes on what was adapted or fell back.
        timings: seconds per phase (``prepare``, ``inference``, ``postprocess``, ``total``).
        tile_size: the spatial tile the network ran on.
        n_tiles: how many tiles were run per image (per flip with TTA).
        class_names: names of the classes, background first.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    gates: list[StageGates] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    tile_size: tuple[int, ...] = ()
    n_tiles: int = 0
    class_names: list[str] = field(default_factory=list)
