"""Typed run configuration: dataclasses with commented defaults, YAML diffs, dotted overrides.

A YAML file holds only what differs from the defaults below; `key=value` overrides on the command
line are applied on top. Every key and type is checked against these dataclasses, so a typo is an
error that lists the valid keys instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from latent_ndm.config_io import ConfigError, config_diff, from_dict, merge, parse_overrides, to_dict  # noqa: F401
from vae.config import VAEConfig, VAELossConfig


@dataclass
class ScheduleConfig:
    kind: str = "linear"  # linear | cosine | learned (VDM's monotone network)
    gamma_min: float = -13.3  # gamma(0), log noise-to-signal ratio at t = 0 (VDM's value: sigma_0 ~ 1e-3,
    # well below the 8-bit bin width 2/256, so L_rec is small)
    gamma_max: float = 5.0  # gamma(1) (VDM's value)
    learned_hidden: int = 1024  # width of the learned schedule's monotone network


# The NetConfig fields that each network architecture takes (latent_ndm.nets.build.build_net).
NET_ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "unet": ("channels", "channel_mult", "num_res_blocks", "attn_resolutions", "num_heads", "dropout", "groups"),
    "dit": ("patch_size", "hidden", "depth", "heads", "mlp_ratio", "dropout"),
}


@dataclass
class NetConfig:
    arch: str = "unet"  # unet (latent_ndm.nets.unet) | dit (latent_ndm.nets.dit, a transformer over patches)
    size: str = "mnist"  # a preset of UNET_SIZES (arch=unet) or DIT_SIZES (arch=dit); the fields below override it
    dropout: float | None = None  # both archs
    # arch=unet only
    channels: int | None = None
    channel_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attn_resolutions: tuple[int, ...] | None = None
    num_heads: int | None = None
    groups: int | None = None
    # arch=dit only
    patch_size: int | None = None  # must divide the image (or latent) size
    hidden: int | None = None  # token width
    depth: int | None = None  # transformer blocks
    heads: int | None = None
    mlp_ratio: float | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields set (not None) that `arch` takes, as keyword overrides of its preset."""
        keys = NET_ARCH_KEYS.get(self.arch, ())
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class ModelConfig:
    transform: str = "neural"  # neural: F(x,t) = x + t*NN(x,t) (NDM) | identity: F(x,t) = x (DDPM/VDM) |
    # separable: F(x,t) = x + sum_k t^k NN_k(x), k = 1..transform_basis (dF/dt in closed form, no tangent pass)
    transform_basis: int = 4  # transform=separable: K, the number of basis functions t^k
    num_steps: int = 0  # T of the discrete-time NELBO; 0 = continuous time
    parameterization: str = "eps"  # the denoiser predicts eps (xhat = (z - sigma*eps)/alpha) or x directly
    likelihood: str = "discrete8bit"  # p(x|z_0): discrete8bit (256 bins per pixel) | gaussian (latents)
    fdot: str = "auto"  # dF/dt by: auto (tangent if the network has one, else jvp) | tangent (the U-Net's hand-written
    # forward-mode pass, ~2x a forward) | jvp (torch.func) | forward_ad (torch.autograd.forward_ad) | fd (central diff.)
    importance_sampling: bool = True  # continuous time: learn a proposal for t (variance reduction)
    is_bins: int = 100  # bins of the piecewise-constant proposal
    is_decay: float = 0.99  # EMA decay of the per-bin second moments that set the proposal
    is_uniform_mix: float = 0.1  # proposal = (1-m) * learned + m * uniform, keeps 1/p(t) bounded
    theta_weighting: str = "elbo"  # elbo | eps_mse | sigmoid: theta alone trains on a reweighting of the diffusion
    # term for sample quality (eps_mse: DDPM's eps-MSE under this schedule, the bound itself for a linear one;
    # sigmoid: sigmoid(gamma(t) + theta_sigmoid_bias), less weight on low noise); phi, the schedule and a VAE
    # stay on the bound, and the reported loss is always the bound
    theta_sigmoid_bias: float = 2.0  # theta_weighting=sigmoid: b of sigmoid(b - log SNR) (Kingma & Gao, 2023)
    mixing: bool = False  # LSGM's mixed prediction: xhat = (1-a) alpha_t z_t + a xhat_net, a per channel, learned
    mixing_logit_init: float = -6.0  # logit of a at initialisation (LSGM's value: mostly the N(0, I) optimum)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    denoiser: NetConfig = field(default_factory=NetConfig)
    transform_net: NetConfig = field(default_factory=NetConfig)


