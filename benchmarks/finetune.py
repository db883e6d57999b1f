"""Fine-tuning on a user's corrections: adaptation cases from real data, before and after.

Each case (``--case``): a bundled parent model, a few "corrected" images (their
ground-truth masks stand for the user's corrections, as if every mistake had been fixed),
and other images never used in fine-tuning, to measure Dice before and after through the
project's inference engine. ``run_finetune`` holds out a quarter of the corrected images
for early stopping and the regression guard and trains on the rest, as the widget does.
Look-alike images stay on one side (BUSI: the groups of ``busi_groups.json``); nothing is
chosen on the images that judge: they are a fixed part of a split, in id order.

- ``own-worst`` (issue 20 case a): ``busi_prosma`` corrected on its own *worst* test
  images (lowest Dice of the parent on the test part of its leak-free split), judged on its
  other test images, every image of a corrected image's look-alike group left out.
- ``kvasir-glas`` (case b, a domain shift): ``kvasir_prosma`` (RGB colonoscopy) corrected
  on a seeded pick of the GlaS official *train* part (RGB histology), judged on GlaS testA;
  the fair baseline beside it is calling every pixel gland (GlaS glands fill half the
  image). Forgetting: Kvasir-SEG test images of the parent's split (its card).
- ``hippocampus-3d`` (case c): ``hippocampus_prosma`` (3D T1 MRI, anterior + posterior)
  corrected on a seeded pick of volumes of its test part, judged on the other test volumes
  (other patients).
- ``busi-hippocampus`` (an older domain shift): ``busi_prosma`` onto one hippocampus
  slice per volume (the largest hippocampus area; both classes as one).

Measured: the wall time of ``run_finetune`` (load, saving the corrections, training,
held-out checks, the whole-image report, saving the new version: what the user waits for)
with its CPU time and what else the machine was doing; mean per-image Dice (mean over the
classes present) on the judged images before and after, beside the all-foreground score;
the held-out Dice the engine reports and its curve; the Dice on the parent's own domain
before and after (forgetting, when the judged images are of another domain). One row per
``--trainable`` choice (the widget's default is ``decoder_gates``) and ``--replay`` mode
(``auto``, the widget's default: a quarter of every batch from 32 of the parent's own
training images; ``none``; or ``both``). The script runs on whatever model is bundled
under each name (or ``--model``), so it reruns unchanged when a model is replaced.

    python benchmarks/finetune.py                                  # CPU, cases a, b, c
    python benchmarks/finetune.py --case hippocampus-3d --trainable decoder_gates gates
    python benchmarks/finetune.py --device cuda --time-budget 15   # GPU

Writes ``benchmarks/results/finetune_<cpu|cuda>.json`` (``--out`` to change) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.checkpoint import (  # noqa: E402
    ModelCard,
    list_bundled,
    load,
    read_card,
    resolve,
    save,
)
from napari_prosma.finetune import FinetuneConfig, finetune, run_finetune  # noqa: E402
from napari_prosma.inference import predict_batch  # noqa: E402
from napari_prosma.metrics import dice  # noqa: E402
from napari_prosma.preprocess import InputError  # noqa: E402
from napari_prosma.versions import ModelStore  # noqa: E402

DATA = Path(os.environ.get("PROSMA_DATA", ROOT.parent / "shared" / "data"))
KVASIR_NORM = {
    "mode": "fixed",
    "scale": 255.0,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


# ---------------------------------------------------------------------------- data


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return (np.asarray(im.convert("L")) > 127).astype(np.uint8)


def glas(ids: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    root = DATA / "glas"
    return (
        [read_rgb(root / "images" / f"{i}.jpg") for i in ids],
        [read_mask(root / "masks" / f"{i}.png") for i in ids],
    )


def kvasir(ids: list[str], size: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Kvasir-SEG frames as a user has them (original size), or resized to ``size``."""
    from napari_prosma.datasets import resize_image, resize_mask

    root = DATA / "kvasir-seg"
    imgs = [read_rgb(root / "images" / f"{i}.jpg") for i in ids]
    masks = [read_mask(root / "masks" / f"{i}.jpg") for i in ids]
    if size:
        imgs = [resize_image(a, size) for a in imgs]
        masks = [resize_mask(m, size) for m in masks]
    return imgs, masks


