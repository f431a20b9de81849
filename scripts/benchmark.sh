#!/usr/bin/env bash
# Benchmarks measured side by side in one run, e.g.:
#   scripts/benchmark.sh speed [--config configs/ndm_mnist.yaml] [--batch-size 32]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.benchmark "$@"
