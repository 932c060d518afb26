#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), then runs the test suite and a
# one-case-per-provider smoke run of the benchmarks (timings disabled: benchmarks are not tests).
# It also builds gated_ops._cuda_emu, the CUDA kernels compiled for the CPU with the CUDA
# execution model emulated (csrc/cuda_emu/), so that tests/test_cuda.py runs them without a GPU;
# a missing emulation then fails those tests instead of skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."
export GATED_OPS_CUDA_EMU=1 GATED_OPS_REQUIRE_CUDA_EMU=1
bash scripts/setup.sh
py=${GATED_OPS_VENV:-.venv}/bin/python
"$py" -m pytest tests -q -m "not slow" "$@"
"$py" -m pytest benchmarks -q --benchmark-disable -m smoke
