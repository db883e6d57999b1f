"""The user's model store: lineage, no overwrite, atomic versions, activation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_prosma.checkpoint import ModelCard, save
from napari_prosma.nets import build_model
from napari_prosma.versions import ModelStore, array_sha256


def _card(net):
    return ModelCard(architecture="prosma_unet", arch_kwargs=net.config, name="base")


def test_complete_run_becomes_a_version(tmp_path):
    store = ModelStore(tmp_path / "store")
    net = build_model(spatial_dims=2, widths="tiny")
    imgs, labs = [np.ones((8, 8), np.float32)], [np.eye(8, dtype=np.uint8)]
    with store.staging("busi_prosma") as (vid, stage):
        entries = store.save_corrections(stage / "corrections", imgs, labs)
        save(net, stage / "model", _card(net))
    assert [v.id for v in store.versions()] == [vid]
    v = store.get(vid)
    assert v.checkpoint.exists()
    assert entries[0]["labels_sha256"] == array_sha256(labs[0])
    back_i, back_l = store.load_corrections(v.path / "corrections")
    assert np.array_equal(back_l[0], labs[0]) and np.array_equal(back_i[0], imgs[0])
    store.activate(vid)
    assert store.active() == vid
    assert store.active_checkpoint() == str(v.checkpoint)
    store.activate("busi_prosma")
    assert store.active_checkpoint() == "busi_prosma"


def test_failed_run_leaves_no_version_but_keeps_corrections(tmp_path):
    store = ModelStore(tmp_path)
    store.activate("parent")
    with pytest.raises(KeyboardInterrupt):
        with store.staging("m") as (vid, stage):
            store.save_corrections(stage / "corrections", [np.zeros((4, 4))], [np.ones((4, 4))])
            (stage / "model.safetensors").write_bytes(b"half written")
            raise KeyboardInterrupt
    assert store.versions() == []
    assert store.active() == "parent"
    assert (tmp_path / ".incoming" / vid / "index.json").exists()
    assert not any(p.name.startswith(f".{vid}") for p in tmp_path.iterdir())


def test_ids_never_collide(tmp_path):
    store = ModelStore(tmp_path)
    net = build_model(spatial_dims=2, widths="tiny")
    ids = []
    for _ in range(3):
        with store.staging("m") as (vid, stage):
            save(net, stage / "model", _card(net))
        ids.append(vid)
    assert len(set(ids)) == 3 and len(store.versions()) == 3


def test_recover_leaves_live_and_foreign_runs_alone(tmp_path):
    """Only staging folders of dead processes on this computer are tidied up."""
    import json
    import os
    import socket
    import subprocess
    import sys

    store = ModelStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owners = {
        ".m-ft-1.aaa": {"pid": dead.pid, "host": socket.gethostname()},  # died
        ".m-ft-2.bbb": {"pid": os.getpid(), "host": socket.gethostname()},  # running (us)
        ".m-ft-3.ccc": {"pid": dead.pid, "host": "another-computer"},  # not ours to judge
        ".m-ft-4.ddd": None,  # no owner record (an older version's folder): left alone
    }
    for name, owner in owners.items():
        corr = tmp_path / name / "corrections"
        corr.mkdir(parents=True)
        (corr / "index.json").write_text("[]")
        if owner is not None:
            (tmp_path / name / "owner.json").write_text(json.dumps(owner))

    assert store.recover() == ["m-ft-1"]
    assert (tmp_path / ".incoming" / "m-ft-1" / "index.json").exists()
    assert not (tmp_path / ".m-ft-1.aaa").exists()
    for name in (".m-ft-2.bbb", ".m-ft-3.ccc", ".m-ft-4.ddd"):
        assert (tmp_path / name / "corrections" / "index.json").exists()


def test_recover_removes_stale_temp_files_of_killed_writes_only(tmp_path):
    """A write killed between its temp file and the rename leaves ``.NAME.<random>.tmp``;
    recover() removes it once it is old, and leaves fresh ones (a write in progress) and
    every other file alone."""
    import os
    import time

    store = ModelStore(tmp_path)
    old = tmp_path / ".active.json.k3j2.tmp"
    fresh = tmp_path / ".active.json.x9q1.tmp"
    keep = tmp_path / "notes.tmp"  # not hidden: not one of ours
    for f in (old, fresh, keep):
        f.write_text("{")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    os.utime(keep, (hours_ago, hours_ago))
    assert store.recover() == []
    assert not old.exists()
    assert fresh.exists() and keep.exists()
