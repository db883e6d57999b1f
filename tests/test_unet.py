"""The whole network in 2D and 3D: shapes, padding, gate outputs, baselines."""

from __future__ import annotations

import pytest
import torch

from napari_prosma.nets import ARCHITECTURES, ProSMAUNet, build_model


def _net(sd, **kw):
    kw.setdefault("widths", "tiny")
    return build_model("prosma_unet", spatial_dims=sd, in_channels=1, out_channels=3, **kw).eval()


@pytest.mark.parametrize(
    ("sd", "size"), [(2, (32, 48)), (2, (37, 29)), (3, (16, 16, 16)), (3, (13, 19, 17))]
)
def test_any_size_runs_and_gate_maps_match_skip_grids(sd, size):
    net = _net(sd)
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        logits, gates = net(x, return_gates=True)
    assert logits.shape == (1, 3, *size)
    assert len(gates) == 4 == net.n_stages
    for level, m in enumerate(gates):
        grid = tuple(-(-s // 2**level) for s in size)
        assert m.psi.shape == (1, 1, *grid)
        assert m.zero_map.shape == (1, 1, *grid)
        assert m.zero_frac.ndim == 2 and torch.all((m.zero_frac >= 0) & (m.zero_frac <= 1))
        assert m.c.shape == (1, net.config["widths"][level])
        assert m.lam.ndim == 1 and torch.all(m.lam > 0)


def test_padding_does_not_leak_into_the_valid_region_shape():
    net = _net(2)
    assert net.padded_shape((37, 29)) == (48, 32)
    assert net.padded_shape((32, 48)) == (32, 48)


@pytest.mark.parametrize("sd", [2, 3])
def test_return_gates_does_not_change_logits(sd):
    net = _net(sd)
    x = torch.randn(2, 1, *([16] * sd))
    with torch.no_grad():
        a = net(x)
        b, _ = net(x, return_gates=True, return_z=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_baselines_share_the_pipeline(arch):
    net = build_model(arch, spatial_dims=2, in_channels=3, out_channels=1, widths="tiny").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y, gates = net(x, return_gates=True)
    assert y.shape == (1, 1, 32, 32)
    if arch == "unet":
        assert all(g.psi is None and g.c is None for g in gates)
    elif arch == "attention_unet":
        assert all(g.psi is not None and g.lam is None and g.c is None for g in gates)
    else:
        assert all(g.psi is not None and g.lam is not None and g.c is not None for g in gates)


def test_parameter_counts_order_the_ablations():
    counts = {
        gate: sum(p.numel() for p in _net(2, gate=gate).parameters())
        for gate in ("none", "channel", "spatial", "full")
    }
    assert counts["none"] < counts["channel"] < counts["full"]
    assert counts["none"] < counts["spatial"] < counts["full"]


def test_training_step_updates_every_theta_2d_and_3d():
    for sd in (2, 3):
        net = _net(sd).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        before = [g.theta.detach().clone() for g in net.gates]
        x = torch.randn(2, 1, *([16] * sd))
        y = torch.randint(0, 3, (2, *([16] * sd)))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        assert all(not torch.equal(b, g.theta) for b, g in zip(before, net.gates))


def test_bad_inputs_get_clear_errors():
    net = _net(2)
    with pytest.raises(ValueError, match="expects 1 channel"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="4D tensor"):
        net(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match="unknown width preset"):
        ProSMAUNet(widths="huge")
    with pytest.raises(ValueError, match="implies gate"):
        build_model("unet", gate="full")
    with pytest.raises(ValueError, match="spatial_dims"):
        ProSMAUNet(spatial_dims=4)


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
@pytest.mark.parametrize("sd", [2, 3])
def test_one_pixel_inputs_run_with_every_norm(sd, norm):
    net = _net(sd, norm=norm)
    with torch.no_grad():
        y = net(torch.randn(1, 1, *([1] * sd)))
    assert y.shape == (1, 3, *([1] * sd))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ["monai_unet", "monai_attention_unet"])
def test_monai_baselines_run_any_size_and_reload_from_their_card(arch, tmp_path):
    pytest.importorskip("monai")
    from napari_prosma.checkpoint import ModelCard, load, save
    from napari_prosma.nets import ARCH_TITLES

    kw = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "widths": "tiny"}
    model = build_model(arch, **kw).eval()
    assert type(model.net).__name__ == {"monai_unet": "UNet"}.get(arch, "AttentionUnet")
    x = torch.randn(1, 1, 37, 50)
    with torch.no_grad():
        logits, gates = model(x, return_gates=True)
    assert logits.shape == (1, 1, 37, 50) and gates == []
    assert "MONAI" in ARCH_TITLES[arch]
    card = ModelCard(architecture=arch, arch_kwargs=dict(model.config), class_names=["b", "f"])
    path = save(model, tmp_path / "m", card)
    again, _ = load(path)
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-2)
    with pytest.raises(ValueError, match="no gate option"):
        build_model(arch, gate="full", **kw)
