"""The forgetting guard's Dice at every held-out evaluation of one fine-tuning run of case
(b) of ``finetune.py`` (``kvasir_prosma`` corrected on 10 GlaS images), to see how fast the
parent's own kind of image is lost (issue 20, session 9). Prints
``[(step, held-out Dice, guard Dice), ...]``; the parent's guard Dice is in the notes.

    python benchmarks/guard_trace.py --lr 1e-5 --steps 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune as bench

from napari_prosma.finetune import FinetuneConfig, run_finetune
from napari_prosma.preprocess import InputError
from napari_prosma.versions import ModelStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, default=FinetuneConfig().lr)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    case_args = argparse.Namespace(
        n_train=10, n_eval=1, n_source=0, model=None, judge="val", seed=0
    )
    case = bench.kvasir_glas(case_args, np.random.default_rng(0))
    cfg = FinetuneConfig(
        lr=args.lr, max_steps=args.steps, time_budget_s=None, min_evals=100, device="cpu"
    )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res, _ = run_finetune(
                "kvasir_prosma",
                *case.train,
                store=ModelStore(tmp),
                config=cfg,
                replay="auto",
                activate="never",
            )
        except InputError as exc:  # nothing kept: the result rides on the error
            res = exc.result  # type: ignore[attr-defined]
    trace = [
        (h["step"], round(h["holdout_dice"], 3), round(h["guard_dice"], 3))
        for h in res.history
        if "guard_dice" in h
    ]
    print(trace)
    print("\n".join(n for n in res.notes if "guard" in n))


if __name__ == "__main__":
    main()
