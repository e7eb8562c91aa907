#!/usr/bin/env bash
# Wheels for running tests/gpu and benchmarks/gpu.py on a GPU machine that has no network: weightd itself and
# the dependencies that machine's image lacks (it has torch, cupy-cuda13x, cuda-bindings 13, grpcio, protobuf,
# safetensors, transformers and pytest). Writes .whl/ (git-ignored); on the GPU machine, from the repository,
# scripts/gpu_check.sh installs them and runs tests/gpu and benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_30_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "grpcio-health-checking==1.76.0" "grpcio-reflection==1.76.0" \
  "runai-model-streamer==0.17.*" "runai-model-streamer-s3==0.17.*" boto3 botocore s3transfer jmespath
ls -l .whl
