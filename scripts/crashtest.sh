#!/usr/bin/env bash
# kill -9 a training run at random moments, resume it each time, and compare with an uninterrupted run:
#   scripts/crashtest.sh [--trials 10] [--steps 40] [--ckpt-every 2] [--out runs/crashtest]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.experiments.crashtest "$@"
