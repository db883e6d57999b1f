"""Replay samples of the base model's training data: found when they exist, a plain
message when they don't, only the train part of the card's split, in napari layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_prosma.checkpoint import ModelCard, read_card, resolve
from napari_prosma.finetune.replay import card_dataset, load_replay, replay_status
from napari_prosma.nets import build_model
from napari_prosma.preprocess import InputError

REPO = Path(__file__).resolve().parents[1]


def _card(training=None, in_channels=1, out_channels=1, dims=2):
    net = build_model(
        spatial_dims=dims, in_channels=in_channels, out_channels=out_channels, widths="tiny"
    )
    return ModelCard(architecture="prosma_unet", arch_kwargs=net.config, training=training or {})


def test_the_card_names_the_data_set_through_its_lineage():
    assert card_dataset(_card()) is None
    assert card_dataset(_card({"dataset": "busi"})) == "busi"
    child = _card(
        {"finetuned_from": "x", "parent_training": {"parent_training": {"dataset": "glas"}}}
    )
    assert card_dataset(child) == "glas"


def test_nothing_to_replay_is_said_plainly(tmp_path):
    empty = load_replay(_card(), "auto")
    assert not empty.found and "does not name" in empty.message
    assert replay_status(_card(), "auto") == (
        False,
        "the model card does not name the data set the model was trained on",
    )
    missing = load_replay(_card({"dataset": "busi"}), "auto", data_root=tmp_path)
    assert not missing.found and "not on this computer" in missing.message
    assert str(tmp_path) in missing.message
    unknown = load_replay(_card({"dataset": "imagenet"}), "auto")
    assert not unknown.found and "cannot read" in unknown.message
    rgb = load_replay(_card({"dataset": "busi"}, in_channels=3), "auto", data_root=tmp_path)
    assert not rgb.found and "do not fit" in rgb.message
    assert not load_replay(_card({"dataset": "busi"}), None).found
    assert not load_replay(_card({"dataset": "busi"}), "none").found
    # asked for explicitly: an error, not a silent run without replay
    with pytest.raises(InputError, match="does not exist"):
        load_replay(_card(), tmp_path / "nowhere")
    with pytest.raises(InputError, match="not on this computer"):
        load_replay(_card(), "busi", data_root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no replay samples"):
        load_replay(_card(), tmp_path / "empty")


def test_replay_from_a_folder_of_images_and_masks(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for k in range(5):
        Image.fromarray(np.full((20, 24), 10 * k, np.uint8)).save(tmp_path / "images" / f"s{k}.png")
        mask = np.zeros((20, 24), np.uint8)
        mask[5:10, 5:10] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"s{k}.png")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "images" / "unpaired.png")
    rs = load_replay(_card(), tmp_path, n=3, seed=1)
    assert rs.found and len(rs.units) == 3 and rs.source == str(tmp_path)
    assert set(rs.ids) <= {f"s{k}" for k in range(5)} and len(set(rs.ids)) == 3
    img, lab, sp = rs.units[0]
    assert img.shape == (20, 24) and lab.shape == (20, 24) and sp is None
    assert set(np.unique(lab).tolist()) == {0, 1} and lab.sum() == 25
    assert rs.record()["n_samples"] == 3 and rs.record()["source"] == str(tmp_path)
    assert replay_status(_card(), tmp_path)[0] is True


def test_replay_from_saved_corrections(tmp_path):
    from napari_prosma.versions import ModelStore

    labs = [np.eye(8, dtype=np.uint8) * 2, np.zeros((8, 8), np.uint8)]
    ModelStore.save_corrections(tmp_path / "c", [np.ones((8, 8))] * 2, labs)
    rs = load_replay(_card(out_channels=3), tmp_path / "c")
    assert len(rs.units) == 2 and {int(u[1].max()) for u in rs.units} == {0, 2}
    binary = load_replay(_card(out_channels=1), tmp_path / "c")
    assert max(int(u[1].max()) for u in binary.units) == 1  # a binary model: fg vs bg


@pytest.mark.data
def test_auto_replays_the_train_part_of_the_bundled_busi_model(shared_data):
    card = read_card(resolve("busi_prosma"))
    assert replay_status(card, "auto", shared_data)[0] is True
    rs = load_replay(card, "auto", n=6, seed=0, data_root=shared_data)
    assert rs.found and len(rs.units) == 6
    split_file = REPO / card.training["split"]["file"]  # the card's own split (issue 14)
    split = json.loads(split_file.read_text())
    assert set(rs.ids) <= set(split["train"]) and set(rs.ids).isdisjoint(split["test"])
    assert f"train part of {split_file.name}" in rs.message
    img, lab, _ = rs.units[0]
    assert img.shape == (256, 256) and img.dtype == np.uint8
    assert lab.shape == (256, 256) and lab.any()
    again = load_replay(card, "auto", n=6, seed=0, data_root=shared_data)
    assert again.ids == rs.ids  # a seeded pick


@pytest.mark.data
def test_the_forgetting_guard_draws_the_validation_part_and_trains_on_every_replay_image(
    shared_data,
):
    """Session 9 (issue 20): the guard's images come from the *validation* part of the
    parent's split (never trained on, by the parent or here), not from its training part;
    every replay image is then trained on; without a validation part it falls back to the
    last replay images, kept out of training."""
    from napari_prosma.finetune import FinetuneConfig
    from napari_prosma.finetune.guard import _guard_units
    from napari_prosma.finetune.units import _replay_units

    card = read_card(resolve("busi_prosma"))
    split = json.loads((REPO / card.training["split"]["file"]).read_text())
    rs = load_replay(card, "auto", n=20, seed=0, data_root=shared_data, n_guard=4)
    assert len(rs.units) == 20 and len(rs.guard) == 4
    assert set(rs.guard_ids) <= set(split["val"]) and set(rs.ids) <= set(split["train"])
    assert "validation part" in rs.message and rs.record()["guard_ids"] == rs.guard_ids
    units, record = _replay_units(rs, card)
    cfg = FinetuneConfig(forgetting_guard=4)
    train, guard, rec = _guard_units(cfg, rs, units, record, card)
    assert len(train) == 20 and len(guard) == 4 and rec["guard_from"] == "validation"
    assert all(np.array_equal(g.image, v[0]) for g, v in zip(guard, rs.guard))
    old = FinetuneConfig(forgetting_guard=4, guard_from="replay")
    train, guard, rec = _guard_units(old, rs, units, record, card)
    assert len(train) == 16 and len(guard) == 4 and rec["guard_from"] == "replay"
    rs.guard = []  # a split without a validation part: the same fallback
    train, guard, rec = _guard_units(cfg, rs, units, record, card)
    assert len(train) == 16 and rec["guard_from"] == "replay"
    with pytest.raises(InputError):
        FinetuneConfig(guard_from="test").validate()


@pytest.mark.data
def test_auto_replays_hippocampus_volumes_with_their_spacing(shared_data):
    card = read_card(resolve("hippocampus_prosma"))
    rs = load_replay(card, "auto", n=2, seed=0, data_root=shared_data)
    assert len(rs.units) == 2
    vol, lab, sp = rs.units[0]
    assert vol.ndim == 3 and lab.shape == vol.shape and sp == (1.0, 1.0, 1.0)
    assert set(np.unique(lab).tolist()) <= {0, 1, 2}
