"""A bioimage.io model package (format 0.5) of a plugin model, validated before it is kept.

Contents: ``rdf.yaml`` (axes, pre/post-processing from the card's normalisation and class
count, licence, citations), ``README.md`` (intended use, limits, input constraints, training
data and metrics from the card), ``cover.png``, a test input and output (a bundled sample
and the plugin's own probabilities on it), the network source (``prosma_unet.py``) with the
weights as ``pytorch_state_dict`` and the same network traced as TorchScript.

The package is built in a hidden folder beside the output, tested with
``bioimageio.core.test_model`` (every weight format reproduces the test output), and only
then renamed into place. Everything is local: no file is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..preprocess import InputError
from ._common import (
    architecture_source,
    cover_image,
    reference_output,
    sample_input,
    trace,
)

PAPER = (
    "Cheng, Cheng, Jing, Yang, Montoya-Zegarra, Schönlieb, Aviles-Rivero. ProSMA-UNet: "
    "Decoder Conditioning for Proximal-Sparse Skip Feature Selection.",
    "https://math-ml-x.github.io/ProSMA-UNet/",
)
DEFAULT_LICENSE = "BSD-3-Clause"  # the plugin's, under which the bundled weights ship


def _ident(text: str, fallback: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in str(text)).strip("_")
    return out if out and out[0].isalpha() else fallback


def preprocessing(card: Any, channels: int, spatial: list[str]) -> list[Any]:
    """bioimage.io steps equal to the card's normalisation (:mod:`napari_prosma.preprocess`).

    Raises:
        InputError: a normalisation bioimage.io cannot express (z-score over non-zero voxels).
    """
    from bioimageio.spec.model import v0_5 as b

    spec = dict(card.normalization or {"mode": "none"})
    mode = spec.get("mode", "none")
    steps: list[Any] = [b.EnsureDtypeDescr(kwargs=b.EnsureDtypeKwargs(dtype="float32"))]
    axes = [b.AxisId(a) for a in spatial]
    if mode == "fixed":
        scale = float(spec.get("scale", 255.0))
        mean = np.broadcast_to(np.asarray(spec.get("mean", 0.0), float), (channels,))
        std = np.broadcast_to(np.asarray(spec.get("std", 1.0), float), (channels,))
        steps.append(_linear(list(1.0 / (scale * std)), list(-mean / std)))
    elif mode == "zscore":
        if spec.get("nonzero"):
            raise InputError(
                "this model's z-score over non-zero voxels has no bioimage.io "
                "equivalent; it cannot be exported"
            )
        steps.append(
            b.ZeroMeanUnitVarianceDescr(kwargs=b.ZeroMeanUnitVarianceKwargs(axes=axes, eps=1e-6))
        )
    elif mode == "ct_window":
        lo, hi = (float(v) for v in spec.get("window", (-1000.0, 1000.0)))
        steps.append(b.ClipDescr(kwargs=b.ClipKwargs(min=lo, max=hi)))
        steps.append(_linear([1.0 / (hi - lo)] * channels, [-lo / (hi - lo)] * channels))
    elif mode == "percentile":
        steps.append(
            b.ScaleRangeDescr(
                kwargs=b.ScaleRangeKwargs(
                    axes=axes,
                    min_percentile=float(spec.get("lower", 0.5)),
                    max_percentile=float(spec.get("upper", 99.5)),
                )
            )
        )
        steps.append(b.ClipDescr(kwargs=b.ClipKwargs(min=0.0, max=1.0)))
    elif mode != "none":
        raise InputError(f"unknown normalisation {mode!r}; it cannot be exported")
    return steps


def _linear(gain: list[float], offset: list[float]) -> Any:
    from bioimageio.spec.model import v0_5 as b

    if len(gain) == 1:
        return b.ScaleLinearDescr(kwargs=b.ScaleLinearKwargs(gain=gain[0], offset=offset[0]))
    return b.ScaleLinearDescr(
        kwargs=b.ScaleLinearAlongAxisKwargs(axis=b.AxisId("channel"), gain=gain, offset=offset)
    )


def _tensors(
    card: Any, net: Any, raw: np.ndarray, prob: np.ndarray, where: Path
) -> tuple[Any, Any]:
    from bioimageio.spec.model import v0_5 as b

    spatial = ["z", "y", "x"][-card.spatial_dims :]
    fixed = (card.extra or {}).get("input_size")
    in_sizes = (
        [int(s) for s in fixed]
        if fixed
        else [b.ParameterizedSize(min=int(net.min_size), step=int(net.divisor))] * len(spatial)
    )
    np.save(where / "test_input.npy", raw[None].astype(np.float32))
    np.save(where / "test_output.npy", prob)
    c_in = raw.shape[0]
    in_names = ["R", "G", "B"] if c_in == 3 else [f"c{i}" for i in range(c_in)]
    names = list(card.class_names or [])
    n_out = prob.shape[1]
    out_names = [
        _ident(names[i + (1 if n_out == 1 else 0)] if len(names) > i else "", f"class{i}")
        for i in range(n_out)
    ]
    inp = b.InputTensorDescr(
        id=b.TensorId("raw"),
        description="raw image values (the card's normalisation is the preprocessing)",
        axes=[b.BatchAxis(), b.ChannelAxis(channel_names=[b.Identifier(n) for n in in_names])]
        + [b.SpaceInputAxis(id=b.AxisId(a), size=s) for a, s in zip(spatial, in_sizes)],
        test_tensor=b.FileDescr(source=where / "test_input.npy"),
        preprocessing=preprocessing(card, c_in, spatial),
    )
    post = (
        b.SigmoidDescr()
        if n_out == 1
        else b.SoftmaxDescr(kwargs=b.SoftmaxKwargs(axis=b.AxisId("channel")))
    )
    out = b.OutputTensorDescr(
        id=b.TensorId("probabilities"),
        description="class probabilities",
        axes=[b.BatchAxis(), b.ChannelAxis(channel_names=[b.Identifier(n) for n in out_names])]
        + [
            b.SpaceOutputAxis(
                id=b.AxisId(a),
                size=b.SizeReference(tensor_id=b.TensorId("raw"), axis_id=b.AxisId(a)),
            )
            for a in spatial
        ],
        test_tensor=b.FileDescr(source=where / "test_output.npy"),
        postprocessing=[post],
    )
    return inp, out


def _weights(card: Any, net: Any, x: np.ndarray, where: Path) -> Any:
    import torch
    from bioimageio.spec.model import v0_5 as b

    (where / "prosma_unet.py").write_text(architecture_source(), encoding="utf-8")
    torch.save(net.state_dict(), where / "weights.pt")
    trace(net, x).save(str(where / "weights_torchscript.pt"))
    version = b.Version(torch.__version__.split("+")[0])
    kwargs = json.loads(json.dumps({"arch": card.architecture, **card.arch_kwargs}))
    arch = b.ArchitectureFromFileDescr(
        source=where / "prosma_unet.py", callable=b.Identifier("build_model"), kwargs=kwargs
    )
    return b.WeightsDescr(
        pytorch_state_dict=b.PytorchStateDictWeightsDescr(
            source=where / "weights.pt", architecture=arch, pytorch_version=version
        ),
        torchscript=b.TorchscriptWeightsDescr(
            source=where / "weights_torchscript.pt",
            pytorch_version=version,
            parent="pytorch_state_dict",
        ),
    )


def _readme(card: Any, net: Any, license_id: str) -> str:
    test = (card.metrics or {}).get("test", {})
    fixed = (card.extra or {}).get("input_size")
    size = (
        f"exactly {'×'.join(map(str, fixed))} (resize the whole image to it, and the labels back)"
        if fixed
        else f"any multiple of {net.divisor} per spatial axis, at least {net.min_size}"
    )
    lines = [
        f"# {card.name} (ProSMA-UNet)",
        "",
        f"Exported by napari-prosma {__version__} (`prosma export`). Weights sha256 "
        f"`{card.weights_sha256}`.",
        "",
        "## Intended use",
        "",
        card.intended_use or "(not stated)",
        "",
        "## Limitations",
        "",
        card.limitations or "(not stated)",
        "",
        "## Input",
        "",
        f"- spatial size: {size}",
        f"- voxel spacing the model was trained at: {card.spacing or 'as acquired (2D)'} mm",
        f"- normalisation (the package's preprocessing): `{json.dumps(card.normalization)}`",
        f"- output: probabilities of {', '.join(card.class_names or ['foreground'])}",
        "",
        "## Training and evaluation",
        "",
        f"- data: {(card.training or {}).get('data', '(not stated)')}",
        f"- test Dice (mean over cases): {test.get('dice_mean', 'n/a')}",
        "",
        "## Licence and data terms",
        "",
        f"Package licence: {license_id}. The weights were trained on public data whose own "
        "terms apply to their use (see the training data above and its citation).",
        "",
    ]
    return "\n".join(lines)


def build_package(net: Any, card: Any, where: Path, license_id: str | None = None) -> Any:
    """Write the package files into ``where`` and return their bioimage.io description."""
    from bioimageio.spec.generic.v0_3 import Author, CiteEntry
    from bioimageio.spec.model import v0_5 as b

    license_id = license_id or (card.extra or {}).get("license") or DEFAULT_LICENSE
    raw = sample_input(card, net)
    x, prob = reference_output(net, card, raw)
    inp, out = _tensors(card, net, raw, prob, where)
    cover_image(raw, prob, where / "cover.png")
    (where / "README.md").write_text(_readme(card, net, license_id), encoding="utf-8")
    dims = f"{card.spatial_dims}d"
    return b.ModelDescr(
        name=f"ProSMA-UNet {card.name}"[:128],
        description=(card.intended_use or f"ProSMA-UNet segmentation ({card.name})")[:1024],
        authors=[Author(name="napari-prosma developers")],
        cite=[CiteEntry(text=PAPER[0], url=PAPER[1])],
        license=license_id,
        documentation=b.FileDescr(source=where / "README.md"),
        covers=[b.FileDescr(source=where / "cover.png")],
        inputs=[inp],
        outputs=[out],
        weights=_weights(card, net, x, where),
        tags=["segmentation", "prosma-unet", "napari-prosma", dims],
        version=b.Version("1.0.0"),
    )


def write_bioimageio(
    net: Any, card: Any, out: Path, license_id: str | None = None, check: bool = True
) -> list[str]:
    """Build, save and (by default) test the package in ``out`` (a folder being made).

    Returns:
        Notes: the test outcome per weight format.

    Raises:
        InputError: the model cannot be described, or the package fails its own test.
    """
    import shutil

    from bioimageio.spec import save_bioimageio_package_as_folder

    staging = out / ".staging"
    staging.mkdir()
    descr = build_package(net, card, staging, license_id)
    save_bioimageio_package_as_folder(descr, output_path=out)
    shutil.rmtree(staging)
    return validate(out / "rdf.yaml") if check else ["not tested (--no-check)"]


def validate(rdf: Path) -> list[str]:
    """Test a package offline with bioimageio.core (format and reproduced test output).

    Raises:
        InputError: the first failure, in bioimageio's words.
    """
    from bioimageio.core import test_model

    summary = test_model(rdf)
    if summary.status != "passed":
        errors = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
        raise InputError(
            "the bioimage.io package failed its own test: "
            + (errors[0] if errors else summary.status)
        )
    formats = [
        str(d.name).rsplit("(", 1)[-1].rstrip(")")
        for d in summary.details
        if str(d.name).startswith("Reproduce test outputs")
    ]
    return [
        f"bioimageio.core test_model passed ({len(summary.details)} checks): test output "
        f"reproduced with {', '.join(formats)}"
    ]
