"""Issue 14, normal scans: the image-level "nothing here" loss term and the lesion-free crops
that add images with nothing to find to a 2D training part."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_prosma.losses import LOSSES, bce_dice_empty_loss, bce_dice_loss
from napari_prosma.train import TrainConfig
from napari_prosma.train.negatives import negative_crops


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 1, 32, 32, generator=g)
    target = torch.zeros(3, 1, 32, 32)
    target[0, 0, 4:12, 4:12] = 1
    target[1, 0, 20:30, 2:9] = 1
    target[2, 0, 0:3, 0:3] = 1
    return logits, target


def test_without_empty_masks_the_loss_is_bce_dice():
    logits, target = _batch()
    assert torch.allclose(bce_dice_empty_loss(logits, target), bce_dice_loss(logits, target))
    assert "bce_dice_empty" in LOSSES


def test_an_empty_mask_gets_a_gradient_where_the_per_image_dice_gives_none():
    target = torch.zeros(1, 1, 32, 32)
    logits = torch.full((1, 1, 32, 32), -6.0)
    logits[0, 0, 10:16, 10:16] = 4.0  # a painted blob (3.5 % of the image) on a normal scan

    def grad(loss_fn, bce_weight):
        z = logits.clone().requires_grad_(True)
        loss_fn(z, target, bce_weight=bce_weight).backward()
        return z.grad[0, 0, 10:16, 10:16].sum().item()  # the top pixels are in the blob

    # without the BCE term: the per-image Dice of an empty mask has (almost) no gradient
    assert abs(grad(bce_dice_loss, 0.0)) < 1e-6
    # the image-level term pushes the painted pixels down
    assert grad(bce_dice_empty_loss, 0.0) > 1e-3
    clean = torch.full((1, 1, 32, 32), -6.0)
    assert bce_dice_empty_loss(logits, target) > 10 * bce_dice_empty_loss(clean, target)


def test_crops_stay_clear_of_the_lesion_and_have_the_image_size():
    rng = np.random.default_rng(0)
    images = rng.integers(20, 255, (4, 1, 64, 64), dtype=np.uint8)
    labels = np.zeros((4, 64, 64), np.uint8)
    labels[0, 2:10, 2:10] = 1  # small lesion in a corner: a large free window
    labels[1, 8:56, 8:56] = 1  # lesion over most of the image: no free window of 32 px
    # image 2: no lesion (a normal scan is not cropped); image 3: lesion at the bottom right
    labels[3, 50:60, 50:60] = 1
    crops, masks, source = negative_crops(images, labels, per_image=2, margin=4, stride=4)
    assert crops.shape[1:] == (1, 64, 64) and crops.dtype == np.uint8
    assert masks.shape == (len(crops), 64, 64) and not masks.any()
    assert set(source.tolist()) == {0, 3} and len(crops) == 4
    # the crop is a resized window of the source image: a mean intensity within its range
    assert all(images[i].min() <= c.mean() <= images[i].max() for c, i in zip(crops, source))
    from napari_prosma.train.negatives import _blocked, _free_corners

    for side in (56, 48):  # every free window of image 0 keeps 4 px from the lesion
        for y, x in _free_corners(_blocked(labels[0], 4), side, 4):
            assert not labels[0, max(y - 4, 0) : y + side + 4, max(x - 4, 0) : x + side + 4].any()
    assert negative_crops(images, labels, per_image=0)[0].shape[0] == 0


def test_dark_windows_outside_the_sector_are_not_crops():
    images = np.zeros((1, 1, 64, 64), np.uint8)  # all black but the lesion
    labels = np.zeros((1, 64, 64), np.uint8)
    labels[0, 2:6, 2:6] = 1
    images[0, 0, 2:6, 2:6] = 200
    assert negative_crops(images, labels)[0].shape[0] == 0


def test_recipe_checks_the_loss_and_the_crops():
    with pytest.raises(ValueError, match="unknown loss"):
        TrainConfig.from_dict({"loss": "focal"})
    with pytest.raises(ValueError, match="negative_crops"):
        TrainConfig.from_dict({"negative_crops": -1})
    with pytest.raises(ValueError, match="negative_crops"):
        TrainConfig.from_dict(
            {"dataset": "hippocampus", "patch_size": [8, 8, 8], "negative_crops": 1}
        )


@pytest.mark.data
def test_a_run_with_crops_and_the_empty_term_trains_and_says_so(tmp_path, shared_data):
    from napari_prosma.train import train
    from test_train import tiny

    cfg = tiny(
        tmp_path,
        shared_data,
        loss="bce_dice_empty",
        negative_crops=1,
        empty_share=0.25,
        epochs=2,
        final_eval=False,
    )
    logs: list[str] = []
    res = train(cfg, log=logs.append)
    card = json.loads((res.out_dir / "model.json").read_text())
    sampling = card["training"]["sampling"]
    n = int(next(s for s in logs if "lesion-free crops added" in s).split(": ")[1].split()[0])
    assert n > 0 and f"{n} lesion-free crops" in sampling
    assert card["training"]["loss"] == "bce_dice_empty"
    assert all(np.isfinite(h["loss"]) for h in res.result["history"])


def test_the_gate_range_uses_every_training_image_by_default():
    """The card's range is [min, max] over training images, so it narrows with fewer of
    them: from 64 frames kvasir_prosma warned on 19 of its 200 test frames, from all 700 on
    3. The trainer's default (``sparsity_images = 0``) is every training image."""
    from napari_prosma.card import ModelCard
    from napari_prosma.nets import build_model
    from napari_prosma.train.support import sparsity_range

    net = build_model("prosma_unet", spatial_dims=2, in_channels=1, out_channels=1, widths="tiny")
    card = ModelCard(architecture="prosma_unet", arch_kwargs=net.config, class_names=["bg", "fg"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(5)]

    class Train(list):  # what sparsity_range reads of a Dataset
        def image(self, i):
            return self[i]

        def spacing_of(self, i):
            return None

    assert TrainConfig().sparsity_images == 0
    _, how = sparsity_range(net.eval(), card, Train(images), "cpu", 0)
    assert how["n_images"] == 5
    _, how = sparsity_range(net.eval(), card, Train(images), "cpu", 3)
    assert how["n_images"] == 3
