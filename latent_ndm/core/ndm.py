"""The NDM module: schedule + transform F + denoiser xhat + data likelihood (docs/MATH.md).

`NDM` is the model and nothing else: given the data and the random draws (times t, noise eps_0 and eps)
it returns the three per-example NELBO terms in nats, for T discrete steps or for continuous time. How
the draws are made (their order, the importance proposal for t, the theta-only reweighting) is the
loss's business (`core/loss.py: NDMLoss`). The samplers use gamma, xhat, F and the ODE drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from latent_ndm.core import process as P
from latent_ndm.core.likelihoods import Likelihood, get_likelihood
from latent_ndm.core.schedules import Schedule
from latent_ndm.core.transforms import Transform


class Denoiser(nn.Module):
    """xhat_theta(z_t, t) from a network that predicts x directly or the noise eps.

    With eps, xhat = (z_t - sigma_t eps_hat) / alpha_t. Any function of (z_t, t) is a valid xhat, so
    both give an exact NELBO; they differ in how well-conditioned the network's target is.

    mixing_channels > 0 adds LSGM's mixed prediction (Vahdat et al., 2021, Sec. 3.2): with a learnable
    per-channel a = sigmoid(logit), xhat = (1 - a) alpha_t z_t + a xhat_net. alpha_t z_t = E[x | z_t] is the
    optimal prediction when the data are N(0, I) and F is the identity, which a latent prior trained
    against a VAE's N(0, I)-regularised latents starts close to; in eps terms it is LSGM's
    eps = (1 - a) sigma_t z_t + a eps_net, the same mixture.
    """

    def __init__(self, net: nn.Module, parameterization: str = "eps", mixing_channels: int = 0,
                 mixing_logit_init: float = -6.0):
        super().__init__()
        if parameterization not in ("eps", "x"):
            raise ValueError(f"parameterization must be 'eps' or 'x', got {parameterization!r}")
        self.net, self.parameterization = net, parameterization
        self.mixing_logit = nn.Parameter(torch.full((mixing_channels,), mixing_logit_init)) if mixing_channels else None

    def forward(self, z: Tensor, t: Tensor, gamma: Tensor) -> Tensor:
        out = self.net(z, t.to(z.dtype))
        alpha, sigma = P.alpha_sigma(gamma)
        xhat = out if self.parameterization == "x" else (z - P.expand(sigma, z) * out) / P.expand(alpha, z)
        if self.mixing_logit is None:
            return xhat
        a = torch.sigmoid(self.mixing_logit).to(xhat.dtype).reshape(1, -1, *([1] * (z.dim() - 2)))
        return (1 - a) * (P.expand(alpha, z) * z) + a * xhat


class Drift(NamedTuple):
    """The probability-flow ODE drift at (z, t) and the pieces it was made of (samplers reuse them)."""

    drift: Tensor  # dz/dt [B, ...]
    xhat: Tensor  # the data prediction xhat(z, t)
    f: Tensor  # F(xhat, t)
    gamma: Tensor  # gamma(t) [B], float64
    dgamma: Tensor  # gamma'(t) [B], float64


class NDM(nn.Module):
    """Neural Diffusion Model (Bartosh, Vetrov, Naesseth 2023); F = identity gives DDPM / VDM.

    likelihood: p(x | z_0), 'discrete8bit' (pixels) or 'gaussian' (latents), or a likelihood object.
    num_steps: T of the discrete-time bound, 0 for continuous time.
    data_shape: one example's shape [C, H, W] in model space (what samplers draw).
    """

    CONFIG, WEIGHTS = "config.json", "model.safetensors"
    config: dict[str, Any] | None = None  # what it was built from (set by nets/build.py), saved with the weights

    def __init__(self, schedule: Schedule, transform: Transform, denoiser: Denoiser,
                 likelihood: str | Likelihood = "discrete8bit", num_steps: int = 0,
                 data_shape: tuple[int, ...] | None = None):
        super().__init__()
        if num_steps < 0:
            raise ValueError("num_steps must be 0 (continuous time) or a positive T")
        self.schedule, self.transform, self.denoiser = schedule, transform, denoiser
        self.likelihood = get_likelihood(likelihood) if isinstance(likelihood, str) else likelihood
        self.num_steps, self.data_shape = num_steps, data_shape
        # Runs saved before the loss owned the t proposal stored it under the model: not model state.
        self._register_load_state_dict_pre_hook(_drop_legacy_proposal)

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def save_pretrained(self, path: str | Path) -> Path:
        """config.json (the model's own config, class name) + model.safetensors, like `VAE.save_pretrained`."""
        if self.config is None:
            raise ValueError("this NDM was not built from a config (latent_ndm.nets.build.build_ndm); save its "
                             "state_dict instead")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.CONFIG).write_text(json.dumps({"class": "NDM", "format": "latent-ndm"} | self.config, indent=2))
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(path / self.WEIGHTS), metadata={"format": "latent-ndm"})
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> NDM:
        from latent_ndm.nets.build import ndm_from_config  # the builder lives above core/: it reads configs

        path = Path(path)
        if not (path / cls.CONFIG).is_file() or not (path / cls.WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a saved NDM (expected {cls.CONFIG} and {cls.WEIGHTS})")
        data = json.loads((path / cls.CONFIG).read_text())
        if data.get("class") != "NDM":
            raise ValueError(f"{path / cls.CONFIG} describes a {data.get('class')!r}, not an NDM")
        ndm = ndm_from_config(data)
        try:
            state = load_file(str(path / cls.WEIGHTS))
        except Exception as e:  # safetensors has its own error types for truncated or corrupt files
            raise ValueError(f"cannot read {path / cls.WEIGHTS}: {e}") from e
        ndm.load_state_dict(state)
        return ndm.to(device).eval()

    # -- the pieces the samplers share -------------------------------------------------------

    def gamma(self, t: Tensor) -> Tensor:
        return self.schedule(t)

    def xhat(self, z: Tensor, t: Tensor) -> Tensor:
        """The data prediction at time t (t [B] or a scalar tensor)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])
        return self.denoiser(z, t, self.gamma(t))

    def ode_drift(self, z: Tensor, t: Tensor) -> Drift:
        """The probability-flow drift at z, times t [B] (docs/MATH.md, section 9); dF/dt by forward mode."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])
        gamma, dgamma = self.schedule.gamma_and_derivative(t)
        xh = self.denoiser(z, t, gamma)
        f, f_dot = self.transform.value_and_time_derivative(xh, t)
        return Drift(P.ode_drift(f, f_dot, z, gamma, dgamma), xh, f, gamma, dgamma)

    def transform_many(self, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """F at several (x, t) pairs of equal batch size in one batched network call."""
        if self.transform.is_identity:
            return [x for x, _ in pairs]
        if len(pairs) == 1:  # x itself, not a copy: a transform `reusing` x recognises it
            x, t = pairs[0]
            return [self.transform(x, t.to(x.dtype).expand(x.shape[0]))]
        xs = torch.cat([x for x, _ in pairs])
        ts = torch.cat([t.to(xs.dtype).expand(x.shape[0]) for x, t in pairs])
        return list(self.transform(xs, ts).chunk(len(pairs)))

    def decode_z0(self, z_0: Tensor) -> Tensor:
        """The most likely x under p(x | z_0): the nearest bin centre of z_0/alpha_0, or its mean."""
        alpha_0, _ = P.alpha_sigma(self.gamma(torch.zeros(z_0.shape[0], dtype=torch.float64, device=z_0.device)))
        return self.likelihood.most_likely(z_0, alpha_0)

    # -- the NELBO terms at given draws (docs/MATH.md, sections 5 and 6) ---------------------------

    def forward(self, x: Tensor, t: Tensor, eps_0: Tensor, eps: Tensor, num_steps: int | None = None,
                theta_grad_scale: Tensor | None = None) -> dict[str, Tensor]:
        """Per-example NELBO terms in nats, each [B] float64: {'rec', 'diff', 'prior'}.

        x: data in model space [B, ...]; t [B] float64: the time of the one-sample estimate of L_diff
        (on the grid i/T for T > 0); eps_0, eps: standard normals like x for z_0 and z_t.
        num_steps: T of the discrete bound, 0 = continuous time, None = the model's own.
        theta_grad_scale [B]: scales the gradient that reaches theta alone (see `_denoise_for_loss`).
        """
        T = self.num_steps if num_steps is None else num_steps
        with self.transform.reusing(x):  # a time-separable F: one network pass on x for L_diff and L_prior
            diff = self.diffusion_loss(x, t, eps, T, theta_grad_scale)
            return {"rec": self.reconstruction_loss(x, eps_0), "diff": diff, "prior": self.prior_loss(x)}

    def reconstruction_loss(self, x: Tensor, eps_0: Tensor) -> Tensor:
        """L_rec = -log p(x | z_0), z_0 = alpha_0 F(x,0) + sigma_0 eps_0, in nats [B].

        F(x, 0) = x for every transform here (NeuralTransform multiplies NN by t).
        """
        gamma_0 = self.gamma(torch.zeros(x.shape[0], dtype=torch.float64, device=x.device))
        return self.likelihood.nll(x, P.marginal_sample(x, gamma_0, eps_0), gamma_0)

    def prior_loss(self, x: Tensor) -> Tensor:
        """L_prior = KL(q(z_1 | x) || N(0, I)) in closed form, nats [B]."""
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        (f_1,) = self.transform_many([(x, ones)])
        return P.prior_kl(f_1, self.gamma(ones))

    def diffusion_loss(self, x: Tensor, t: Tensor, eps: Tensor, num_steps: int,
                       theta_grad_scale: Tensor | None = None) -> Tensor:
        """Single-time estimate of L_diff in nats [B], at times t [B] (float64) with noise eps.

        num_steps = T > 0: T * KL_i with t = i/T, s = (i-1)/T (t must lie on that grid).
        num_steps = 0: the continuous-time integrand at t (divide by p(t) for non-uniform t).
        """
        if num_steps > 0:
            s = ((t * num_steps).round() - 1) / num_steps
            gamma_t, gamma_s = self.gamma(t), self.gamma(s)
            (f_xt,) = self.transform_many([(x, t)])
            xh = self._denoise_for_loss(P.marginal_sample(f_xt, gamma_t, eps), t, gamma_t, theta_grad_scale)
            f_xs, f_hs, f_ht = self.transform_many([(x, s), (xh, s), (xh, t)])
            return num_steps * P.diffusion_kl(f_xs - f_hs, f_xt - f_ht, gamma_s, gamma_t)
        gamma_t, dgamma_t = self.schedule.gamma_and_derivative(t)
        f_x, fdot_x = self.transform.value_and_time_derivative(x, t)
        xh = self._denoise_for_loss(P.marginal_sample(f_x, gamma_t, eps), t, gamma_t, theta_grad_scale)
        # dF(xhat, t)/dt holds xhat fixed (a partial derivative), yet gradients still reach theta.
        f_h, fdot_h = self.transform.value_and_time_derivative(xh, t)
        return P.diffusion_loss_continuous(f_x - f_h, fdot_x - fdot_h, gamma_t, dgamma_t)

    def _denoise_for_loss(self, z: Tensor, t: Tensor, gamma: Tensor, grad_scale: Tensor | None) -> Tensor:
        """xhat for the loss; with grad_scale r [B] the gradient that reaches theta is r times that of the
        loss, and nothing else changes (docs/MATH.md, section 8). theta enters the loss only through xhat,
        so xhat's gradient is scaled by r and every input's by 1/r, which undoes it on every other path
        through the denoiser (phi via F(x, t), the schedule, a stage-3 encoder). Forward values are equal."""
        if grad_scale is None or not torch.is_grad_enabled():
            return self.denoiser(z, t, gamma)
        r = grad_scale.to(z.dtype)
        return P.scale_grad(self.denoiser(P.scale_grad(z, 1 / r), t, P.scale_grad(gamma, 1 / r)), r)


def _drop_legacy_proposal(state_dict: dict, prefix: str, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "time_sampler.")]:
        del state_dict[key]
