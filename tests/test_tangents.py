"""The hand-written tangent pass (latent_ndm.nets.tangents, UNet.forward_and_time_derivative) against torch.func.jvp,
layer by layer and for the whole U-Net and NDM loss, values and parameter gradients, in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import float64, perturbed  # noqa: F401 (fixture)
from torch import nn

from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.ndm import NDM, Denoiser
from latent_ndm.core.schedules import LearnedGamma
from latent_ndm.core.transforms import NeuralTransform
from latent_ndm.nets import tangents as D
from latent_ndm.nets.unet import UNet, build_unet

pytestmark = pytest.mark.usefixtures("float64")  # the two computations must agree to round-off


def _jvp(fn, x, dx):
    return torch.func.jvp(fn, (x,), (dx,))


def _close(a, b, tol=1e-11):
    assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max()


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_tangent(affine: bool) -> None:
    g = torch.Generator().manual_seed(0)
    norm = nn.GroupNorm(4, 8, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    x, dx = torch.randn(3, 8, 5, 5, generator=g), torch.randn(3, 8, 5, 5, generator=g)
    value, tangent = _jvp(norm, x, dx)
    v2, d2 = D.group_norm(norm, (x, dx))
    _close(v2, value), _close(d2, tangent)
    assert D.group_norm(norm, (x, None))[1] is None
    # The hand-written backward: numerical gradients in v, dv and the affine parameters, with both outputs
    # used and with each alone (the backward updates its own buffers in place, so each path is checked).
    params = list(norm.parameters())
    inputs = (x.clone().requires_grad_(), dx.clone().requires_grad_(), *params)
    both = lambda v, d, *_: D.group_norm(norm, (v, d))  # noqa: E731
    tangent_only = lambda v, d, *_: D.group_norm(norm, (v, d))[1]  # noqa: E731
    value_only = lambda v, d, *_: D.group_norm(norm, (v, d))[0]  # noqa: E731
    for fn in (both, tangent_only, value_only):
        assert torch.autograd.gradcheck(fn, inputs)


def test_silu_scale_shift_and_attention_tangents() -> None:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, dx = r(4, 6), r(4, 6)
    _close(D.silu((x, dx))[1], _jvp(torch.nn.functional.silu, x, dx)[1])
    h, s, b = (r(2, 3, 4, 4), r(2, 3, 4, 4)), (r(2, 3, 1, 1), r(2, 3, 1, 1)), (r(2, 3, 1, 1), r(2, 3, 1, 1))
    ref = torch.func.jvp(lambda h_, s_, b_: h_ * (1 + s_) + b_, (h[0], s[0], b[0]), (h[1], s[1], b[1]))
    got = D.scale_shift(h, s, b)
    _close(got[0], ref[0]), _close(got[1], ref[1])
    q, k, v = [(r(2, 1, 9, 4), r(2, 1, 9, 4)) for _ in range(3)]
    attn = lambda q_, k_, v_: (q_ @ k_.transpose(-2, -1)).softmax(-1) @ v_  # noqa: E731
    ref = torch.func.jvp(attn, (q[0], k[0], v[0]), (q[1], k[1], v[1]))
    got = D.attention(q, k, v)
    _close(got[0], ref[0]), _close(got[1], ref[1])


def test_silu_tangent_backward_equals_autograd_of_the_jvp() -> None:
    """The hand-written backward of the silu pair: gradients of (value, tangent) in (v, dv) equal reverse
    mode through torch.func.jvp, also when only one of the two outputs is used."""
    g = torch.Generator().manual_seed(2)
    v, dv, w1, w2 = (torch.randn(3, 7, generator=g) * 3 for _ in range(4))
    v, dv = v.requires_grad_(), dv.requires_grad_()
    out, tan = D.silu((v, dv))
    ref_out, ref_tan = _jvp(torch.nn.functional.silu, v, dv)
    for loss, ref in [((out * w1 + tan * w2).sum(), (ref_out * w1 + ref_tan * w2).sum()),
                      ((tan * w2).sum(), (ref_tan * w2).sum()), ((out * w1).sum(), (ref_out * w1).sum())]:
        got = torch.autograd.grad(loss, [v, dv], retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref, [v, dv], retain_graph=True, allow_unused=True)
        for a, b in zip(got, want):
            if b is None:
                assert a is None or not a.any()
            else:
                _close(a, b)
    inputs = (v.detach().requires_grad_(), dv.detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: D.silu((a, b)), inputs)


def test_scale_shift_backward_by_gradcheck() -> None:
    """The hand-written backward of the scale-shift pair (per-example, per-channel s and b), with both outputs
    used and with each alone (an unused output's gradient arrives as None)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 3, 4, 5)] * 2 + [(2, 3, 1, 1)] * 4
    inputs = tuple(torch.randn(*s, generator=g).requires_grad_() for s in shapes)
    pairs = lambda *a: D.scale_shift(*zip(a[::2], a[1::2]))  # noqa: E731
    assert type(pairs(*inputs)[1].grad_fn).__name__ == "_ScaleShiftDualBackward"  # the fast path is taken
    assert torch.autograd.gradcheck(pairs, inputs)
    assert torch.autograd.gradcheck(lambda *a: pairs(*a)[0], inputs)
    assert torch.autograd.gradcheck(lambda *a: pairs(*a)[1], inputs)


def _random_unet(**kw) -> UNet:
    net = build_unet("tiny", 2, 2, 8, zero_init_out=False, **kw)
    return perturbed(net, 3, scale=0.2)  # the zero-initialised convs open, so every path carries a tangent


@pytest.mark.parametrize("kw", [{}, dict(num_res_blocks=2, attn_levels=(0, 1), num_heads=2)])
def test_unet_tangent_pass_equals_jvp_with_its_parameter_gradients(kw) -> None:
    net = _random_unet(**kw)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.1, 0.5, 0.93])
    value, tangent = _jvp(lambda tt: net(x, tt), t, torch.ones_like(t))
    v2, d2 = net.forward_and_time_derivative(x, t)
    _close(v2, value), _close(d2, tangent)
    assert tangent.abs().max() > 1e-2  # not vacuous
    params = list(net.parameters())
    g_ref = torch.autograd.grad((tangent * tangent.detach().sign()).sum() + value.sum(), params, allow_unused=True,
                                materialize_grads=True)
    g_got = torch.autograd.grad((d2 * d2.detach().sign()).sum() + v2.sum(), params, allow_unused=True,
                                materialize_grads=True)
    for a, b in zip(g_got, g_ref):
        _close(a, b, 1e-10)


