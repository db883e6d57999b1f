"""Copy a finished run's float16 model into ``models/`` under its bundled name, after
loading it (hash check) and completing its card.

    python training/ship_model.py RUN_DIR NAME [--note TEXT]
``--note`` is appended to the card's limitations (e.g. how the run departs from its recipe).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from napari_prosma.checkpoint import load, seal_card

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("name")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    run = Path(args.run_dir)
    model, _ = load(run / "model")  # verifies the sha256 of the weights
    n = sum(p.numel() for p in model.parameters())
    data = json.loads((run / "model.json").read_text())
    cmd = data["training"].get("command", "")
    if cmd.startswith("prosma ") and not cmd.startswith("prosma train"):
        data["training"]["command"] = "prosma train " + cmd[len("prosma ") :]
    data["name"] = args.name
    data["training"]["parameters"] = n
    if args.note:
        data["limitations"] = (data.get("limitations", "") + " " + args.note).strip()
    dst = ROOT / "models"
    shutil.copyfile(run / "model.safetensors", dst / f"{args.name}.safetensors")
    (dst / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    seal_card(dst / f"{args.name}.json")  # name and notes changed on purpose
    load(dst / args.name)  # the shipped pair loads and verifies
    size = (dst / f"{args.name}.safetensors").stat().st_size / 1e6
    print(f"models/{args.name}: {n:,} parameters, {size:.1f} MB")


if __name__ == "__main__":
    main()
