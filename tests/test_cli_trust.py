"""Issue 12, CLI parts: outputs never replace inputs (3), card text cannot drive the
terminal (11), one model resolver for names, paths, version ids and folders (12), SIGTERM
undoes the file in progress like Ctrl-C (13, real processes and real signals), progress on
stderr (14). Real BUSI files from ``../shared/data`` where a file is read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hardening_support import disc_images, save_tiny, snapshot, tiny_model
from napari_prosma.checkpoint import CheckpointError, save
from napari_prosma.cli import main
from napari_prosma.cli.outputs import MANIFEST
from napari_prosma.io import write_image
from napari_prosma.models import resolve_model, version_id_of

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def grey(tmp_path) -> Path:
    return save_tiny(tmp_path / "models", "grey")


@pytest.fixture
def scans(tmp_path, shared_data) -> Path:
    """A folder with two real BUSI scans and the user's manual mask of the first."""
    folder = tmp_path / "scans"
    folder.mkdir()
    busi = shared_data / "busi"
    shutil.copy(busi / "images" / "benign_001.png", folder / "scan.png")
    shutil.copy(busi / "masks" / "benign_001.png", folder / "scan_labels.png")
    shutil.copy(busi / "images" / "benign_002.png", folder / "other.png")
    return folder


def _predict(*args: str | Path, model: Path) -> int:
    return main(["predict", *map(str, args), "--model", str(model), "--device", "cpu"])


# ---------------------------------------------------------------------------- 3: inputs


def test_output_into_the_input_folder_never_replaces_an_input(scans, grey, capsys):
    """``predict DIR -o DIR --overwrite`` with the user's ``scan_labels.png`` beside
    ``scan.png``: refused before any work (it **was** replaced, then segmented, exit 0)."""
    before = snapshot(scans)
    rc = _predict(scans, "-o", scans, "--overwrite", model=grey)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "would replace" in err[0] and "scan_labels.png" in err[0], err[0]
    assert "an input of this run" in err[0]
    assert snapshot(scans) == before  # the mask untouched, nothing added


def test_an_input_named_twice_through_a_link_is_still_an_input(scans, grey, capsys):
    """The same file reached by another path (a symbolic link) is recognised too."""
    (scans.parent / "alias").symlink_to(scans)
    before = snapshot(scans)
    rc = _predict(
        scans / "scan.png",
        scans.parent / "alias" / "scan_labels.png",
        "-o",
        scans,
        "--overwrite",
        model=grey,
    )
    assert rc == 1 and "would replace" in capsys.readouterr().err
    assert snapshot(scans) == before


def test_a_second_run_never_reads_the_first_runs_outputs(scans, grey, capsys):
    """``predict DIR -o DIR/out`` twice, then into ``DIR/out2``: the outputs of the first
    run (one level down, so listed with the folder) are skipped and said, never segmented
    (they **were**: ``out2/out/scan_labels_labels.png``)."""
    out = scans / "out"
    assert _predict(scans, "-o", out, "--probabilities", model=grey) == 0
    record = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(record) == sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert len(record) == 6  # labels + probabilities of scan, scan_labels and other
    (out / "other_labels.png").rename(out / "renamed.png")  # still known by its sha256
    capsys.readouterr()

    rc = _predict(scans, "-o", scans / "out2", model=grey)
    text = capsys.readouterr().out
    assert rc == 0
    assert "skipped 6 file(s)" in text and "done: 3 file(s)" in text
    assert sorted(p.name for p in (scans / "out2").iterdir()) == sorted(
        ["other_labels.png", "scan_labels.png", "scan_labels_labels.png", MANIFEST]
    )
    # into the same folder again, replacing its own outputs
    rc = _predict(scans, "-o", out, "--overwrite", "--probabilities", model=grey)
    assert rc == 0 and not (out / "out").exists()
    assert "done: 3 file(s)" in capsys.readouterr().out


def test_overwrite_never_replaces_a_file_the_user_changed(scans, grey, capsys):
    """``--overwrite`` replaces earlier outputs only: a label map the user corrected since
    (or a file of the same name that the command never wrote) stays as it is."""
    out = scans.parent / "out"
    assert _predict(scans / "scan.png", "-o", out, model=grey) == 0
    labels = out / "scan_labels.png"
    corrected = np.zeros((256, 256), np.uint8)
    corrected[100:140, 100:140] = 1
    labels.unlink()
    write_image(labels, corrected)  # the user's correction, saved over the output
    foreign = out / "other_labels.png"
    shutil.copy(scans / "scan_labels.png", foreign)  # a file the command did not write
    before = snapshot(out)
    capsys.readouterr()

    rc = _predict(scans / "scan.png", scans / "other.png", "-o", out, "--overwrite", model=grey)
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("it is never replaced, even with --overwrite") == 2, err
    assert snapshot(out) == before


def test_a_folder_of_only_earlier_outputs_says_so(scans, grey, capsys):
    out = scans.parent / "out"
    assert _predict(scans / "scan.png", "-o", out, model=grey) == 0
    capsys.readouterr()
    rc = _predict(out, "-o", scans.parent / "again", model=grey)
    assert rc == 1
    assert "are outputs of an earlier prosma predict run" in capsys.readouterr().err
    assert not (scans.parent / "again").exists()