def test_ndm_loss_and_gradients_with_the_tangent_pass_equal_jvp() -> None:
    """The continuous NELBO (both dF/dt of the loss) and every gradient are those of fdot=jvp."""
    unet = lambda s: perturbed(UNet(1, 1, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1,  # noqa: E731
                                    attn_resolutions=(4,), groups=4), s)
    model = NDM(LearnedGamma(-10.0, 5.0, hidden=8), NeuralTransform(unet(1), "tangent"),
                Denoiser(unet(2), "eps"), "discrete8bit", 0)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    results = []
    for method in ("tangent", "jvp"):
        model.transform.fdot_method = method
        model.zero_grad()
        terms = NDMLoss()(model, x, torch.Generator().manual_seed(0))
        sum(terms.values()).sum().backward()
        results.append((terms["diff"].detach(), [p.grad.clone() for p in model.parameters()]))
    _close(results[0][0], results[1][0], 1e-10)
    for a, b in zip(results[0][1], results[1][1]):
        _close(a, b, 1e-9)


def test_auto_chooses_the_tangent_pass_and_jvp_for_other_networks() -> None:
    class Plain(nn.Module):
        def forward(self, x, t):
            return x * torch.sin(3 * t).reshape(-1, 1, 1, 1)

    x, t = torch.randn(2, 1, 4, 4), torch.tensor([0.3, 0.7])
    plain = NeuralTransform(Plain())
    assert not plain.has_tangent_pass and NeuralTransform(_random_unet()).has_tangent_pass
    f, fdot = plain.value_and_time_derivative(x, t)  # auto -> jvp
    _close(fdot, x * (torch.sin(3 * t) + 3 * t * torch.cos(3 * t)).reshape(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="forward_and_time_derivative"):
        NeuralTransform(Plain(), "tangent")
