#!/usr/bin/env bash
# The whole test suite (lint, then pytest). Extra arguments go to pytest, e.g. -k resume.
source "$(dirname "$0")/_env.sh"
ruff check latent_ndm vae tests
exec python -m pytest tests -p no:cacheprovider "$@"
