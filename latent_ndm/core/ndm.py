"""The NDM module: schedule + transform F + denoiser xhat + data likelihood, and its NELBO.

`NDM.nelbo` returns the three per-example terms of SPEC.md's bound in nats, for T discrete steps
or for continuous time; the training loop, the evaluation and the samplers all go through this
module, whatever the data (pixels or latents) and whether F is learned or the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latent_ndm.config import ModelConfig
from latent_ndm.core import process as P
from latent_ndm.core.noise import Noise
from latent_ndm.core.schedules import Schedule, build_schedule
from latent_ndm.core.timesteps import ImportanceSampler
from latent_ndm.core.transforms import IdentityTransform, NeuralTransform, Transform
from latent_ndm.nets.build import build_net


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


THETA_WEIGHTINGS = ("elbo", "eps_mse")


class NDM(nn.Module):
    """Neural Diffusion Model (Bartosh, Vetrov, Naesseth 2023); F = identity gives DDPM / VDM."""

    def __init__(
        self,
        schedule: Schedule,
        transform: Transform,
        denoiser: Denoiser,
        likelihood: str = "discrete8bit",
        num_steps: int = 0,
        time_sampler: ImportanceSampler | None = None,
        data_shape: tuple[int, ...] | None = None,
        theta_weighting: str = "elbo",
    ):
        super().__init__()
        if theta_weighting not in THETA_WEIGHTINGS:
            raise ValueError(f"theta_weighting must be one of {', '.join(THETA_WEIGHTINGS)}, got {theta_weighting!r}")
        if likelihood not in ("discrete8bit", "gaussian"):
            raise ValueError(f"likelihood must be 'discrete8bit' or 'gaussian', got {likelihood!r}")
        if num_steps < 0:
            raise ValueError("num_steps must be 0 (continuous time) or a positive T")
        self.schedule, self.transform, self.denoiser = schedule, transform, denoiser
        self.likelihood, self.num_steps, self.time_sampler = likelihood, num_steps, time_sampler
        self.data_shape = data_shape  # one example's shape [C, H, W], for samplers
        self.theta_weighting = theta_weighting

    def forward(
        self, x: Tensor, noise: Noise | torch.Generator | None = None, num_steps: int | None = None
    ) -> dict[str, Tensor]:
        """The NELBO terms (see `nelbo`); forward so that DDP-wrapped models train through it."""
        return self.nelbo(x, noise, num_steps)

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    # -- the pieces the samplers share -------------------------------------------------------

    def gamma(self, t: Tensor) -> Tensor:
        return self.schedule(t)

    def xhat(self, z: Tensor, t: Tensor) -> Tensor:
        """The data prediction at time t (t [B] or a scalar tensor)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])
        return self.denoiser(z, t, self.gamma(t))

    def ode_drift(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(probability-flow drift, xhat, F(xhat, t), gamma(t), gamma'(t)) at z, times t [B];
        dF/dt by forward-mode AD."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])
        gamma, dgamma = self.schedule.gamma_and_derivative(t)
        xh = self.denoiser(z, t, gamma)
        f, f_dot = self.transform.value_and_time_derivative(xh, t)
        return P.ode_drift(f, f_dot, z, gamma, dgamma), xh, f, gamma, dgamma

    def transform_many(self, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """F at several (x, t) pairs of equal batch size in one batched network call."""
        if self.transform.is_identity:
            return [x for x, _ in pairs]
        xs = torch.cat([x for x, _ in pairs])
        ts = torch.cat([t.to(xs.dtype).expand(x.shape[0]) for x, t in pairs])
        return list(self.transform(xs, ts).chunk(len(pairs)))

    def reconstruction_nll(self, x: Tensor, z_0: Tensor, gamma_0: Tensor) -> Tensor:
        if self.likelihood == "discrete8bit":
            return P.reconstruction_nll_discrete(x, z_0, gamma_0)
        return P.reconstruction_nll_gaussian(x, z_0, gamma_0)

    def decode_z0(self, z_0: Tensor) -> Tensor:
        """The most likely x under p(x | z_0): the nearest bin centre of z_0/alpha_0, or its mean."""
        alpha_0, _ = P.alpha_sigma(self.gamma(torch.zeros(z_0.shape[0], dtype=torch.float64, device=z_0.device)))
        x = z_0 / P.expand(alpha_0, z_0)
        if self.likelihood == "discrete8bit":
            return P.bin_centres(x.device, x.dtype)[P.to_bin_index(x.clamp(-1, 1))]
        return x

    # -- the NELBO ----------------------------------------------------------------------------

    def nelbo(
        self, x: Tensor, noise: Noise | torch.Generator | None = None, num_steps: int | None = None
    ) -> dict[str, Tensor]:
        """Per-example NELBO terms in nats, each [B] float64: {'rec', 'diff', 'prior'}.

        x: data in model space [B, ...] (pixels on the 8-bit bin centres in [-1, 1], or latents).
        num_steps: T of the discrete-time bound; 0 = continuous time; None = the model's own.
        L_diff is estimated at one time per example, drawn low-discrepancy across the batch (and,
        in continuous time while training, from the learned importance proposal).
        noise: a `Noise` (per-example keyed draws, see latent_ndm.core.noise), or one generator for all.
        """
        self._check_data(x)
        T = self.num_steps if num_steps is None else num_steps
        if not isinstance(noise, Noise):
            noise = Noise.from_generator(noise, x.shape[0], x.device)
        eps_0 = noise.normal(x)
        u = noise.uniform(x.device)
        eps = noise.normal(x)
        sampler = self.time_sampler if (self.training and self.time_sampler is not None and T == 0) else None
        if T > 0:
            t, weight = ((u * T).floor() + 1) / T, torch.ones_like(u)  # t = i/T, i ~ U{1..T}
        elif sampler is not None:
            t, weight = sampler.sample(u)
        else:
            t, weight = u, torch.ones_like(u)
        diff = self.diffusion_loss(x, t, eps, T)
        if sampler is not None:
            sampler.update(t, diff.detach())
        return {"rec": self.reconstruction_loss(x, eps_0), "diff": diff * weight, "prior": self.prior_loss(x)}

    def _check_data(self, x: Tensor) -> None:
        # Catches the usual slips at the API boundary (uint8 pixels, [0, 255] or [0, 1] floats) instead of
        # returning a plausible-looking but meaningless bound. The range check costs one reduction.
        if not x.is_floating_point():
            raise TypeError(f"NDM.nelbo expects float data in model space, got {x.dtype} (encode uint8 pixels "
                            "with PixelCodec first)")
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"NDM.nelbo expects a non-empty batch [B, ...], got shape {tuple(x.shape)}")
        if self.likelihood == "discrete8bit":
            lo, hi = torch.aminmax(x.detach())
            if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
                raise ValueError(f"pixels in model space lie in [-1, 1]; got values in [{lo.item():.3g}, "
                                 f"{hi.item():.3g}] (PixelCodec.encode maps uint8 images there)")

    def reconstruction_loss(self, x: Tensor, eps_0: Tensor) -> Tensor:
        """L_rec = -log p(x | z_0), z_0 = alpha_0 F(x,0) + sigma_0 eps_0, in nats [B].

        F(x, 0) = x for every transform here (NeuralTransform multiplies NN by t).
        """
        gamma_0 = self.gamma(torch.zeros(x.shape[0], dtype=torch.float64, device=x.device))
        return self.reconstruction_nll(x, P.marginal_sample(x, gamma_0, eps_0), gamma_0)

    def prior_loss(self, x: Tensor) -> Tensor:
        """L_prior = KL(q(z_1 | x) || N(0, I)) in closed form, nats [B]."""
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        (f_1,) = self.transform_many([(x, ones)])
        return P.prior_kl(f_1, self.gamma(ones))

    def diffusion_loss(self, x: Tensor, t: Tensor, eps: Tensor, num_steps: int) -> Tensor:
        """Single-time estimate of L_diff in nats [B], at times t [B] (float64) with noise eps.

        num_steps = T > 0: T * KL_i with t = i/T, s = (i-1)/T (t must lie on that grid).
        num_steps = 0: the continuous-time integrand at t (divide by p(t) for non-uniform t).
        """
        if num_steps > 0:
            s = ((t * num_steps).round() - 1) / num_steps
            gamma_t, gamma_s = self.gamma(t), self.gamma(s)
            (f_xt,) = self.transform_many([(x, t)])
            xh = self._denoise_for_loss(P.marginal_sample(f_xt, gamma_t, eps), t, gamma_t,
                                        lambda: num_steps * (gamma_t - gamma_s))
            f_xs, f_hs, f_ht = self.transform_many([(x, s), (xh, s), (xh, t)])
            return num_steps * P.diffusion_kl(f_xs - f_hs, f_xt - f_ht, gamma_s, gamma_t)
        gamma_t, dgamma_t = self.schedule.gamma_and_derivative(t)
        f_x, fdot_x = self.transform.value_and_time_derivative(x, t)
        xh = self._denoise_for_loss(P.marginal_sample(f_x, gamma_t, eps), t, gamma_t, lambda: dgamma_t)
        # dF(xhat, t)/dt holds xhat fixed (a partial derivative), yet gradients still reach theta.
        f_h, fdot_h = self.transform.value_and_time_derivative(xh, t)
        return P.diffusion_loss_continuous(f_x - f_h, fdot_x - fdot_h, gamma_t, dgamma_t)

    def _denoise_for_loss(self, z: Tensor, t: Tensor, gamma: Tensor, gamma_rate) -> Tensor:
        """xhat for the loss. With theta_weighting = 'eps_mse' the gradient that reaches theta is that of
        the loss reweighted per example by r = (gamma(1) - gamma(0)) / gamma'(t) (its discrete analogue:
        gamma_rate = T (gamma(t) - gamma(s))), i.e. the likelihood weighting 1/2 gamma' ||eps - eps_hat||^2
        of F = identity turned into DDPM's unweighted eps-MSE, normalised so that r averages 1 over t for
        any schedule (r = 1 exactly for the linear one). theta enters the loss only through xhat, so
        scaling xhat's gradient by r reweights theta; the scale 1/r on z_t's gradient undoes it on every
        other path through the denoiser (phi via F(x, t), the schedule, a stage-3 encoder), so phi, the
        schedule and the VAE still follow the true NELBO. Forward values are unchanged: the reported loss
        stays the bound (SPEC.md: a reweighted loss is allowed for theta only)."""
        if self.theta_weighting == "elbo" or not torch.is_grad_enabled():
            return self.denoiser(z, t, gamma)
        ones = torch.ones_like(t)
        span = (self.gamma(ones) - self.gamma(torch.zeros_like(t))).detach()
        r = (span / gamma_rate().detach()).to(z.dtype)
        # Every input's gradient scaled by 1/r, the output's by r: only theta's own gradient changes.
        return P.scale_grad(self.denoiser(P.scale_grad(z, 1 / r), t, P.scale_grad(gamma, 1 / r)), r)


def build_ndm(cfg: ModelConfig, channels: int, image_size: int) -> NDM:
    """An NDM from its config: networks (U-Net or DiT) from the registry for the denoiser and for NN inside F."""
    denoiser = Denoiser(
        build_net(cfg.denoiser, channels, channels, image_size),
        cfg.parameterization,
        mixing_channels=channels if cfg.mixing else 0,
        mixing_logit_init=cfg.mixing_logit_init,
    )
    if cfg.transform == "identity":
        transform: Transform = IdentityTransform()
    else:
        # F must be deterministic: F(x, .) and F(xhat, .) are separate evaluations whose difference is the
        # loss, and independent dropout masks would add an O(1) term that T/v or SNR/gamma' amplifies.
        net = build_net(cfg.transform_net, channels, channels, image_size, dropout=0.0)
        transform = NeuralTransform(net, cfg.fdot)
    sampler = None
    if cfg.num_steps == 0 and cfg.importance_sampling:
        sampler = ImportanceSampler(cfg.is_bins, cfg.is_decay, cfg.is_uniform_mix)
    return NDM(build_schedule(cfg.schedule), transform, denoiser, cfg.likelihood, cfg.num_steps, sampler,
               (channels, image_size, image_size), cfg.theta_weighting)
