"""Perceptual and adversarial parts of the LDM autoencoder loss (Rombach et al. 2022, taming-transformers).

The decoder is trained with  rec + lpips + lambda * disc_factor * g_loss,  where lambda balances the
gradients of the reconstruction and GAN terms at the decoder's last layer (Esser et al. 2021, eq. 7).
All losses here are per example ([B]); the caller reduces and weights them.

LPIPS is loaded strictly offline: the torchvision backbone must already be in the torch hub cache.
"""

import math
import warnings
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torchvision backbone files that lpips loads through the torch hub cache ($TORCH_HOME/hub/checkpoints).
LPIPS_WEIGHTS = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_TORCHVISION_URL = "https://download.pytorch.org/models/"


def _check_net(net: str) -> None:
    if net not in LPIPS_WEIGHTS:
        # lpips itself would fail with an UnboundLocalError on an unknown name
        raise ValueError(f"unknown LPIPS network {net!r}; choices: {sorted(LPIPS_WEIGHTS)}")


def lpips_backbone_path(net: str) -> Path:
    """Where torchvision (and so lpips) looks for the backbone weights of `net`: <torch hub dir>/checkpoints/."""
    _check_net(net)
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_WEIGHTS[net]


def load_lpips(net: str = "vgg", random_backbone: bool = False) -> nn.Module:
    """A frozen LPIPS metric (Zhang et al. 2018) in eval mode; never downloads anything.

    Args:
        net: backbone, one of "vgg" (LDM's choice), "alex", "squeeze". "alex" needs images of at least 32x32.
        random_backbone: randomly initialised backbone with the calibrated linear heads. For tests only: the
            distance is then NOT perceptual. No file is needed.

    Raises:
        FileNotFoundError: the backbone file is not in the torch hub cache (see `lpips_backbone_path`).
    """
    _check_net(net)
    if not random_backbone:
        path = lpips_backbone_path(net)
        if not path.is_file():
            # Without this check torchvision would try to download the file (and hang or fail offline).
            raise FileNotFoundError(
                f"LPIPS({net!r}) needs the torchvision backbone weights {path.name}, not found in {path.parent}. "
                f"Nothing is downloaded: fetch {_TORCHVISION_URL}{path.name} elsewhere and put it in {path.parent} "
                "(the torch hub cache: $TORCH_HOME/hub/checkpoints, or the folder given to torch.hub.set_dir)."
            )
    with warnings.catch_warnings():
        # lpips 0.1.4 still calls torchvision's legacy `pretrained=` interface; expected, not actionable.
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
        # pretrained=True: the calibrated linear heads shipped in the lpips wheel. pnet_rand=False makes lpips call
        # torchvision's vgg16(pretrained=True), which reads the file checked above; pnet_rand=True passes
        # pretrained=False (weights=None), which reads and downloads nothing.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)
    # The heads carry Dropout layers (the state dict keys depend on them, so use_dropout=False would silently leave
    # the heads random under lpips' strict=False load). Zero them so that a parent module's .train() cannot make
    # the distance stochastic.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    # lpips leaves the linear heads trainable: freeze everything, and keep it out of the optimizer and DDP.
    return model.eval().requires_grad_(False)


def lpips_distance(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example LPIPS distance [B] between images x, y in [-1, 1] of shape [B, C, H, W], C in {1, 3}.

    Grey images (C = 1) are repeated to 3 channels, as the ImageNet backbones expect RGB.
    """
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected [B, 1 or 3, H, W] images, got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    return model(x, y).reshape(x.shape[0])  # [B, 1, 1, 1] -> [B]


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix's / LDM's NLayerDiscriminator): one real/fake logit per image patch.

    GroupNorm replaces BatchNorm: batch statistics differ between processes and between the real and the fake batch
    (which are passed separately), so the discriminator would judge batches rather than images.

    The receptive field is 70 px for n_layers=3 (34 for 2, 16 for 1). Output size: a 32x32 input gives 2x2 logits
    with n_layers=3, but a 28x28 input only 1x1 (a global discriminator); use n_layers=2 there (5x5 logits).
    """

    def __init__(self, in_channels: int, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()

        def norm(c: int) -> nn.GroupNorm:
            return nn.GroupNorm(math.gcd(32, c), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_out = channels
        for n in range(1, n_layers + 1):
            c_in, c_out = c_out, channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last feature layer keeps the resolution
            # no bias: the norm's shift absorbs it
            layers += [nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False), norm(c_out), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(c_out, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)

        # pix2pix init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # [B, C, H, W] -> [B, 1, h, w] logits


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss per example [B]: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    loss_real = F.relu(1.0 - logits_real).flatten(1).mean(1)
    loss_fake = F.relu(1.0 + logits_fake).flatten(1).mean(1)
    return 0.5 * (loss_real + loss_fake)


def generator_loss(logits_fake: Tensor) -> Tensor:
    """Generator (decoder) adversarial loss per example [B]: -mean D(x_hat)."""
    return -logits_fake.flatten(1).mean(1)


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """LDM's GAN weight  lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + 1e-4), L the decoder's last layer.

    Both losses are scalars still attached to the graph (kept, so the caller can backpropagate them afterwards).
    Returns a detached scalar clamped to [0, max_weight]; LDM multiplies it by its `disc_weight` afterwards.
    """
    if rec_loss.ndim != 0 or g_loss.ndim != 0:
        raise ValueError(f"expected scalar losses, got shapes {tuple(rec_loss.shape)} and {tuple(g_loss.shape)}")
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def disc_factor(step: int, start: int) -> float:
    """GAN term switch: 0 before step `start`, 1 from `start` on (LDM's `disc_start`)."""
    return 0.0 if step < start else 1.0
