"""Pieces of :mod:`napari_prosma.train` that fine-tuning can reuse: resume state on disk
(safetensors only, nothing pickled), the optimiser with its parameter groups, CUDA-graph
capture of a whole training step, quick in-training validation on the device, the best
validation weights, and the gate-sparsity range written to the card."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import ModelCard
from ..datasets import Dataset
from ..fs import atomic_write_bytes


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

    from ..checkpoint import save

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

    from ..checkpoint import _read_tensors, read_card

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


# ---------------------------------------------------------------------------- optimiser


def make_optimizer(model: Any, kind: str, lr: Any, weight_decay: float, device: Any) -> Any:
    """The optimiser of a run.

    ``"adamw"``: AdamW (decoupled weight decay) on two parameter groups, the convolution
    and linear weights with ``weight_decay``, and biases, normalisation parameters and the
    gates' theta without it, so a theta that gets no task gradient does not move (under
    Adam's L2 decay it drifts towards 0 one step per iteration, i.e. lambda grows to
    softplus(0) = 0.69 whatever the data say). ``"adam_l2"``: the earlier recipe (Adam with
    L2 decay on every parameter), kept to reproduce older runs.
    """
    import torch

    capturable = device.type == "cuda"
    if kind == "adam_l2":
        return torch.optim.Adam(
            model.parameters(),
            lr=lr,
            weight_decay=weight_decay,
            capturable=capturable,
            foreach=True,
        )
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}; choose 'adamw' or 'adam_l2'")
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim <= 1 or name.endswith("theta") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, capturable=capturable, foreach=True)


# ---------------------------------------------------------------------------- validation

#: A prediction covering more than this share of an image with nothing to find counts as
#: painting a lesion that is not there.
FALSE_POSITIVE_AREA = 0.005


def quick_validate(model: Any, val: Any, card: ModelCard, device: Any, amp: bool) -> dict:
    """Fast in-training validation on the device (the split's ``val`` part, never test).

    Same normalisation and thresholds as :mod:`napari_prosma.evaluation`, no HD95.

    Returns:
        ``{"dice", "iou"}``: per-case means over every case (a case with nothing to find
        scores 1 when nothing is predicted, else 0); 2D also ``dice_target``/``iou_target``
        (cases with a target only), ``n_empty`` and ``fp_empty`` (share of the cases with
        nothing to find where more than 0.5 % of the image is predicted) and, for sparse
        gates, ``zero_frac`` (per stage, mean exact-zero fraction of z*); 3D ``dice_CLASS``.
    """
    import torch

    from .augment import Normalizer2D

    was_training = model.training
    model.eval()
    ac = torch.autocast(device.type, torch.bfloat16, enabled=amp)
    with torch.inference_mode(), ac:
        if val.dims == 2:
            out = _validate_2d(model, val, card, device, Normalizer2D)
        else:
            out = _validate_3d(model, val, card, device)
    model.train(was_training)
    return out


def _validate_2d(model: Any, val: Dataset, card: ModelCard, device: Any, Norm: Any) -> dict:
    import torch

    from ..metrics import batch_dice_iou

    norm = Norm(card.normalization, val.images.shape[1], device)
    dices, ious, area, has, zf = [], [], [], [], []
    sparse = bool(getattr(model, "gates", None)) and any(
        getattr(g, "sparse", False) for g in model.gates
    )
    for i in range(0, len(val), 16):
        x = norm(torch.from_numpy(val.images[i : i + 16]).to(device))
        y = torch.from_numpy(val.labels[i : i + 16]).to(device).bool()
        if sparse:
            logits, maps = model(x, return_gates=True)
            zf.append(torch.stack([m.zero_frac.float().mean(1) for m in maps], 1).cpu())
        else:
            logits = model(x)
        pred = logits[:, 0] > 0
        d, u, *_ = batch_dice_iou(pred, y)
        dices.append(d.float().cpu())
        ious.append(u.float().cpu())
        area.append(pred.flatten(1).float().mean(1).cpu())
        has.append(y.flatten(1).any(1).cpu())
    d, u, a, h = (torch.cat(t) for t in (dices, ious, area, has))
    out: dict[str, Any] = {"dice": float(d.mean()), "iou": float(u.mean())}
    out["dice_target"] = float(d[h].mean()) if h.any() else float("nan")
    out["iou_target"] = float(u[h].mean()) if h.any() else float("nan")
    out["n_empty"] = int((~h).sum())
    if out["n_empty"]:
        out["fp_empty"] = float((a[~h] > FALSE_POSITIVE_AREA).float().mean())
    if zf:
        out["zero_frac"] = [float(v) for v in torch.cat(zf).mean(0)]
    return out


def _validate_3d(model: Any, val: Any, card: ModelCard, device: Any) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from ..metrics import batch_dice_iou
    from ..preprocess import normalize

    k = card.out_channels
    dices, ious = [], []
    for img, lab in zip(val.images, val.labels):
        x = torch.from_numpy(normalize(img[None], card.normalization))[None].to(device)
        # on the device, as MONAI's window (Gaussian blending); evaluation uses the engine
        logits = sliding_window_inference(
            x, tuple(card.patch_size), 8, model, overlap=0.5, mode="gaussian"
        )
        pred = logits.argmax(1)[0]
        y = torch.from_numpy(lab.astype(np.int64)).to(device)
        p1 = torch.stack([pred == c for c in range(1, k)])
        g1 = torch.stack([y == c for c in range(1, k)])
        d, u, *_ = batch_dice_iou(p1, g1)
        dices.append(d.float().cpu()[None])
        ious.append(u.float().cpu()[None])
    d, u = torch.cat(dices), torch.cat(ious)
    out = {"dice": float(d.mean()), "iou": float(u.mean())}
    for c in range(d.shape[1]):
        out[f"dice_{card.class_names[c + 1]}"] = float(d[:, c].mean())
    return out


def save_best(out: Path, model: Any, card: ModelCard, best: Mapping[str, Any]) -> None:
    """Write the weights of the best validation epoch so far to ``out/best`` (float32)."""
    from ..checkpoint import save

    card.training = {**(card.training or {}), "state": {"best": dict(best)}}
    save(model, out / "best", card, dtype="float32", overwrite=True)


def load_best(out: Path, model: Any, device: Any) -> None:
    """Load ``out/best.safetensors`` into ``model`` (in place)."""
    from ..checkpoint import _read_tensors

    state = _read_tensors(out / "best.safetensors")
    with_model = model.state_dict()
    for k, v in state.items():
        with_model[k].copy_(v.to(device=device, dtype=with_model[k].dtype))


def sparsity_range(model: Any, card: ModelCard, train: Any, device: Any, n: int = 0) -> Any:
    """The card's ``gate_sparsity_range`` from up to ``n`` training cases (evenly spaced;
    ``n <= 0``: all of them),
    computed by the inference engine exactly as the plugin computes a scan's sparsity, in
    the format its parser reads (``{"stageN": [min, max]}``); None without a sparse gate.

    Returns:
        ``(range, how)``: the range and a description for ``card.extra``.
    """
    from ..inference import gate_sparsity_range, predict
    from ..nets import SPARSE_MODES

    if card.arch_kwargs.get("gate") not in SPARSE_MODES:
        return None, None
    k = len(train) if n <= 0 else min(n, len(train))
    idx = np.unique(np.linspace(0, len(train) - 1, k).round().astype(int))
    preds = []
    for i in idx:
        img, sp = train.image(i), train.spacing_of(i)
        kw = {"spacing": sp} if sp is not None else {}
        preds.append(
            # "stats": the same zero fractions as True, without stitching the maps (the
            # final evaluation of a 3D ProSMA run spent most of its time on those)
            predict(
                img, model, card, device=str(device), precision="fp32", return_gates="stats", **kw
            )
        )
    how = {
        "part": "train",
        "n_images": len(idx),
        "statistic": "per-image mean exact-zero fraction of z* per decoder stage; [min, max]",
        "by": "napari_prosma.inference.gate_sparsity_range (inference.predict, fp32, "
        "return_gates='stats')",
    }
    return gate_sparsity_range(preds), how


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
