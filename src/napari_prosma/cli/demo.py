"""``prosma demo [-o OUT]``: segment a bundled sample with the bundled default model, write
the result, and print the Dice against the sample's manual ground truth.

The default model is the first of :data:`DEMO_MODELS` that is bundled. Where none is (a
fresh checkout before the trained models land), a freshly initialised ProSMA-UNet is used
and the output says plainly that its weights are untrained and its Dice meaningless.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Bundled models the demo tries, in order, with the sample each one segments.
DEMO_MODELS = {"kvasir_prosma": "kvasir_polyp", "busi_prosma": "busi_benign"}
DEFAULT_OUT = "prosma-demo-output"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="segment a bundled sample with the default model (the README's main job)",
        description="Segment a bundled sample image with the bundled default model, write the "
        "labels and an overlay picture, and print the Dice against the sample's manual "
        "ground truth.",
    )
    p.add_argument(
        "-o",
        "--output",
        default=f"./{DEFAULT_OUT}/",
        metavar="OUT",
        help=f"output folder (default ./{DEFAULT_OUT}/)",
    )
    p.add_argument(
        "--model",
        choices=list(DEMO_MODELS),
        help="bundled model to run on its sample (default: the first of these that is bundled)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    return p


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of the foreground (label > 0 in both; mean over classes when there are several).

    Returns 1.0 when both are empty.
    """
    classes = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {0})
    if not classes:
        return 1.0
    scores = []
    for c in classes:
        a, b = pred == c, truth == c
        denom = a.sum() + b.sum()
        scores.append(1.0 if denom == 0 else 2.0 * np.logical_and(a, b).sum() / denom)
    return float(np.mean(scores))


def free_path(path: Path) -> Path:
    """``path``, or ``name-2.ext``, ``name-3.ext``, ... if it exists (never overwrites)."""
    from ..io import stem_of, suffix_of

    n = 2
    out = path
    while out.exists():
        out = path.with_name(f"{stem_of(path)}-{n}{suffix_of(path)}")
        n += 1
    return out


def overlay(image: np.ndarray, labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB picture: the image with the prediction's outline in yellow, the truth's in cyan."""
    from scipy import ndimage

    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    rgb = rgb.astype(np.float32)
    lo, hi = float(rgb.min()), float(rgb.max())
    out = ((rgb - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    for mask, colour in ((truth > 0, (0, 255, 255)), (labels > 0, (255, 220, 0))):
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        out[edge] = colour
    return out


def untrained_model() -> tuple[Any, Any]:
    """A freshly initialised small RGB ProSMA-UNet and a card that says it is untrained."""
    import torch

    from ..checkpoint import ModelCard
    from ..nets import build_model

    kwargs = {"spatial_dims": 2, "in_channels": 3, "out_channels": 1, "widths": "small"}
    torch.manual_seed(0)
    model = build_model("prosma_unet", **kwargs).eval()
    card = ModelCard(
        architecture="prosma_unet",
        arch_kwargs=kwargs,
        name="untrained ProSMA-UNet",
        class_names=["background", "polyp"],
        normalization={
            "mode": "fixed",
            "scale": 255.0,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        intended_use="none: random weights, for checking that the pipeline runs",
    )
    return model, card


def gate_lines(gates: list[Any]) -> list[str]:
    """What each stage's skip really passes: the mean of psi·c (the factor x is multiplied
    by, averaged over locations and channels), where it passes exactly nothing, and the
    exact zeros of the gate field z* beside them."""
    lines = []
    for g in gates:
        if g.psi is None and g.c is None:
            continue
        psi = np.asarray(g.psi, dtype=np.float64) if g.psi is not None else None
        c = float(np.mean(g.c)) if g.c is not None else 1.0
        passes = (float(psi.mean()) if psi is not None else 1.0) * c
        removed = float((psi == 0).mean()) if psi is not None else 0.0
        z = (
            f"; z* exactly zero {100 * g.zero_frac_mean:.0f}%"
            if g.zero_frac_mean is not None
            else ""
        )
        lines.append(
            f"  Skip stage {g.stage}: passes on average {passes:.2f} of x (psi·c), exactly "
            f"nothing at {100 * removed:.0f}% of locations{z}"
        )
    return lines


def distribution_lines(card: Any, score: float) -> list[str]:
    """The model's test-set Dice distribution (from its card) beside the demo's one frame."""
    from ..metrics import percentile_of

    dist = ((card.metrics or {}).get("test") or {}).get("distribution")
    if not dist:
        return ["  (the model card records no test-set distribution to compare this frame with)"]
    at = percentile_of(score, dist["dice_sorted"])
    return [
        f"  This one frame is not the model's accuracy: on its {dist['n']} held-out test images "
        f"the {dist['class']} Dice was mean {dist['mean']:.3f}, median {dist['median']:.3f}, "
        f"5th-95th percentile {dist['p05']:.3f}-{dist['p95']:.3f};",
        f"  it missed completely (Dice 0) on {dist['dice_0']:.1%} and scored below 0.5 on "
        f"{dist['dice_below_0.5']:.1%}. This frame's {score:.3f} sits at percentile {at:.0f} of "
        "them.",
    ]


def run(args: argparse.Namespace) -> int:
    from .._samples import SAMPLES, load_sample
    from ..checkpoint import list_bundled
    from ..inference import load_model, predict
    from ..io import write_image, write_labels

    t0 = time.perf_counter()
    bundled = list_bundled()
    wanted = [args.model] if getattr(args, "model", None) else list(DEMO_MODELS)
    name = next((n for n in wanted if n in bundled), None)
    if getattr(args, "model", None) and name is None:
        print(f"error: model {args.model} is not bundled in this installation", file=sys.stderr)
        return 2
    if name is not None:
        model, card = load_model(name, device="cpu")
        sample = DEMO_MODELS[name]
        trained = True
    else:
        model, card = untrained_model()
        sample = "kvasir_polyp"
        trained = False
        print("WARNING: no trained model is bundled in this installation yet, so the demo uses")
        print("         an UNTRAINED ProSMA-UNet with random weights. Its segmentation and the")
        print("         Dice below are MEANINGLESS; they only show that the pipeline runs.")
    info = SAMPLES[sample]
    image, truth = load_sample(sample)
    pred = predict(image.data, model, card, device=args.device, return_gates=True)
    score = dice(pred.labels, truth)

    out_dir = Path(args.output).expanduser()
    lab_path = write_labels(free_path(out_dir / f"{sample}_labels.png"), pred.labels, image)
    ov_path = write_image(
        free_path(out_dir / f"{sample}_overlay.png"), overlay(image.data, pred.labels, truth)
    )
    shape = "×".join(map(str, image.data.shape))
    what = f"model {name}" if trained else "an untrained ProSMA-UNet (random weights)"
    print(f"Segmented the bundled sample '{info.title}' ({shape}, {image.kind}) with {what}")
    print(
        f"  on {pred.device} in {pred.timings['total']:.2f} s "
        f"(whole demo {time.perf_counter() - t0:.1f} s)."
    )
    for note in pred.notes:
        print(f"  note: {note}")
    for line in gate_lines(pred.gates):
        print(line)
    fg = info.class_names[1] if len(info.class_names) > 1 else "foreground"
    suffix = "" if trained else "   <- MEANINGLESS: untrained weights"
    print(f"Dice against the sample's manual ground truth ({fg}): {score:.3f}{suffix}")
    for line in distribution_lines(card, score) if trained else []:
        print(line)
    print(f"Labels:  {lab_path}")
    print(f"Overlay: {ov_path}  (yellow = model, cyan = ground truth)")
    return 0
