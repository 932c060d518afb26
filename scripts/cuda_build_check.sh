#!/usr/bin/env bash
# The full CUDA build of gated_ops on a machine without a GPU, then a check that the extension
# imports and registers a CUDA kernel for every op. Exits non-zero on a build error, on a compiler
# warning from csrc/, or on a missing CUDA kernel.
#
#   bash scripts/cuda_build_check.sh
#
# It never touches the repository's own build: it builds a copy (in a temporary folder, removed
# afterwards unless GATED_OPS_KEEP_BUILD=1) with a second virtualenv holding a CUDA torch, made
# once and reused (GATED_OPS_CUDA_VENV, default: cuda-venv beside the repository; torch 2.14.1
# cu130 installs from this machine's local wheels in about a minute, 5.5 GB). Needs nvcc
# (CUDA_HOME or /usr/local/cuda). Measured on this project's 2-core machines: 3.5 minutes with
# the venv present (nvcc on csrc/cuda/*.cu is most of it), plus about a minute to make the venv.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${GATED_OPS_CUDA_VENV:-$(dirname "$repo")/cuda-venv}
torch_version=${GATED_OPS_CUDA_TORCH:-2.14.1}
start=$(date +%s)

has_cuda_torch="import sys, torch; sys.exit(torch.version.cuda is None)"
if ! "$venv/bin/python" -c "$has_cuda_torch" 2>/dev/null; then
  echo "== creating $venv (torch==$torch_version with CUDA, numpy, ninja)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version" numpy ninja setuptools 2>&1 |
    grep -v "is ignored: it is neither a file nor a directory" || true
fi
py="$venv/bin/python"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# CUDA library headers (cusparse.h, cublas_v2.h, ...) that torch's headers include: the pip
# wheels' copies match the torch build.
for inc in "$site"/nvidia/cu13/include "$site"/nvidia/*/include; do
  [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
done
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
nvcc --version | tail -1

build=$(mktemp -d "${TMPDIR:-/tmp}/gated_ops_cuda_build.XXXXXX")
if [ "${GATED_OPS_KEEP_BUILD:-0}" != 1 ]; then trap 'rm -rf "$build"' EXIT; fi
tar -C "$repo" --exclude='./.venv*' --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
  --exclude=./gated_ops/_build_info.json --exclude=./.git --exclude=__pycache__ \
  --exclude=./experiments/runs -cf - . |
  tar -C "$build" -xf -
echo "== building in $build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
log="$build/build.log"
if ! (cd "$build" && GATED_OPS_PTXAS_REPORT=1 "$py" setup.py -q build_ext --inplace) >"$log" 2>&1; then
  tail -n 80 "$log"
  echo "FAIL: the CUDA build failed (log above)"
  exit 1
fi
# gcc: "csrc/x.cpp:12:3: warning: ..."; nvcc: "csrc/x.cu(12): warning #177-D: ..."
warnings=$(grep -E "csrc/[^ ]*\.(cu|cpp|h)(:[0-9:]+|\([0-9]+\)): ?warning" "$log" || true)
if [ -n "$warnings" ]; then
  echo "$warnings"
  echo "FAIL: compiler warnings in csrc/ (above)"
  exit 1
fi
for cu in "$repo"/csrc/cuda/*.cu; do
  name=csrc/cuda/$(basename "$cu")
  grep -q "$name" "$log" || { echo "FAIL: $name was not compiled"; exit 1; }
done

echo "== registers and spills per kernel (ptxas, sm_${TORCH_CUDA_ARCH_LIST//./})"
# Registers set the kernels' occupancy; a spill in a float32 / 16-bit kernel (local memory in a
# memory-bound loop) fails the check. float64 kernels are only reported.
python3 "$repo/scripts/ptxas_report.py" "$log"

echo "== the build (gated_ops/_build_info.json: what import gated_ops checks before it loads _C)"
ls -l "$build"/gated_ops/_C.*.so | awk '{print "  " $NF ": " $5 " bytes"}'
sed 's/^/  /' "$build/gated_ops/_build_info.json"

echo "== checking the registrations"
(cd "$build" && "$py" - <<'EOF'
import sys
import torch
import gated_ops  # noqa: F401  (loads gated_ops._C)

ops = ["pathway_matmul", "pathway_grad_z", "pathway_grad_x", "pathway_grad_weight",
       "pathway_grad_bias", "pathway_grad_gate", "pathway_sgd_", "pathway_sgd_lookahead_",
       "pathway_bias_sgd_", "gated_cross_entropy", "gated_cross_entropy_backward",
       "pathway_route", "routed_matmul", "routed_grad_z", "routed_grad_x", "routed_grad_weight",
       "routed_grad_bias", "routed_grad_gate"]
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"gated_ops::{op}", "CUDA")]
for op in ops:
    print(f"  gated_ops::{op:30s} CUDA kernel: {'MISSING' if op in missing else 'ok'}")
# ops that run on CUDA as a composite of the ones above (registered in gated_ops/ops.py)
composite = ["pathway_grad_x_gate"]
for op in composite:
    ok = torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"gated_ops::{op}", "CUDA")
    print(f"  gated_ops::{op:30s} CUDA composite: {'ok' if ok else 'MISSING'}")
    if not ok:
        missing.append(op)
if missing:
    sys.exit(f"FAIL: no CUDA kernel for {missing}")
EOF
)
echo "OK: CUDA build and registrations ($(($(date +%s) - start)) s)"
