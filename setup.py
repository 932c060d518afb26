"""Build gated_ops._C: C++ always, CUDA sources added when a CUDA toolkit and a CUDA torch exist.

The extension is built against the torch already installed (pip install --no-build-isolation -e .).
No GPU is queried unless CUDA sources are built with TORCH_CUDA_ARCH_LIST unset; then, without a
visible GPU (a CPU build machine, CI), the architectures default to DEFAULT_CUDA_ARCH_LIST.
GATED_OPS_DEBUG=1 builds with -O0 -g; a release build carries no debug info.
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))
# The GPUs the kernels are written and tested for (A100, H100); PTX of the newest lets later GPUs
# JIT-compile them at first load. torch's autodetection has no GPU to ask on a build machine.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
use_cuda = (
    os.environ.get("GATED_OPS_FORCE_CPU", "0") != "1"
    and torch.version.cuda is not None
    and CUDA_HOME is not None
    and bool(cuda_sources)
)
debug = os.environ.get("GATED_OPS_DEBUG", "0") == "1"
extra_compile_args = {
    # -fno-trapping-math / -fno-math-errno (as PyTorch builds with) let GCC if-convert and
    # vectorise the branch-free float loops; IEEE results are unchanged (no -ffast-math).
    # -g0 overrides Python's own -g.
    "cxx": ["-O0", "-g"] if debug else ["-O3", "-fno-trapping-math", "-fno-math-errno", "-g0"],
    "nvcc": ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "--use_fast_math", "-lineinfo",
                                                       "--expt-relaxed-constexpr"],
}
# The CPU kernels split work with at::parallel_for, which with PyTorch's OpenMP builds is an
# inline `#pragma omp parallel`: without -fopenmp it silently runs on one thread. Compiled with
# -fopenmp but not linked with it, the GOMP_* / omp_* references resolve at load time to the
# OpenMP runtime that libtorch_cpu (our dependency) already loaded, so there is one runtime and
# torch.set_num_threads governs our loops too.
# A release build without debug info: _C is 2.6 MB instead of 15 MB (measured, CPU build).
# --strip-debug keeps the symbol table, so profilers still name the kernels.
extra_link_args = [] if debug else ["-Wl,--strip-debug"]
if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
    extra_compile_args["cxx"].append("-fopenmp")
Extension = CUDAExtension if use_cuda else CppExtension
if use_cuda:
    sources += cuda_sources
    extra_compile_args["cxx"].append("-DGATED_OPS_WITH_CUDA")
    if os.environ.get("GATED_OPS_PTXAS_REPORT", "0") == "1":  # registers and spills per kernel
        extra_compile_args["nvcc"].append("--resource-usage")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        # torch's autodetection would fail: it has no GPU to ask
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        print(f"gated_ops: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for "
              f"TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCH_LIST!r}", file=sys.stderr)
else:
    extra_compile_args.pop("nvcc")

ext_modules = [
    Extension(
        "gated_ops._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        py_limited_api=False,
    )
]
# GATED_OPS_CUDA_EMU=1: also gated_ops._cuda_emu, the CUDA kernels (gated_ops_cuda.cu) compiled by
# the host compiler with the CUDA execution model emulated on the CPU (csrc/cuda_emu/): a testing
# backend for machines without a GPU (backend="cuda_emu"; scripts/test.sh builds it). -O1: the
# fibers' switches, not the kernels' arithmetic, set its speed, and it compiles in ~30 s.
if os.environ.get("GATED_OPS_CUDA_EMU", "0") == "1":
    ext_modules.append(
        CppExtension(
            "gated_ops._cuda_emu",
            [os.path.join("csrc", "cuda_emu", "module.cpp")],
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": ["-O0", "-g"] if debug else
                                ["-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-g0"]},
            extra_link_args=extra_link_args,
            py_limited_api=False,
        )
    )

setup(
    name="gated_ops",
    version="0.1.0",
    description="Fused gated multi-pathway matmuls for PyTorch (Gated Deep Linear Networks)",
    packages=find_packages(include=["gated_ops", "gated_ops.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
)
