"""``prosma predict --devices``: files spread over several workers, the same outputs."""

from __future__ import annotations

import _thread
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_prosma._samples import sample_path
from napari_prosma.cli import devices, main
from napari_prosma.cli.outputs import MANIFEST
from napari_prosma.errors import ProsmaError, UserError
from test_cli_predict import _checkpoint  # tests/ is on sys.path


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the records, by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _records(folder: Path) -> dict[str, dict]:
    """The records under ``folder`` without their time stamps."""
    out = {}
    for m in sorted(folder.rglob(MANIFEST)):
        data = json.loads(m.read_text())
        for e in data["files"].values():
            del e["written"]
        out[m.parent.relative_to(folder).as_posix()] = data
    return out


@pytest.fixture
def threads_used(monkeypatch) -> list[str]:
    """The names of the threads that ran the engine, one per file."""
    import napari_prosma.inference.plan as plan

    used: list[str] = []
    real = plan.run_segmentation

    def spy(*a, **kw):
        used.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(plan, "run_segmentation", spy)
    return used


def _predict(src: Path, out: Path, model: Path, where: list[str], *extra: str) -> int:
    return main(["predict", str(src), "-o", str(out), "--model", str(model), *where, *extra])


def test_two_cpu_workers_write_the_same_bytes_as_one(tmp_path, capsys, threads_used):
    model = _checkpoint(
        tmp_path / "m", "rgb", spatial_dims=2, in_channels=3, out_channels=1, widths=[8, 16]
    )
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    img = np.asarray(Image.open(sample_path("kvasir_polyp")))
    for i in range(4):  # different images, so that a mix-up between files would show
        Image.fromarray(np.ascontiguousarray(np.rot90(img[:64, :64], i))).save(src / f"p{i}.png")
    shutil.copy(src / "p1.png", src / "sub" / "q.png")
    # p0_labels.png twice: p0.jpg comes first in the folder's order, p0.png is refused
    Image.fromarray(img[100:164, 100:164]).save(src / "p0.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
    extra = ["--probabilities", "--gates", "--tta", "--tile-size", "64"]

    rc1 = _predict(src, tmp_path / "one", model, ["--device", "cpu"], *extra)
    err1 = capsys.readouterr().err
    assert threads_used and set(threads_used) == {threading.main_thread().name}
    threads_used.clear()
    rc2 = _predict(src, tmp_path / "two", model, ["--devices", "cpu,cpu"], *extra)
    err2 = capsys.readouterr().err

    assert rc1 == rc2 == 1  # broken.png and the second p0 fail in both runs
    assert len(set(threads_used)) == 2, threads_used  # both workers segmented files
    for err in (err1, err2):
        assert "Traceback" not in err
        assert sum("broken.png" in line for line in err.splitlines()) == 1
        assert "p0.png: another input already writes p0_labels.png" in err
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 5 * 6  # five images, six outputs each
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []
    assert _records(tmp_path / "one") == _records(tmp_path / "two")


def test_two_cpu_workers_on_volumes(tmp_path, capsys, threads_used):
    import nibabel as nib

    model = _checkpoint(
        tmp_path / "m", "mri", spatial_dims=3, in_channels=1, out_channels=3, widths=[4, 8]
    )
    ref = nib.load(sample_path("hippocampus_mri"))
    vol = np.asarray(ref.dataobj, dtype=np.float32)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        crop = vol[i * 4 : i * 4 + 24, :24, :24]
        nib.save(nib.Nifti1Image(crop, ref.affine), src / f"v{i}.nii.gz")
    extra = ["--probabilities", "--tile-size", "16", "-q"]

    assert _predict(src, tmp_path / "one", model, ["--device", "cpu"], *extra) == 0
    assert _predict(src, tmp_path / "two", model, ["--devices", "cpu,cpu"], *extra) == 0
    assert capsys.readouterr().out == ""  # -q: no lines from either
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 6 and one == two
    assert _records(tmp_path / "one") == _records(tmp_path / "two")
    assert len(threads_used) == 6


def test_devices_spec(monkeypatch, capsys):
    assert devices.parse_devices("cpu, CPU") == [torch.device("cpu")] * 2
    with pytest.raises(UserError, match="empty entry"):
        devices.parse_devices("cpu,,cpu")
    with pytest.raises(ProsmaError, match="unknown device"):
        devices.parse_devices("cpu,tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ProsmaError, match="no CUDA GPU"):
        devices.parse_devices("cuda:0")
    import napari_prosma.inference.device as dev

    monkeypatch.setattr(dev, "mps_available", lambda: False)
    assert devices.parse_devices("all") == [torch.device("cpu")]
    assert "no CUDA GPU found, so one worker runs on the CPU" in capsys.readouterr().out
    assert devices.parse_devices("all", quiet=True) == [torch.device("cpu")]
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a host with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    two = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert devices.parse_devices("all") == two
    assert devices.parse_devices("cuda,cuda:1") == two
    with pytest.raises(UserError, match=r"cuda:2 does not exist; this machine has 2 CUDA"):
        devices.parse_devices("cuda:0,cuda:2")


def test_device_and_devices_together_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "x.png", "-o", str(tmp_path), "--device", "cpu", "--devices", "cpu"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_claims_go_to_the_first_input():
    a, b = {"labels": Path("o/a_labels.png")}, {"labels": Path("o/b_labels.png")}
    claims = devices.Claims([("a.png", a), ("b.png", b), ("a.jpg", dict(a))])
    assert not claims.taken(0, a) and not claims.taken(1, b) and claims.taken(2, a)


def _workers(n: int) -> list[devices.Worker]:
    return devices.make_workers([torch.device("cpu")] * n, None, None, devices.Claims([]))


def test_ctrl_c_stops_every_worker_before_it_is_raised():
    done: list[int] = []
    started = threading.Barrier(2)

    def segment(job, w):
        started.wait(timeout=10)
        if job[0] == 0:
            _thread.interrupt_main()  # Ctrl-C: reaches the main thread, in its join loop
        deadline = time.monotonic() + 10
        while not w.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine polls its cancel flag like this
        time.sleep(0.5)  # removing the cancelled file's outputs takes a while
        done.append(job[0])
        return False

    jobs = [(i, Path(f"f{i}"), {}) for i in range(6)]
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        devices.run_jobs(jobs, _workers(2), segment)
    assert time.monotonic() - t0 < 5
    # raised only once both files in progress had ended (their outputs removed); no new
    # file was started
    assert sorted(done) == [0, 1]
    assert not [t for t in threading.enumerate() if t.name.startswith("prosma-predict")]


def test_a_worker_that_breaks_stops_the_run():
    def segment(job, w):
        if job[0] == 1:
            raise SystemExit("boom")
        return job[0] != 2

    with pytest.raises(SystemExit, match="boom"):
        devices.run_jobs([(i, Path(), {}) for i in range(4)], _workers(2), segment)
    failed = devices.run_jobs([(i, Path(), {}) for i in (0, 2, 3, 2)], _workers(2), segment)
    assert failed == 2


def test_each_gpu_worker_makes_its_gpu_current(monkeypatch):
    bound: dict[str, torch.device] = {}
    seen: dict[int, str] = {}
    name = threading.current_thread
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.__setitem__(name().name, d))

    def segment(job, w):
        seen[job[0]] = name().name
        assert bound[name().name] == w.device  # set before the worker's first file
        time.sleep(0.05)
        return True

    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    workers = devices.make_workers(gpus, None, None, devices.Claims([]))
    assert devices.run_jobs([(i, Path(), {}) for i in range(6)], workers, segment) == 0
    assert {str(d) for d in bound.values()} == {"cuda:0", "cuda:1"}
    assert len(set(seen.values())) == 2


SLOW_TILES = """
import sys, threading, time
from napari_prosma.inference import tiling
real = tiling.TilePredictor.__call__
def slow(self, *a, **k):
    # the first tile of a file soon, every later one slowly: a file takes > 15 s, so that
    # it is still in progress when the signal comes, however loaded the machine is
    time.sleep(2.0 if getattr(self, "_seen", False) else 0.2)
    self._seen = True
    out = real(self, *a, **k)
    print("TILE", threading.current_thread().name, file=sys.stderr, flush=True)
    return out
tiling.TilePredictor.__call__ = slow
from napari_prosma.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_with_two_workers_keeps_no_file_in_progress(tmp_path):
    """A real SIGTERM while two workers segment: exit 143, the files in progress on both
    workers cancelled and removed, no temporary file."""
    import os
    import signal
    import subprocess
    import sys

    model = _checkpoint(
        tmp_path / "m", "rgb", spatial_dims=2, in_channels=3, out_channels=1, widths=[8, 16]
    )
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    img = np.asarray(Image.open(sample_path("kvasir_polyp")))
    for i in range(6):
        Image.fromarray(np.ascontiguousarray(np.rot90(img[:128, :128], i % 4))).save(
            src / f"p{i}.png"
        )
    cmd = [sys.executable, "-c", SLOW_TILES, "predict", str(src), "-o", str(out)]
    cmd += ["--model", str(model), "--devices", "cpu,cpu", "--probabilities"]
    cmd += ["--tile-size", "64"]
    env = {**os.environ, "PYTHONPATH": str(Path(devices.__file__).parents[2])}
    env.pop("PROSMA_DEBUG", None)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        busy: set[str] = set()
        while len(busy) < 2:  # a tile done on each worker: both are inside their first file
            line = proc.stderr.readline()
            assert line, "the child ended before its tiles"
            if line.startswith("TILE"):
                busy.add(line.split()[1])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("prosma: stopped by SIGTERM")
    assert "Traceback" not in err
    # both workers were inside their first file: both cancelled, their outputs removed;
    # nothing is left, not even a hidden temporary file
    left = list(out.rglob("*")) if out.exists() else []
    assert left == [], (left, err)
    assert err.count("cancelled") == 2, err  # one line for each file in progress


def test_two_workers_recording_into_one_folder_lose_no_entry(tmp_path):
    """The record's folder lock (``flock``) holds between threads too: every file two
    workers record at the same time is in it."""
    from napari_prosma.cli.outputs import read_manifest, record_outputs

    def worker(k: int) -> None:
        for i in range(25):
            f = tmp_path / f"w{k}_{i}_labels.png"
            f.write_bytes(f"{k} {i}".encode())
            record_outputs(tmp_path, [f], Path(f"in{k}_{i}.png"), "m")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_manifest(tmp_path)) == 50
