#!/usr/bin/env bash
# One prepared check of a GPU machine (a few minutes on one H100/H200): NELBO on the GPU vs the CPU, training
# images/s, MFU, NDM/baseline time over FLOP ratio and peak memory (pixel and latent, bf16, eager and
# compiled), sampling images/s. On a CPU, as a smoke test: scripts/gpu_check.sh --device cpu --quick
#   scripts/gpu_check.sh --out docs/bench/gpu_check_h100
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.experiments.gpu_check "$@"
