"""How one Monte-Carlo estimate of the NDM's NELBO is drawn (docs/MATH.md, sections 5-8).

`NDMLoss(ndm, x, noise)` returns the per-example terms {'rec', 'diff', 'prior'} in nats. It owns the
policy around the pure model: the order of the random draws (eps_0, then the uniforms that become t,
then eps: with keyed noise the same example always gets the same draws), the time t (the grid i/T,
stratified uniforms, or the learned importance proposal while training in continuous time, with the
1/p(t) weight), the theta-only reweighting, and the checks of the input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latent_ndm.core.ndm import NDM
from latent_ndm.core.noise import Noise
from latent_ndm.core.timesteps import ImportanceSampler

THETA_WEIGHTINGS = ("elbo", "eps_mse", "sigmoid")


class NDMLoss(nn.Module):
    """The NELBO terms of a batch, per example in nats.

    proposal: the importance proposal for t (continuous time, used while training only). The loss
    densities it learns from are kept until `update_proposal`, which the training loop calls once per
    optimizer step on every process (it gathers the global batch: a collective, made explicit there).
    theta_weighting: 'elbo' (the bound), or theta alone follows the bound reweighted per example by r(t):
    - 'eps_mse': r = (gamma(1) - gamma(0)) / gamma'(t) (discrete time: gamma'(t) -> T (gamma(t) - gamma(s))),
      which turns the likelihood weighting of F = identity into DDPM's unweighted eps-MSE under this
      schedule: r = 1 for a linear schedule (the bound itself), about 2.05 on average for the cosine one
      from -13.3 to 5 (the constant only rescales theta's learning rate);
    - 'sigmoid': r = sigmoid(gamma(t) + sigmoid_bias), Kingma & Gao's (2023) monotone weighting
      sigmoid(b - log SNR): the low-noise levels, which dominate the bound but not the samples, weigh less.
    phi, the schedule and a VAE stay on the bound, and the returned values are always the bound's terms.
    """

    def __init__(self, proposal: ImportanceSampler | None = None, theta_weighting: str = "elbo",
                 sigmoid_bias: float = 2.0):
        super().__init__()
        if theta_weighting not in THETA_WEIGHTINGS:
            raise ValueError(f"theta_weighting must be one of {', '.join(THETA_WEIGHTINGS)}, got {theta_weighting!r}")
        self.proposal, self.theta_weighting, self.sigmoid_bias = proposal, theta_weighting, sigmoid_bias
        self._seen: list[tuple[Tensor, Tensor]] = []  # (t, unweighted L_diff) since the last update

    def forward(self, ndm: NDM, x: Tensor, noise: Noise | torch.Generator | None = None,
                num_steps: int | None = None) -> dict[str, Tensor]:
        """x: data in model space [B, ...]; noise: a `Noise` (keyed draws) or one generator for all;
        num_steps: T of the discrete bound, 0 = continuous time, None = the model's own."""
        self._check(ndm, x)
        T = ndm.num_steps if num_steps is None else num_steps
        if not isinstance(noise, Noise):
            noise = Noise.from_generator(noise, x.shape[0], x.device)
        eps_0 = noise.normal(x)
        u = noise.uniform(x.device)
        eps = noise.normal(x)
        learn_t = self.proposal is not None and self.training and T == 0
        if T > 0:
            t, weight = ((u * T).floor() + 1) / T, torch.ones_like(u)  # t = i/T, i ~ U{1..T}
        elif learn_t:
            t, weight = self.proposal.sample(u)
        else:
            t, weight = u, torch.ones_like(u)
        # The terms one by one (what NDM.forward returns), so that the 1/p(t) weight joins L_diff where the
        # autograd graph had it in earlier versions: gradients then sum in the same order, bit for bit.
        with ndm.transform.reusing(x):  # a time-separable F: one network pass on x for L_diff and L_prior
            diff = ndm.diffusion_loss(x, t, eps, T, self.theta_grad_scale(ndm, t, T))
            if learn_t:
                self._seen.append((t.detach(), diff.detach()))
            return {"rec": ndm.reconstruction_loss(x, eps_0), "diff": diff * weight, "prior": ndm.prior_loss(x)}

    def theta_grad_scale(self, ndm: NDM, t: Tensor, num_steps: int) -> Tensor | None:
        """r [B] of theta's weighting (None for the bound, or when no gradient is taken)."""
        if self.theta_weighting == "elbo" or not torch.is_grad_enabled():
            return None
        with torch.no_grad():
            if self.theta_weighting == "sigmoid":
                return torch.sigmoid(ndm.gamma(t) + self.sigmoid_bias)
            span = ndm.gamma(torch.ones_like(t)) - ndm.gamma(torch.zeros_like(t))
            if num_steps > 0:
                s = ((t * num_steps).round() - 1) / num_steps
                return span / (num_steps * (ndm.gamma(t) - ndm.gamma(s)))
            return span / ndm.schedule.gamma_and_derivative(t)[1]

    def update_proposal(self, keep: bool = True) -> None:
        """Fold the loss densities seen since the last call into the proposal (a collective when distributed);
        keep=False forgets them (a skipped, non-finite step must not poison the proposal)."""
        seen, self._seen = self._seen, []
        if self.proposal is None or not seen or not keep:
            return
        t, diff = (torch.cat(v) for v in zip(*seen))
        self.proposal.update(t, diff)

    def _check(self, ndm: NDM, x: Tensor) -> None:
        # The usual slips at the API boundary (uint8 pixels, [0, 255] or [0, 1] floats) would otherwise give a
        # plausible-looking but meaningless bound. The range check syncs with the device, so training (whose
        # data come from a codec, in range by construction) skips it.
        if not x.is_floating_point():
            raise TypeError(f"the NELBO expects float data in model space, got {x.dtype} (encode uint8 pixels "
                            "with PixelCodec first)")
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"the NELBO expects a non-empty batch [B, ...], got shape {tuple(x.shape)}")
        if not self.training:
            ndm.likelihood.check(x)
