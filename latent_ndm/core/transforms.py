"""The data transformation F(x, t) of the forward process, and its time derivative dF/dt.

dF/dt is the partial derivative in the explicit t with x held fixed. It is computed by forward-mode
differentiation in t, no double backward: by default ("auto") the network's own hand-written tangent
pass when it has one (the U-Net: `forward_and_time_derivative`, ~2x a forward where torch.func.jvp
costs ~4.6x on CPU), else one JVP. torch.func.jvp, torch.autograd.forward_ad and the central
difference stay selectable, as fallbacks and as the references the tests compare against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from latent_ndm.runtime import full_fp32

FDOT_METHODS = ("auto", "tangent", "jvp", "forward_ad", "fd")


class Transform(nn.Module):
    """F(x, t) with `value_and_time_derivative` giving (F, dF/dt) in one pass."""

    is_identity = False
    fdot_method = "auto"
    # Central-difference step in t. The U-Net embeds 1000 t, so the O(h^2) error is ~(1000 h)^2 / 6
    # relative; float32 round-off grows as 1e-7 / h: 1e-4 balances the two (~1e-3 relative).
    fd_step = 1e-4

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def value_and_time_derivative(self, x: Tensor, t: Tensor, method: str | None = None) -> tuple[Tensor, Tensor]:
        method = method or self.fdot_method
        t = t.to(x.dtype).contiguous()  # an expanded t cannot carry a dual tangent
        if method == "auto":
            method = "tangent" if self.has_tangent_pass else "jvp"
        if method == "tangent":
            return self.value_and_tangent(x, t)
        if method == "jvp":
            # The tangent keeps autograd history (pytorch#151782): phi is trained through dF/dt.
            return torch.func.jvp(lambda tt: self(x, tt), (t,), (torch.ones_like(t),))
        if method == "forward_ad":
            with forward_ad.dual_level():
                out = self(x, forward_ad.make_dual(t, torch.ones_like(t)))
                value, tangent = forward_ad.unpack_dual(out)
            return value, tangent
        if method == "fd":
            h = self.fd_step
            return self(x, t), (self(x, t + h) - self(x, t - h)) / (2 * h)
        raise ValueError(f"unknown dF/dt method {method!r}; choose one of {', '.join(FDOT_METHODS)}")

    has_tangent_pass = False

    @contextmanager
    def reusing(self, x: Tensor) -> Iterator[None]:
        """Inside the block, work on this very tensor x that does not depend on t may be done once for every
        F(x, .) (the loss's F(x, t) and F(x, 1)). Nothing to share for a network that sees t."""
        yield

    def value_and_tangent(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError(f"{type(self).__name__} has no hand-written tangent pass; use fdot=jvp")


class IdentityTransform(Transform):
    """F(x, t) = x: conventional diffusion (DDPM / VDM), the baseline."""

    is_identity = True

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return x

    def value_and_time_derivative(self, x: Tensor, t: Tensor, method: str | None = None) -> tuple[Tensor, Tensor]:
        return x, torch.zeros_like(x)


class NeuralTransform(Transform):
    """F(x, t) = x + t * NN(x, t): F(x, 0) = x exactly, and with NN's last layer initialised to
    zero training starts from the baseline (Bartosh et al., 2023, Sec. 3)."""

    def __init__(self, net: nn.Module, fdot_method: str = "auto"):
        super().__init__()
        if fdot_method not in FDOT_METHODS:
            raise ValueError(f"unknown dF/dt method {fdot_method!r}; choose one of {', '.join(FDOT_METHODS)}")
        self.net = net
        self.fdot_method = fdot_method
        if fdot_method == "tangent" and not self.has_tangent_pass:
            raise ValueError(f"fdot=tangent needs a network with forward_and_time_derivative "
                             f"(the U-Net); {type(net).__name__} has none: use auto or jvp")

    @property
    def has_tangent_pass(self) -> bool:
        return hasattr(self.net, "forward_and_time_derivative")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        x, t = _inputs(x, t)
        with torch.autocast(x.device.type, enabled=False), full_fp32():
            return x + _per_example(t, x) * self.net(x, t)

    def value_and_tangent(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(F, dF/dt) with dF/dt = NN + t dNN/dt from the network's tangent pass."""
        x, t = _inputs(x, t)
        with torch.autocast(x.device.type, enabled=False), full_fp32():
            out, d_out = self.net.forward_and_time_derivative(x, t)
            tt = _per_example(t, x)
            return x + tt * out, out + tt * d_out


class SeparableTransform(Transform):
    """F(x, t) = x + sum_k t^k NN_k(x), k = 1..K: a time-separable F. One network sees x only (its time input
    is held at 0) and returns the K groups NN_k stacked on the channels, so one evaluation gives F and its
    closed-form dF/dt = sum_k k t^(k-1) NN_k(x): no tangent pass. F(x, 0) = x exactly, and with NN's last
    layer initialised to zero training starts from the baseline."""

    def __init__(self, net: nn.Module, num_basis: int, fdot_method: str = "auto"):
        super().__init__()
        if num_basis < 1:
            raise ValueError(f"the separable F needs K >= 1 basis functions, got {num_basis}")
        if fdot_method not in FDOT_METHODS or fdot_method == "tangent":
            raise ValueError(f"dF/dt method {fdot_method!r}: the separable F has dF/dt in closed form (auto); "
                             f"jvp, forward_ad and fd stay selectable as references")
        self.net, self.num_basis, self.fdot_method = net, num_basis, fdot_method
        self._shared: list | None = None  # [x, its groups or None] inside `reusing`

    @contextmanager
    def reusing(self, x: Tensor) -> Iterator[None]:
        """NN(x) is computed once inside the block for every F(x, .) and dF/dt(x, .) of this tensor x: the
        continuous loss needs F(x, t), dF/dt(x, t) and F(x, 1), all from the same K groups."""
        self._shared = [x, None]
        try:
            yield
        finally:
            self._shared = None

    def groups(self, x: Tensor) -> Tensor:
        """NN_k(x) for k = 1..K, [K, B, C, H, W] (float32, see `_inputs`)."""
        shared = self._shared
        if shared is not None and shared[0] is x:
            if shared[1] is None:
                shared[1] = self._groups(x)
            return shared[1]
        return self._groups(x)

    def _groups(self, x: Tensor) -> Tensor:
        out = self.net(x, x.new_zeros(x.shape[0]))  # [B, K*C, H, W]
        return out.unflatten(1, (self.num_basis, x.shape[1])).movedim(1, 0)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        x, t = _inputs(x, t)
        with torch.autocast(x.device.type, enabled=False), full_fp32():
            return x + torch.einsum("kb,kb...->b...", self._basis(t)[0], self.groups(x))

    def value_and_time_derivative(self, x: Tensor, t: Tensor, method: str | None = None) -> tuple[Tensor, Tensor]:
        method = method or self.fdot_method
        if method != "auto":  # the generic derivatives, kept as references for the closed form
            return super().value_and_time_derivative(x, t, method)
        x, t = _inputs(x, t)
        with torch.autocast(x.device.type, enabled=False), full_fp32():
            groups = self.groups(x)
            b, db = self._basis(t)
            return x + torch.einsum("kb,kb...->b...", b, groups), torch.einsum("kb,kb...->b...", db, groups)

    def _basis(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """b_k(t) = t^k and b_k'(t) = k t^(k-1), both [K, B]."""
        k = torch.arange(1, self.num_basis + 1, dtype=t.dtype, device=t.device)[:, None]
        return t**k, k * t ** (k - 1)


def _inputs(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    # F runs in float32 even under bf16 autocast, and without TF32 on GPUs (latent_ndm.runtime): the loss
    # is a difference F(x,.) - F(xhat,.) scaled by up to SNR/gamma' (continuous) or T/v (discrete), so
    # rounding in F would not cancel.
    x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    t = t.to(x.dtype).reshape(-1)
    return x, t.expand(x.shape[0]) if t.numel() == 1 else t


def _per_example(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))
