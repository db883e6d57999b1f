"""Model maths of the ProSMA gate (paper §2.2–2.3), in 2D and 3D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_prosma.nets import SkipGate, soft_threshold, theta_for_lambda

DIMS = [2, 3]


def _shape(sd: int, n: int = 2, c: int = 6) -> tuple[int, ...]:
    return (n, c, 9, 11) if sd == 2 else (n, c, 5, 7, 6)


@pytest.mark.parametrize("sd", DIMS)
def test_soft_threshold_exact_zeros_where_below_lambda(sd):
    u = torch.randn(_shape(sd))
    lam = torch.rand(u.shape[1]) * 0.8
    z = soft_threshold(u, lam)
    lam_b = lam.view(1, -1, *([1] * sd))
    below = u.abs() <= lam_b
    assert torch.all(z[below] == 0)  # exact zeros, not small numbers
    assert torch.all(z[~below] != 0)
    # closed form of eq. 4 and the shrinkage by exactly lambda
    assert torch.allclose(z[~below].abs(), (u.abs() - lam_b.expand_as(u))[~below])
    assert torch.equal(torch.sign(z[~below]), torch.sign(u[~below]))


@pytest.mark.parametrize("sd", DIMS)
def test_soft_threshold_solves_the_l1_problem(sd):
    """z* minimises 1/2||z-u||^2 + lam||z||_1: no perturbation lowers the objective."""
    u = torch.randn(_shape(sd, n=1, c=3))
    lam = torch.tensor([0.1, 0.5, 1.0])
    z = soft_threshold(u, lam)
    lam_b = lam.view(1, -1, *([1] * sd))

    def obj(v):
        return 0.5 * ((v - u) ** 2).sum() + (lam_b * v.abs()).sum()

    best = obj(z)
    for _ in range(20):
        assert obj(z + 0.05 * torch.randn_like(z)) >= best


@pytest.mark.parametrize("sd", DIMS)
def test_support_shrinks_monotonically_with_lambda(sd):
    u = torch.randn(_shape(sd))
    lam = torch.rand(u.shape[1])
    prev = soft_threshold(u, lam) != 0
    for step in range(1, 6):
        cur = soft_threshold(u, lam + 0.2 * step) != 0
        assert torch.all(cur <= prev)  # supp(z(lam')) is a subset of supp(z(lam))
        prev = cur
    assert prev.sum() < (soft_threshold(u, lam) != 0).sum()


@pytest.mark.parametrize("sd", DIMS)
def test_proximal_step_is_one_lipschitz(sd):
    lam = torch.rand(6)
    for _ in range(20):
        u, v = torch.randn(_shape(sd)), torch.randn(_shape(sd))
        v = u + torch.randn_like(u) * torch.rand(1)
        lhs = torch.linalg.vector_norm(soft_threshold(u, lam) - soft_threshold(v, lam))
        assert lhs <= torch.linalg.vector_norm(u - v) + 1e-6


def test_theta_for_lambda_inverts_softplus():
    for lam in (1e-3, 0.1, 1.0, 5.0):
        assert F.softplus(torch.tensor(theta_for_lambda(lam))).item() == pytest.approx(
            lam, rel=1e-5
        )


@pytest.mark.parametrize("sd", DIMS)
def test_gate_outputs_shapes_ranges_and_exact_sparsity(sd):
    torch.manual_seed(0)
    gate = SkipGate(sd, x_ch=6, g_ch=10, att_ch=8, theta_init=theta_for_lambda(0.2))
    x, g = torch.randn(_shape(sd)), torch.randn(_shape(sd, c=10))
    out, m = gate(x, g, return_maps=True, return_z=True)
    assert out.shape == x.shape
    assert m.psi.shape == (2, 1, *x.shape[2:])  # psi has x's spatial shape
    assert torch.all((m.psi > 0) & (m.psi < 1))
    assert m.c.shape == (2, 6) and torch.all((m.c > 0) & (m.c < 1))  # one per skip channel
    assert m.lam.shape == (8,) and torch.allclose(m.lam, torch.full((8,), 0.2), atol=1e-5)
    # z* is exactly the soft threshold of the compatibility field u
    u = gate.compatibility(x, g)
    assert torch.equal(m.z, soft_threshold(u, m.lam))
    assert torch.equal(m.z == 0, u.abs() <= m.lam.view(1, -1, *([1] * sd)))
    assert torch.allclose(m.zero_frac, (m.z == 0).flatten(2).float().mean(-1))
    assert m.zero_map.shape == m.psi.shape
    # eq. 5: x~ = x * c * psi
    c = m.c.view(2, 6, *([1] * sd))
    assert torch.allclose(out, x * c * m.psi, atol=1e-6)


@pytest.mark.parametrize("sd", DIMS)
def test_gradients_reach_theta(sd):
    gate = SkipGate(sd, x_ch=6, g_ch=6)
    x, g = torch.randn(_shape(sd)), torch.randn(_shape(sd))
    out, _ = gate(x, g)
    out.square().mean().backward()
    assert gate.theta.grad is not None
    assert torch.any(gate.theta.grad != 0)
    for name in ("w_x", "w_g", "fuse", "psi"):
        assert getattr(gate, name).weight.grad is not None
    assert gate.mlp[0].weight.grad is not None


@pytest.mark.parametrize("sd", DIMS)
def test_large_lambda_zeroes_everything_so_psi_is_constant(sd):
    gate = SkipGate(sd, 6, 6, mode="spatial", theta_init=theta_for_lambda(1e4))
    x, g = torch.randn(_shape(sd)), torch.randn(_shape(sd))
    _, m = gate(x, g, return_maps=True)
    assert torch.all(m.zero_frac == 1)
    expected = torch.sigmoid(gate.psi.bias).item()
    assert torch.allclose(m.psi, torch.full_like(m.psi, expected))


@pytest.mark.parametrize("sd", DIMS)
def test_ablation_switches_remove_what_they_say(sd):
    x, g = torch.randn(_shape(sd)), torch.randn(_shape(sd))
    plain = SkipGate(sd, 6, 6, mode="none")
    out, m = plain(x, g, return_maps=True)
    assert torch.equal(out, x) and m.psi is None and m.c is None
    assert len(list(plain.parameters())) == 0

    spatial = SkipGate(sd, 6, 6, mode="spatial")
    out, m = spatial(x, g, return_maps=True)
    assert m.c is None and m.psi is not None and m.lam is not None
    assert not hasattr(spatial, "mlp")
    assert torch.allclose(out, x * m.psi)

    channel = SkipGate(sd, 6, 6, mode="channel")
    out, m = channel(x, g, return_maps=True)
    assert m.psi is None and m.lam is None and m.c is not None
    assert not hasattr(channel, "theta") and not hasattr(channel, "w_x")
    assert torch.allclose(out, x * m.c.view(2, 6, *([1] * sd)))

    att = SkipGate(sd, 6, 6, mode="attention")
    out, m = att(x, g, return_maps=True)
    assert m.c is None and m.lam is None and m.zero_frac is None
    assert not hasattr(att, "theta") and not hasattr(att, "dw")
    assert torch.allclose(out, x * m.psi)


def test_unknown_gate_mode_is_refused():
    with pytest.raises(ValueError, match="unknown gate mode"):
        SkipGate(2, 4, 4, mode="dense")


# ---------------------------------------------------------------------------- exact removal


def _exact_pair(sd: int, theta: float = -2.0) -> tuple[SkipGate, SkipGate]:
    """A paper-form gate and an exact-removal gate with the same weights."""
    torch.manual_seed(3)
    full = SkipGate(sd, 6, 6, mode="full", theta_init=theta)
    exact = SkipGate(sd, 6, 6, mode="exact", theta_init=theta)
    exact.load_state_dict(full.state_dict())
    return full, exact


@pytest.mark.parametrize("sd", DIMS)
def test_exact_removal_passes_nothing_where_every_latent_channel_is_zero(sd):
    full, exact = _exact_pair(sd, theta=theta_for_lambda(0.3))
    x, g = torch.randn(_shape(sd)), torch.randn(_shape(sd))
    out_f, mf = full(x, g, return_maps=True, return_z=True)
    out_e, me = exact(x, g, return_maps=True, return_z=True)
    removed = (me.z == 0).all(1, keepdim=True)
    assert removed.any() and (~removed).any()  # the test covers both kinds of location
    # the paper's form still passes sigmoid(bias) of x*c there; exact removal passes nothing
    assert torch.all(mf.psi[removed] > 0)
    assert torch.all(me.psi[removed] == 0)
    assert torch.all(out_e.masked_select(removed.expand_as(out_e)) == 0)
    # elsewhere the two forms are the same gate
    keep = ~removed
    assert torch.equal(me.psi[keep], mf.psi[keep])
    assert torch.equal(
        out_e.masked_select(keep.expand_as(out_e)), out_f.masked_select(keep.expand_as(out_f))
    )
    assert torch.equal(me.z, mf.z)  # z* itself (eq. 4) is untouched


@pytest.mark.parametrize("sd", DIMS)
def test_exact_removal_support_shrinks_monotonically_with_lambda(sd):
    """Theorem 1 (monotone sparsity) carried to the skip: a larger lambda can only remove
    more locations, never bring one back."""
    x, g = torch.randn(_shape(sd)), torch.randn(_shape(sd))
    prev = None
    for lam in (0.01, 0.1, 0.3, 0.6, 1.0, 5.0):
        gate = _exact_pair(sd, theta=theta_for_lambda(lam))[1]
        out, m = gate(x, g, return_maps=True)
        passed = m.psi != 0
        if prev is not None:
            assert torch.all(passed <= prev)
        prev = passed
    assert not prev.any()  # lambda 5 removes the whole skip
    assert torch.all(out == 0)


@pytest.mark.parametrize("sd", DIMS)
def test_exact_removal_keeps_the_proximal_step_non_expansive(sd):
    gate = _exact_pair(sd, theta=theta_for_lambda(0.2))[1]
    x, g = torch.randn(_shape(sd)), torch.randn(_shape(sd))
    u = gate.compatibility(x, g)
    v = u + 0.3 * torch.randn_like(u)
    lam = gate.lam
    assert (soft_threshold(u, lam) - soft_threshold(v, lam)).norm() <= (u - v).norm() + 1e-6


@pytest.mark.parametrize("sd", DIMS)
def test_dead_gate_gets_no_gradient_and_the_surrogate_brings_it_back(sd):
    """With z* zero everywhere (lambda far above |u|) nothing upstream of the prox gets a
    gradient; with dead_slope the forward pass is identical (the same exact zeros) and theta
    and W_x receive a gradient again."""
    x, g = torch.randn(_shape(sd)), torch.randn(_shape(sd))
    grads, outs = {}, {}
    for slope in (0.0, 0.1):
        torch.manual_seed(5)
        gate = SkipGate(sd, 6, 6, mode="exact", theta_init=theta_for_lambda(50.0), dead_slope=slope)
        out, m = gate(x, g, return_maps=True)
        assert torch.all(m.zero_frac == 1)
        outs[slope] = out.detach()
        (out - x).square().mean().backward()
        grads[slope] = (gate.theta.grad.abs().sum(), gate.w_x.weight.grad.abs().sum())
    assert torch.equal(outs[0.0], outs[0.1])
    assert grads[0.0][0] == 0 and grads[0.0][1] == 0
    assert grads[0.1][0] > 0 and grads[0.1][1] > 0
