#!/usr/bin/env bash
# Benchmarks measured side by side in one run, e.g.:
#   scripts/benchmark.sh speed [--config configs/bench_cifar_size.yaml] [--batch-size 32] [--bf16] [--channels-last]
#                              [--compile] [--sample-nfe 10] [--out docs/bench/cpu_fp32]
#   scripts/benchmark.sh speed --variants baseline,reference   (beside diffusers UNet2DModel; pip install diffusers)
#   scripts/benchmark.sh convs [--out docs/bench/convs]   (the denoiser's convolutions alone: the MFU bound)
#   scripts/benchmark.sh data
#   scripts/benchmark.sh shards [--images 20000] [--large 80000] [--out docs/bench/shards]   (make_shards at scale)
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.experiments.benchmark "$@"
