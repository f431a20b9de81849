#!/usr/bin/env bash
# Pictures of a trained model: F(x, t) of test images at t = 0, 0.25, 0.5, 0.75, 1 (transform.png)
# and denoising trajectories of samples (trajectories.png):
#   scripts/visualize.sh runs/ndm_mnist [--num 8] [--steps 100] [--out DIR]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli pictures "$@"
