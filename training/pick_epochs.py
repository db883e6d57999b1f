"""Epochs a stack of runs can train in the time left, from the stack benchmark:
``python training/pick_epochs.py BENCH.json SECONDS_LEFT K IMAGES_PER_RUN_EPOCH``.

Prints the largest multiple of 25 (at most 400, at least 50) such that K runs of that many
epochs, at the aggregate images/s measured for the nearest K (not above), fit in the time
left minus a reserve for setup and the final evaluations (30 s + 8 s per run)."""

import json
import sys

bench, left, k, per_epoch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rows = json.load(open(bench))["rows"]
row = max((r for r in rows if r["k"] <= k), key=lambda r: r["k"])
rate = row["aggregate_images_per_s"] * (min(k, row["k"]) / row["k"])
budget = left - 30 - 8 * k
epochs = int(budget * rate / (k * per_epoch) // 25 * 25)
print(max(50, min(400, epochs)))
