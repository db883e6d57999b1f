"""Fine-tune a model on a user's corrected labels (Qt-free).

:func:`finetune` trains a copy of the model in memory and returns it with before/after
held-out Dice; it writes nothing. :func:`run_finetune` wraps it with the model store
(:mod:`napari_prosma.versions`): bad input is refused first, the corrections are saved
before training starts, the new checkpoint goes into a fresh version folder (never over
its parent) only when a held-out evaluation beat the parent, its card records the
lineage, and a regression guard keeps the parent active when held-out Dice got worse.
A cancel (the ``cancel`` flag, checked every step, inside every held-out evaluation and
once more after the checkpoint is written) raises :class:`~napari_prosma.inference.Cancelled`
and leaves the parent active and no version.

Held-out corrections (``FinetuneConfig.holdout_fraction`` of the training units, at least
one when there are two or more) are never trained on. They serve two purposes that must not
share images for the regression guard to mean anything:

- *selection*: early stopping and the choice of the state that is kept;
- *report*: the Dice before and after that the user is shown and the guard decides on.

With :data:`REPORT_SPLIT_MIN` (4) or more held-out units they are split in two (the larger
half reports). With fewer, both roles use the same units; the kept state was chosen on
them, so "after" is optimistic and the guard can hardly fire (``FinetuneResult.notes``
says so). With nothing held out, the last trained state is kept.

Volumes: a 3D model trains on the volume resampled to its card's spacing, as the inference
engine segments it (:func:`napari_prosma.inference.resample.working_shape`); a 2D model
learns from the corrected slices along ``FinetuneConfig.slice_axis``.

Rooms: :mod:`.config` (settings, progress, result), :mod:`.units` (labels checked,
corrected units, held-out split, patches), :mod:`.net` (trainable parameters, loss,
held-out Dice), :mod:`.loop` (:func:`finetune`), :mod:`.lineage` (the new card),
:mod:`.run` (:func:`run_finetune`, the outcome in words), :mod:`.replay` (base-model
samples against forgetting), :mod:`.whole` (the parent and the new model on the user's
whole images, and the new model's gate-sparsity range).
"""

from .config import (
    CANCEL_MESSAGE,
    NOT_IMPROVED,
    REPORT_SPLIT_MIN,
    TRAINABLE,
    FinetuneConfig,
    FinetuneProgress,
    FinetuneResult,
    min_units_for_report,
)
from .lineage import check_naming
from .loop import finetune
from .net import holdout_dice, trainable_parameters
from .run import finetune_outcome, run_finetune
from .units import Unit, check_labels, corrected_units, split_units

__all__ = [
    "CANCEL_MESSAGE",
    "NOT_IMPROVED",
    "REPORT_SPLIT_MIN",
    "TRAINABLE",
    "FinetuneConfig",
    "FinetuneProgress",
    "FinetuneResult",
    "Unit",
    "check_labels",
    "check_naming",
    "corrected_units",
    "finetune",
    "finetune_outcome",
    "holdout_dice",
    "min_units_for_report",
    "run_finetune",
    "split_units",
    "trainable_parameters",
]
