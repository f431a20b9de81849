"""The VAE: a convolutional encoder to a diagonal Gaussian posterior, a decoder, a N(0, I) prior.

    vae = VAE.from_pretrained("runs/vae_mnist/vae")
    posterior = vae.encode(VAE.from_uint8(images))      # images uint8 [N, C, H, W] -> float [-1, 1]
    z = posterior.sample(generator)                      # or posterior.mode(); normalised latents
    VAE.to_uint8(vae.decode(z))                          # float [-1, 1] -> uint8

`encode` and `decode` speak normalised latents: (z - shift) / scale with a per-channel shift and
scale computed from training data (`fit_latent_stats`) and stored with the model, so that latents
have unit variance for a prior trained on them. Training uses the raw latents (`posterior_raw`,
`decoder_output`), on which the N(0, I) prior of stage 1 is placed.

Pixels are floats on the 8-bit bin centres -1 + (2k + 1)/256, k = 0..255 (the pixel NDM's
convention), so the discrete decoder's NELBO is in bits/dim of the same 8-bit images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import VAEConfig
from .distributions import DiagonalGaussian
from .likelihoods import build_likelihood

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all positions (LDM's mid-block attention)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(groups, ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        return x + self.out(torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w))


def _middle(ch: int, cfg: VAEConfig) -> nn.Sequential:
    attn = [Attention(ch, cfg.groups)] if cfg.attention else []
    return nn.Sequential(ResBlock(ch, ch, cfg.groups, cfg.dropout), *attn, ResBlock(ch, ch, cfg.groups, cfg.dropout))


class Encoder(nn.Module):
    """Images [B, C, H, W] -> posterior mean and log-variance [B, 2 * latent, H/f, W/f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width, cfg.groups, cfg.dropout))
                ch = width
            if level < len(widths) - 1:
                blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halves H and W
        self.down = nn.Sequential(*blocks)
        self.mid = _middle(ch, cfg)
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.mid(self.down(self.conv_in(x))))))


class Decoder(nn.Module):
    """Latents [B, latent, h, w] -> decoder output [B, out, h*f, w*f] (likelihood parameters or pixels)."""

    def __init__(self, cfg: VAEConfig, out_channels: int):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = _middle(ch, cfg)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, widths[level], cfg.groups, cfg.dropout))
                ch = widths[level]
            if level > 0:
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.up(self.mid(self.conv_in(z))))))