def split(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "training" / "splits" / f"{name}.json").read_text())


# ---------------------------------------------------------------------------- models


def stand_in(seconds: float, device: str, folder: Path) -> Path:
    """A Kvasir-trained stand-in for ``kvasir_prosma`` (cached in ``folder``)."""
    import torch

    from napari_prosma.nets import build_model

    path = folder / f"kvasir_standin_{int(seconds)}s.safetensors"
    if path.exists():
        print(f"stand-in parent: {path} (cached)", file=sys.stderr)
        return path
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_model("prosma_unet", spatial_dims=2, in_channels=3, out_channels=1, widths="small")
    card = ModelCard(
        architecture="prosma_unet",
        arch_kwargs=dict(net.config),
        name="kvasir_prosma (stand-in)",
        class_names=["background", "polyp"],
        normalization=dict(KVASIR_NORM),
        patch_size=[256, 256],
        intended_use="Benchmark stand-in for kvasir_prosma until trained weights are bundled.",
        extra={"input_size": [256, 256]},
    )
    ids = split("kvasir_seed0")["train"][:200]
    print(
        f"training a stand-in on {len(ids)} Kvasir-SEG images for {seconds:.0f} s ...",
        file=sys.stderr,
    )
    imgs, masks = kvasir(ids, 256)
    cfg = FinetuneConfig(
        trainable="all",
        max_steps=10**6,
        time_budget_s=seconds,
        lr=1e-3,
        batch_size=4,
        patch_size=(256, 256),
        holdout_fraction=0.0,
        replay_fraction=0.0,
        device=device,
    )
    res = finetune(net, card, imgs, masks, config=cfg)
    card.training = {
        "stand_in": True,
        "data": "Kvasir-SEG train split seed 0, first 200",
        "steps": res.steps,
        "seconds": round(res.seconds, 1),
        "device": device,
    }
    save(res.model, path.with_suffix(""), card)
    print(f"stand-in parent: {path} ({res.steps} steps)", file=sys.stderr)
    return path


def image_dice(pred: np.ndarray, truth: np.ndarray, card: ModelCard) -> float:
    """Per-image Dice, the mean over the classes present in ``truth`` (binary models:
    foreground), as the engine's held-out Dice counts it; 1 for an image with nothing to
    find and nothing found, 0 when something was found there."""
    if card.out_channels == 1:
        pred, truth = pred > 0, truth > 0
        classes = [True]
    else:
        classes = range(1, card.out_channels)
    per = [dice(pred == c, truth == c) for c in classes if np.any(truth == c)]
    if not per:
        return 1.0 if not np.any(pred) else 0.0
    return float(np.mean(per))


def mean_dice(
    model: Any,
    card: ModelCard,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    device: str,
    batch: int = 8,
    spacing: list[Any] | None = None,
) -> list[float]:
    """Dice per image through the inference engine (same-shape 2D images batched; volumes
    one at a time at their spacing)."""
    from napari_prosma.inference import predict

    scores: dict[int, float] = {}
    if card.spatial_dims == 3:
        for k, (a, m) in enumerate(zip(images, masks)):
            sp = spacing[k] if spacing else None
            p = predict(a, model, card, device=device, spacing=sp)
            scores[k] = image_dice(p.labels, m, card)
        return [scores[k] for k in range(len(images))]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, a in enumerate(images):
        by_shape.setdefault(a.shape, []).append(k)
    for idx in by_shape.values():
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            preds = predict_batch([images[k] for k in part], model, card, device=device)
            for k, p in zip(part, preds):
                scores[k] = image_dice(p.labels, masks[k], card)
    return [scores[k] for k in range(len(images))]


