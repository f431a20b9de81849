#!/usr/bin/env bash
# NDM against its F = identity baseline on MNIST at equal steps and equal denoiser (T = 10 and continuous time):
# test NELBO at T = 10, 100, 1000 and continuous, ODE NLL, FD-MNIST; a table and a plot in docs/reproduce/.
#   scripts/reproduce.sh [--steps 600] [--seeds 0,1] [--ode-images 20] [--fd-samples 500]
# At equal training compute (wall-clock and FLOPs), with the time-separable F and a baseline as large as NDM's
# two networks, on MNIST-5k and 8x8 digits; what F does to the data; tables and plots in docs/compute/:
#   scripts/reproduce.sh compute [--datasets mnist5k,digits] [--seeds 0,1,2] [--baseline-steps mnist5k=1500]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.experiments.reproduce "$@"
