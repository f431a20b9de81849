#!/usr/bin/env bash
# Test-set NELBO in bits/dim (per term and total) of a trained run, as JSON; for a latent run the full
# model's (VAE + NDM prior) in bits per image dimension, ode_nll = the bound with the prior's ODE NLL:
#   scripts/evaluate.sh runs/ndm_mnist [--metrics nelbo,ode_nll] [--steps 10,100,1000,continuous] [--out F.json]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.cli evaluate "$@"
