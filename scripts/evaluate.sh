#!/usr/bin/env bash
# Test-set NELBO in bits/dim (per term and total) of a trained run, as JSON; for a latent run the full
# model's (VAE + NDM prior) in bits per image dimension, ode_nll = the bound with the prior's ODE NLL:
#   scripts/evaluate.sh runs/ndm_mnist [--metrics nelbo,ode_nll] [--steps 10,100,1000,continuous] [--out F.json]
# Sample quality at several numbers of sampling steps (FD-MNIST needs scripts/train_classifier.sh first; it is
# not FID; fid needs the local Inception file weights-inception-2015-12-05-6726825d.pth, never downloaded):
#   scripts/evaluate.sh runs/ndm_mnist --metrics fd_mnist --classifier runs/mnist_classifier \
#       --sample-steps 10,100,1000 --num-samples 500 --sampler ancestral
#   scripts/evaluate.sh runs/ndm_mnist --metrics fid --inception-weights PATH/weights-inception-2015-12-05-6726825d.pth
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli evaluate "$@"
