"""The network as ONNX (logits; the card beside it says how to prepare the input).

Exported with torch's TorchScript-based exporter (``dynamo=False``: the newer exporter needs
onnxscript, which is not a dependency), batch and spatial sizes dynamic, checked with
``onnx.checker`` (full check) and, when onnxruntime is installed, run on the test input and
compared with the plugin's own logits.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..preprocess import InputError
from ._common import reference_output, sample_input

OPSET = 17
#: Largest |ONNX - torch| difference of the logits accepted (float32 CPU kernels differ).
ATOL = 1e-3


def write_onnx(net: Any, card: Any, out: Path) -> list[str]:
    """Write ``out/NAME.onnx`` and ``out/NAME.json`` (the card); return notes.

    Raises:
        InputError: the network does not export, or the exported graph fails its checks.
    """
    import onnx
    import torch

    raw = sample_input(card, net)
    x, _ = reference_output(net, card, raw)
    path = out / f"{card.name}.onnx"
    dims = {0: "batch", **{i + 2: f"s{i}" for i in range(card.spatial_dims)}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (torch.from_numpy(x),),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": dims, "logits": dims},
            )
    except Exception as e:
        raise InputError(
            f"this network does not export to ONNX ({type(e).__name__}: {e})"
        ) from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise InputError(f"the exported ONNX graph fails onnx.checker ({e})") from None
    (out / f"{card.name}.json").write_text(
        json.dumps(card.to_dict(), indent=1) + "\n", encoding="utf-8"
    )
    notes = [f"onnx.checker passed (opset {OPSET})"]
    return [*notes, _run_check(net, path, x)]


def _run_check(net: Any, path: Path, x: np.ndarray) -> str:
    """Run the ONNX graph with onnxruntime on ``x`` and compare with torch, if installed."""
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed: the graph was checked, not run"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= ATOL:
        raise InputError(f"the ONNX graph's logits differ from the network's by {diff:.3g}")
    return f"onnxruntime {ort.__version__} reproduces the logits (max |diff| {diff:.1e})"
