"""A model of images: a codec to the NDM's space and the NDM there (pixel and latent models alike).

`ImageModel.nelbo_terms` is the whole model's per-example bound (docs/MATH.md, sections 5 and 11): the
codec's terms (none for pixels; 'decoder' and 'log_q' for a VAE) plus the NDM's 'rec', 'diff', 'prior'
of the encoded data, all float64 nats [B]. Training, evaluation and the pipeline all go through it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latent_ndm.core.codec import Codec
from latent_ndm.core.loss import NDMLoss
from latent_ndm.core.ndm import NDM
from latent_ndm.core.noise import Noise
from latent_ndm.core.process import scale_grad


class ImageModel(nn.Module):
    def __init__(self, codec: Codec, ndm: NDM):
        super().__init__()
        if codec.likelihood != ndm.likelihood.name:
            raise ValueError(f"the codec's data need the {codec.likelihood!r} likelihood, but the NDM has "
                             f"{ndm.likelihood.name!r} (model.likelihood)")
        self.codec, self.ndm = codec, ndm
        # Weights saved before this class existed: a bare NDM's keys, or a latent model's 'vae.*' and 'ndm.*'.
        self._register_load_state_dict_pre_hook(_legacy_keys)

    @property
    def device(self) -> torch.device:
        return self.ndm.device

    def nelbo_terms(self, batch: Tensor, noise: Noise, loss: NDMLoss, num_steps: int | None = None,
                    kl_weight: float = 1.0) -> dict[str, Tensor]:
        """Per-example terms of the bound in nats, float64 [B]; their sum is the NELBO of the batch.

        kl_weight (LSGM's KL annealing) changes gradients only: the codec's encoder is trained on
        decoder + w (log_q + the NDM's NELBO), while the NDM's own parameters keep the unweighted gradient
        of its NELBO (LSGM trains the prior on its cross-entropy term unweighted)."""
        x, terms = self.codec.encode(batch, noise)
        if kl_weight != 1.0 and "log_q" in terms:
            w = torch.full((len(x),), kl_weight, device=x.device)
            terms["log_q"], x = scale_grad(terms["log_q"], w), scale_grad(x, w)
        terms = {k: v.double() for k, v in terms.items()}
        return terms | {k: v.double() for k, v in loss(self.ndm, x, noise, num_steps).items()}


def _legacy_keys(state_dict: dict, prefix: str, *args) -> None:
    keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    if any(k.startswith("codec.") for k in keys):
        return
    for key in keys:  # (a pixel model's codec has no state, so its keys all start with 'ndm.' already)
        new = "codec." + key if key.startswith("vae.") else key if key.startswith("ndm.") else "ndm." + key
        state_dict[prefix + new] = state_dict.pop(prefix + key)
