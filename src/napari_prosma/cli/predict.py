"""``prosma predict INPUT... -o OUT``: segment image files or folders of them.

Labels are written with the input's geometry (NIfTI affine and header, TIFF resolution);
probabilities, uncertainty and gate maps optionally beside them (NIfTI for NIfTI input,
TIFF otherwise). A file that fails is reported in one line on stderr and skipped; the exit
code is 0 only if every file succeeded. A volume given to a 2D model is segmented slice by
slice (``--slice-axis``), as the Segment widget does; a scan whose gate sparsity lies
outside the range the model card records for the training data gets a warning on stderr
(the widget's "scan unlike the training data"). Writes are atomic; an output never replaces an
input of the run, ``--overwrite`` replaces only earlier outputs of ``prosma predict`` (see
:mod:`.outputs`), and the outputs of a file that failed half-way are removed. Progress goes
to stderr (``-q`` for none). ``--devices cuda:0,cuda:1`` (or ``all``) spreads the files over
several devices, one model each, with the same outputs (see :mod:`.devices`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .outputs import output_paths


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="segment images or volumes with a model",
        description="Segment PNG/JPEG/TIFF/NIfTI files (or folders of them, one level deep) "
        "and write label maps with the input's geometry into OUT. Files an earlier run "
        f"wrote (recorded in each output folder's {_manifest()}) are never read as input.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--model",
        metavar="MODEL",
        help="bundled model name, checkpoint path, fine-tuned version id or version folder "
        "(default: the bundled model that suits each image: colour, greyscale or 3D)",
    )
    p.add_argument(
        "--store",
        metavar="DIR",
        help="model store holding fine-tuned versions (default: $PROSMA_MODEL_DIR or the "
        "user data folder; the -o of prosma finetune)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    where.add_argument(
        "--devices",
        metavar="LIST",
        help="spread the files over several devices, one model and worker each: all (every "
        "GPU of this host) or a list such as cuda:0,cuda:1 (outputs as with one device)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="flip test-time augmentation; also writes an uncertainty map",
    )
    p.add_argument("--probabilities", action="store_true", help="also write class probabilities")
    p.add_argument(
        "--gates",
        action="store_true",
        help="also write the gate maps (psi and "
        "exact-zero fraction per decoder stage) and their numbers as JSON",
    )
    p.add_argument(
        "--tile-size",
        type=int,
        metavar="N",
        help="tile edge in pixels/voxels "
        "(default: the model's training patch, or the whole image if small)",
    )
    p.add_argument(
        "--overlap", type=float, default=0.5, help="tile overlap in [0, 1) (default 0.5)"
    )
    p.add_argument(
        "--slice-axis",
        type=int,
        choices=[0, 1, 2],
        default=0,
        help="a volume given to a 2D model is segmented slice by slice along this axis "
        "(default 0, the first array axis; NIfTI volumes are read in (k, j, i) order)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs of an earlier prosma predict run (never other files)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no per-file lines")
    p.add_argument(  # DICOM (issue 17)
        "--format",
        choices=["auto", "dicom-seg"],
        default="auto",
        help="labels format: auto (like the input; NIfTI for DICOM volumes) or dicom-seg (a "
        "DICOM Segmentation referencing the source series; DICOM input only)",
    )
    return p


def _manifest() -> str:
    from .outputs import MANIFEST

    return MANIFEST


def gates_summary(result: Any, warnings: list[str] | None = None) -> dict[str, Any]:
    """The gate numbers of a segmentation (a ``SegResult`` or a ``Prediction``) as
    JSON-ready data, with the per-slice sparsity of a volume segmented slice by slice and
    the gate-drift warnings."""

    def lst(a: Any) -> Any:
        return None if a is None else [round(float(v), 6) for v in a]

    stages = []
    for g in result.gates:
        entry = {
            "stage": g.stage,
            "scale": g.scale,
            "zero_frac_mean": g.zero_frac_mean,
            "zero_frac": lst(g.zero_frac),
            "c": lst(g.c),
            "lambda": lst(g.lam),
        }
        per_slice = getattr(g, "zero_frac_slices", None)
        if per_slice is not None:
            entry["zero_frac_mean_per_slice"] = lst(per_slice)
        stages.append(entry)
    return {"stages": stages, "warnings": list(warnings or [])}


def run(args: argparse.Namespace) -> int:
    from ..inference import resolve_device
    from ..models import resolve_model
    from . import UserError
    from .devices import Claims, make_workers, parse_devices, run_jobs
    from .outputs import output_format, refuse_outputs_over_inputs

    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be at least 0 and below 1, got {args.overlap}")
    if getattr(args, "devices", None):
        devices = parse_devices(args.devices, args.quiet)
    else:
        devices = [resolve_device(args.device)]  # fail once, early, on a missing GPU
    if args.model is None:
        from ..checkpoint import list_bundled

        if not list_bundled():
            raise UserError(
                "no bundled models are installed in this version; pass --model with a "
                "checkpoint path"
            )
    else:
        resolve_model(args.model, args.store)  # a model that does not exist: one line, early
    out_root = Path(args.output).expanduser()
    if out_root.exists() and not out_root.is_dir():
        raise UserError(f"the output {out_root} exists and is not a folder")
    files = _inputs(args)
    plans = [
        (src, output_paths(src, output_format(src), out_root / rel, **_wanted(args)))
        for src, rel in files
    ]
    refuse_outputs_over_inputs(plans)
    workers = make_workers(devices, args.model, args.store, Claims(plans))
    jobs = [(i, src, paths) for i, (src, paths) in enumerate(plans)]
    failed = run_jobs(jobs, workers, lambda job, w: _segment_file(*job, w, args))
    n = len(files)
    if failed:
        if n > 1:  # one file: its own line said it all
            print(
                f"prosma predict: {failed} of {n} file(s) failed; the others were written",
                file=sys.stderr,
            )
        return 1
    if not args.quiet:
        print(f"done: {n} file(s) segmented into {_p(out_root)}")
    return 0


def _wanted(args: argparse.Namespace) -> dict[str, bool]:
    return {
        "probabilities": args.probabilities,
        "tta": args.tta,
        "gates": args.gates,
        "dicom_seg": getattr(args, "format", "auto") == "dicom-seg",
    }


def _p(text: Any) -> str:
    from .text import printable

    return printable(text)


def _inputs(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """The files to segment; earlier outputs among the inputs are skipped and said."""
    from . import UserError
    from .outputs import MANIFEST, collect_inputs

    found = collect_inputs(args.inputs)
    n_skipped = sum(len(v) for v in found.skipped.values())
    if not args.quiet:
        for folder, skipped in found.skipped.items():
            print(
                f"note: skipped {len(skipped)} file(s) in {_p(folder)} that an earlier "
                f"prosma predict wrote (listed in its {MANIFEST})"
            )
    if not found.files:
        if n_skipped:
            raise UserError(
                f"no image files to segment: the {n_skipped} file(s) found are outputs of an "
                "earlier prosma predict run"
            )
        raise UserError("no image files found in the given input(s)")
    return found.files


def _segment_file(
    index: int, src: Path, paths: dict[str, Path], w: Any, args: argparse.Namespace
) -> bool:
    """Segment input ``index`` (``src``) with worker ``w`` (a :class:`.devices.Worker`)
    and write its outputs; on failure, one line on stderr and none of its outputs left
    behind. Returns whether it succeeded."""
    from ..dicom.predict import output_format, read_input
    from ..errors import Cancelled, user_message
    from ..inference.gates import sparsity_warnings
    from ..io import read_image
    from . import UserError
    from .devices import PRINT_LOCK
    from .outputs import record_outputs, refuse_existing
    from .progress import Progress

    written: list[Path] = []
    t0 = time.perf_counter()
    progress = Progress(_p(src.name), w.unit, quiet=args.quiet, stream=w.progress_stream)
    try:
        img = read_input(src) if hasattr(src, "series") else read_image(src)
        output_format(img, getattr(args, "format", "auto"))  # dicom-seg needs DICOM input
        name, model, card = w.models.get(img.kind)
        plan = _plan(src, img, card, args.slice_axis)
        if w.claims.taken(index, paths):  # same stem twice in this run
            raise UserError(f"another input already writes {paths['labels'].name}; rename one")
        refuse_existing(paths, args.overwrite)
        res = _run(plan, model, card, args, progress, w)
        progress.close()
        warnings = sparsity_warnings(card.gate_sparsity_range, res.gates)
        seg_card = card if getattr(args, "format", "auto") == "dicom-seg" else None
        _write_outputs(paths, res, img, name, src, warnings, args.overwrite, written, seg_card)
        if w.stop.is_set():  # interrupted while writing (another worker's thread got it)
            raise Cancelled()
        record_outputs(paths["labels"].parent, written, src, str(name))
    except KeyboardInterrupt:
        progress.close()
        _remove(written)
        raise
    except Exception as e:
        progress.close()
        _remove(written)
        with PRINT_LOCK:
            print(f"prosma predict: {_p(src)}: {_p(user_message(e))}", file=sys.stderr)
        return False
    with PRINT_LOCK:
        _report(src, img, name, res, paths, time.perf_counter() - t0, args.quiet, warnings)
    return True


def _plan(src: Path, img: Any, card: Any, slice_axis: int) -> Any:
    """What to segment in a file: the whole image or volume, or a volume slice by slice
    with a 2D model (the same plan the Segment widget makes for a layer)."""
    from ..inference.plan import plan_input

    volume = img.kind == "volume"
    return plan_input(
        img.data,
        rgb=img.kind == "rgb",
        spatial_dims=card.spatial_dims,
        slice_axis=slice_axis,
        spacing=img.spacing if volume else None,
        what=src.name,
    )


def _run(plan: Any, model: Any, card: Any, args: argparse.Namespace, progress: Any, w: Any) -> Any:
    """Run the engine on ``plan`` on worker ``w``'s device (its stop flag cancels); the
    gates' numbers are always computed (for the drift warning), their maps only with
    ``--gates``."""
    from ..inference.plan import run_segmentation

    return run_segmentation(
        plan,
        model,
        card,
        device=w.device,
        tta=args.tta,
        probabilities=args.probabilities,
        gates=True if args.gates else "stats",
        progress=progress,
        cancel=w.stop,
        tile_size=args.tile_size,
        overlap=args.overlap,
    )


def _write_outputs(
    paths: dict[str, Path],
    res: Any,
    img: Any,
    name: str,
    src: Path,
    warnings: list[str],
    ow: bool,
    written: list[Path],
    seg_card: Any = None,
) -> None:
    """Write the labels and the maps asked for, appending each file to ``written`` as
    soon as it is on disk (so that a failure can remove them). With ``seg_card`` (the
    model's card) the labels are a DICOM Segmentation of the source series."""
    import numpy as np

    from ..io import atomic_write, write_image, write_labels

    if seg_card is not None:
        from ..dicom import write_seg

        written.append(write_seg(paths["labels"], res.labels, img, seg_card, overwrite=ow))
    else:
        written.append(write_labels(paths["labels"], res.labels, img, overwrite=ow))
    if "probabilities" in paths:
        written.append(write_image(paths["probabilities"], res.probabilities, img, overwrite=ow))
    if "uncertainty" in paths:
        written.append(write_image(paths["uncertainty"], res.uncertainty, img, overwrite=ow))
    if "gates_json" in paths:
        psi = [g.psi for g in res.gates if g.psi is not None]
        zero = [g.zero_map for g in res.gates if g.zero_map is not None]
        if psi:
            written.append(write_image(paths["gates_psi"], np.stack(psi), img, overwrite=ow))
        if zero:
            written.append(write_image(paths["gates_zero"], np.stack(zero), img, overwrite=ow))
        summary = {"model": name, "image": str(src), **gates_summary(res, warnings)}
        text = json.dumps(summary, indent=1)
        written.append(
            atomic_write(paths["gates_json"], lambda t: t.write_text(text + "\n"), overwrite=ow)
        )


def _report(
    src: Path,
    img: Any,
    name: str,
    res: Any,
    paths: dict[str, Path],
    secs: float,
    quiet: bool,
    warnings: list[str],
) -> None:
    """The file's result line and its notes (on stderr under ``-q``); gate-drift warnings
    always, on stderr."""
    shape = "×".join(str(s) for s in img.data.shape)
    how = f", {res.plan.describe()}" if res.plan.mode == "slices" else ""
    if not quiet:
        print(
            f"{_p(src.name)}: {shape} {img.kind}{how}, model {_p(name)}, {res.device}, "
            f"{secs:.2f} s -> {_p(paths['labels'])}"
        )
    for note in img.warnings + res.notes:
        if quiet:
            print(f"{_p(src.name)}: note: {_p(note)}", file=sys.stderr)
        else:
            print(f"  note: {_p(note)}")
    for w in warnings:
        print(f"prosma predict: {_p(src.name)}: warning: {_p(w)}", file=sys.stderr)


def _remove(paths: list[Path]) -> None:
    """Remove the outputs written for a file that then failed (they are this run's own)."""
    for p in paths:
        p.unlink(missing_ok=True)
