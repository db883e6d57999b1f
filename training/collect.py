"""Pack finished runs for the trip back from the GPU machine:
``python training/collect.py RUNS_DIR OUT.tgz "name1 name2"`` puts every ``*/result.json`` and
``*/model.json`` (and ``last.json``/``best.json`` of unfinished runs) in the archive,
``model.safetensors`` of the named runs, and the logs of LOGS_DIR:
``python training/collect.py RUNS_DIR OUT.tgz "names" [LOGS_DIR]``."""

import sys
import tarfile
from pathlib import Path

runs, out = Path(sys.argv[1]), sys.argv[2]
keep = set((sys.argv[3] if len(sys.argv) > 3 else "").split())
logs = Path(sys.argv[4]) if len(sys.argv) > 4 else None
with tarfile.open(out, "w:gz") as tar:
    for d in sorted(p for p in runs.iterdir() if p.is_dir()):
        for f in ("result.json", "model.json", "last.json", "best.json"):
            if (d / f).exists():
                tar.add(d / f, arcname=f"{d.name}/{f}")
        if d.name in keep and (d / "model.safetensors").exists():
            tar.add(d / "model.safetensors", arcname=f"{d.name}/model.safetensors")
        if not (d / "result.json").exists():
            print(f"{d.name}: not finished")
    if logs is not None and logs.is_dir():
        for f in sorted(logs.glob("*.log")):
            tar.add(f, arcname=f"logs/{f.name}")
print(f"{out}: {Path(out).stat().st_size / 1e6:.1f} MB")
