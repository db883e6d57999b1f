"""Markdown tables from the JSON of ``benchmarks/speed.py`` (GPU and CPU), for
``benchmarks/README.md``; missing or failed cases show as ``–`` or their error's last line.

    python benchmarks/speed_table.py benchmarks/results/speed_h200.json [speed_cpu.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _get(d: Any, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _err(d: Any) -> str | None:
    if isinstance(d, dict) and "error" in d:
        return "error: " + d["error"].strip().splitlines()[-1][:120]
    if isinstance(d, dict) and "skipped" in d:
        return "skipped: " + d["skipped"]
    return None


def _f(v: Any, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def table_2d(res: dict) -> list[str]:
    eng, nets, base = res.get("engine_2d", {}), res.get("networks_2d", {}), res.get("base", {})
    floor = _get(nets, "prosma", "floor", "images_per_s")
    n = _get(base, "2d", "n") or 512
    lines = [
        f"2D, {n} Kvasir-SEG frames 256×256, `kvasir_prosma` (bf16 unless said):",
        "",
        "| path | img/s | × floor time | Dice vs fp32 | Dice vs before | peak GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(name, ips, d32=None, dbase=None, pk=None):
        ratio = None if not (ips and floor) else floor / ips
        lines.append(
            f"| {name} | {_f(ips)} | {_f(ratio, '{:.1f}×')} | {_f(d32, '{:.4f}')} | "
            f"{_f(dbase, '{:.4f}')} | {_f(pk, '{:.2f}')} |"
        )

    row("floor (unfused bytes / HBM, FLOPs / bf16 peak)", floor)
    if _err(base.get("2d")) or not base:
        lines.append(f"| engine before (main) | {_err(base.get('2d')) or '–'} | | | | |")
    else:
        row("engine before (main)", _get(base, "2d", "images_per_s"))
    for k, title in (
        ("engine_fp32", "engine now, fp32"),
        ("engine_none", "engine now"),
        ("engine_graph", "engine now, CUDA graph"),
    ):
        v = eng.get(k, {})
        if _err(v) or not v:
            lines.append(f"| {title} | {_err(v) or '–'} | | | | |")
            continue
        row(
            title, v["images_per_s"], v.get("dice_vs_fp32"), v.get("dice_vs_base"), v.get("peak_gb")
        )
    comp = res.get("compile_2d", {})
    row("engine now, torch.compile", _get(comp, "engine", "images_per_s"))
    for name, title in (
        ("prosma", "ProSMA network alone"),
        ("monai_unet", "MONAI UNet alone"),
        ("monai_attention_unet", "MONAI AttentionUnet alone"),
    ):
        for m in ("none", "graph"):
            row(
                f"{title}, {'eager' if m == 'none' else 'CUDA graph'}",
                _get(nets, name, m, "images_per_s"),
            )
    row("ProSMA network alone, torch.compile", _get(comp, "network", "images_per_s"))
    me = res.get("monai_engine_2d", {})
    for k in (
        "monai_unet_none",
        "monai_unet_graph",
        "monai_attention_unet_none",
        "monai_attention_unet_graph",
    ):
        row(
            f"{k.replace('_none', '').replace('_graph', ', CUDA graph')} through the engine",
            _get(me, k, "images_per_s"),
        )
    return lines


def _row(*cells: Any) -> str:
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


def table_3d(res: dict) -> list[str]:
    e3, base = res.get("engine_3d", {}), res.get("base", {})
    net = res.get("network_3d", {})
    m = res.get("model_3d", {})
    lines = [
        f"3D, one 128×512×512 volume, `{m.get('name')}` (patch {m.get('patch_size')}):",
        "",
        _row(
            "path",
            "s/volume",
            "windows",
            "peak GB",
            "Dice vs default (hippocampus)",
            "Dice vs before (synthetic)",
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    f = _get(net, "floor")
    n_win = _get(e3, "engine", "n_tiles")
    if f and n_win:
        per = f["s"] / (_get(net, "batch") or 64)
        lines.append(_row("floor of the default windows", f"{per * n_win:.3f}", n_win, "", "", ""))
    b = base.get("3d")
    if b and not _err(b):
        s = f"{min(b['seconds']):.2f}"
        lines.append(
            _row(
                "engine before (main)", s, b.get("n_tiles"), _f(b.get("peak_gb"), "{:.2f}"), "", ""
            )
        )
    else:
        lines.append(_row("engine before (main)", _err(b) or "–", "", "", "", ""))
    for k, v in e3.items():
        if k.startswith("_"):
            continue
        if _err(v):
            lines.append(_row(k, _err(v), "", "", "", ""))
            continue
        dh = v.get("dice_vs_default_hippocampus") or []
        dh_s = f"{min(dh):.3f}–{max(dh):.3f}" if dh else "–"
        what = (
            f"{k} ({v.get('layout')}, tile {'×'.join(map(str, v['tile']))}, overlap {v['overlap']})"
        )
        lines.append(
            _row(
                what,
                f"{min(v['seconds']):.2f}",
                v["n_tiles"],
                _f(v.get("peak_gb"), "{:.2f}"),
                dh_s,
                _f(v.get("dice_vs_base_synthetic"), "{:.3f}"),
            )
        )
    for k, v in res.get("monai_3d", {}).items():
        if k.startswith("_"):
            continue
        s = _err(v) or f"{min(v['seconds']):.2f}"
        pk = _f(v.get("peak_gb"), "{:.2f}")
        lines.append(_row(f"{k} (random init, 96³ tiles, engine)", s, v.get("n_tiles"), pk, "", ""))
    for k in ("ncdhw_none", "ncdhw_graph", "channels_last_3d_none", "channels_last_3d_graph"):
        bs = _f(_get(net, k, "batch_s"), "{:.4f}")
        lines.append(_row(f"network alone, one batch of windows, {k}", f"{bs} s", "", "", "", ""))
    return lines


def table_cpu(res: dict) -> list[str]:
    env = res.get("env", {})
    lines = [
        f"CPU: {env.get('device_name')}, torch {env.get('torch')}, {env.get('threads')} threads, "
        f"load average {env.get('load_before')} → {env.get('load_after')}; "
        f"limits measured: {res.get('limits')}:",
        "",
        _row(
            "case",
            "path",
            "s (min)",
            "floor s",
            "× floor",
            "CPU s",
            "windows",
            "peak RSS GB",
            "Dice vs before",
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, v in res.items():
        if case in ("env", "total_seconds") or not isinstance(v, dict):
            continue
        for path, r in v.items():
            if not isinstance(r, dict):
                continue
            if _err(r):
                lines.append(_row(case, path, _err(r), "", "", "", "", "", ""))
                continue
            fl = _get(r, "floor", "s")
            lines.append(
                _row(
                    case,
                    path,
                    f"{min(r['seconds']):.2f}",
                    _f(fl, "{:.3f}"),
                    _f(fl and min(r["seconds"]) / fl, "{:.1f}×"),
                    _f(r.get("cpu_seconds"), "{:.2f}"),
                    _f(r.get("n_tiles")),
                    _f(r.get("peak_rss_gb"), "{:.2f}"),
                    _f(r.get("dice_vs_base"), "{:.4f}"),
                )
            )
    return lines


def table(res: dict) -> str:
    env = res.get("env", {})
    head = [
        f"card: {env.get('device_name')}; torch {env.get('torch')}, cuDNN {env.get('cudnn')}, "
        f"MONAI {env.get('monai')}; limits measured: {res.get('limits')}",
        "",
    ]
    if "engine_2d" in res or "engine_3d" in res:
        return "\n".join(head + table_2d(res) + [""] + table_3d(res))
    return "\n".join(head + table_cpu(res))


if __name__ == "__main__":
    for f in sys.argv[1:]:
        print(table(json.loads(Path(f).read_text())))
        print()
