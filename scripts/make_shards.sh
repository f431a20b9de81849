#!/usr/bin/env bash
# Images to webdataset tar shards (train and test) with a JSON manifest:
#   scripts/make_shards.sh mnist5k data/mnist5k
#   scripts/make_shards.sh photo-patches data/photos --patch 32
#   scripts/make_shards.sh folder data/mine --root ~/pictures --resize 64 --center-crop 256 --channels 3
#   scripts/make_shards.sh cifar10 data/cifar10 --root ~/torchvision-data [--download]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.data.writer "$@"
