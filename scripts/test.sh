#!/usr/bin/env bash
# The whole test suite (lint, then pytest), the slow end-to-end runs included. Extra arguments go to pytest,
# e.g. -k resume, or -m "not slow" for a quick check.
source "$(dirname "$0")/_env.sh"
ruff check latent_ndm vae tests
exec python -m pytest tests -p no:cacheprovider "$@"
