"""Injected file-system faults (issue #7): a read-only output folder, a full disk (simulated
``ENOSPC`` and a real size limit), and the process killed in the middle of a checkpoint
or label save. Every case: one plain message, no partial file, earlier files untouched.

Read-only folders use ``chmod`` when not root and a simulated read-only disk as root
(root ignores permissions); see ``hardening_support.read_only``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import napari_prosma
from hardening_support import (
    disc_images,
    disk_full_at_fsync,
    hidden_or_temp,
    read_only,
    save_tiny,
    snapshot,
    tiny_model,
)
from napari_prosma._samples import sample_path
from napari_prosma.checkpoint import load, save
from napari_prosma.cli import main
from napari_prosma.errors import user_message
from napari_prosma.finetune import FinetuneConfig, run_finetune
from napari_prosma.io import from_array, read_image, write_labels
from napari_prosma.versions import ModelStore

SRC = str(Path(napari_prosma.__file__).resolve().parents[1])
READ_ONLY_WORDS = ("permission denied", "read-only disk")


def _one_plain_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def grey_model(tmp_path) -> Path:
    return save_tiny(tmp_path / "models", "grey")


def _predict_args(out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "predict",
        str(sample_path("busi_benign")),
        "-o",
        str(out),
        "--model",
        str(model),
        "--device",
        "cpu",
        *extra,
    ]


# ---------------------------------------------------------------------------- read-only


def test_cli_predict_into_a_read_only_folder(tmp_path, grey_model, capsys):
    out = tmp_path / "out"
    with read_only(out):
        rc = main(_predict_args(out, grey_model))
    line = _one_plain_line(capsys.readouterr().err)
    assert rc == 1
    assert any(w in line for w in READ_ONLY_WORDS), line
    assert list(out.iterdir()) == []


def test_checkpoint_and_labels_into_a_read_only_folder(tmp_path):
    net, card = tiny_model()
    folder = tmp_path / "ro"
    save(net, folder / "earlier", card)
    write_labels(folder / "earlier_labels.png", np.eye(8, dtype=np.uint8))
    before = snapshot(folder)
    with read_only(folder):
        with pytest.raises(OSError) as ckpt_err:
            save(net, folder / "new", card)
        with pytest.raises(OSError) as ckpt_over:
            save(net, folder / "earlier", card, overwrite=True)
        with pytest.raises(OSError) as lab_err:
            write_labels(folder / "earlier_labels.png", np.zeros((8, 8), np.uint8), overwrite=True)
    for e in (ckpt_err, ckpt_over, lab_err):
        msg = user_message(e.value)
        assert any(w in msg for w in READ_ONLY_WORDS), msg
    assert snapshot(folder) == before  # nothing added, nothing changed
    load(folder / "earlier")


def _ft_config() -> FinetuneConfig:
    return FinetuneConfig(
        max_steps=2, time_budget_s=None, batch_size=2, eval_every=2, trainable="all", device="cpu"
    )


def test_finetune_into_a_read_only_store(tmp_path):
    parent = save_tiny(tmp_path / "models", "parent", normalization={"mode": "fixed"})
    parent_files = snapshot(parent.parent)
    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    before = snapshot(store.root)
    images, labels = disc_images(3)
    with read_only(store.root):
        with pytest.raises(OSError) as info:
            run_finetune(parent, images, labels, store=store, config=_ft_config())
    assert any(w in user_message(info.value) for w in READ_ONLY_WORDS)
    assert snapshot(store.root) == before
    assert store.active() == "parent-name" and store.versions() == []
    assert snapshot(parent.parent) == parent_files


def test_napari_writer_into_a_read_only_folder_or_full_disk(tmp_path):
    """napari's File > Save replaces a file after asking: through the plugin's writer, a
    read-only folder or a full disk leaves the earlier file exactly as it was."""
    from napari_prosma import _writer

    folder = tmp_path / "saved"
    folder.mkdir()
    target = folder / "mine.nii.gz"
    first = _writer.write_labels(str(target), np.eye(8, dtype=np.uint8), {})
    assert first == [str(target)]
    before = snapshot(folder)
    with read_only(folder), pytest.raises(OSError) as ro:
        _writer.write_labels(str(target), np.ones((8, 8), np.uint8), {})
    with disk_full_at_fsync(), pytest.raises(OSError) as full:
        _writer.write_labels(str(target), np.ones((8, 8), np.uint8), {})
    assert any(w in user_message(ro.value) for w in READ_ONLY_WORDS)
    assert user_message(full.value).startswith("the disk is full")
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------- full disk


def test_full_disk_keeps_the_earlier_checkpoint_and_labels(tmp_path):
    net, card = tiny_model()
    save(net, tmp_path / "m", card)
    img = from_array(np.zeros((8, 8), np.uint8))
    write_labels(tmp_path / "lab.nii.gz", np.eye(8, dtype=np.uint8), img)
    before = snapshot(tmp_path)
    torch.manual_seed(1)
    other, _ = tiny_model()
    with torch.no_grad():
        other.head.bias += 1.0
    with disk_full_at_fsync() as hits:
        with pytest.raises(OSError) as ckpt:
            save(other, tmp_path / "m", card, overwrite=True)
        with pytest.raises(OSError) as lab:
            write_labels(tmp_path / "lab.nii.gz", np.ones((8, 8), np.uint8), img, overwrite=True)
        with pytest.raises(OSError):
            save(other, tmp_path / "fresh", card)
    assert len(hits) == 3
    for e in (ckpt, lab):
        assert user_message(e.value).startswith("the disk is full")
    assert snapshot(tmp_path) == before  # no temp file, no partial file, no change
    net2, _ = load(tmp_path / "m")
    assert torch.equal(net2.head.bias, net.head.bias)


def test_cli_predict_on_a_full_disk(tmp_path, grey_model, capsys):
    out = tmp_path / "out"
    with disk_full_at_fsync():
        rc = main(_predict_args(out, grey_model, "--probabilities"))
    line = _one_plain_line(capsys.readouterr().err)
    assert rc == 1 and "the disk is full" in line, line
    assert not out.exists() or list(out.rglob("*")) == []


def test_finetune_on_a_full_disk_keeps_no_version(tmp_path):
    parent = save_tiny(tmp_path / "models", "parent", normalization={"mode": "fixed"})
    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    images, labels = disc_images(3)
    with disk_full_at_fsync():
        with pytest.raises(OSError) as info:
            run_finetune(parent, images, labels, store=store, config=_ft_config())
    assert user_message(info.value).startswith("the disk is full")
    assert store.versions() == [] and store.active() == "parent-name"
    assert hidden_or_temp(store.root) == []


def _limit_file_size(limit: int):  # type: ignore[no-untyped-def]
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX only")
def test_cli_predict_hits_a_real_file_size_limit(tmp_path, grey_model):
    """A real write failure (not a mock): the kernel refuses writes past 64 KiB. The labels
    PNG fits, the probability map does not: both are removed, one plain line."""
    out = tmp_path / "out"
    code = "import sys; from napari_prosma.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PROSMA_DEBUG", None)
    run = subprocess.run(
        [sys.executable, "-c", code, *_predict_args(out, grey_model, "--probabilities")],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_file_size(64 * 1024),
        timeout=300,
    )
    line = _one_plain_line(run.stderr)
    assert run.returncode == 1, run.stderr
    # tifffile reports the kernel's refusal as a short write; either way, plain words
    assert "larger than this system allows" in line or "could not be written in full" in line
    assert "(OSError)" not in line, line
    assert list(out.rglob("*")) == []  # the labels written before were removed too


# ---------------------------------------------------------------------------- killed


_PAUSE_AT_FSYNC = """
import os, sys, time
from pathlib import Path

