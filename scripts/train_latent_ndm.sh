#!/usr/bin/env bash
# Stage 2: an NDM prior on the latents of a VAE trained with scripts/train_vae.sh (kept frozen):
#   scripts/train_latent_ndm.sh configs/latent_ndm_mnist.yaml [vae_path=runs/vae_mnist/vae] [key=value ...]
# Writes runs/NAME/ (checkpoints, metrics, decoded sample grids) and runs/NAME/test_report.json
# (the full model's test NELBO in bits/dim: decoder + log q + the prior's NDM NELBO of z0).
# latents=DIR (written by scripts/encode_latents.sh): stage 2 reads pre-encoded posteriors instead of
# encoding every batch.
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli train_latent "$@"
