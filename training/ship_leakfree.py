"""Ship a run of the leak-free protocol as a bundled model, with a card that says what the
test part showed (issue 14).

    python training/ship_leakfree.py RUN_JSON WEIGHTS NAME --chosen-over "run (val 70.3)"...

The dataset (BUSI or Kvasir-SEG) is read from the run's card; the limitations say what its
leak-free test part showed.

RUN_JSON is the run's ``result.json`` (``training/runs/leakfree/NAME.json``), WEIGHTS its
``model.safetensors`` as it came back from the GPU machine (checked against the card's
sha256). The card gets ``metrics.test.distribution`` (every lesion image's Dice, sorted,
with quantiles and failure rates: what ``prosma demo`` prints beside its one frame), plain
limitations with the numbers, and what the model does on images without a lesion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_prosma.checkpoint import atomic_write_bytes, file_sha256, load, seal_card  # noqa: E402
from napari_prosma.metrics import dice_distribution  # noqa: E402


def card_for(res: dict, name: str, chosen_over: list[str]) -> dict:
    """The shipped card: the run's card plus the distribution and plain limitations."""
    card = json.loads(json.dumps(res["card"]))
    cls = card["class_names"][1]
    rep = res["evaluation"]["report"]["per_class"][cls]
    dice = [c[cls]["dice"] for c in res["evaluation"]["cases"] if not c["id"].startswith("normal")]
    dist = dice_distribution(dice, cls)
    card["name"] = name
    card["metrics"]["test"]["distribution"] = dist
    sel = card["training"]["selected"]
    card["extra"]["chosen_on_validation"] = {
        "kept": f"{res['config']['name']} (val Dice {100 * sel['score']:.1f}, "
        f"epoch {sel['epoch']})",
        "over": chosen_over,
        "rule": "the candidate with the best validation score; the test part was not looked at",
    }
    if card["training"]["dataset"] == "kvasir":
        return _kvasir_limits(card, dist)
    nt = rep["no_target"]
    split = json.loads((ROOT / card["training"]["split"]["file"]).read_text())
    n_train_normal = sum(i.startswith("normal") for i in split["train"])
    loss = (
        " It was trained with an image-level 'nothing here' term on images with an empty mask "
        "(loss bce_dice_empty), which halved this share over three seeds (62 % to 33 %) but did "
        "not remove it."
        if card["training"].get("loss") == "bce_dice_empty"
        else ""
    )
    card["extra"]["images_without_a_lesion"] = (
        f"On {nt['n']} held-out BUSI images without a lesion it painted a lesion (> 0.5 % of the "
        f"image) on {nt['n_fp']} ({100 * nt['fp_share']:.0f} %), although {n_train_normal} such "
        f"images were in its training part.{loss} It does not reliably say 'nothing here': "
        "check every outline on a scan that may hold no lesion."
    )
    card["limitations"] = (
        "Research model, not a diagnostic device. Trained on BUSI (one hospital, one scanner "
        "family; whole images resized to 256x256 greyscale). Leak-free test part "
        f"({rep['n_target'] + nt['n']} images: {rep['n_target']} with a lesion, {nt['n']} "
        "without; every look-alike "
        "group of BUSI on one side of the split): lesion Dice mean "
        f"{100 * dist['mean']:.1f}, median {100 * dist['median']:.1f}, 5th-95th percentile "
        f"{100 * dist['p05']:.1f}-{100 * dist['p95']:.1f}; it misses the lesion completely "
        f"(Dice 0) on {100 * dist['dice_0']:.1f} % and scores below 0.5 on "
        f"{100 * dist['dice_below_0.5']:.1f} % of lesion images. "
        + card["extra"]["images_without_a_lesion"]
        + " BUSI holds near-duplicates (the same lesion with and without calipers, one image "
        "under both classes); numbers measured on random splits of BUSI, including the "
        "paper's, are inflated by twins across train and test."
    )
    return card


def _kvasir_limits(card: dict, dist: dict) -> dict:
    sp = card["training"]["split"]
    card["extra"]["images_without_a_polyp"] = (
        "Kvasir-SEG holds no frame without a polyp, so the model never saw one and was never "
        "tested on one: on a frame with no polyp it may still outline something. Check every "
        "outline."
    )
    card["limitations"] = (
        "Research model, not a diagnostic device. Trained on "
        f"{sp['n_train']} Kvasir-SEG frames (one centre, white-light colonoscopy; whole frames "
        f"resized to 256x256 RGB), the epoch chosen on {sp['n_val']} validation frames. "
        f"Leak-free test part ({sp['n_test']} frames; near-identical frames, r > 0.90 at 256x256, "
        "kept on one side; Kvasir-SEG gives no video ids, so other frames of one video may "
        "sit on both sides): polyp Dice mean "
        f"{100 * dist['mean']:.1f}, median {100 * dist['median']:.1f}, 5th-95th percentile "
        f"{100 * dist['p05']:.1f}-{100 * dist['p95']:.1f}; it misses the polyp completely "
        f"(Dice 0) on {100 * dist['dice_0']:.1f} % and scores below 0.5 on "
        f"{100 * dist['dice_below_0.5']:.1f} % of frames. Very small polyps in large frames "
        "lose detail in the resize. " + card["extra"]["images_without_a_polyp"]
    )
    return card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_json", type=Path)
    ap.add_argument("weights", type=Path)
    ap.add_argument("name")
    ap.add_argument("--chosen-over", action="append", default=[])
    args = ap.parse_args()
    res = json.loads(args.run_json.read_text())
    card = card_for(res, args.name, args.chosen_over)
    if file_sha256(args.weights) != card["weights_sha256"]:
        sys.exit(f"{args.weights} does not match the run's card (sha256)")
    dst = ROOT / "models"
    tmp = dst / f".{args.name}.safetensors.tmp"
    shutil.copyfile(args.weights, tmp)
    tmp.replace(dst / f"{args.name}.safetensors")
    atomic_write_bytes(dst / f"{args.name}.json", (json.dumps(card, indent=2) + "\n").encode())
    seal_card(dst / f"{args.name}.json")  # name, distribution and limits changed on purpose
    model, _ = load(dst / args.name)  # the shipped pair loads and verifies
    n = sum(p.numel() for p in model.parameters())
    print(f"models/{args.name}: {n:,} parameters; {card['limitations'][:300]}...")


if __name__ == "__main__":
    main()
