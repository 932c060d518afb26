#!/usr/bin/env bash
# Fresh machine -> a virtualenv with the pinned dependencies and gated_ops built in it.
#   bash scripts/setup.sh            (venv at .venv; GATED_OPS_VENV=path to choose another)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GATED_OPS_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip 2>/dev/null || true
"$venv/bin/python" -m pip install -q -r requirements.txt
MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" -m pip install -q --no-build-isolation -e .
"$venv/bin/python" -c "import gated_ops, torch; print('gated_ops', gated_ops.__version__, 'built against torch', torch.__version__)"
