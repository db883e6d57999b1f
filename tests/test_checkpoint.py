"""Save/load round trip, golden outputs, and refusal of bad checkpoints."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_prosma.checkpoint import (
    CheckpointError,
    ModelCard,
    checkpoint_paths,
    file_sha256,
    load,
    read_card,
    save,
)
from napari_prosma.nets import build_model

DATA = Path(__file__).parent / "data"
GOLDEN_WIDTHS = [4, 8, 8, 16, 16]


def _card(net, **kw) -> ModelCard:
    return ModelCard(
        architecture="prosma_unet",
        arch_kwargs=net.config,
        name="t",
        class_names=["background", "a", "b"][: net.out_channels],
        **kw,
    )


def _net(sd=2, **kw):
    kw.setdefault("widths", "tiny")
    return build_model("prosma_unet", spatial_dims=sd, in_channels=1, out_channels=3, **kw).eval()


def _golden_input(sd: int) -> torch.Tensor:
    rng = np.random.default_rng(1234)
    shape = (1, 1, 40, 36) if sd == 2 else (1, 1, 20, 18, 17)
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("sd", [2, 3])
def test_round_trip_is_exact(tmp_path, sd):
    net = _net(sd)
    # make BN running stats non-trivial so they are round-tripped too
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 1, *([16] * sd)))
    net.eval()
    card = _card(net, spacing=[1.0] * sd, patch_size=[16] * sd, metrics={"dice": 0.5})
    w = save(net, tmp_path / "m", card)
    assert w == tmp_path / "m.safetensors" and (tmp_path / "m.json").exists()
    net2, card2 = load(tmp_path / "m")
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k
    assert card2.metrics == {"dice": 0.5} and card2.spacing == [1.0] * sd
    assert card2.weights_sha256 == file_sha256(w)
    assert card2.torch_version == torch.__version__
    x = torch.randn(1, 1, *([16] * sd))
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_half_precision_round_trip_is_close_and_small(tmp_path):
    net = _net(2)
    save(net, tmp_path / "full", _card(net))
    save(net, tmp_path / "half", _card(net), dtype="float16")
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (
        tmp_path / "full.safetensors"
    ).stat().st_size
    half, card = load(tmp_path / "half.safetensors")
    assert card.weights_dtype == "float16"
    assert next(half.parameters()).dtype == torch.float32
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), half(x), atol=5e-2)


def test_never_overwrites(tmp_path):
    net = _net(2)
    save(net, tmp_path / "m", _card(net))
    before = file_sha256(tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError, match="never overwritten"):
        save(_net(2, widths=[4, 8, 8, 8, 8]), tmp_path / "m.safetensors", _card(net))
    assert file_sha256(tmp_path / "m.safetensors") == before


@pytest.mark.parametrize("sd", [2, 3])
def test_golden_output(sd):
    """A committed checkpoint must give the committed logits and gate maps.

    Regenerate (only after an intended change of the maths) with
    ``PROSMA_REGEN_GOLDEN=1 pytest tests/test_checkpoint.py -k golden``.
    """
    ckpt, ref = DATA / f"golden_{sd}d", DATA / f"golden_{sd}d_out.npz"
    if os.environ.get("PROSMA_REGEN_GOLDEN"):
        torch.manual_seed(sd)
        net = _net(sd, widths=GOLDEN_WIDTHS, norm="instance")
        # non-trivial gates: make thresholds bite on some channels
        for g in net.gates:
            g.theta.data.uniform_(-3.0, 0.5)
        for p in checkpoint_paths(ckpt):
            p.unlink(missing_ok=True)
        save(net, ckpt, _card(net))
        with torch.no_grad():
            y, gates = net(_golden_input(sd), return_gates=True)
        np.savez_compressed(
            ref,
            logits=y.numpy(),
            **{f"psi{i}": g.psi.numpy() for i, g in enumerate(gates)},
            **{f"zero{i}": g.zero_frac.numpy() for i, g in enumerate(gates)},
            **{f"c{i}": g.c.numpy() for i, g in enumerate(gates)},
        )
    net, _ = load(ckpt)
    want = np.load(ref)
    with torch.no_grad():
        y, gates = net(_golden_input(sd), return_gates=True)
    np.testing.assert_allclose(y.numpy(), want["logits"], rtol=1e-4, atol=1e-4)
    for i, g in enumerate(gates):
        np.testing.assert_allclose(g.psi.numpy(), want[f"psi{i}"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g.c.numpy(), want[f"c{i}"], rtol=1e-4, atol=1e-5)
        # exact-zero fractions may move by one element where |u| sits on lambda
        np.testing.assert_allclose(g.zero_frac.numpy(), want[f"zero{i}"], atol=0.02)
    assert any(float(want[f"zero{i}"].mean()) > 0.05 for i in range(4)), "golden gates not sparse"


# ---------------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    net = _net(2)
    save(net, tmp_path / "m", _card(net))
    return tmp_path / "m"


def test_truncated_weights_are_refused(saved):
    w = saved.with_suffix(".safetensors")
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="does not match its model card"):
        load(saved)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(saved, verify_hash=False)


def test_garbage_weights_are_refused(saved):
    saved.with_suffix(".safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(saved, verify_hash=False)


def test_missing_or_broken_card(saved):
    card = saved.with_suffix(".json")
    data = json.loads(card.read_text())
    card.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(saved)
    del data["arch_kwargs"]
    card.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"lacks required field.*arch_kwargs"):
        read_card(saved)
    card.unlink()
    with pytest.raises(CheckpointError, match=r"m\.json is missing"):
        load(saved)


def test_mismatched_shapes_name_the_tensor(saved):
    card = saved.with_suffix(".json")
    data = json.loads(card.read_text())
    data["arch_kwargs"]["widths"] = [8, 16, 32, 64, 256]
    card.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"tensor '.*' has shape .* but the card's"):
        load(saved)
    data["arch_kwargs"]["gate"] = "none"
    data["arch_kwargs"]["widths"] = [8, 16, 32, 64, 128]
    card.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unexpected"):
        load(saved)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_with_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = _net(2)
    save(net, tmp_path / "m", _card(net))
    # a .pt "checkpoint" that runs a command when unpickled
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": _Evil()}))
    (tmp_path / "evil.json").write_text((tmp_path / "m.json").read_text())
    with pytest.raises(CheckpointError, match="could not be read safely"):
        load(evil)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    # a torch.save'd file with a plain state dict loads through weights_only=True
    torch.save(net.state_dict(), tmp_path / "ok.pt")
    (tmp_path / "ok.json").write_text((tmp_path / "m.json").read_text())
    net2, _ = load(tmp_path / "ok.pt")
    assert torch.equal(net2.head.weight, net.head.weight)


def test_newer_card_format_asks_for_an_update(saved):
    card = saved.with_suffix(".json")
    data = json.loads(card.read_text())
    data["format_version"] = 99
    card.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="update the plugin"):
        read_card(saved)


def test_folder_layout_like_save_pretrained(tmp_path):
    net = _net(2)
    d = tmp_path / "hub_style"
    save(net, d / "model", _card(net))
    (d / "model.json").rename(d / "config.json")
    net2, _ = load(d)
    assert torch.equal(net2.head.bias, net.head.bias)
