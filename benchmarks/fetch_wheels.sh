#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels the H200 image lacks into ./wheels (git-ignored),
# for the device tool to carry: `run(command="bash benchmarks/gpu_check.sh $OUT", carry=["wheels"])`.
# The H200 image runs Python 3.12 with torch 2.11 / triton 3.6 / pytest / numpy / nvidia-ml-py.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
get() {
  pip download -q -d wheels --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform any "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
get --no-deps nvidia-cutlass   # only its headers are needed (its deps include scipy: over the carry limit)
get build "setuptools>=77"     # gpu_check.sh builds the sdist offline (pyproject needs setuptools>=77)
get hypothesis matplotlib
rm -f wheels/numpy-*           # the image has numpy
du -sh wheels && ls wheels
