#!/usr/bin/env bash
# 2D experiments (checkerboard, 8 Gaussians, two moons): baseline (F = identity), NDM and NDM with a
# curvature penalty on its probability-flow paths; sample quality at 1, 2, 4, 8 Euler steps, path
# straightness, pictures of F(x, t), samples and paths (about 10 minutes on 2 CPU cores):
#   scripts/experiments_2d.sh [--steps 2000] [--curvature-weight 1e-3] [--seed 0] [--out docs/figures/2d]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.experiments.toy2d "$@"
