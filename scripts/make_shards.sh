#!/usr/bin/env bash
# Images to webdataset tar shards (train and test) with a JSON manifest (all options: --help):
#   scripts/make_shards.sh mnist5k data/mnist5k
#   scripts/make_shards.sh photo-patches data/photos --patch 32
#   scripts/make_shards.sh folder data/mine --root ~/pictures --resize 64 --test-fraction 0.05 --workers 8
#   scripts/make_shards.sh folder data/mine --root ~/pictures/train --test-folder ~/pictures/val --resize 64
#   scripts/make_shards.sh imagenet32-png data/imagenet32 --root DIR_WITH_train_32x32_AND_valid_32x32 --workers 16
#   scripts/make_shards.sh cifar10 data/cifar10 --root ~/torchvision-data [--download]
source "$(dirname "$0")/_env.sh"
exec python -m latent_ndm.data.writer "$@"
