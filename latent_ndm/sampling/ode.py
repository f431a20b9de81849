"""ODE solvers on batched tensors: fixed-step Heun and adaptive Dormand-Prince RK45.

Written here rather than taken from scipy or torchdiffeq: the state stays a torch tensor on the
model's device (no host round trips per step), the drift may itself use forward-mode AD, and the
project keeps its dependency list to what the field's stack already brings. One step size is
shared by the whole batch and the error is the RMS over all of its elements (as torchdiffeq does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Drift = Callable[[float, Tensor], Tensor]  # (t, z) -> dz/dt


@dataclass
class ODEResult:
    z: Tensor  # the state at the final time
    nfe: int  # drift evaluations
    steps: int  # accepted steps
    rejected: int = 0  # rejected steps (adaptive solvers)


def heun(f: Drift, z: Tensor, ts: Tensor, callback: Callable[[int, float, Tensor], None] | None = None) -> ODEResult:
    """Heun's second-order method on the grid ts (increasing or decreasing)."""
    nfe = 0
    d = f(float(ts[0]), z)
    nfe += 1
    for k in range(len(ts) - 1):
        t, s = float(ts[k]), float(ts[k + 1])
        h = s - t
        z_euler = z + h * d
        d_next = f(s, z_euler)
        nfe += 1
        z = z + 0.5 * h * (d + d_next)
        # The corrected state's derivative is re-evaluated at the next step (a Heun step needs f at its start).
        if k + 1 < len(ts) - 1:
            d = f(s, z)
            nfe += 1
        if callback is not None:
            callback(k + 1, s, z)
    return ODEResult(z, nfe, len(ts) - 1)


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980), the method of scipy's RK45 and torchdiffeq's dopri5.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def rk45(
    f: Drift,
    z: Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int = 10_000,
    callback: Callable[[int, float, Tensor], None] | None = None,
) -> ODEResult:
    """Adaptive Dormand-Prince RK45 from t0 to t1 (either direction) with error control
    ||err / (atol + rtol * max(|z|, |z_new|))||_rms <= 1 and the first-same-as-last property."""
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    h = min(first_step or 0.01 * span, span)
    t, k1 = t0, f(t0, z)
    nfe, steps, rejected = 1, 0, 0
    while direction * (t1 - t) > 1e-12 * max(1.0, span):
        if steps + rejected >= max_steps:
            raise RuntimeError(f"rk45: more than {max_steps} steps between t={t0} and t={t1}; loosen rtol/atol")
        h = min(h, abs(t1 - t))
        hs = direction * h
        ks = [k1]
        for i in range(1, 7):
            zi = z + hs * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
            ks.append(f(t + _C[i] * hs, zi))
        nfe += 6
        z5 = z + hs * sum(b * k for b, k in zip(_B5, ks) if b != 0.0)
        err = hs * sum((b5 - b4) * k for b5, b4, k in zip(_B5, _B4, ks) if b5 != b4)
        scale = atol + rtol * torch.maximum(z.abs(), z5.abs())
        err_norm = float((err / scale).square().mean().sqrt())
        if err_norm <= 1.0:
            t, z, k1 = t + hs, z5, ks[6]  # FSAL: the last stage is f at the new point
            steps += 1
            if callback is not None:
                callback(steps, t, z)
        else:
            rejected += 1
        # Standard step-size controller for a 5th-order method, with safety factor and bounds.
        factor = 0.9 * (err_norm + 1e-16) ** (-1 / 5)
        h = h * min(5.0, max(0.2, factor))
    return ODEResult(z, nfe, steps, rejected)