@dataclass
class DataConfig:
    shards: str = "data/mnist5k"  # a folder of shards with manifest.json (scripts/make_shards.sh), or of
    # another tool's webdataset shards (no manifest: counted once, cached in shard_index.json, and every image
    # converted to channels x image_size x image_size on reading)
    train_urls: str = ""  # optional webdataset URL spec of the train shards in manifest order, e.g.
    # "pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -"; default: the files beside the manifest
    # (without a manifest: SHARDS/train-*.tar)
    test_urls: str = ""  # the same for the test shards
    image_keys: str = "jpg,jpeg,png,webp"  # other tools' shards: the sample fields that may hold the image
    label_key: str = "cls"  # other tools' shards: the label's field, json.FIELD for a field of the .json, or none
    channels: int = 1  # checked against the manifest
    image_size: int = 28
    hflip: bool = False  # random horizontal flips of training images
    num_workers: int = 2  # decoding processes per training process (0: decode in the training process)
    prefetch: int = 4  # chunks each decoding worker prepares ahead
    lanes: int = 0  # shuffled streams the global batch is drawn from equally; 0 = processes x workers.
    # Fix it (a multiple of every process count you use) and runs on 1, 2, ... processes see the same data.
    strict: bool = False  # a damaged shard or undecodable sample stops the run instead of being skipped


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer steps (progress is counted in steps, not epochs)
    batch_size: int = 32  # global batch size
    lr: float = 2.0e-3  # high for the short CPU runs these defaults are for; paper-scale configs set 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 50  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (decays to min_lr at train.steps)
    min_lr: float = 0.0  # the end of the cosine decay
    grad_accum: int = 1  # micro-batches per step (gradients add up to the batch's); must divide each
    # process's data lanes (data.lanes / processes), so that the step's noise is the unaccumulated step's
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA of the weights (kept in float32); 0 disables the EMA
    bf16: bool = False  # bf16 autocast for the forward pass
    tf32: bool = True  # TF32 float32 matmuls/convolutions for the denoiser and VAE on Ampere+ GPUs; F and the
    # bound always run in full float32 (latent_ndm/runtime.py)
    compile: bool = False  # torch.compile the denoiser's network in place (F stays eager: forward-mode AD)
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: graph capture without code generation)
    channels_last: bool = False  # NHWC weights and activations (faster convolutions on GPUs and some CPUs)
    seed: int = 0
    log_every: int = 25
    eval_every: int = 500  # test NELBO; 0 disables periodic evaluation
    eval_examples: int = 500  # test images per periodic evaluation
    sample_every: int = 1000  # write a sample grid; 0 disables
    sample_steps: int = 100  # ancestral steps for the periodic sample grid (at most T for a discrete model)
    num_samples: int = 64
    ckpt_every: int = 500
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    max_nonfinite_steps: int = 20  # stop after this many non-finite steps in a row (each is skipped); 0: never


@dataclass
class EvalConfig:
    batch_size: int = 250
    num_steps: int | None = None  # T at which to evaluate the NELBO; None = the model's own
    repeats: int = 1  # Monte-Carlo draws of (t, eps) per test image
    seed: int = 1234
    final_examples: int | None = None  # evenly spaced test images of a run's final report (None: all)


@dataclass
class _RunCommon:
    """What every run has: where it lives, its data, training and evaluation settings."""

    kind: str = ""  # what the run trains: fixed per schema, recorded so that loading needs no guessing
    name: str = "run"  # the run lives in {out_dir}/{name}
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class RunConfig(_RunCommon):
    """A pixel-space NDM (or its F = identity baseline)."""

    kind: str = "pixel"
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class VAERunConfig(_RunCommon):
    """Stage 1: the VAE (vae/) trained through the same loop and data pipeline."""

    kind: str = "vae"
    name: str = "vae"
    vae: VAEConfig = field(default_factory=VAEConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)


