#!/usr/bin/env bash
# Stage 1: train the VAE on webdataset shards (make them first with scripts/make_shards.sh):
#   scripts/train_vae.sh configs/vae_mnist.yaml [key=value ...] [--allow-config-change]
# Writes runs/NAME/ (checkpoints, metrics, reconstruction grids), runs/NAME/vae/ (the trained model,
# VAE.from_pretrained) and runs/NAME/test_report.json (test PSNR, KL per latent dim, bits/dim).
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli train_vae "$@"