marker, pattern = Path(sys.argv[1]), sys.argv[2]
real_fsync = os.fsync

def fsync(fd):
    real_fsync(fd)
    name = os.readlink(f"/proc/self/fd/{fd}")
    if pattern in os.path.basename(name):
        marker.write_text(name)
        time.sleep(600)  # killed here, in the middle of the save

os.fsync = fsync
"""


def _kill_during(task: str, pattern: str, tmp_path: Path) -> str:
    """Run ``task`` in a fresh Python that is SIGKILLed once it has written (and flushed)
    a temporary file whose name contains ``pattern``; returns that file's path."""
    marker = tmp_path / "paused.txt"
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSE_AT_FSYNC + task, str(marker), pattern],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the save finished without pausing:\n{proc.stderr.read()}")
            assert time.monotonic() < deadline, "the save never reached its temporary file"
            time.sleep(0.05)
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="finding the file being written needs /proc"
)


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("pause_in", [".m.safetensors.", ".m.json."])
def test_killed_while_overwriting_a_checkpoint(tmp_path, pause_in):
    """Killed while writing the new weights, or the new card: the earlier checkpoint is
    exactly as it was and loads; only a hidden temporary file is left."""
    net, card = tiny_model()
    save(net, tmp_path / "m", card)
    before = snapshot(tmp_path)
    task = (
        "import torch\n"
        "from napari_prosma.checkpoint import ModelCard, save\n"
        "from napari_prosma.nets import build_model\n"
        f"card = ModelCard.from_dict({card.to_dict()!r})\n"
        "torch.manual_seed(5)\n"
        "net = build_model(card.architecture, **card.arch_kwargs)\n"
        f"save(net, {str(tmp_path / 'm')!r}, card, overwrite=True)\n"
    )
    temp = _kill_during(task, pause_in, tmp_path)
    assert Path(temp).name.startswith(pause_in) and Path(temp).name.endswith(".tmp")
    after = snapshot(tmp_path)
    for name in ("m.safetensors", "m.json"):
        assert after[name] == before[name]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["m.safetensors"]
    net2, _ = load(tmp_path / "m")
    assert torch.equal(net2.head.weight, net.head.weight)


