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


_CHILD = r"""
import datetime, sys, time
from pathlib import Path
import numpy as np
import napari_prosma.versions as versions
from napari_prosma.finetune import FinetuneConfig, run_finetune

class Frozen(datetime.datetime):  # both runs start in the same second
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 1, 2, 3, 4, 5)

versions._dt = type("dt", (), {"datetime": Frozen, "timezone": datetime.timezone})
parent, store, go = sys.argv[1:4]
rng = np.random.default_rng(0)
images = [rng.integers(0, 255, (32, 32)).astype(np.uint8) for _ in range(2)]
labels = [(im > 128).astype(np.uint8) for im in images]
while not Path(go).exists():
    time.sleep(0.01)
cfg = FinetuneConfig(max_steps=3, time_budget_s=None, batch_size=2, device="cpu",
                     holdout_fraction=0.0, trainable="all")
_, vid = run_finetune(parent, images, labels, store=versions.ModelStore(store), config=cfg,
                      activate="always")
print(vid)
"""


def test_two_processes_finetuning_into_one_store_get_two_versions(tmp_path):
    """Issue 12 #5: two runs at once got the same id; the second failed after training
    ("Directory not empty") and its model was left in a hidden folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hardening_support import save_tiny

    parent = save_tiny(tmp_path, out_channels=2)
    store, go = tmp_path / "store", tmp_path / "go"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(parent), str(store), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    ids = [o.strip().splitlines()[-1] for o, _ in outs]
    assert len(set(ids)) == 2, ids
    assert sorted(v.id for v in ModelStore(store).versions()) == sorted(ids)
    hidden = [p.name for p in store.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert hidden == [], hidden
    assert ModelStore(store).active() in ids


def test_the_store_lock_is_not_held_while_training(tmp_path):
    """Another process may reserve an id or activate a model while a run trains."""
    import fcntl
    import os

    from hardening_support import disc_images, save_tiny
    from napari_prosma.finetune import FinetuneConfig, run_finetune

    parent = save_tiny(tmp_path, out_channels=2)
    store = ModelStore(tmp_path / "store")
    images, labels = disc_images(1)
    free = []

    def progress(p):
        fd = os.open(store.root, os.O_RDONLY)  # the store locks its folder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            free.append(True)
        except BlockingIOError:
            free.append(False)
        finally:
            os.close(fd)

    cfg = FinetuneConfig(max_steps=2, time_budget_s=None, batch_size=2, device="cpu")
    run_finetune(parent, images, labels, store=store, config=cfg, progress=progress)
    assert free and all(free)
    with store.lock():  # and it is held while locked (the probe above can fail)
        fd = os.open(store.root, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