def device_name(device: str) -> str:
    """The card's or CPU's name, as ``benchmarks/inference.py`` (beside this script) writes it."""
    import torch
    from inference import device_name as name

    return name(torch.device(device))


# ---------------------------------------------------------------------------- main


@dataclass
class Case:
    """One domain shift: a parent, the corrected images of the new domain, the images to
    evaluate on (new domain: target; parent's domain: source)."""

    name: str
    parent: str
    target: str
    source: str
    corrected_ids: list[str]
    train: tuple[list[np.ndarray], list[np.ndarray]]
    test: tuple[list[np.ndarray], list[np.ndarray]]
    source_test: tuple[list[np.ndarray], list[np.ndarray]]
    design: dict[str, Any] = field(default_factory=dict)
    train_spacing: list[Any] | None = None
    test_spacing: list[Any] | None = None


def parent_split(card: ModelCard, default: str) -> tuple[str, dict[str, Any]]:
    """The split file the parent's card names (``default`` for cards without one) and its
    content."""
    split_file = (card.training.get("split") or {}).get("file", default)
    return split_file, json.loads((ROOT / split_file).read_text())


def kvasir_glas(args: argparse.Namespace, rng: np.random.Generator) -> Case:
    """Kvasir-SEG polyps (RGB endoscopy) -> GlaS glands (RGB histology). With ``--judge
    val``, judged on images that are not test images (to choose settings on): the GlaS train
    images not corrected, and the parent's *validation* frames the forgetting guard does
    not measure."""
    gsplit = json.loads((DATA / "glas" / "split.json").read_text())
    train_ids = sorted(rng.choice(gsplit["train"], size=args.n_train, replace=False).tolist())
    spec = args.model or "kvasir_prosma"
    # the parent's own split (its card: session 9 reshipped kvasir_prosma on a leak-free
    # split, where the random seed-0 test part holds some of its training frames)
    card = read_card(resolve(spec))
    split_file, psplit = parent_split(card, "training/splits/kvasir_seed0.json")
    if args.judge == "val":
        from napari_prosma.finetune.replay import load_replay

        d = FinetuneConfig()
        rs = load_replay(
            card, "auto", n=d.replay_samples, seed=args.seed, n_guard=d.forgetting_guard
        )
        pool = sorted(set(gsplit["train"]) - set(train_ids), key=lambda s: int(s.split("_")[-1]))
        test_ids = pool[: args.n_eval]
        src_ids = [i for i in psplit.get("val", []) if i not in set(rs.guard_ids)]
        target, source = "GlaS train (not corrected)", "Kvasir-SEG val (not the guard's)"
    else:
        test_ids = sorted(gsplit["testA"], key=lambda s: int(s.split("_")[-1]))[: args.n_eval]
        src_ids = psplit["test"]
        target, source = "GlaS testA", "Kvasir-SEG test"
    src_ids = src_ids[: args.n_source] if args.n_source else []
    return Case(
        "kvasir-glas",
        spec,
        target,
        source,
        train_ids,
        glas(train_ids),
        glas(test_ids),
        kvasir(src_ids) if src_ids else ([], []),
        {
            "new_domain": "GlaS gland histology (RGB, 512x512), official split: corrected = "
            f"{len(train_ids)} of the train part, evaluated = {len(test_ids)} {target} images",
            "source_domain": f"{len(src_ids)} {source} images ({Path(split_file).name})",
            "judge": args.judge,
        },
    )


