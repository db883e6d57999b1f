"""``prosma predict --devices``: the files of a run spread over several devices.

Each device gets one worker thread with its own copy of each model (a model object holds
its last pass's gate values, so two workers never share one); the workers take files from
one shared queue, so a slow file holds up only its own worker. Threads rather than
processes: the network's work and most of the file writing (zlib, numpy) release the
interpreter lock, a thread costs no second ``import torch`` and no copy of the model
through pickles, and Ctrl-C reaches every worker through one flag (measured on a CPU in
``benchmarks/results/predict_devices_cpu.json``).

The outputs are the same bytes as with one device, and the output-safety rules of
:mod:`.outputs` hold as before: the paths every input writes are known before any work,
and :class:`Claims` gives each path to the first input (in input order) that writes it,
so two workers never write one file and which input wins does not depend on timing; each
write is atomic and never clobbers a file that appeared meanwhile; the record of an output
folder is updated under a lock on the folder, which also holds between threads.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Held while a worker prints, so that a file's result line and its notes stay together.
PRINT_LOCK = threading.Lock()


def parse_devices(spec: str, quiet: bool = False) -> list[torch.device]:
    """The devices ``--devices SPEC`` names, one worker each.

    Args:
        spec: ``"all"`` (every CUDA GPU of this host; Apple MPS, else one CPU worker, when
            there is none) or a comma-separated list such as ``"cuda:0,cuda:1"`` or
            ``"cpu,cpu"`` (a device named twice gets two workers).
        quiet: do not print the note that ``all`` found no GPU.

    Raises:
        UserError: an empty entry, an unknown device, or a GPU this host does not have.
    """
    import torch

    from ..errors import UserError
    from ..inference import resolve_device
    from ..inference.device import mps_available

    if spec.strip().lower() == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n:
            return [torch.device("cuda", i) for i in range(n)]
        fallback = "mps" if mps_available() else "cpu"
        if not quiet:
            where = "Apple MPS" if fallback == "mps" else "the CPU"
            print(f"note: --devices all: no CUDA GPU found, so one worker runs on {where}")
        return [torch.device(fallback)]
    names = [s.strip().lower() for s in spec.split(",")]
    if not all(names):
        raise UserError(f"--devices {spec!r}: an empty entry; name devices like cuda:0,cuda:1")
    devices = []
    for name in names:
        device = resolve_device(name)  # a plain error for an unknown name or a missing GPU
        if device.type == "cuda":
            device = torch.device("cuda", device.index or 0)
            n = torch.cuda.device_count()
            if device.index >= n:
                raise UserError(
                    f"--devices: {name} does not exist; this machine has {n} CUDA GPU(s) "
                    f"(cuda:0 to cuda:{n - 1})"
                )
        devices.append(device)
    return devices


class Models:
    """Loads each model once for one device; picks the bundled default per image kind
    when none is named. The model is loaded on the CPU and moved by the engine."""

    def __init__(self, name: str | None, store: str | None):
        self.name, self.store = name, store
        self.cache: dict[str, Any] = {}

    def get(self, kind: str) -> tuple[str, Any, Any]:
        from ..inference import load_model
        from ..models import default_model_name, resolve_model
        from . import UserError

        name = self.name or default_model_name(kind)
        if name is None:
            raise UserError(f"no bundled model suits a {kind} image; pass --model MODEL")
        if name not in self.cache:
            self.cache[name] = load_model(resolve_model(name, self.store), device="cpu")
        model, card = self.cache[name]
        return name, model, card


class Claims:
    """Which input of a run writes each output path: the first, in input order, that
    names it. Decided before any work, so it is the same with any number of workers."""

    def __init__(self, plans: Iterable[tuple[Any, dict[str, Path]]]):
        self.owner: dict[Path, int] = {}
        for i, (_, paths) in enumerate(plans):
            for p in paths.values():
                self.owner.setdefault(Path(p).absolute(), i)

    def taken(self, index: int, paths: dict[str, Path]) -> bool:
        """Whether another input of the run writes one of ``paths``."""
        return any(self.owner.get(Path(p).absolute(), index) != index for p in paths.values())


class _Lines:
    """stderr for progress while several workers run: whole lines (never a line rewritten
    in place, which two files would garble), one writer at a time."""

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> None:
        with PRINT_LOCK:
            sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@dataclass
class Worker:
    """What one worker segments with.

    Attributes:
        device: where its network runs.
        models: its own models.
        claims: the run's output claims.
        stop: set when the run is interrupted (the engine's cancel flag).
        progress_stream: where its progress goes (None: stderr, a line rewritten in place
            on a terminal).
    """

    device: torch.device
    models: Models
    claims: Claims
    stop: threading.Event = field(default_factory=threading.Event)
    progress_stream: Any = None

    @property
    def unit(self) -> str:
        return "tiles" if self.device.type == "cpu" else "tile batches"


Job = tuple[int, Path, dict[str, Path]]


def run_jobs(
    jobs: Sequence[Job],
    workers: Sequence[Worker],
    segment: Callable[[Job, Worker], bool],
) -> int:
    """Segment every job (``segment(job, worker)`` returns whether it succeeded); returns
    the number that failed.

    One worker runs in the calling thread, in input order. Several run in threads that
    take jobs from one queue; on Ctrl-C (or SIGTERM) the stop flag cancels the files in
    progress, their outputs are removed, and the interrupt is raised again once every
    worker has stopped.
    """
    if len(workers) == 1:
        _bind(workers[0].device)
        return sum(not segment(job, workers[0]) for job in jobs)
    todo: queue.SimpleQueue[Job] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    failed = [0] * len(workers)
    errors: list[BaseException] = []
    ended = [threading.Event() for _ in workers]

    def work(k: int) -> None:
        w = workers[k]
        try:
            _bind(w.device)
            while not w.stop.is_set():
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                failed[k] += not segment(job, w)
        except BaseException as e:  # not a file's own failure: stop the others too
            errors.append(e)
            for other in workers:
                other.stop.set()
        finally:
            ended[k].set()

    threads = [
        threading.Thread(target=work, args=(k,), name=f"prosma-predict-{k}-{w.device}")
        for k, w in enumerate(workers)
    ]
    # Wait on events, not on Thread.join: a join that Ctrl-C or SIGTERM interrupts can mark
    # a thread that still runs as ended (CPython 3.11), and the run would end before its
    # workers had removed the outputs of the files they were cancelling.
    try:
        for t in threads:
            t.start()
        for e in ended:
            while not e.wait(0.2):  # a timeout, so that Ctrl-C reaches this thread
                pass
    except BaseException:  # also while starting: a thread not yet running sees the flag
        for w in workers:
            w.stop.set()
        for t, e in zip(threads, ended):
            if t.ident is not None:
                e.wait()
        raise
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(failed)


def _bind(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device (each thread starts on
    cuda:0), for the calls that take no device (``torch.cuda.empty_cache`` after an
    out-of-memory error)."""
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)


def make_workers(
    devices: Sequence[torch.device], model: str | None, store: str | None, claims: Claims
) -> list[Worker]:
    """One worker per device, sharing one stop flag (progress as whole lines when there
    are several)."""
    stop = threading.Event()
    stream = _Lines() if len(devices) > 1 else None
    return [Worker(d, Models(model, store), claims, stop, stream) for d in devices]
