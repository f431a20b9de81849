#!/usr/bin/env bash
# Stage 2 data: the frozen VAE's posterior (mean and log-variance of its normalised latents) of every
# train image, as shards in the train split's order and sharding, with a manifest naming the VAE:
#   scripts/encode_latents.sh runs/vae_mnist/vae data/mnist5k data/mnist5k_latents [--batch-size 256]
#   scripts/train_latent_ndm.sh configs/latent_ndm_mnist.yaml latents=data/mnist5k_latents --stages prior
# Training with another VAE is refused. Test images are not encoded: evaluation encodes them.
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli encode_latents "$@"
