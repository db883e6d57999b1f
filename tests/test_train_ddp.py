"""Training under torchrun (DDP, gloo on the CPU): resume across a change in the number of
processes, each rank its own random streams, all ranks stop together."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_prosma.checkpoint import read_card
from napari_prosma.train.ddp import any_rank, derived_seed, rank_streams, resumed_line

REPO = Path(__file__).resolve().parents[1]
MAIN = "import sys; from napari_prosma.cli import main; sys.exit(main(sys.argv[1:]))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(world: int, out: Path, data: Path, *extra: str) -> list[str]:
    """``prosma train`` of a tiny 3D recipe in ``world`` processes, as torchrun starts them
    (its environment variables, the gloo backend); returns each rank's output."""
    cmd = [
        sys.executable,
        "-c",
        MAIN,
        "train",
        str(REPO / "training/recipes/hippocampus_prosma.toml"),
        "--data-root",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--epochs",
        "3",
        "-q",
        *(
            f"--set={kv}"
            for kv in (
                "widths=tiny",
                "limit=6",
                "iters_per_epoch=2",
                "batch_size=4",
                "patch_size=[16,16,16]",
                "val_every=0",
                "select=last",  # the 3D recipe picks best_val; 6 cases leave no val part
                "final_eval=false",
                "sparsity_images=2",
            )
        ),
        *extra,
    ]
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO / "src"),
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
        }
        if world == 1:
            for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
                env.pop(k)
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = []
    for p in procs:
        text, _ = p.communicate(timeout=600)
        assert p.returncode == 0, text
        outs.append(text)
    return outs


def _adam_steps(out: Path) -> set[float]:
    tensors = load_file(out / "last_optim.safetensors")
    return {float(v) for k, v in tensors.items() if k.endswith("::step")}


def _finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in load_file(path).values())


@pytest.mark.data
@pytest.mark.slow
def test_resume_across_a_change_in_the_number_of_processes(tmp_path, shared_data):
    out = tmp_path / "run"
    # two processes: epoch 1 of 3, then a resume checkpoint
    ranks = _train(2, out, shared_data, "--max-epochs", "1")
    assert "stopped" in ranks[0] and "(epoch 1/3)" in ranks[0]
    state = read_card(out / "last").training["state"]
    assert state["epoch"] == 1 and state["processes"] == 2
    assert _adam_steps(out) == {2.0}  # two global steps per epoch
    w1 = load_file(out / "last.safetensors")

    # one process resumes it: epoch 2, from the saved weights, optimiser and step
    (one,) = _train(1, out, shared_data, "--max-epochs", "1")
    assert "stopped" in one and "(epoch 2/3)" in one
    state = read_card(out / "last").training["state"]
    assert state["epoch"] == 2 and state["processes"] == 1
    assert _adam_steps(out) == {4.0}  # the step count went on from 2
    w2 = load_file(out / "last.safetensors")
    assert _finite(out / "last.safetensors")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # it trained

    # and two processes again finish it
    ranks = _train(2, out, shared_data)
    assert "finished" in ranks[0] and "(epoch 3/3)" in ranks[0]
    assert _finite(out / "model.safetensors")
    assert not (out / "last.json").exists()
    import json

    history = json.loads((out / "result.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(math.isfinite(h["loss"]) for h in history)


def test_resumed_line_says_when_the_processes_changed():
    assert resumed_line("r", 4, 2, 1) == (
        "resumed r at epoch 4 (saved by 2 processes, now 1: each epoch is shared out anew)"
    )
    assert resumed_line("r", 4, 1, 2).startswith("resumed r at epoch 4 (saved by 1 process, now 2")
    assert resumed_line("r", 4, 2, 2) == resumed_line("r", 4, None, 1) == "resumed r at epoch 4"


def _draws(seed: int, start_epoch: int, rank: int) -> torch.Tensor:
    torch.manual_seed(123)  # the stream a resume state restores
    rank_streams(seed, start_epoch, rank, torch.device("cpu"))
    return torch.rand(8)


def test_each_rank_draws_its_own_patches_and_rank_0_resumes_exactly():
    torch.manual_seed(123)
    restored = torch.rand(8)
    assert torch.equal(_draws(0, 5, 0), restored)  # rank 0 keeps the restored stream
    r1, r2 = _draws(0, 5, 1), _draws(0, 5, 2)
    assert not torch.equal(r1, restored) and not torch.equal(r1, r2)
    assert torch.equal(_draws(0, 5, 1), r1)  # derived, so reproducible
    assert not torch.equal(_draws(0, 6, 1), r1)  # and new after each resume
    assert not torch.equal(_draws(0, 0, 1), _draws(0, 0, 0))  # a fresh run as well
    assert len({derived_seed(s, r, e) for s in (0, 1) for r in (1, 2) for e in (0, 1)}) == 8


AGREE = """
import os, torch, torch.distributed as dist
from napari_prosma.train.ddp import any_rank
dist.init_process_group("gloo")
rank = int(os.environ["RANK"])
print(any_rank(rank == 1, torch.device("cpu"), 2), any_rank(False, torch.device("cpu"), 2))
dist.destroy_process_group()
"""


def test_any_rank_is_one_answer_for_all_ranks():
    assert any_rank(True, torch.device("cpu"), 1) is True
    assert any_rank(False, torch.device("cpu"), 1) is False
    port, procs = str(_free_port()), []
    for rank in range(2):  # rank 1 alone is out of time: both ranks stop
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO / "src"),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", AGREE], env=env, stdout=subprocess.PIPE, text=True
            )
        )
    assert [p.communicate(timeout=300)[0].split() for p in procs] == [["True", "False"]] * 2


def test_the_2d_sampler_shares_each_epoch_out_by_the_number_of_processes():
    from types import SimpleNamespace

    from napari_prosma.train.loop import epoch_draws

    def shares(world: int, epoch: int) -> list[list[int]]:
        out = []
        for rank in range(world):
            run = SimpleNamespace(
                cfg=SimpleNamespace(dims=2, seed=3, empty_share=0.0),
                data=SimpleNamespace(n=40),
                empty_idx=None,
                steps=5,
                bsz=8 // world,  # global batch 8
            )
            epoch_draws(run, epoch, rank, world, torch.device("cpu"))
            out.append(run.perm.tolist())
        return out

    (one,) = shares(1, 7)
    for world in (2, 4):
        parts = shares(world, 7)
        assert sorted(i for p in parts for i in p) == sorted(one)  # the same images, split
        assert all(len(set(p)) == len(p) == 40 // world for p in parts)  # disjoint shares
        for s in range(5):  # and step s of every rank together is step s of one process
            step = sorted(i for p in parts for i in p[s * (8 // world) : (s + 1) * (8 // world)])
            assert step == sorted(one[s * 8 : (s + 1) * 8])
    assert shares(2, 8) != shares(2, 7)  # a new order every epoch
