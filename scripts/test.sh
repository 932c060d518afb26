#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), then runs the test suite and a
# one-case-per-provider smoke run of the benchmarks (timings disabled: benchmarks are not tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=${GATED_OPS_VENV:-.venv}/bin/python
"$py" -m pytest tests -q -m "not slow" "$@"
"$py" -m pytest benchmarks -q --benchmark-disable -m smoke
