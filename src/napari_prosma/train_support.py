"""Pieces of :mod:`napari_prosma.train` that fine-tuning can reuse: resume state on disk
(safetensors only, nothing pickled), CUDA-graph capture of a whole training step, quick
in-training validation on the device, and the gate-sparsity range written to the card."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import ModelCard
from .datasets import Dataset2D
from .fs import atomic_write_bytes


def _optim_state_tensors(model: Any, opt: Any) -> dict[str, Any]:
    import torch

    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            out[f"{n}::{k}"] = t.detach().float().cpu().contiguous()
    return out


def _load_optim_state(model: Any, opt: Any, tensors: Mapping[str, Any], device: Any) -> None:
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        if "::" not in key or key.startswith("rng::"):
            continue
        n, k = key.split("::", 1)
        p = params[n]
        st = opt.state.setdefault(p, {})
        if k == "step":
            capturable = opt.param_groups[0].get("capturable", False)
            st[k] = t.to(device=device if capturable else "cpu", dtype=torch_float32())
        else:
            st[k] = t.to(device=device, dtype=p.dtype)


def torch_float32() -> Any:
    import torch

    return torch.float32


def _write_resume(out: Path, model: Any, opt: Any, card: ModelCard, epoch: int) -> None:
    import torch
    from safetensors.torch import save as st_save

    from .checkpoint import save

    tensors = _optim_state_tensors(model, opt)
    tensors["rng::cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng::cuda"] = torch.cuda.get_rng_state()
    blob = st_save(tensors, metadata={"epoch": str(epoch)})
    atomic_write_bytes(out / "last_optim.safetensors", blob)
    save(model, out / "last", card, dtype="float32", overwrite=True)


def _read_resume(out: Path, model: Any, opt: Any, device: Any) -> tuple[int, ModelCard]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    from .checkpoint import _read_tensors, read_card

    card = read_card(out / "last")
    epoch = int(card.training["state"]["epoch"])
    optim_file = out / "last_optim.safetensors"
    with safe_open(str(optim_file), "pt") as f:
        meta_epoch = int((f.metadata() or {}).get("epoch", -1))
    if meta_epoch != epoch:
        raise RuntimeError(
            f"resume state in {out} is inconsistent (weights at epoch {epoch}, optimiser at "
            f"{meta_epoch}); delete last.* to start over"
        )
    state = _read_tensors(out / "last.safetensors")
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    tensors = st_load(optim_file.read_bytes())
    _load_optim_state(model, opt, tensors, device)
    torch.set_rng_state(tensors["rng::cpu"])
    if "rng::cuda" in tensors and torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng::cuda"], device)
    return epoch, card


# ---------------------------------------------------------------------------- validation


def quick_validate(model: Any, test: Any, card: ModelCard, device: Any, amp: bool) -> dict:
    """Fast in-training validation on the device: mean per-case Dice/IoU over the test set
    (same normalisation and thresholds as :mod:`napari_prosma.evaluation`, no HD95)."""
    import torch

    from .augment import Normalizer2D
    from .evaluation import sliding_window
    from .metrics import batch_dice_iou
    from .preprocess import normalize

    was_training = model.training
    model.eval()
    dices, ious = [], []
    ac = torch.autocast(device.type, torch.bfloat16, enabled=amp)
    with torch.inference_mode(), ac:
        if isinstance(test, Dataset2D):
            norm = Normalizer2D(card.normalization, test.images.shape[1], device)
            for i in range(0, len(test), 16):
                x = norm(torch.from_numpy(test.images[i : i + 16]).to(device))
                y = torch.from_numpy(test.masks[i : i + 16]).to(device).bool()
                pred = model(x)[:, 0] > 0
                d, u, *_ = batch_dice_iou(pred, y)
                dices.append(d.float().cpu())
                ious.append(u.float().cpu())
        else:
            k = card.out_channels
            for img, lab in zip(test.images, test.labels):
                x = torch.from_numpy(normalize(img[None], card.normalization))[None].to(device)
                logits = sliding_window(model, x, card.patch_size)
                pred = logits.argmax(1)[0]
                y = torch.from_numpy(lab.astype(np.int64)).to(device)
                p1 = torch.stack([pred == c for c in range(1, k)])
                g1 = torch.stack([y == c for c in range(1, k)])
                d, u, *_ = batch_dice_iou(p1, g1)
                dices.append(d.float().cpu()[None])
                ious.append(u.float().cpu()[None])
    model.train(was_training)
    d = torch.cat(dices)
    u = torch.cat(ious)
    out = {"dice": float(d.mean()), "iou": float(u.mean())}
    if d.ndim == 2:
        for c in range(d.shape[1]):
            out[f"dice_{card.class_names[c + 1]}"] = float(d[:, c].mean())
    return out


def gate_sparsity(model: Any, train: Any, card: ModelCard, device: Any, n: int = 32) -> Any:
    """Per-stage 5th/95th percentile and min/max, over training images, of the mean
    exact-zero fraction of z*; None for models without a sparse gate."""
    import torch

    from .augment import Normalizer2D
    from .preprocess import normalize

    if card.arch_kwargs.get("gate") not in ("full", "spatial"):
        return None
    model.eval()
    per_stage: list[list[float]] = []
    with torch.inference_mode():
        for i in range(min(n, len(train))):
            if isinstance(train, Dataset2D):
                norm = Normalizer2D(card.normalization, train.images.shape[1], device)
                x = norm(torch.from_numpy(train.images[i : i + 1]).to(device))
            else:
                vol = normalize(train.images[i][None], card.normalization)
                x = torch.from_numpy(vol)[None].to(device)
            _, maps = model(x, return_gates=True)
            vals = [float(m.zero_frac.float().mean()) for m in maps]
            for s, v in enumerate(vals):
                if len(per_stage) <= s:
                    per_stage.append([])
                per_stage[s].append(v)
    stages = []
    for s, v in enumerate(per_stage):
        a = np.asarray(v)
        stages.append(
            {
                "stage": s + 1,
                "p05": float(np.percentile(a, 5)),
                "p95": float(np.percentile(a, 95)),
                "min": float(a.min()),
                "max": float(a.max()),
            }
        )
    return {
        "what": "mean fraction of exact zeros of z* per decoder stage (1 = finest), over "
        f"{len(per_stage[0]) if per_stage else 0} training images",
        "stages": stages,
    }


def _json_safe(obj: Any) -> Any:
    """NaN/inf floats to None (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _capture(model, opt, body, eager_step, loss_acc, static_idx, n, device):  # type: ignore[no-untyped-def]
    """Capture one whole training step (batch gather + augmentation, forward, backward,
    Adam) in a CUDA graph. The three warm-up steps this needs are undone: weights, buffers
    and optimiser state are restored afterwards, so the run is the same as without a graph."""
    import torch

    snap_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    snap_opt = {p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    static_idx.copy_(torch.arange(static_idx.numel(), device=device) % n)
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                eager_step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            loss = body()
            loss.backward()
            opt.step()
            loss_acc.add_(loss.detach())
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(snap_model[k])
            for p, st in opt.state.items():
                for k, v in st.items():
                    if p in snap_opt:
                        v.copy_(snap_opt[p][k])
                    else:
                        v.zero_()
            loss_acc.zero_()
    return graph
