"""``models.py``: the one model resolver's corner cases, and the modules of this region
importing without Qt or torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hardening_support import save_tiny
from napari_prosma.checkpoint import CheckpointError, save
from napari_prosma.models import default_model_name, model_choices, resolve_model, version_id_of
from napari_prosma.versions import ModelStore

CORE = (
    "napari_prosma.models",
    "napari_prosma.errors",
    "napari_prosma.inference",
    "napari_prosma.inference.engine",
    "napari_prosma.inference.window",
    "napari_prosma.inference.bundled",
    "napari_prosma.cli",
    "napari_prosma.cli.predict",
    "napari_prosma.cli.devices",
    "napari_prosma.cli.outputs",
    "napari_prosma.cli.progress",
    "napari_prosma.cli.text",
    "napari_prosma.cli.info",
    "napari_prosma.cli.evaluate",
    "napari_prosma.cli.train",
)


@pytest.mark.parametrize("module", CORE)
def test_imports_without_qt_or_torch(module):
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('torch', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'napari') "
        "if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


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
