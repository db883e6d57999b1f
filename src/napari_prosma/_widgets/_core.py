"""Old home of the widgets' Qt-free helpers, kept as re-exports for callers of these names.

What to segment, running it and placing results back live in
:mod:`napari_prosma.inference.plan`; the gates and their sparsity range in
:mod:`napari_prosma.inference.gates`; the model list and cache in
:mod:`napari_prosma.models`; the version rows in :mod:`napari_prosma.versions`; the
fine-tune outcome text in :mod:`napari_prosma.finetune.run`.
"""

from __future__ import annotations

from ..finetune.run import finetune_outcome  # noqa: F401  (moved there)
from ..models import (  # noqa: F401  (moved to models.py; re-exported)
    _MODEL_CACHE,
    ModelChoice,
    get_model,
    model_choices,
    read_model_card,
)
from ..versions import VersionRow, version_rows  # noqa: F401  (moved there)
