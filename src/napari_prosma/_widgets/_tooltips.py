"""The words of the widgets: labels and tooltips, kept apart from the layout code."""

from __future__ import annotations

from ..report import GATE_WORDS

DEVICE = "auto: CUDA GPU, else Apple MPS, else the CPU"

# ---------------------------------------------------------------------------- Segment

SCOPE_LABELS = {"whole": "Whole image / volume", "slice": "Current slice"}
SEGMENT = {
    "image": "The image layer to segment (2D grey or colour, or a volume)",
    "scope": "Whole: the full image, or every slice of a volume. Current slice: only the slice "
    "shown (2D models); its result goes into the volume's label layer.",
    "tta": "Average over mirrored copies: slower, steadier",
    "uncertainty": "Where the mirrored predictions disagree; turns TTA on",
    "gates": "ψ and exact-zero maps of every decoder stage (memory)",
}

# ---------------------------------------------------------------------------- Gate inspector

GATE_COLUMNS = ("Stage", "Zeros\nscan", "Zeros\nslice", "Train\nrange", "Passes", "ψ", "0s")
GATE_COLUMN_TIPS = (
    "Decoder stage: 1 works at full resolution, 2 at 1/2, ...",
    "Share of the sparse code z* that is exactly zero over the whole scan. " + GATE_WORDS["z*"],
    "Share of z* exactly zero on the current slice (volumes)",
    "Range of the exact-zero share on the model's training images (from its card); a scan "
    "outside it is unlike the training data",
    "How much of its detail the skip passes on the current slice: mean ψ × mean c. "
    + GATE_WORDS["ψ"]
    + ". "
    + GATE_WORDS["c"],
    "Show ψ (where the skip passes detail) of this stage as a layer",
    "Show the share of latent channels of z* that are exactly zero, per pixel, as a layer. "
    + GATE_WORDS["latent channel"],
)
GATES_NONE = "Run the Segment widget: the gates of its result show here."
GATES_NO_MAPS = (
    "This result has no gate maps: the model has plain skips, or 'Keep gate maps' was off "
    "in the Segment widget."
)

# ---------------------------------------------------------------------------- Fine-tune

#: What to train: engine key -> label (see ``napari_prosma.finetune.TRAINABLE``).
TRAINABLE_LABELS = {
    "decoder_gates": "Decoder and gates",
    "all": "Everything",
    "gates": "Gates only",
}
TRAINABLE_TIPS = {
    "decoder_gates": "The upsampling path, the skip gates, the decoder and the output head; "
    "the encoder stays as it was (a good default)",
    "all": "Every weight: adapts most, forgets most; needs more corrected images",
    "gates": "Only the ProSMA skip gates (θ, W_x, W_g, f_ms, ψ and the channel gate): "
    "the smallest change",
}
FINETUNE = {
    "image": "The image whose labels you corrected",
    "labels": "The labels layer with your corrections (usually '<image> labels' made by the "
    "Segment widget, after you painted and erased). It is never modified.",
    "others": "Add the Segment labels of the other open images that you corrected (those "
    "that differ from their prediction)",
    "axis": "For volumes: the axis along which your corrected slices are found (the one you "
    "step through with the slider, unless you choose another)",
    "replay": "Mix a few of the images the model was first trained on into every training "
    "batch (a quarter of it), so that it forgets less of what it knew; used only when "
    "those images are on this computer ($PROSMA_DATA)",
    "steps": "Optimiser steps at most (training stops early when the held-out Dice stops "
    "improving)",
    "time": "Stop training after this many seconds (0: no limit); measuring the model on "
    "your whole images before and after comes on top",
    "run": "Train a new version of the model on your corrections; the model you start from is kept",
    "task": "What the new version segments, in words (shown on its card and in the list of "
    "versions). Empty: the parent's task is kept",
    "classes": "The new version's class names, comma-separated: what it finds (e.g. spleen), "
    "or all of them with the background first. Empty: the parent's names are kept",
    "label": "A few words that name the new version in the list of versions (and in its "
    "folder name). Empty: the first words of the task",
}

# ---------------------------------------------------------------------------- versions

VERSION_COLUMNS = ("Version", "Held-out Dice", "Date", "Parent")
VERSIONS = {
    "activate": "Make the selected version the active model",
    "revert": "Make the model the selected version (else the active one) was trained from "
    "the active model again",
}