@needs_proc
@pytest.mark.slow
def test_killed_while_saving_labels(tmp_path):
    """Killed while writing a labels file: a new file never appears half-written and an
    existing one (overwrite) is unchanged."""
    old = np.eye(16, dtype=np.uint8)
    write_labels(tmp_path / "kept_labels.nii.gz", old)
    before = (tmp_path / "kept_labels.nii.gz").read_bytes()
    task = (
        "import numpy as np\n"
        "from napari_prosma.io import write_labels\n"
        f"write_labels({str(tmp_path / 'kept_labels.nii.gz')!r}, np.ones((16, 16), np.uint8),"
        " overwrite=True)\n"
    )
    _kill_during(task, ".kept_labels.", tmp_path)
    assert (tmp_path / "kept_labels.nii.gz").read_bytes() == before
    np.testing.assert_array_equal(read_image(tmp_path / "kept_labels.nii.gz").data, old)
    task_new = task.replace("kept_labels", "new_labels")
    _kill_during(task_new, ".new_labels.", tmp_path)
    assert not (tmp_path / "new_labels.nii.gz").exists()
    assert all(p.name.startswith(".") for p in hidden_or_temp(tmp_path))


@needs_proc
@pytest.mark.slow
def test_killed_while_saving_a_finetuned_model(tmp_path):
    """Killed while the fine-tuned checkpoint is written: no version appears, the parent
    stays active and untouched, and the saved corrections are still on disk."""
    parent = save_tiny(tmp_path / "models", "parent", normalization={"mode": "fixed"})
    parent_files = snapshot(parent.parent)
    store = ModelStore(tmp_path / "store")
    store.activate("parent-name")
    task = (
        "import sys; sys.path.insert(0, " + repr(str(Path(__file__).parent)) + ")\n"
        "from hardening_support import disc_images\n"
        "from napari_prosma.finetune import FinetuneConfig, run_finetune\n"
        "from napari_prosma.versions import ModelStore\n"
        "images, labels = disc_images(3)\n"
        "cfg = FinetuneConfig(max_steps=2, time_budget_s=None, batch_size=2, trainable='all',"
        " device='cpu', holdout_fraction=0.0)\n"  # nothing held out: always saved
        f"run_finetune({str(parent)!r}, images, labels, store=ModelStore({str(store.root)!r}),"
        " config=cfg)\n"
    )
    _kill_during(task, ".model.safetensors.", tmp_path)
    assert store.versions() == []
    assert store.active() == "parent-name"
    assert snapshot(parent.parent) == parent_files
    saved = list(store.root.glob(".*/corrections/index.json"))
    assert len(saved) == 1  # the corrections, in the run's (hidden) staging folder
    _, labels = ModelStore.load_corrections(saved[0].parent)
    np.testing.assert_array_equal(labels[0], disc_images(3)[1][0])

    # the next run (or ModelStore.recover) tidies up after the dead process: the corrections
    # move to .incoming, the half-written checkpoint goes, nothing else is touched
    recovered = store.recover()
    assert len(recovered) == 1
    kept = store.root / ".incoming" / recovered[0]
    _, labels = ModelStore.load_corrections(kept)
    np.testing.assert_array_equal(labels[0], disc_images(3)[1][0])
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == [".incoming"]
    assert store.versions() == [] and store.active() == "parent-name"
    assert store.recover() == []


def test_next_finetune_run_says_it_recovered_a_killed_run(tmp_path):
    """A staging folder left by a dead process is tidied up by the next run, which says
    where the earlier corrections went."""
    import json
    import socket
    import subprocess
    import sys

    from napari_prosma.finetune import FinetuneConfig, run_finetune

    parent = save_tiny(tmp_path / "models", "parent", normalization={"mode": "fixed"})
    store = ModelStore(tmp_path / "store")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stage = store.root / ".parent-ft-20250101-000000.x1y2"
    ModelStore.save_corrections(stage / "corrections", *[list(a) for a in disc_images(2)])
    (stage / "owner.json").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))

    images, labels = disc_images(3)
    cfg = FinetuneConfig(
        max_steps=1, time_budget_s=None, batch_size=2, device="cpu", holdout_fraction=0.0
    )  # nothing held out: the run always saves
    result, _ = run_finetune(str(parent), images, labels, store=store, config=cfg)

    assert not stage.exists()
    kept = store.root / ".incoming" / "parent-ft-20250101-000000"
    assert (kept / "index.json").exists()
    assert any(".incoming" in n and "interrupted" in n for n in result.notes), result.notes
