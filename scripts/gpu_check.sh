#!/usr/bin/env bash
# The GPU checks in one command, on a GPU machine: tests/gpu, then benchmarks/gpu.py, logs in DIR (default
# gpu-logs). Where .whl/ holds scripts/gpu_wheels.sh's wheels (a machine without network), they are installed
# into /tmp/site first. On an H200 the tests took 165-188 s and the benchmark with these defaults about 130 s;
# BENCH_ARGS replaces the defaults (e.g. BENCH_ARGS="--size-gb 4 --repetitions 3").
#   scripts/gpu_check.sh [DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-gpu-logs}
mkdir -p "$logs"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>&1 | tee "$logs/env.log"
python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -rA -v 2>&1 | tee "$logs/tests.log"
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
python3 benchmarks/gpu.py ${BENCH_ARGS:---size-gb 1 --small-size-gb 0.25 --repetitions 2} --json "$logs/gpu.json" \
  2>&1 | tee "$logs/bench.log"
bench=${PIPESTATUS[0]}
echo "tests/gpu rc=$tests, benchmarks/gpu.py rc=$bench"
exit $((tests || bench))
