#!/usr/bin/env bash
# Downloads, where PyPI is reachable, the wheels `anygpt-engine serve` and `bench serve` need that
# the GPU image lacks (fastapi, uvicorn, python-multipart, prometheus_client, aiohttp and their
# dependencies) for its Python 3.12, into DIR (default wheels/serving, git-ignored). Carry DIR to
# the GPU machine; `scripts/gpu_check.sh OUT serving` installs from it without network.
set -euo pipefail
dest=${1:-wheels/serving}
cd "$(dirname "$0")/.."
pip download --dest "$dest" --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  fastapi uvicorn python-multipart prometheus_client aiohttp
du -sh "$dest"
