"""Training: ``train(cfg)`` for one run, ``train_many(cfgs)`` for a stack sharing one GPU.

The rooms: :mod:`.recipe` (the config, progress and result types, the data and model a run
starts from, and the ``train`` / ``train_many`` entry points), :mod:`.loop` (one step, one
epoch, after an epoch), :mod:`.stack` (setting up, running and finishing a stack of runs),
:mod:`.support` (optimiser, resume state, validation, the best epoch, the gate-sparsity
range, the CUDA graph) and :mod:`.augment` (the training set on the device: gather,
augment, normalise). This face re-exports the names callers used from the old
``napari_prosma.train`` module.
"""

from __future__ import annotations

from ..errors import Cancelled
from .recipe import (
    NORMALIZATION,
    TrainConfig,
    TrainProgress,
    TrainResult,
    evaluate_shipped,
    load_data,
    lr_at,
    overrides_from_strings,
    train,
    train_many,
)

__all__ = [
    "NORMALIZATION",
    "Cancelled",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "evaluate_shipped",
    "load_data",
    "lr_at",
    "overrides_from_strings",
    "train",
    "train_many",
]
