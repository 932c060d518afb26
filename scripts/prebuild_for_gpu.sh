#!/usr/bin/env bash
# Build gated_ops/_C for another machine's Python and torch, here, so that a GPU machine with
# little time can skip its build (scripts/gpu_check.sh with GATED_OPS_PREBUILT=1).
#
#   bash scripts/prebuild_for_gpu.sh [PYTHON_VERSION] [TORCH_VERSION]    # default 3.12 2.11.0
#
# Makes a venv (.venv-gpu-<py>-<torch>, ignored by git) with that Python (pyenv's, or
# python<version> on the PATH) and that torch's CUDA wheel, then builds in place with nvcc for
# TORCH_CUDA_ARCH_LIST (default 9.0, the H100): gated_ops/_C.cpython-<py>-x86_64-linux-gnu.so,
# beside this machine's own build. The extension links against libtorch, so the torch version
# must be exactly the GPU machine's (`python3 -c "import torch; print(torch.__version__)"`
# there). Takes a few minutes on 2 cores (nvcc on csrc/cuda/*.cu, one job per file, is most
# of it).
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
torchver=${2:-2.11.0}
venv=.venv-gpu-$pyver-$torchver
py=$(ls -d "$HOME"/.pyenv/versions/"$pyver"*/bin/python"$pyver" 2>/dev/null | tail -1 || true)
[ -n "$py" ] || py=$(command -v "python$pyver" || true)
[ -n "$py" ] || { echo "no Python $pyver found (pyenv or python$pyver on the PATH)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torchver" numpy setuptools ninja
fi
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
"$venv/bin/python" setup.py build_ext --inplace --build-temp "build/gpu-$pyver-$torchver"
"$venv/bin/python" -c "import torch, gated_ops
ok = torch._C._dispatch_has_kernel_for_dispatch_key('gated_ops::pathway_matmul', 'CUDA')
print('built', gated_ops.__file__, 'for torch', torch.__version__, '- CUDA kernels:', ok)"
ls gated_ops/_C.cpython-"${pyver/./}"-*.so
