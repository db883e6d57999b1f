"""Size the runs of one device call from measured rates: prints ``NAME=VALUE`` lines.

    python training/plan.py FORMATS_JSON SECONDS
Gives KVASIR_EPOCHS (ProSMA 2D, 800 images/epoch) and HIPPO_EPOCHS (3D, 50 x 16 patches
per epoch) so that both, run side by side on one GPU, end inside SECONDS (70 % of the
GPU time to Kvasir, 30 % to Hippocampus), capped at 400 and 200 epochs."""

import json
import sys

res = json.load(open(sys.argv[1]))
T = float(sys.argv[2]) * 0.85
r2 = res["best_prosma"]["images_per_s"]
r3 = max(
    (r["patches_per_s"] for r in res.get("rows_3d", []) if r["widths"] == "small"), default=300.0
)
kv = min(400, int(0.7 * T * r2 / 800))
hi = min(200, int(0.3 * T * r3 / 800))
print(f"KVASIR_EPOCHS={max(kv, 20)}")
print(f"HIPPO_EPOCHS={max(hi, 10)}")
