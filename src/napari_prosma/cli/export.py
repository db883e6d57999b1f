"""``prosma export MODEL --format bioimageio|onnx -o DIR``: a model others can run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export a model as a bioimage.io package or as ONNX",
        description="Write MODEL (a bundled name or a checkpoint) into the new folder DIR as a "
        "bioimage.io model package (rdf.yaml, test tensors, cover, weights as "
        "pytorch_state_dict + TorchScript; tested with bioimageio.core before it is kept) "
        "or as ONNX (checked with onnx.checker). Needs the 'export' extra.",
    )
    p.add_argument("model", metavar="MODEL", help="bundled model name or checkpoint path")
    p.add_argument("--format", required=True, choices=["bioimageio", "onnx"], dest="fmt")
    p.add_argument(
        "-o", "--output", required=True, metavar="DIR", help="folder to create (never overwritten)"
    )
    p.add_argument(
        "--license",
        dest="license_id",
        metavar="SPDX",
        help="licence of a bioimage.io package (default: the card's, else "
        "BSD-3-Clause, the plugin's)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="do not test the bioimage.io package with bioimageio.core",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from ..export import export_model

    result = export_model(
        args.model, args.fmt, args.output, license_id=args.license_id, check=not args.no_check
    )
    print(f"{args.model}: {args.fmt} export -> {result.path}")
    for note in result.notes:
        print(f"  {note}")
    return 0
