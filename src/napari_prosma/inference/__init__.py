"""Inference engine (Qt-free; torch and MONAI are imported only when a model runs).

``predict(image, model, card, ...)`` prepares the image as the model card says, runs
Gaussian-blended sliding-window inference through MONAI in bounded memory (with optional
flip test-time augmentation), resamples to the model's training spacing and back, and
returns labels, probabilities, an uncertainty map and the gate maps of every decoder stage
on the input grid. See :func:`predict` for details.
"""

from __future__ import annotations

from .device import DEVICES, resolve_device
from .engine import load_model, predict, predict_batch
from .gates import gate_sparsity_range
from .types import Cancelled, Prediction, StageGates

__all__ = [
    "DEVICES",
    "Cancelled",
    "Prediction",
    "StageGates",
    "gate_sparsity_range",
    "load_model",
    "predict",
    "predict_batch",
    "resolve_device",
]