class VAE(nn.Module):
    """Encoder, decoder and (for the discrete decoder) its 8-bit likelihood; prior N(0, I)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.likelihood = build_likelihood(config.likelihood, config.num_mixtures) if config.decoder == "discrete" \
            else None
        per_channel = self.likelihood.params_per_channel if self.likelihood is not None else 1
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, config.in_channels * per_channel)
        # Normalisation of the latents for downstream priors; identity until fit_latent_stats.
        self.register_buffer("latent_shift", torch.zeros(config.latent_channels))
        self.register_buffer("latent_scale", torch.ones(config.latent_channels))

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output weight (the GAN's adaptive weight compares gradients here)."""
        return self.decoder.conv_out.weight

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return (self.config.latent_channels, h // self.factor, w // self.factor)

    # -- input checks ----------------------------------------------------------------------

    def check_images(self, images: Tensor) -> None:
        c, f = self.config.in_channels, self.factor
        if not torch.is_floating_point(images):
            raise TypeError(f"images must be float in [-1, 1] (use VAE.from_uint8 for uint8), got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"images must be [N, {c}, H, W], got {tuple(images.shape)}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not divisible by the VAE's factor {f}")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                             f"(uint8 images: VAE.from_uint8)")

    def check_latents(self, z: Tensor) -> None:
        if not torch.is_floating_point(z) or z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be float [N, {self.config.latent_channels}, h, w], "
                             f"got {z.dtype} {tuple(z.shape)}")

    # -- training-side pieces (raw latents) --------------------------------------------------

    def posterior_raw(self, images: Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decoder_output(self, z_raw: Tensor) -> Tensor:
        """Likelihood parameters (discrete decoder) or the reconstruction itself (perceptual)."""
        return self.decoder(z_raw)

    def reconstruction(self, output: Tensor, exact: bool = True) -> Tensor:
        """The decoded image in [-1, 1] from the decoder output: the likelihood's mean (exact=False: a cheap
        point estimate, for monitoring), or the perceptual decoder's output clamped."""
        if self.likelihood is not None:
            return self.likelihood.mean(output) if exact else self.likelihood.location(output)
        return output.clamp(-1, 1)

    def nelbo(self, images: Tensor, eps: Tensor | None = None) -> dict[str, Tensor]:
        """Per-example NELBO terms in nats (discrete decoder): {'rec': -log p(x|z), 'kl': KL(q||N(0,I))},
        z = mean + std * eps (eps ~ N(0, I) drawn here if not given), plus 'output' and 'z' for losses."""
        posterior = self.posterior_raw(images)
        z = posterior.reparameterize(torch.randn_like(posterior.mean) if eps is None else eps)
        output = self.decoder_output(z)
        rec = self.likelihood.nll(output, images) if self.likelihood is not None else images.new_zeros(len(images))
        return {"rec": rec, "kl": posterior.kl(), "output": output, "z": z}

    # -- the public API (normalised latents) ---------------------------------------------------

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """q(z | x) over normalised latents for images float [N, C, H, W] in [-1, 1]."""
        self.check_images(images)
        return self.posterior(images)

    def posterior(self, images: Tensor) -> DiagonalGaussian:
        """q(z | x) over normalised latents without the input checks (they synchronise with the device:
        for training loops, on inputs known to be valid)."""
        return self.posterior_raw(images).affine(self.latent_shift, self.latent_scale)

    def denormalize(self, latents: Tensor) -> Tensor:
        """Normalised latents -> the raw latents the decoder reads."""
        shape = (1, -1, 1, 1)
        return latents * self.latent_scale.view(shape) + self.latent_shift.view(shape)

    def decode(self, latents: Tensor) -> Tensor:
        """Images float [N, C, H, W] in [-1, 1] from normalised latents."""
        self.check_latents(latents)
        return self.reconstruction(self.decoder_output(self.denormalize(latents)))

    @torch.no_grad()
    def fit_latent_stats(self, batches, max_batches: int | None = None) -> tuple[Tensor, Tensor]:
        """Set the per-channel shift and scale from posterior samples of images (an iterable of float
        batches in [-1, 1]) so that normalised latents have zero mean and unit variance per channel."""
        total = total_sq = count = 0
        for i, images in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            z = self.posterior_raw(images.to(self.latent_shift.device)).sample().double()
            total = total + z.sum(dim=(0, 2, 3))
            total_sq = total_sq + z.square().sum(dim=(0, 2, 3))
            count += z.numel() // z.shape[1]
        if count == 0:
            raise ValueError("fit_latent_stats got no images")
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
        self.latent_shift.copy_(mean.float())
        self.latent_scale.copy_(std.float())
        return self.latent_shift.clone(), self.latent_scale.clone()

    @staticmethod
    def from_uint8(images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> float32 on the bin centres -1 + (2k + 1)/256."""
        if images.dtype != torch.uint8:
            raise TypeError(f"from_uint8 expects uint8 images, got {images.dtype}")
        return (images.float() * 2 + 1) / 256 - 1

    @staticmethod
    def to_uint8(images: Tensor) -> Tensor:
        """float in [-1, 1] -> uint8, the bin each value falls in (inverse of from_uint8 on the centres)."""
        return ((images.detach().float() + 1) * 128).floor().clamp(0, 255).to(torch.uint8)

    # -- saving and loading ----------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps({"format": "latent-ndm-vae", **self.config.to_dict()}, indent=2))
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS), metadata={"format": "latent-ndm-vae"})
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> VAE:
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a saved VAE (expected {CONFIG} and {WEIGHTS})")
        data = json.loads((path / CONFIG).read_text())
        data.pop("format", None)
        vae = cls(VAEConfig.from_dict(data))
        try:
            state = load_file(str(path / WEIGHTS))
        except Exception as e:  # safetensors has its own error types for truncated or corrupt files
            raise ValueError(f"cannot read {path / WEIGHTS}: {e}") from e
        vae.load_state_dict(state)
        return vae.to(device).eval()
