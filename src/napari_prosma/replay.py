"""Moved to :mod:`napari_prosma.finetune.replay`; this name keeps old imports working."""

from .finetune.replay import (  # noqa: F401
    DEFAULT_SAMPLES,
    ReplaySet,
    card_dataset,
    load_replay,
    replay_status,
)
