#!/usr/bin/env bash
# Train the small MNIST classifier whose 128-d penultimate features define FD-MNIST, the Frechet
# distance that evaluate.sh --metrics fd_mnist reports (NOT FID: comparable only for the same classifier):
#   scripts/train_classifier.sh [--shards data/mnist5k] [--out runs/mnist_classifier] [--steps 1000]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli train_classifier "$@"