# ---------------------------------------------------------------------------- 11: card text


EVIL = "\x1b[2J\x1b[H\x1b]0;owned\x07\u202e"


def test_info_prints_card_text_with_control_characters_escaped(tmp_path, capsys):
    """A card's text fields with clear-screen, cursor-home, window-title and a bidi
    override, and a newline that would fake a line: printed escaped (they **were** raw)."""
    net, card = tiny_model(intended_use=f"screening{EVIL}", limitations="none\nWeights OK: yes")
    card.name = f"evil{EVIL}"
    card.class_names = ["background", f"lesion{EVIL}"]
    path = save(net, tmp_path / "evil", card)
    for extra in ([], ["--check"], ["--json"]):
        assert main(["info", str(path), *extra]) == 0
        out = capsys.readouterr().out
        assert not any(c in out for c in "\x1b\x07\u202e"), repr(out)
        assert "\\x1b[2J" in out or "\\u001b[2J" in out
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("Weights OK") for line in lines)  # no forged line
    assert any("none\\nWeights OK: yes" in line for line in lines)


def test_error_lines_escape_control_characters(tmp_path, grey, capsys):
    """File and model names reach the terminal escaped in error lines too."""
    bad = tmp_path / f"scan{EVIL}.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert _predict(bad, "-o", tmp_path / "out", model=grey) == 1
    assert main(["info", f"nothing{EVIL}"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2
    assert not any(c in err for c in "\x1b\x07\u202e"), repr(err)


# ---------------------------------------------------------------------------- 12: model ids


@pytest.fixture
def version(tmp_path):
    """A real fine-tuned version (two steps on discs) in a store of its own."""
    from napari_prosma.finetune import FinetuneConfig, run_finetune
    from napari_prosma.versions import ModelStore

    parent = save_tiny(tmp_path / "models", "parent", normalization={"mode": "fixed"})
    store = ModelStore(tmp_path / "store")
    images, labels = disc_images(2)
    cfg = FinetuneConfig(
        max_steps=2,
        time_budget_s=None,
        batch_size=2,
        trainable="all",
        device="cpu",
        holdout_fraction=0.0,
    )
    _, vid = run_finetune(parent, images, labels, store=store, config=cfg, replay=None)
    return store, vid


def test_one_resolver_for_names_paths_ids_and_folders(tmp_path, version, monkeypatch):
    store, vid = version
    ckpt = store.root / vid / "model.safetensors"
    monkeypatch.setenv("PROSMA_MODEL_DIR", str(store.root))
    folder = store.root / vid
    for spec in (vid, folder, ckpt, ckpt.with_suffix(".json"), folder / "model"):
        path = resolve_model(spec)
        assert Path(path).resolve() in (
            ckpt.resolve(),
            ckpt.with_suffix("").resolve(),
            ckpt.with_suffix(".json").resolve(),
        ), (spec, path)
        assert version_id_of(spec) == vid
    assert resolve_model("busi_prosma").name == "busi_prosma.safetensors"
    assert version_id_of("busi_prosma") is None
    with pytest.raises(CheckpointError, match="fine-tuned version in"):
        resolve_model("busi_prosma-ft-19990101-000000")
    with pytest.raises(CheckpointError):
        resolve_model(f"../{store.root.name}/{vid}x")


def test_predict_info_and_evaluate_take_a_version_id_or_folder(
    tmp_path, version, capsys, shared_data
):
    """``--model <id>`` and ``--model <store>/<id>`` (**were** refused: "no checkpoint" /
    "model card config.json is missing")."""
    store, vid = version
    images, _ = disc_images(1, size=48, seed=3)
    img = tmp_path / "disc.png"
    write_image(img, images[0])
    assert _predict(img, "-o", tmp_path / "a", "--store", store.root, model=vid) == 0
    assert (tmp_path / "a" / "disc_labels.png").exists()
    assert _predict(img, "-o", tmp_path / "b", model=store.root / vid) == 0
    assert f"model {store.root / vid}" in capsys.readouterr().out
    assert main(["info", vid, "--store", str(store.root), "--check"]) == 0
    assert f"Model      {vid}" in capsys.readouterr().out
    assert main(["info", str(store.root / vid)]) == 0
    assert main(["info", "--store", str(store.root)]) == 0
    assert vid in capsys.readouterr().out

    rc = main(
        [
            "evaluate",
            vid,
            "busi",
            "--data-root",
            str(shared_data),
            "--limit",
            "2",
            "--store",
            str(store.root),
            "--device",
            "cpu",
            "--no-hd95",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"{vid} on" in out.out


# ---------------------------------------------------------------------------- 13: SIGTERM


def _child(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("PROSMA_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(proc: subprocess.Popen, word: str, timeout: float = 120) -> list[str]:
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if word in line:
            return seen
    proc.kill()
    raise AssertionError(f"{word!r} never came: {seen}")


PRELUDE = """
import sys, time
"""
SLOW_TILES = """
from napari_prosma.inference import tiling
real = tiling.TilePredictor.__call__
def slow(self, *a, **k):
    time.sleep(0.2)
    out = real(self, *a, **k)
    print("TILE", file=sys.stderr, flush=True)
    return out
tiling.TilePredictor.__call__ = slow
"""
HANG_IN_TIFF = """
import tifffile
def hang(path, *a, **k):
    with open(path, "wb") as f:
        f.write(b"II*\\x00 half a file")
    print("WRITING", file=sys.stderr, flush=True)
    time.sleep(120)
tifffile.imwrite = hang
"""
MAIN = """
from napari_prosma.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("when", ["tiles", "between outputs"])
def test_sigterm_undoes_the_file_in_progress(tmp_path, grey, shared_data, when):
    """A real ``kill`` (SIGTERM) while tiles run, and while the probability map is being
    written after the labels: exit code 143, one line, no labels without their maps and no
    temporary file (the process **used to** die at once and leave both)."""
    out = tmp_path / "out"
    scan = shared_data / "busi" / "images" / "benign_001.png"
    hook, word = (SLOW_TILES, "TILE") if when == "tiles" else (HANG_IN_TIFF, "WRITING")
    proc = _child(
        PRELUDE + hook + MAIN,
        "predict",
        str(scan),
        "-o",
        str(out),
        "--model",
        str(grey),
        "--device",
        "cpu",
        "--probabilities",
        "--tile-size",
        "64",
    )
    try:
        _wait_for(proc, word)
        if when == "between outputs":
            assert (out / "benign_001_labels.png").exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == (
        "prosma: stopped by SIGTERM; the file in progress was not kept"
    )
    assert "Traceback" not in err
    assert list(out.rglob("*")) == []  # nothing, not even a hidden temporary file


# ---------------------------------------------------------------------------- 14: progress


def test_predict_shows_progress_on_stderr_and_q_silences_it(
    tmp_path, grey, shared_data, capsys, monkeypatch
):
    import napari_prosma.cli.progress as progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    scan = shared_data / "busi" / "images" / "benign_001.png"
    assert _predict(scan, "-o", tmp_path / "a", "--tile-size", "64", model=grey) == 0
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("benign_001.png: tiles ")]
    assert len(lines) >= 3, cap.err
    total = int(lines[-1].split("/")[1].split()[0])
    assert total > 1 and lines[-1].startswith(f"benign_001.png: tiles {total}/{total} (100%)")
    assert "left" in lines[0] and "left" not in lines[-1]
    assert "benign_001.png: 256×256 grey" in cap.out

    assert _predict(scan, "-o", tmp_path / "b", "--tile-size", "64", "-q", model=grey) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out == ""
    assert (tmp_path / "b" / "benign_001_labels.png").exists()


def test_progress_is_silent_for_short_work_and_estimates_time_left(monkeypatch):
    import io as _io

    import napari_prosma.cli.progress as progress

    clock = iter(range(0, 1000, 5))  # every call 5 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    buf = _io.StringIO()
    bar = progress.Progress("scan.nii.gz", "tiles", stream=buf, interval=12)
    for done in range(1, 5):
        bar(done, 4)
    lines = buf.getvalue().splitlines()
    # t0=0; reports at 5, 10, 15, 20 s: lines at 15 s (12 s since the last) and the end
    assert lines == [
        "scan.nii.gz: tiles 3/4 (75%), 15 s, about 5.0 s left",
        "scan.nii.gz: tiles 4/4 (100%), 20 s",
    ]
    buf = _io.StringIO()
    quick = progress.Progress("a.png", "tiles", stream=buf, interval=100)
    for done in range(1, 4):
        quick(done, 3)
    assert buf.getvalue() == ""  # over before the first line was due: nothing
    assert progress.fmt_seconds(185) == "3 min 05 s" and progress.fmt_seconds(3720) == "1 h 02 min"


def test_train_shows_epochs_on_stderr_and_q_silences_it(tmp_path, capsys, monkeypatch):
    """``prosma train``: epochs done, time spent and left on stderr (the training loop
    itself is replaced by one that reports three epochs)."""
    import napari_prosma.cli.progress as progress
    import napari_prosma.train as train_mod

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)

    def fake_train(cfg, progress=None, **kw):
        for e in (1, 2, 3):
            progress(train_mod.TrainProgress(e, 3, 0.5, 1e-3, 10.0))
        return train_mod.TrainResult("finished", Path(cfg.out_dir), 3)

    monkeypatch.setattr(train_mod, "train", fake_train)
    recipe = Path(__file__).resolve().parents[1] / "training/recipes/busi_prosma.toml"
    args = ["train", str(recipe), "--out", str(tmp_path / "t"), "--epochs", "3"]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("training: epochs 1/3 (33%), ") and err[0].endswith(" left")
    assert err[-1].startswith("training: epochs 3/3 (100%)")
    assert main([*args, "-q"]) == 0
    assert capsys.readouterr().err == ""
