#!/usr/bin/env bash
# Samples from a trained model, pixel or latent (run directory or saved model directory), as a PNG grid
# and an .npz of uint8 images:
#   scripts/sample.sh runs/ndm_mnist [--num 64] [--sampler ancestral|deterministic|sde|ode_heun|ode_rk45]
#                     [--steps 100] [--seed 0] [--out DIR]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli sample "$@"