def busi_hippocampus(args: argparse.Namespace, rng: np.random.Generator) -> Case:
    """BUSI breast ultrasound (grey) -> hippocampus T1 MRI slices (grey), binary."""
    import nibabel as nib

    def slice_of(stem: str) -> tuple[np.ndarray, np.ndarray]:
        root = DATA / "hippocampus"
        img = np.asarray(nib.load(str(root / "imagesTr" / f"{stem}.nii.gz")).dataobj)
        lab = np.asarray(nib.load(str(root / "labelsTr" / f"{stem}.nii.gz")).dataobj) > 0
        k = int(np.argmax(lab.reshape(lab.shape[0], -1).sum(1)))  # largest hippocampus area
        return np.ascontiguousarray(img[k]).astype(np.uint8), lab[k].astype(np.uint8)

    def pairs(stems: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        got = [slice_of(s) for s in stems]
        return [g[0] for g in got], [g[1] for g in got]

    hsplit = split("hippocampus_seed0")
    train_ids = sorted(rng.choice(hsplit["train"], size=args.n_train, replace=False).tolist())
    test_ids = hsplit["test"][: args.n_eval]
    bsplit = split("busi_seed0")["test"][: args.n_source] if args.n_source else []
    broot = DATA / "busi"

    def busi(stems: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        from PIL import Image

        imgs = [np.asarray(Image.open(broot / "images" / f"{s}.png").convert("L")) for s in stems]
        return imgs, [read_mask(broot / "masks" / f"{s}.png") for s in stems]

    return Case(
        "busi-hippocampus",
        args.model or "busi_prosma",
        "hippocampus MRI slices",
        "BUSI test",
        train_ids,
        pairs(train_ids),
        pairs(test_ids),
        busi(bsplit) if bsplit else ([], []),
        {
            "new_domain": "MSD Task04 hippocampus T1 MRI (grey), split seed 0; one slice per "
            "volume (along the first array axis, the one with the largest hippocampus area), "
            "anterior + posterior as one class: corrected = "
            f"{len(train_ids)} train volumes, evaluated = {len(test_ids)} test volumes",
            "source_domain": f"{len(bsplit)} BUSI test images (split seed 0)",
        },
    )


def busi_images(stems: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """BUSI images with and without a lesion, as training read them (grey, 256x256: the
    packed ``busi_with_normal.npz`` when it is in the data folder, else the image folders),
    so that a CPU and a GPU run see the same pixels."""
    from napari_prosma.datasets import read_dataset

    ds = read_dataset("busi_with_normal", DATA, ids=stems)
    order = {k: i for i, k in enumerate(ds.ids)}
    return (
        [np.ascontiguousarray(ds.images[order[s]][0]) for s in stems],
        [np.asarray(ds.labels[order[s]]) for s in stems],
    )


def own_worst(args: argparse.Namespace, rng: np.random.Generator) -> Case:
    """Case (a): busi_prosma's own worst test images corrected, its other test images
    judged (look-alike groups of a corrected image left out)."""
    spec = args.model or "busi_prosma"
    model, card = load(resolve(spec))
    split_file, psplit = parent_split(card, "training/splits/busi_seed0.json")
    test = psplit["test"]
    imgs, masks = busi_images(test)
    scores = mean_dice(model.eval(), card, imgs, masks, args.device_name)
    worst = [test[k] for k in np.argsort(scores, kind="stable")[: args.n_train]]
    groups = json.loads((ROOT / "training" / "splits" / "busi_groups.json").read_text())
    near = {m for g in groups["groups"] if set(g) & set(worst) for m in g}
    others = [t for t in test if t not in worst and t not in near][: args.n_eval]
    pick = {t: k for k, t in enumerate(test)}
    return Case(
        "own-worst",
        spec,
        "other BUSI test images",
        "BUSI test (the same images)",
        sorted(worst),
        ([imgs[pick[t]] for t in sorted(worst)], [masks[pick[t]] for t in sorted(worst)]),
        ([imgs[pick[t]] for t in others], [masks[pick[t]] for t in others]),
        ([], []),
        {
            "new_domain": f"the parent's own domain: its {len(worst)} worst images of the test "
            f"part of {Path(split_file).name} (parent Dice "
            f"{np.mean(sorted(scores)[: args.n_train]):.3f} on them) are corrected; judged on "
            f"{len(others)} other test images in id order, after leaving out "
            f"{len(near - set(worst))} look-alikes of the corrected ones (busi_groups.json)",
            "source_domain": "the judged images are the source domain (forgetting = their change)",
        },
    )


def hippocampus_3d(args: argparse.Namespace, rng: np.random.Generator) -> Case:
    """Case (c): hippocampus_prosma corrected on a few test volumes, judged on the others."""
    from napari_prosma.datasets import read_hippocampus

    test = split("hippocampus_seed0")["test"]
    corrected = sorted(rng.choice(test, size=args.n_train, replace=False).tolist())
    others = [t for t in test if t not in corrected][: args.n_eval]
    a = read_hippocampus(DATA, ids=corrected)
    b = read_hippocampus(DATA, ids=others)
    return Case(
        "hippocampus-3d",
        args.model or "hippocampus_prosma",
        "other hippocampus test volumes",
        "hippocampus test (the same volumes)",
        corrected,
        (list(a.images), list(a.labels)),
        (list(b.images), list(b.labels)),
        ([], []),
        {
            "new_domain": f"the parent's own domain: {len(corrected)} volumes of the test part "
            "of hippocampus_seed0.json (a seeded pick) corrected, whole; judged on the other "
            f"{len(others)} test volumes (other patients), anterior and posterior Dice averaged",
            "source_domain": "the judged volumes are the source domain",
        },
        train_spacing=[tuple(x) for x in a.spacing] if a.spacing else None,
        test_spacing=[tuple(x) for x in b.spacing] if b.spacing else None,
    )


CASES = {
    "own-worst": own_worst,
    "kvasir-glas": kvasir_glas,
    "hippocampus-3d": hippocampus_3d,
    "busi-hippocampus": busi_hippocampus,
}
DEFAULT_CASES = ["own-worst", "kvasir-glas", "hippocampus-3d"]


def main(argv: list[str] | None = None) -> int:
    import torch

    from napari_prosma.inference import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--case",
        nargs="+",
        default=DEFAULT_CASES,
        choices=list(CASES),
        help=f"cases to run (default: {' '.join(DEFAULT_CASES)})",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="parent: bundled name or checkpoint (default: busi_prosma for own-worst and "
        "busi-hippocampus, kvasir_prosma for kvasir-glas, hippocampus_prosma for "
        "hippocampus-3d)",
    )
    ap.add_argument(
        "--stand-in",
        type=float,
        default=None,
        metavar="SECONDS",
        help="if kvasir_prosma is not available, train a Kvasir stand-in this long",
    )
    ap.add_argument(
        "--stand-in-dir", type=Path, default=Path(tempfile.gettempdir()) / "prosma-bench-standin"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument(
        "--trainable",
        nargs="+",
        default=["decoder_gates"],
        choices=["decoder_gates", "all", "gates"],
        help="what is trained, one row each (default: the widget's, decoder_gates)",
    )
    ap.add_argument("--n-train", type=int, default=10, help="corrected images (or volumes)")
    ap.add_argument(
        "--judge",
        default="test",
        choices=["test", "val"],
        help="kvasir-glas: judge on test images (default, to report) or on images of no "
        "test part (val: to choose settings on)",
    )
    ap.add_argument("--n-eval", type=int, default=60, help="new-domain images to evaluate on")
    ap.add_argument(
        "--n-source",
        type=int,
        default=40,
        help="images of the parent's domain to evaluate on (forgetting); 0: skip",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training (default 90 on the CPU, so that the whole call stays "
        "within 2 minutes; 15 on CUDA)",
    )
    ap.add_argument(
        "--max-steps", type=int, default=None, help="default 300 on the CPU, 1000 on CUDA"
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=FinetuneConfig().lr,
        help=f"AdamW learning rate (default: the widget's, {FinetuneConfig().lr:g})",
    )
    ap.add_argument(
        "--patience",
        type=int,
        default=FinetuneConfig().patience,
        help="held-out evaluations without improvement before stopping",
    )
    ap.add_argument("--batch-size", type=int, default=FinetuneConfig().batch_size)
    ap.add_argument(
        "--replay",
        default="auto",
        choices=["none", "auto", "both"],
        help="replay the parent's training images: auto (default, as the widget: the data "
        "set its card names, when available), none, or both, one row each",
    )
    ap.add_argument("--replay-fraction", type=float, default=FinetuneConfig().replay_fraction)
    ap.add_argument(
        "--anchor",
        type=float,
        default=FinetuneConfig().anchor,
        help="L2-SP pull towards the parent's weights (FinetuneConfig.anchor)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.device_name = str(resolve_device(args.device))

    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    budget = (
        args.time_budget if args.time_budget is not None else (15.0 if dev_type == "cuda" else 90.0)
    )
    max_steps = args.max_steps or (1000 if dev_type == "cuda" else 300)
    out = args.out or ROOT / "benchmarks" / "results" / f"finetune_{dev_type}.json"
    settings = {
        "time_budget_s": budget,
        "max_steps": max_steps,
        "lr": args.lr,
        "patience": args.patience,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "replay_fraction": args.replay_fraction,
        "replay_samples": FinetuneConfig().replay_samples,
        "anchor": args.anchor,
        "judge": args.judge,
        "labels": "ground-truth masks stand for the user's corrections",
    }

    reports = []
    for name in args.case:
        case = CASES[name](args, np.random.default_rng(args.seed))
        parent_spec, is_stand_in = case.parent, False
        try:
            resolve(parent_spec)
        except Exception:
            if name != "kvasir-glas" or args.stand_in is None:
                print(
                    f"{name}: the parent {parent_spec!r} is not available (bundled: "
                    f"{list_bundled()}); skipped"
                    + (
                        " (--stand-in SECONDS trains a Kvasir stand-in)"
                        if name == "kvasir-glas"
                        else ""
                    ),
                    file=sys.stderr,
                )
                continue
            parent_spec = str(stand_in(args.stand_in, device, args.stand_in_dir))
            is_stand_in = True
        reports.append(run_case(case, parent_spec, is_stand_in, args, device, settings))
    if not reports:
        return 2

    report = {
        "benchmark": "finetune",
        "device": {"type": dev_type, "name": device_name(device), "torch": torch.__version__},
        "settings": settings,
        "cases": reports,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


def _warm_up(parent: Any, card: ModelCard, device: str, batch: int) -> float:
    """Seconds of one training forward + backward of a copy of the parent on ``device`` at
    the card's patch size (backward kernels, cuDNN's algorithm search, the caching
    allocator): the GPU start-up the issue keeps outside the user's fine-tuning budget,
    measured and reported instead of hidden."""
    import copy

    import torch

    t = time.perf_counter()
    net = copy.deepcopy(parent).train()
    x = torch.randn(batch, card.in_channels, *card.patch_size, device=device)
    with torch.autocast("cuda", torch.bfloat16):
        net(x).float().mean().backward()
    torch.cuda.synchronize()
    del net, x
    return time.perf_counter() - t


def run_case(
    case: Case,
    parent_spec: str,
    is_stand_in: bool,
    args: argparse.Namespace,
    device: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    import torch

    parent, card = load(resolve(parent_spec))
    parent = parent.to(device).eval()
    tr_imgs, tr_masks = case.train
    te_imgs, te_masks = case.test
    src_imgs, src_masks = case.source_test
    print(
        f"{case.name}: parent {card.name} on {device_name(device)}; {len(tr_imgs)} corrected, "
        f"{len(te_imgs)} {case.target}, {len(src_imgs)} {case.source}",
        file=sys.stderr,
    )
    trivial = statistics.fmean(dice(np.ones_like(m, bool), m > 0) for m in te_masks)
    load_start = _loadavg()
    t = time.perf_counter()
    before = mean_dice(parent, card, te_imgs, te_masks, device, spacing=case.test_spacing)
    src_before = mean_dice(parent, card, src_imgs, src_masks, device) if src_imgs else []
    eval_s = time.perf_counter() - t
    cuda = device.startswith("cuda")
    warmup_s = _warm_up(parent, card, device, args.batch_size) if cuda else None

    rows = []
    with tempfile.TemporaryDirectory(prefix="prosma-bench-store-") as tmp:
        store = ModelStore(tmp)
        modes = ["none", "auto"] if args.replay == "both" else [args.replay]
        for trainable, replay in [(t, m) for t in args.trainable for m in modes]:
            cfg = FinetuneConfig(
                trainable=trainable,
                max_steps=settings["max_steps"],
                time_budget_s=settings["time_budget_s"],
                lr=args.lr,
                patience=args.patience,
                batch_size=args.batch_size,
                replay_fraction=args.replay_fraction,
                anchor=args.anchor,
                device=args.device,
                seed=args.seed,
            )
            if cuda:
                torch.cuda.synchronize()
            st0 = _cpu_stat()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                result, vid = run_finetune(
                    parent_spec,
                    tr_imgs,
                    tr_masks,
                    store=store,
                    config=cfg,
                    spacing=case.train_spacing,
                    replay=None if replay == "none" else replay,
                    activate="never",
                    progress=_say_progress,
                )
                model, new_card = load(store.get(vid).checkpoint)
                model = model.to(device).eval()
                saved = True
            except InputError as exc:  # no state beat the parent: nothing saved
                result = exc.result  # type: ignore[attr-defined]
                model, new_card, saved = parent, card, False
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            busy_other, steal = _others(st0, _cpu_stat(), cpu)
            after = mean_dice(model, new_card, te_imgs, te_masks, device, spacing=case.test_spacing)
            src_after = mean_dice(model, new_card, src_imgs, src_masks, device) if src_imgs else []
            rec = result.replay or {}
            row = {
                "trainable": trainable,
                "replay": replay,
                "replay_used": bool(rec.get("used")),
                "replay_source": rec.get("source"),
                "replay_samples": rec.get("n_samples", 0),
                "replay_patches": rec.get("patches", 0),
                "replay_message": rec.get("message"),
                "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 1),
                "machine_busy_other_s": busy_other,
                "steal_s": steal,
                "train_s": round(result.seconds, 1),
                "steps": result.steps,
                "stopped": result.stopped,
                "n_train": result.n_train,
                "n_holdout": result.n_holdout,
                "independent_report": result.independent_report,
                "holdout_dice_before": _r(result.dice_before),
                "holdout_dice_after": _r(result.dice_after),
                "target_dice_before": _r(statistics.fmean(before)),
                "target_dice_after": _r(statistics.fmean(after)),
                "target_dice_after_sd": _r(statistics.pstdev(after)),
                "target_gain": _r(statistics.fmean(after) - statistics.fmean(before)),
                "target_improved_images": int(sum(a > b for a, b in zip(after, before))),
                "target_worse_images": int(sum(a < b for a, b in zip(after, before))),
                "n_target": len(after),
                "saved": saved,
                "n_report": result.n_report,
                "holdout_curve": [[st, _r(d)] for st, d in result.curve],
                "forgetting_guard": result.card.metrics.get("finetune_holdout", {}).get(
                    "forgetting_guard"
                ),
                "notes": list(result.notes),
                "whole": result.whole,
                "source_dice_before": _r(statistics.fmean(src_before)) if src_imgs else None,
                "source_dice_after": _r(statistics.fmean(src_after)) if src_imgs else None,
            }
            src_b, src_a = (
                (row["source_dice_before"], row["source_dice_after"])
                if src_imgs
                else (row["target_dice_before"], row["target_dice_after"])
            )
            row["forgetting"] = _r(src_b - src_a)
            row["forgetting_on"] = case.source
            rows.append(row)
            src_txt = (
                ""
                if not src_imgs
                else f"; source {row['source_dice_before']:.3f} -> {row['source_dice_after']:.3f}"
            )
            print(
                f"  {trainable:13s} replay {replay:4s} {row['target_dice_before']:.3f} -> "
                f"{row['target_dice_after']:.3f}{src_txt} in {wall:.1f} s ({result.steps} "
                f"steps, {result.stopped}; {rec.get('message')})",
                file=sys.stderr,
            )
    return {
        "case": case.name,
        "parent": {
            "spec": parent_spec if not is_stand_in else "stand-in",
            "name": card.name,
            "stand_in": is_stand_in,
            "stand_in_seconds": args.stand_in if is_stand_in else None,
            "stand_in_steps": card.training.get("steps") if is_stand_in else None,
        },
        "target": case.target,
        "source": case.source,
        "design": {
            **case.design,
            "corrected": case.corrected_ids,
            "target_dice_all_foreground": _r(trivial),
            "eval_before_s": round(eval_s, 1),
            "gpu_warm_up_s": None if warmup_s is None else round(warmup_s, 2),
        },
        "loadavg_1min_start_end": [load_start, _loadavg()],
        "rows": rows,
    }


def _say_progress(p: Any) -> None:
    """The held-out evaluations and the whole-image passes of a run, on stderr."""
    if p.phase in ("before", "eval", "whole", "done"):
        d = "" if p.holdout_dice is None else f", held-out Dice {p.holdout_dice:.3f}"
        print(f"    [{p.phase}] step {p.step}, {p.elapsed_s:.0f} s{d}", file=sys.stderr, flush=True)


def _cpu_stat() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``, clock ticks), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def _others(a: list[int] | None, b: list[int] | None, own_cpu: float) -> tuple[Any, Any]:
    """CPU seconds other processes used during a run, and the hypervisor's steal time: a
    busy shared machine makes the wall time longer than the method needs."""
    if a is None or b is None:
        return None, None
    hz = os.sysconf("SC_CLK_TCK")
    d = [(y - x) / hz for x, y in zip(a, b)]
    busy = d[0] + d[1] + d[2] + d[5] + d[6]  # user nice system irq softirq
    return round(max(busy - own_cpu, 0.0), 1), round(d[7], 1)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def table(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [f"Device: {dev['name']}, torch {dev['torch']}"]
    for c in report["cases"]:
        p = c["parent"]
        parent = p["name"] + (f", trained {p['stand_in_seconds']:.0f} s" if p["stand_in"] else "")
        lines += [
            "",
            f"{c['case']}: {parent}, corrected on {len(c['design']['corrected'])} images; "
            f"1-min load average {c['loadavg_1min_start_end']}; calling every pixel "
            f"foreground scores Dice {c['design']['target_dice_all_foreground']:.3f} on "
            f"{c['target']}",
            "",
            f"| train | replay | wall s | steps | held-out Dice (n) | evals | {c['target']} "
            f"Dice (n) | gain | forgetting ({c['source']}) | saved |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            hold = (
                "–"
                if r["holdout_dice_before"] is None
                else f"{r['holdout_dice_before']:.3f} → {r['holdout_dice_after']:.3f}"
            )
            replay = (
                f"{r['replay_samples']} images, {r['replay_patches']} patches"
                if r.get("replay_used")
                else r.get("replay", "none")
            )
            lines.append(
                f"| {r['trainable']} | {replay} | {r['wall_s']:.0f} | {r['steps']} "
                f"({r['stopped']}) | {hold} ({r['n_report']}) | "
                f"{max(len(r['holdout_curve']) - 1, 0)} | "
                f"{r['target_dice_before']:.3f} → {r['target_dice_after']:.3f} ({r['n_target']}) | "
                f"{r['target_gain']:+.3f} | {r['forgetting']:+.3f} | "
                f"{'yes' if r['saved'] else 'no (kept the parent)'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
