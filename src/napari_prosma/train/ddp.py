"""What a run under ``torchrun`` (DistributedDataParallel) needs beyond one process.

The resume state (:func:`~napari_prosma.train.support._write_resume`, written by rank 0)
does not depend on the number of processes: the weights and the optimiser's moments (the
same on every rank after each all-reduced step), the epoch, and rank 0's random streams.
The learning rate is a function of the epoch, and the 2D sampler a function of (seed,
epoch) from which each rank takes its share (``perm[rank::world]``), so a run saved by
two processes resumes on one, or on four, and re-shards its epochs by itself.

Only the random streams of the other ranks are not in the file; :func:`rank_streams`
derives them from (seed, rank, start epoch). Without it every rank of a resumed run
continued rank 0's saved stream and so drew the same 3D patches: the processes trained on
copies of one batch (and on the CPU, where every rank started from the recipe's one seed,
they did so from the first epoch on).
"""

from __future__ import annotations

from typing import Any


def derived_seed(seed: int, rank: int, start_epoch: int) -> int:
    """The seed of rank ``rank``'s streams in a run (re)started at ``start_epoch``."""
    return ((seed * 1_000 + rank) * 100_003 + start_epoch) % (2**63)


def rank_streams(seed: int, start_epoch: int, rank: int, device: Any) -> None:
    """Give this process its own random streams (3D patch draws, 2D draws use their own
    generators).

    Rank 0 keeps the streams it has: seeded by the recipe, or restored from the resume
    state, so that a one-process run resumes exactly where it stopped. Every other rank
    gets streams derived from (seed, rank, start epoch). A fresh run on CUDA seeds each
    rank's CUDA stream with ``seed * 1000 + rank``, as before.
    """
    import torch

    if rank > 0:
        torch.manual_seed(derived_seed(seed, rank, start_epoch))
    if device.type != "cuda":
        return
    if start_epoch == 0:
        torch.cuda.manual_seed(seed * 1000 + rank)
    elif rank > 0:
        torch.cuda.manual_seed(derived_seed(seed, rank, start_epoch))


def any_rank(flag: bool, device: Any, world: int) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the same answer), so that all
    processes stop after the same epoch; one that stopped alone would leave the others
    waiting in their next all-reduce."""
    if world <= 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def resumed_line(out: Any, epoch: int, saved_by: int | None, world: int) -> str:
    """The log line of a resumed run, saying when the number of processes changed."""
    line = f"resumed {out} at epoch {epoch}"
    if saved_by and saved_by != world:
        line += (
            f" (saved by {saved_by} process{'es' if saved_by > 1 else ''}, now {world}: "
            "each epoch is shared out anew)"
        )
    return line
