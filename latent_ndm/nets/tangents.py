"""Forward-mode derivatives in t written out by hand for the U-Net's layers.

dF/dt needs the network's output and its derivative in the scalar input t. torch.func.jvp gives both,
but on CPU its generic rules cost ~4.6x a forward pass instead of ~2x: every convolution also runs on a
materialised zero weight tangent (152 convolutions for the 52 of a forward), and GroupNorm and the
elementwise ops are decomposed into many small kernels. Here each layer maps a pair (value, tangent)
to a pair, with the tangent of a linear layer being the layer without its bias, so the cost is one
extra convolution per convolution and a few fused elementwise passes. A tangent of None stands for
zero (x itself does not depend on t), and stays None through linear layers.

Everything here is ordinary differentiable torch: gradients reach the parameters through values and
tangents alike (phi trains through dF/dt). tests/test_tangents.py checks each layer and the whole U-Net
against torch.func.jvp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Dual = tuple[Tensor, Tensor | None]  # (value, d value / dt); None = a zero tangent


def conv(module: nn.Conv2d, x: Dual) -> Dual:
    """A convolution (linear): the tangent is the convolution without bias."""
    value, tangent = x
    out = module(value)
    if tangent is None:
        return out, None
    return out, module._conv_forward(tangent, module.weight, None)


def linear(module: nn.Linear, x: Dual) -> Dual:
    value, tangent = x
    return module(value), None if tangent is None else F.linear(tangent, module.weight)


def silu(x: Dual) -> Dual:
    """silu(v) = v sigmoid(v); d silu = silu'(v) dv with silu'(v) = s (1 + v (1 - s)) = s + silu(v) (1 - s)."""
    value, tangent = x
    if tangent is None:
        return F.silu(value), None
    return _SiluDual.apply(value, tangent)


class _SiluDual(torch.autograd.Function):
    """(silu(v), silu'(v) dv) with a hand-written backward: as autograd of the elementwise formula, but the
    graph of eight elementwise nodes (each a pass over the activation, forward and backward) becomes one.
    Gradients of first order (what training needs); gradcheck in tests/test_tangents.py."""

    @staticmethod
    def forward(ctx, value: Tensor, tangent: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no work for it
        s = torch.sigmoid(value)
        out = value * s
        d1 = (1 - s).mul_(out).add_(s)  # silu'(v) = s + silu(v) (1 - s)
        ctx.save_for_backward(value, tangent, s, d1)
        return out, tangent * d1

    @staticmethod
    def backward(ctx, g_out: Tensor | None, g_tan: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        value, tangent, s, d1 = ctx.saved_tensors
        grad_value = grad_tangent = None
        if g_tan is not None:
            # silu''(v) = s (1 - s) (2 + v (1 - 2 s)), in place on one temporary (x (1 - s) = x - x s): on CPU a
            # fresh activation-sized tensor costs more than its arithmetic (page faults).
            d2 = torch.mul(s, -2).add_(1).mul_(value).add_(2).mul_(s)
            d2.addcmul_(d2, s, value=-1)
            grad_value = d2.mul_(tangent).mul_(g_tan)
            grad_tangent = g_tan * d1
        if g_out is not None:
            grad_value = g_out * d1 if grad_value is None else grad_value.addcmul_(g_out, d1)
        return grad_value, grad_tangent


def group_norm(module: nn.GroupNorm, x: Dual) -> Dual:
    """GroupNorm in at least float32 (as GroupNorm32), cast back to the input dtype.

    With xh = (v - mean) / std over each group: d xh = (dv - mean(dv) - xh mean(dv xh)) / std.
    """
    value, tangent = x
    dtype = torch.promote_types(value.dtype, torch.float32)
    weight = None if module.weight is None else module.weight.to(dtype)
    bias = None if module.bias is None else module.bias.to(dtype)
    if tangent is None:
        return F.group_norm(value.to(dtype), module.num_groups, weight, bias, module.eps).to(value.dtype), None
    out, tan = _GroupNormDual.apply(value.to(dtype), tangent.to(dtype), weight, bias, module.num_groups, module.eps)
    return out.to(value.dtype), tan.to(value.dtype)


class _GroupNormDual(torch.autograd.Function):
    """(GroupNorm(v), its tangent along dv) with a hand-written backward, on grouped views [B, G, C/G, L].

    Autograd of the elementwise formula records ~14 passes over the activation and ~35 in its backward;
    here the value is one fused GroupNorm kernel, the tangent 6 more passes, the backward ~20 (fused
    multiply-adds, in place on the node's own buffers). Per group (n = C/G * L, r = 1/std, xh = (v - mean) r):
    u = dv - mean(dv), a = mean(u xh), q = u - xh a, jd = r q; y = w xh + b, ty = w jd. Backward:
    ga = -r sum(gjd xh), gr = sum(gjd q), d dv = r (gjd - mean(gjd)) + ga xh / n,
    gxh = w gy - r a gjd + ga u / n, d v = r (gxh - mean(gxh) - xh mean(gxh xh)) - r^2 gr xh / n.
    Checked against torch.func.jvp and by gradcheck in tests/test_tangents.py.
    """

    @staticmethod
    def forward(ctx, v: Tensor, dv: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float):
        ctx.set_materialize_grads(False)
        b, c = v.shape[:2]
        grouped = (b, groups, c // groups, -1)
        out, mean, rstd = torch.ops.aten.native_group_norm(v, weight, bias, b, c, v[0, 0].numel(), groups, eps)
        r, m = rstd.view(b, groups, 1, 1), mean.view(b, groups, 1, 1)
        xh = torch.mul(v.reshape(grouped), r).sub_(m * r)  # (an addcmul with a broadcast input is slower)
        dvg = dv.reshape(grouped)
        u = dvg - dvg.mean((2, 3), keepdim=True)
        tan = torch.mul(u, xh)  # u xh, for a; then the tangent itself, in the same buffer
        a = _group_sum(tan) / xh[0, 0].numel()
        q = torch.addcmul(u, xh, -a)
        scale = r if weight is None else r * weight.view(1, groups, -1, 1)
        ctx.save_for_backward(xh, u, q, r, a, weight)
        ctx.shape = v.shape
        return out, torch.mul(q, scale, out=tan).reshape(v.shape)

    @staticmethod
    def backward(ctx, g_out: Tensor | None, g_tan: Tensor | None):
        # Every activation-sized tensor made here is a fresh buffer that later steps update in place: g_xh
        # becomes d v, g_jd becomes d dv, and one scratch buffer holds the products the dot products sum.
        # On CPU a fresh 16 MB tensor costs more than the arithmetic on it (page faults): this backward makes
        # 3 of them where the formula written out-of-place made 10.
        if g_out is None and g_tan is None:
            return None, None, None, None, None, None
        xh, u, q, r, a, weight = ctx.saved_tensors
        b, groups = xh.shape[:2]
        n = xh[0, 0].numel()
        w = None if weight is None else weight.view(1, groups, -1, 1)
        scratch = torch.empty_like(xh)
        dot = lambda x, y: _group_sum(torch.mul(x, y, out=scratch))  # noqa: E731
        owned = lambda g: g.clone(memory_format=torch.contiguous_format) if w is None else torch.mul(g, w)  # noqa: E731
        g_y = None if g_out is None else g_out.reshape(xh.shape)
        g_t = None if g_tan is None else g_tan.reshape(xh.shape)
        g_w = g_b = None
        if weight is not None and ctx.needs_input_grad[2]:
            g_w = torch.zeros_like(weight)
            if g_y is not None:
                g_w += torch.mul(g_y, xh, out=scratch).sum((0, 3)).reshape(-1)
            if g_t is not None:
                g_w += (torch.mul(g_t, q, out=scratch).sum(3) * r.view(b, groups, 1)).sum(0).reshape(-1)
        if ctx.needs_input_grad[3] and g_y is not None:
            g_b = g_y.sum((0, 3)).reshape(-1)
        g_xh = None if g_y is None else owned(g_y)
        g_dv = g_r = None
        if g_t is not None:
            g_jd = owned(g_t)
            g_a, g_r = -r * dot(g_jd, xh), dot(g_jd, q)
            if g_xh is None:
                g_xh = torch.mul(g_jd, -r * a)
            else:
                g_xh.addcmul_(g_jd, -r * a)
            g_xh.addcmul_(u, g_a / n)
            mean_jd = g_jd.mean((2, 3), keepdim=True)  # before g_jd is scaled in place
            g_dv = g_jd.mul_(r).sub_(r * mean_jd).addcmul_(xh, g_a / n)
        coef = -r * dot(g_xh, xh) / n
        if g_r is not None:
            coef = coef - r.square() * g_r / n
        mean_xh = g_xh.mean((2, 3), keepdim=True)
        g_v = g_xh.mul_(r).sub_(r * mean_xh).addcmul_(xh, coef)
        shape = ctx.shape
        return g_v.reshape(shape), None if g_dv is None else g_dv.reshape(shape), g_w, g_b, None, None


def _group_sum(x: Tensor) -> Tensor:
    """Per-group sums of a [B, G, C/G, L] tensor as [B, G, 1, 1]. The dot products above are this sum of a
    product written into a buffer the node reuses: on CPU torch.linalg.vecdot is the same product into a
    fresh tensor, then the sum (einsum's bmm with 1x1 outputs was 2.5x slower still)."""
    return x.sum((2, 3), keepdim=True)


def add_into(fresh: Dual, other: Dual) -> Dual:
    """fresh + other, written into fresh's buffers. For a pair just made by a convolution, whose backward
    does not need its output, so autograd allows the in-place add: no new activation-sized tensors (on CPU
    a fresh one costs more than the addition: page faults)."""
    (fv, fd), (ov, od) = fresh, other
    return fv.add_(ov), od if fd is None else (fd if od is None else fd.add_(od))


def cat(parts: list[Dual], dim: int) -> Dual:
    """torch.cat of values and of tangents (a zero tangent is materialised only when others are not)."""
    values = [p for p, _ in parts]
    if all(d is None for _, d in parts):
        return torch.cat(values, dim), None
    return torch.cat(values, dim), torch.cat([torch.zeros_like(p) if d is None else d for p, d in parts], dim)


def scale_shift(h: Dual, scale: Dual, shift: Dual) -> Dual:
    """h (1 + scale) + shift, the ResBlock's time modulation (scale, shift per example and channel)."""
    (hv, hd), (sv, sd), (tv, td) = h, scale, shift
    if hd is not None and sd is not None and td is not None and sv.shape == (*hv.shape[:2], 1, 1) == tv.shape:
        return _ScaleShiftDual.apply(hv, hd, sv, sd, tv, td)
    out = hv * (1 + sv) + tv
    tangent = None if hd is None else hd * (1 + sv)
    tangent = _add_tangents(tangent, None if sd is None else hv * sd)
    return out, _add_tangents(tangent, td)


class _ScaleShiftDual(torch.autograd.Function):
    """(h (1 + s) + b, dh (1 + s) + h ds + db) for h, dh [B, C, H, W] and s, ds, b, db [B, C, 1, 1], with a
    hand-written backward. On CPU a fresh activation-sized tensor costs more than its arithmetic (page
    faults): autograd of the formula allocates ~19 of them forward and backward, this node 5 (the rest are
    in-place passes). Gradcheck in tests/test_tangents.py."""

    @staticmethod
    def forward(ctx, hv: Tensor, hd: Tensor, sv: Tensor, sd: Tensor, tv: Tensor, td: Tensor):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no work for it
        one_s = 1 + sv
        ctx.save_for_backward(hv, hd, one_s, sd)
        return torch.mul(hv, one_s).add_(tv), torch.mul(hd, one_s).addcmul_(hv, sd).add_(td)

    @staticmethod
    def backward(ctx, g_out: Tensor | None, g_tan: Tensor | None):
        hv, hd, one_s, sd = ctx.saved_tensors
        g_hv = g_hd = g_sv = g_sd = g_tv = g_td = None
        spatial = lambda u: u.sum((2, 3), keepdim=True)  # noqa: E731
        if g_out is not None:
            g_hv, g_tv = torch.mul(g_out, one_s), spatial(g_out)
            tmp = torch.mul(g_out, hv)
            if g_tan is not None:
                tmp.addcmul_(g_tan, hd)
            g_sv = spatial(tmp)
        if g_tan is not None:
            g_hv = torch.mul(g_tan, sd) if g_hv is None else g_hv.addcmul_(g_tan, sd)
            g_hd, g_td = torch.mul(g_tan, one_s), spatial(g_tan)
            if g_out is None:
                tmp = torch.mul(g_tan, hd)
                g_sv = spatial(tmp)
            g_sd = spatial(torch.mul(g_tan, hv, out=tmp))  # tmp's buffer again
        return g_hv, g_hd, g_sv, g_sd, g_tv, g_td


def apply_linear(fn, x: Dual) -> Dual:
    """A bias-free linear map without parameters (reshape, interpolation, a fixed dropout mask)."""
    value, tangent = x
    return fn(value), None if tangent is None else fn(tangent)


def attention(q: Dual, k: Dual, v: Dual) -> Dual:
    """softmax(q k^T) v over the last two dims (q already scaled), softmax in at least float32.

    d logits = dq k^T + q dk^T; d w = w (d logits - sum(w d logits)); d out = dw v + w dv.
    """
    (qv, qd), (kv, kd), (vv, vd) = q, k, v
    logits = qv @ kv.transpose(-2, -1)
    w = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    out = w.to(vv.dtype) @ vv
    dlogits = _add_tangents(None if qd is None else qd @ kv.transpose(-2, -1),
                            None if kd is None else qv @ kd.transpose(-2, -1))
    tangent = None
    if dlogits is not None:
        dl = dlogits.to(w.dtype)
        dw = w * (dl - (w * dl).sum(-1, keepdim=True))
        tangent = dw.to(vv.dtype) @ vv
    return out, _add_tangents(tangent, None if vd is None else w.to(vv.dtype) @ vd)


def _add_tangents(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
