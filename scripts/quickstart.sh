#!/usr/bin/env bash
# The main job on a fresh Linux machine: install what is missing, build gated_ops, and run the
# small k-path reproduction on real data (experiments.kpath --preset quick, about 3-5 minutes on
# 2 CPU cores), writing experiments/runs/quick/{kpath.png,results.md,summary.json}.
#   bash scripts/quickstart.sh                       # Fashion-MNIST (Debian package)
#   bash scripts/quickstart.sh --dataset mnist --data-dir DIR   # MNIST IDX files in DIR
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ " $* " != *" --data-dir "* && -z "${GATED_OPS_DATA:-}" && ! -d /usr/share/datasets/fashion-mnist ]]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    echo "Fashion-MNIST is missing: 'sudo apt-get install dataset-fashion-mnist', or pass" \
         "--data-dir DIR with the IDX files (or --download true on a machine with a network)" >&2
    exit 1
  fi
fi
"${GATED_OPS_VENV:-.venv}/bin/python" -m experiments.kpath --preset quick --out experiments/runs/quick "$@"
echo "figure: experiments/runs/quick/kpath.png  table: experiments/runs/quick/results.md"
