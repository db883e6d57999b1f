"""``prosma predict INPUT... -o OUT``: segment image files or folders of them.

Labels are written with the input's geometry (NIfTI affine and header, TIFF resolution);
probabilities, uncertainty and gate maps optionally beside them (NIfTI for NIfTI input,
TIFF otherwise). A file that fails is reported in one line on stderr and skipped; the exit
code is 0 only if every file succeeded. Writes are atomic and never overwrite existing
files unless ``--overwrite``; the outputs of a file that failed half-way are removed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="segment images or volumes with a model",
        description="Segment PNG/JPEG/TIFF/NIfTI files (or folders of them, one level deep) "
        "and write label maps with the input's geometry into OUT.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="bundled model name or checkpoint path (default: the bundled model that suits "
        "each image: colour, greyscale or 3D)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
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
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(  # DICOM (issue 17)
        "--format",
        choices=["auto", "dicom-seg"],
        default="auto",
        help="labels format: auto (like the input; NIfTI for DICOM volumes) or dicom-seg (a "
        "DICOM Segmentation referencing the source series; DICOM input only)",
    )
    return p


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """Expand files and folders (one level of sub-folders) into ``(file, relative_dir)``.

    Files named explicitly are kept whatever their suffix (a wrong one is reported later);
    inside folders only supported image files are taken, hidden files skipped.
    """
    from ..dicom.predict import is_dicom_input, series_inputs
    from ..io import is_supported

    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if is_dicom_input(p, nested=False):  # a DICOM file or folder: one input per series
            found += [(s, Path()) for s in series_inputs(p)]
            continue
        if not p.is_dir():
            found.append((p, Path()))
            continue
        for child in sorted(p.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_file() and is_supported(child):
                found.append((child, Path()))
            elif child.is_dir() and is_dicom_input(child):
                found += [(s, Path(child.name)) for s in series_inputs(child)]
            elif child.is_dir():
                found += [
                    (f, Path(child.name))
                    for f in sorted(child.iterdir())
                    if f.is_file() and not f.name.startswith(".") and is_supported(f)
                ]
    return found


def output_paths(
    src: Path, kind_fmt: str | None, out_dir: Path, args: argparse.Namespace, n_stages: int = 0
) -> dict[str, Path]:
    """Where the outputs of ``src`` go: labels always, the rest when asked for."""
    from ..io import stem_of

    stem = stem_of(src)
    nifti = kind_fmt == "nifti"
    lab_ext = ".nii.gz" if nifti else (".tif" if kind_fmt == "tiff" else ".png")
    map_ext = ".nii.gz" if nifti else ".tif"
    paths = {"labels": out_dir / f"{stem}_labels{lab_ext}"}
    if getattr(args, "format", "auto") == "dicom-seg":
        paths["labels"] = out_dir / f"{stem}_seg.dcm"
    if args.probabilities:
        paths["probabilities"] = out_dir / f"{stem}_probabilities{map_ext}"
    if args.tta:
        paths["uncertainty"] = out_dir / f"{stem}_uncertainty{map_ext}"
    if args.gates:
        paths["gates_psi"] = out_dir / f"{stem}_gates_psi{map_ext}"
        paths["gates_zero"] = out_dir / f"{stem}_gates_zero{map_ext}"
        paths["gates_json"] = out_dir / f"{stem}_gates.json"
    return paths


def gates_summary(pred: Any) -> dict[str, Any]:
    """The gate numbers of a prediction as JSON-ready data."""

    def lst(a: Any) -> Any:
        return None if a is None else [round(float(v), 6) for v in a]

    return {
        "stages": [
            {
                "stage": g.stage,
                "scale": g.scale,
                "zero_frac_mean": g.zero_frac_mean,
                "zero_frac": lst(g.zero_frac),
                "c": lst(g.c),
                "lambda": lst(g.lam),
            }
            for g in pred.gates
        ]
    }


def check_fit(src: Path, kind: str, spatial_dims: int) -> None:
    """Refuse a file whose kind the model cannot segment (the engine alone cannot tell an
    ``(H, W, 3)`` photo from a 3-slice volume, nor a 3-slice volume from channels).

    Raises:
        UserError: a colour image for a 3D model, or a volume for a 2D model.
    """
    from . import UserError

    if kind == "rgb" and spatial_dims == 3:
        raise UserError(
            f"{src.name} is a 2D colour image but the model segments 3D volumes; "
            "choose a 2D model"
        )
    if kind == "volume" and spatial_dims == 2:
        raise UserError(
            f"{src.name} is a 3D volume but the model segments 2D images; choose a 3D model "
            "(or segment the slices in napari with the Segment widget)"
        )


class _Models:
    """Loads each model once; picks the bundled default per image kind when none is named."""

    def __init__(self, name: str | None, device: str):
        self.name, self.device = name, device
        self.cache: dict[str, Any] = {}

    def get(self, kind: str) -> tuple[str, Any, Any]:
        from ..inference import load_model
        from ..inference.bundled import default_model_name
        from . import UserError

        name = self.name or default_model_name(kind)
        if name is None:
            raise UserError(f"no bundled model suits a {kind} image; pass --model NAME_OR_PATH")
        if name not in self.cache:
            self.cache[name] = load_model(name, device="cpu")
        model, card = self.cache[name]
        return name, model, card


def run(args: argparse.Namespace) -> int:
    from ..dicom import write_seg
    from ..dicom.predict import output_format, read_input
    from ..errors import user_message
    from ..inference import predict, resolve_device
    from ..io import atomic_write, read_image, write_image, write_labels
    from . import UserError

    if not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be at least 0 and below 1, got {args.overlap}")
    resolve_device(args.device)  # fail once, early, on a missing GPU
    if args.model is None:
        from ..checkpoint import list_bundled

        if not list_bundled():
            raise UserError(
                "no bundled models are installed in this version; pass --model with a "
                "checkpoint path"
            )
    files = collect_inputs(args.inputs)
    if not files:
        raise UserError("no image files found in the given input(s)")
    out_root = Path(args.output).expanduser()
    if out_root.exists() and not out_root.is_dir():
        raise UserError(f"the output {out_root} exists and is not a folder")
    models = _Models(args.model, args.device)
    failed, planned = 0, set()
    for src, rel in files:
        written: list[Path] = []
        t0 = time.perf_counter()
        try:
            img = read_input(src) if hasattr(src, "series") else read_image(src)
            name, model, card = models.get(img.kind)
            check_fit(src, img.kind, card.spatial_dims)
            paths = output_paths(src, output_format(img, args.format), out_root / rel, args)
            if any(p in planned for p in paths.values()):  # same stem twice in this run
                raise UserError(f"another input already writes {paths['labels'].name}; rename one")
            planned.update(paths.values())
            if not args.overwrite:
                for p in paths.values():
                    if p.exists():
                        raise FileExistsError(
                            f"{p} exists already; it is never overwritten (use --overwrite)"
                        )
            pred = predict(
                img.data,
                model,
                card,
                spacing=img.spacing if img.kind == "volume" else None,
                device=args.device,
                tile_size=args.tile_size,
                overlap=args.overlap,
                tta=args.tta,
                return_probabilities=args.probabilities,
                return_gates=args.gates,
            )
            ow = args.overwrite
            if args.format == "dicom-seg":
                written.append(write_seg(paths["labels"], pred.labels, img, card, overwrite=ow))
            else:
                written.append(write_labels(paths["labels"], pred.labels, img, overwrite=ow))
            if "probabilities" in paths:
                written.append(
                    write_image(paths["probabilities"], pred.probabilities, img, overwrite=ow)
                )
            if "uncertainty" in paths:
                written.append(
                    write_image(paths["uncertainty"], pred.uncertainty, img, overwrite=ow)
                )
            if "gates_json" in paths:
                import numpy as np

                psi = [g.psi for g in pred.gates if g.psi is not None]
                zero = [g.zero_map for g in pred.gates if g.zero_map is not None]
                if psi:
                    written.append(
                        write_image(paths["gates_psi"], np.stack(psi), img, overwrite=ow)
                    )
                if zero:
                    written.append(
                        write_image(paths["gates_zero"], np.stack(zero), img, overwrite=ow)
                    )
                text = json.dumps(
                    {"model": name, "image": str(src), **gates_summary(pred)}, indent=1
                )
                written.append(
                    atomic_write(
                        paths["gates_json"],
                        lambda t, text=text: t.write_text(text + "\n"),
                        overwrite=ow,
                    )
                )
        except KeyboardInterrupt:
            _remove(written)
            raise
        except Exception as e:
            _remove(written)
            failed += 1
            print(f"prosma predict: {src}: {user_message(e)}", file=sys.stderr)
            continue
        shape = "×".join(str(s) for s in img.data.shape)
        secs = time.perf_counter() - t0
        print(
            f"{src.name}: {shape} {img.kind}, model {name}, {pred.device}, {secs:.2f} s "
            f"-> {paths['labels']}"
        )
        for note in img.warnings + pred.notes:
            print(f"  note: {note}")
    n = len(files)
    if failed:
        if n > 1:  # one file: its own line said it all
            print(
                f"prosma predict: {failed} of {n} file(s) failed; the others were written",
                file=sys.stderr,
            )
        return 1
    print(f"done: {n} file(s) segmented into {out_root}")
    return 0


def _remove(paths: list[Path]) -> None:
    """Remove the outputs written for a file that then failed (they are this run's own)."""
    for p in paths:
        p.unlink(missing_ok=True)
