#!/usr/bin/env bash
# Train a pixel-space NDM, or its DDPM/VDM baseline by choosing that config:
#   scripts/train_ndm.sh configs/ndm_mnist.yaml [key=value ...] [--allow-config-change]
# A run lives in runs/NAME (NAME defaults to the config's file name); rerunning resumes it.
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli train "$@"
