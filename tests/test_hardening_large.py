"""Very large images and volumes (issue #7): tiled inference runs in bounded memory.

Each case runs in a fresh Python (so the peak resident memory, ``ru_maxrss``, belongs to
it alone, on one thread so a busy machine does not distort the timing): first the tiled
prediction, then, for comparison, the same network on the whole image at once. The tiled
run's extra peak must stay a small multiple of the image's float32 size and far below the
untiled run's. The numbers are printed (``-s``) and recorded as test properties; the ones
measured when this was written are in ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import napari_prosma

SRC = str(Path(napari_prosma.__file__).resolve().parents[1])

_MEASURE = """
import json, resource, sys
import numpy as np, torch
from napari_prosma.checkpoint import ModelCard
from napari_prosma.inference import predict
from napari_prosma.nets import build_model

torch.set_num_threads(1)
shape, tile = tuple(json.loads(sys.argv[1])), json.loads(sys.argv[2])
torch.manual_seed(0)
net = build_model("prosma_unet", spatial_dims=len(shape), in_channels=1, out_channels=2,
                  widths=[4, 8, 16]).eval()
card = ModelCard("prosma_unet", net.config, normalization={"mode": "zscore"})
image = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
predict(image[tuple(slice(0, 32) for _ in shape)], net, card, device="cpu", tile_size=16)

def peak():
    # VmHWM, this process's own high-water mark: ru_maxrss keeps the parent's across exec on
    # Linux, so under a large pytest process every delta read 0 (seen in the full CI run)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

base = peak()
pred = predict(image, net, card, device="cpu", tile_size=tile, overlap=0.0, precision="fp32")
tiled = peak() - base
with torch.inference_mode():
    net(torch.from_numpy(image.astype(np.float32))[None, None])
whole = peak() - base
print(json.dumps({"tiled": tiled, "whole": whole, "float32": image.size * 4,
                  "tiles": pred.n_tiles, "labels_shape": list(pred.labels.shape)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.parametrize(
    ("shape", "tile"),
    [((2048, 2048), 256), ((64, 192, 192), 32)],
    ids=["2d-2048x2048", "3d-64x192x192"],
)
def test_tiled_inference_peak_memory_is_bounded(shape, tile, record_property):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(list(shape)), json.dumps(tile)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    mib = {k: m[k] / 2**20 for k in ("tiled", "whole", "float32")}
    summary = (
        f"{'x'.join(map(str, shape))}: {m['tiles']} tiles of {tile}; extra peak tiled "
        f"{mib['tiled']:.0f} MiB ({m['tiled'] / m['float32']:.1f}x the float32 image of "
        f"{mib['float32']:.0f} MiB), untiled {mib['whole']:.0f} MiB"
    )
    print(summary)
    record_property("peak_memory", summary)
    assert m["labels_shape"] == list(shape)
    assert m["tiles"] > 8  # it really was tiled
    assert m["tiled"] < 16 * m["float32"], summary  # a few copies of the image, no more
    assert m["tiled"] * 5 < m["whole"], summary  # far below running it whole