@dataclass
class LatentRunConfig(_RunCommon):
    """Stages 2 and 3 of the latent model: an NDM prior on a stage-1 VAE's latents, then end to end."""

    kind: str = "latent"
    name: str = "latent_ndm"
    vae_path: str = "runs/vae_mnist/vae"  # a saved VAE: train_vae.sh exports runs/NAME/vae
    stage: str = "prior"  # prior: stage 2, the VAE frozen | joint: stage 3, every part trained end to end
    init_from: str = ""  # a run directory (e.g. stage 2's) whose latest EMA weights start this run
    vae_lr: float = 1.0e-4  # stage 3: the VAE's learning rate (the prior uses train.lr)
    freeze_vae: bool = False  # stage 3 with the VAE kept frozen (stage 2 always freezes it)
    kl_anneal_steps: int = 0  # stage 3 (ignored in stage 2): the VAE's weight of log q + prior NELBO rises to 1
    kl_anneal_start: float = 0.1  # ... from this value (LSGM's KL annealing); 0 steps = always 1
    latents: str = ""  # stage 2 only: train on posteriors pre-encoded by scripts/encode_latents.sh (that folder)
    # instead of encoding every batch; "" = encode on the fly. Evaluation still encodes the test images.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(likelihood="gaussian"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema: type = RunConfig):
    """Defaults of `schema` (RunConfig or VAERunConfig), then the YAML file's differences, then
    `key=value` overrides; all checked."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
        data.setdefault("name", path.stem)
    data = merge(data, parse_overrides(overrides or []))
    cfg = from_dict(schema, data)
    validate(cfg)
    return cfg


def _validate_common(cfg: RunConfig | VAERunConfig | LatentRunConfig) -> None:
    t, d = cfg.train, cfg.data
    if t.steps < 0 or t.batch_size < 1:
        raise ConfigError("train.steps must be >= 0 and train.batch_size >= 1")
    if not t.lr > 0 or t.weight_decay < 0 or t.grad_clip < 0 or t.warmup_steps < 0:
        raise ConfigError(f"train.lr = {t.lr} must be > 0; train.weight_decay, train.grad_clip and "
                          "train.warmup_steps >= 0")
    if t.lr_schedule not in ("constant", "cosine") or not 0.0 <= t.min_lr <= t.lr or t.grad_accum < 1:
        raise ConfigError(f"train.lr_schedule = {t.lr_schedule!r} (constant | cosine), train.min_lr = {t.min_lr} "
                          f"(in [0, train.lr]), train.grad_accum = {t.grad_accum} (>= 1)")
    if not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas = {t.betas}; both must lie in [0, 1)")
    if t.ckpt_every < 0 or t.keep_checkpoints < 0 or t.max_nonfinite_steps < 0:
        raise ConfigError("train.ckpt_every, train.keep_checkpoints and train.max_nonfinite_steps must be >= 0")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay = {t.ema_decay}; must lie in [0, 1)")
    if d.channels < 1 or d.image_size < 1:
        raise ConfigError("data.channels and data.image_size must be positive")
    if d.num_workers < 0 or d.lanes < 0 or d.prefetch < 1:
        raise ConfigError("data.num_workers and data.lanes must be >= 0, data.prefetch >= 1")
    if d.lanes and t.batch_size % d.lanes:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of data.lanes={d.lanes}")


RUN_SCHEMAS: dict[str, type] = {"pixel": RunConfig, "latent": LatentRunConfig, "vae": VAERunConfig}


def run_schema(data: dict[str, Any]) -> type:
    """The config class of a saved run config (plain data). Runs written before `kind` was recorded are
    recognised by their sections: a latent run names its VAE, a VAE run has a `vae` section."""
    kind = data.get("kind") or ("latent" if "vae_path" in data else "vae" if "vae" in data else "pixel")
    if kind not in RUN_SCHEMAS:
        raise ConfigError(f"unknown run kind {kind!r}; expected one of {', '.join(RUN_SCHEMAS)}")
    return RUN_SCHEMAS[kind]


def validate(cfg: RunConfig | VAERunConfig | LatentRunConfig) -> None:
    """Checks of values that the types alone cannot express."""
    expected = next(k for k, schema in RUN_SCHEMAS.items() if isinstance(cfg, schema))
    if cfg.kind != expected:
        raise ConfigError(f"kind = {cfg.kind!r}, but this is a {expected} run's configuration (leave kind out)")
    _validate_common(cfg)
    if isinstance(cfg, VAERunConfig):
        try:
            cfg.vae.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if cfg.vae.in_channels != cfg.data.channels:
            raise ConfigError(f"vae.in_channels={cfg.vae.in_channels} but data.channels={cfg.data.channels}")
        if cfg.data.image_size % cfg.vae.factor:
            raise ConfigError(f"data.image_size={cfg.data.image_size} is not divisible by the VAE's downsampling "
                              f"factor {cfg.vae.factor} (vae.channel_mult has {len(cfg.vae.channel_mult)} levels)")
        if cfg.loss.kl_weight < 0 or cfg.loss.kl_warmup_steps < 0 or cfg.loss.gan_weight < 0:
            raise ConfigError("loss.kl_weight, loss.kl_warmup_steps and loss.gan_weight must be >= 0")
        if cfg.vae.decoder == "perceptual" and cfg.loss.lpips_net not in ("vgg", "alex", "squeeze"):
            raise ConfigError(f"loss.lpips_net={cfg.loss.lpips_net!r}; choose vgg, alex or squeeze")
        return
    m = cfg.model
    if isinstance(cfg, RunConfig) and m.likelihood != "discrete8bit":
        raise ConfigError("model.likelihood must be 'discrete8bit' for a pixel model (its data are 8-bit pixels)")
    if isinstance(cfg, LatentRunConfig):
        if m.likelihood != "gaussian":
            raise ConfigError("model.likelihood must be 'gaussian' for a latent prior (its data are latents)")
        if cfg.stage not in ("prior", "joint"):
            raise ConfigError(f"stage = {cfg.stage!r}; choose prior (stage 2) or joint (stage 3)")
        if cfg.kl_anneal_steps < 0 or not 0.0 <= cfg.kl_anneal_start <= 1.0:
            raise ConfigError("kl_anneal_steps must be >= 0 and kl_anneal_start in [0, 1]")
        if cfg.kl_anneal_steps and cfg.stage == "joint" and cfg.freeze_vae:
            raise ConfigError("KL annealing weights the VAE's objective: it cannot apply with freeze_vae=true")
        if cfg.latents and cfg.stage != "prior":
            raise ConfigError(f"latents={cfg.latents} (pre-encoded posteriors) needs stage=prior: in stage 3 the "
                              "encoder trains, so stored posteriors would be stale (set latents= to encode on the fly)")
        if cfg.latents and cfg.data.hflip:
            raise ConfigError("data.hflip flips images, but pre-encoded latents (latents=...) are of unflipped images")
    choices = {
        "model.transform": (m.transform, ("neural", "identity", "separable")),
        "model.parameterization": (m.parameterization, ("eps", "x")),
        "model.likelihood": (m.likelihood, ("discrete8bit", "gaussian")),
        "model.fdot": (m.fdot, ("auto", "tangent", "jvp", "forward_ad", "fd")),
        "model.theta_weighting": (m.theta_weighting, ("elbo", "eps_mse", "sigmoid")),
        "model.schedule.kind": (m.schedule.kind, ("linear", "cosine", "learned")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r}; choose one of {', '.join(allowed)}")
    if m.theta_weighting == "eps_mse" and m.schedule.kind == "linear":
        raise ConfigError("model.theta_weighting=eps_mse with a linear schedule is the bound itself (gamma' is "
                          "constant, so r = 1): use theta_weighting=sigmoid, or a cosine or learned schedule")
    if m.num_steps < 0:
        raise ConfigError(f"model.num_steps = {m.num_steps}; use 0 for continuous time or T >= 1")
    if not m.schedule.gamma_min < m.schedule.gamma_max:
        raise ConfigError("model.schedule.gamma_min must be below gamma_max")
    if m.transform == "separable" and m.transform_basis < 1:
        raise ConfigError(f"model.transform_basis = {m.transform_basis}; the separable F needs K >= 1")
    if m.transform == "separable" and m.fdot == "tangent":
        raise ConfigError("model.fdot=tangent is the U-Net's tangent pass; the separable F's dF/dt is closed form "
                          "(auto), with jvp, forward_ad and fd as references")
    if m.transform != "identity" and (m.transform_net.dropout or 0.0) > 0:
        raise ConfigError("model.transform_net.dropout must be 0: F must be deterministic (see ndm.build_ndm)")
    # A latent prior's networks see latents, whose size depends on the saved VAE: build_dit checks it there.
    image_size = None if isinstance(cfg, LatentRunConfig) else cfg.data.image_size
    _validate_net(m.denoiser, "model.denoiser", image_size)
    _validate_net(m.transform_net, "model.transform_net", image_size)


def _validate_net(net: NetConfig, where: str, image_size: int | None) -> None:
    if net.arch not in NET_ARCH_KEYS:
        raise ConfigError(f"{where}.arch = {net.arch!r}; choose one of {', '.join(NET_ARCH_KEYS)}")
    foreign = [f.name for f in dataclasses.fields(net)
               if f.name not in ("arch", "size", *NET_ARCH_KEYS[net.arch]) and getattr(net, f.name) is not None]
    if foreign:
        raise ConfigError(f"{where}.{foreign[0]} does not apply to arch={net.arch}; "
                          f"its fields are {', '.join(NET_ARCH_KEYS[net.arch])}")
    if net.arch == "dit":
        from latent_ndm.nets.dit import DIT_SIZES  # imported here: timm is slow to import and U-Net runs do not need it

        if net.size not in DIT_SIZES:
            raise ConfigError(f"{where}.size = {net.size!r} is not a DiT preset; choose one of {', '.join(DIT_SIZES)}")
        patch = net.patch_size if net.patch_size is not None else DIT_SIZES[net.size]["patch_size"]
        if image_size is not None and (patch < 1 or image_size % patch):
            raise ConfigError(f"{where}.patch_size = {patch} must divide data.image_size = {image_size}")
