"""``models.py``: the one model resolver's corner cases (that these modules import without
Qt or torch is checked for every core module in ``test_core_layout.py``)."""

from __future__ import annotations

import pytest

from hardening_support import save_tiny
from napari_prosma.checkpoint import CheckpointError, save
from napari_prosma.models import default_model_name, model_choices, resolve_model, version_id_of
from napari_prosma.versions import ModelStore


def _version(root, vid: str):
    from hardening_support import tiny_model

    net, card = tiny_model()
    card.name = vid
    return save(net, root / vid / "model", card)


def test_store_versions_by_id_and_folder_and_what_is_refused(tmp_path):
    store = ModelStore(tmp_path / "store")
    ckpt = _version(store.root, "m-ft-20250101-000000")
    assert resolve_model("m-ft-20250101-000000", store) == ckpt
    assert resolve_model(store.root / "m-ft-20250101-000000", store) == ckpt
    assert version_id_of(ckpt, store) == "m-ft-20250101-000000"
    # a checkpoint file of the same stem elsewhere is a file, not a version
    other = save_tiny(tmp_path / "files", "m-ft-20250101-000000")
    assert version_id_of(other, store) is None
    # a half-made folder (no card) is no version; names with a path part never reach
    # into the store
    (store.root / "half").mkdir()
    (store.root / "half" / "model.safetensors").write_bytes(b"")
    for spec in ("half", "../store/nothing", "m-ft-unknown"):
        with pytest.raises(CheckpointError, match="no checkpoint at"):
            resolve_model(spec, store)


def test_default_models_and_chooser_list_versions(tmp_path, monkeypatch):
    assert default_model_name("grey") == "busi_prosma"
    assert default_model_name("rgb") == "kvasir_prosma"
    store = ModelStore(tmp_path / "store")
    monkeypatch.setenv("PROSMA_MODEL_DIR", str(store.root))
    ckpt = _version(store.root, "busi-ft-20250101-000000")
    store.activate("busi-ft-20250101-000000")
    choices, active = model_choices()
    assert active == str(ckpt)
    row = [c for c in choices if c.kind == "version"]
    assert len(row) == 1 and row[0].label.endswith("★ active")
    assert {c.spec for c in choices if c.kind == "bundled"} >= {"busi_prosma"}
