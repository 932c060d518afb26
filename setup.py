"""Build gated_ops._C: C++ always, CUDA sources added when a CUDA toolkit and a CUDA torch exist.

The extension is compiled against the torch already installed, and it only loads into that torch
release (torch's C++ ABI changes between releases), so the build needs that torch:

    pip install --no-build-isolation -e .     # a checkout (scripts/setup.sh)
    pip install --no-build-isolation .        # or pip wheel --no-build-isolation --no-deps .

(`pip install .`, with pip's build isolation, builds against the same torch: build_backend/.)
Each build records its torch three ways: the version carries it as a PEP 440 local tag
(0.1.0+torch2.13.0.cpu), the metadata requires that torch release (torch==2.13.0), and
gated_ops/_build_info.json lets ``import gated_ops`` refuse another torch before it loads _C.
An sdist is the release itself (0.1.0, torch>=2.4): it builds against whatever torch is there.

No GPU is queried unless CUDA sources are built with TORCH_CUDA_ARCH_LIST unset; then, without a
visible GPU (a CPU build machine, CI), the architectures default to DEFAULT_CUDA_ARCH_LIST.

Environment: GATED_OPS_FORCE_CPU=1 (no CUDA sources), GATED_OPS_DEBUG=1 (-O0 -g; a release build
carries no debug info), GATED_OPS_CUDA_EMU=1 (also gated_ops._cuda_emu), GATED_OPS_PTXAS_REPORT=1
(registers and spills per kernel), TORCH_CUDA_ARCH_LIST, MAX_JOBS.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = "2.4"
# The GPUs the kernels are written and tested for (A100, H100); PTX of the newest lets later GPUs
# JIT-compile them at first load. torch's autodetection has no GPU to ask on a build machine.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
BUILD_INFO = "_build_info.json"
EXTRAS = {
    "theory": ["scipy"],  # gated_ops.theory: quadrature of the reduced dynamics
    "triton": ["triton"],  # backend="triton" (CUDA torch wheels already depend on it)
    "experiments": ["numpy", "matplotlib", "scipy"],  # experiments/: data, figures, theory
    "bench": ["pytest", "pytest-benchmark"],  # benchmarks/
}


def release() -> str:
    """The release, written once: gated_ops/__init__.py's ``__version__``."""
    with open(os.path.join(HERE, "gated_ops", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def torch_pin(release: str, torch_version: str, cuda: str | None,
              hip: str | None = None) -> tuple[str, str]:
    """(version, torch requirement) of a build against that torch: the release with the torch as
    a local version tag, and that torch release exactly. ``torch==2.13.0`` accepts 2.13.0+cpu and
    2.13.0+cu130 (PEP 440: a specifier without a local tag ignores it); the import-time check
    tells the variants apart (gated_ops/__init__.py).

    >>> torch_pin("0.1.0", "2.13.0+cpu", None)
    ('0.1.0+torch2.13.0.cpu', 'torch==2.13.0')
    >>> torch_pin("0.1.0", "2.14.1", "13.0")
    ('0.1.0+torch2.14.1.cu130', 'torch==2.14.1')
    """
    public = torch_version.split("+")[0]
    if cuda:
        variant = "cu" + cuda.replace(".", "")
    elif hip:
        variant = "rocm" + ".".join(hip.split(".")[:2])
    else:
        variant = "cpu"
    local = re.sub(r"[^A-Za-z0-9.]+", ".", f"torch{public}.{variant}")
    return f"{release}+{local}", f"torch=={public}"


def default_cuda_arch_list(torch) -> str | None:
    """TORCH_CUDA_ARCH_LIST to set, or None to leave it (set by the user, or a GPU to ask)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


def main() -> None:
    try:
        import torch
    except ImportError:
        sys.exit(
            "gated_ops: building it needs torch, and this Python has none it can import (none\n"
            "installed, or one hidden by an isolated build environment). The extension is\n"
            "compiled against the torch it runs with: install that torch first (pip install\n"
            "torch, or the CUDA build for your machine), then build without build isolation:\n"
            "    pip install --no-build-isolation .     (a checkout: pip install "
            "--no-build-isolation -e .)\n"
            "    python -m build --no-isolation         (with python -m build)"
        )
    from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                           CUDAExtension)

    # One file per op family and backend: csrc/*.cpp and csrc/cpu/*.cpp, csrc/cuda/*.cu (the
    # CUDA emulation, csrc/cuda_emu/, is a library of its own below).
    sources = sorted(p for p in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                     if os.path.join("csrc", "cuda_emu", "") not in p)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
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
    # A release build without debug info: _C is 2.6 MB instead of 15 MB (measured, CPU build).
    # --strip-debug keeps the symbol table, so profilers still name the kernels.
    extra_link_args = [] if debug else ["-Wl,--strip-debug"]
    # The CPU kernels split work with at::parallel_for, which with PyTorch's OpenMP builds is an
    # inline `#pragma omp parallel`: without -fopenmp it silently runs on one thread. Compiled
    # with -fopenmp but not linked with it, the GOMP_* / omp_* references resolve at load time to
    # the OpenMP runtime that libtorch_cpu (our dependency) already loaded, so there is one
    # runtime and torch.set_num_threads governs our loops too.
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        extra_compile_args["cxx"].append("-fopenmp")
    Extension = CUDAExtension if use_cuda else CppExtension
    cuda_arch_list = None
    if use_cuda:
        sources += cuda_sources
        extra_compile_args["cxx"].append("-DGATED_OPS_WITH_CUDA")
        if os.environ.get("GATED_OPS_PTXAS_REPORT", "0") == "1":  # registers and spills per kernel
            extra_compile_args["nvcc"].append("--resource-usage")
        default = default_cuda_arch_list(torch)
        if default is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = default
            print(f"gated_ops: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for "
                  f"TORCH_CUDA_ARCH_LIST={default!r}", file=sys.stderr)
        cuda_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    else:
        extra_compile_args.pop("nvcc")

    ext_modules = [
        Extension(
            "gated_ops._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            py_limited_api=False,
        )
    ]
    # GATED_OPS_CUDA_EMU=1: also gated_ops._cuda_emu, the CUDA kernels (csrc/cuda/*.cu)
    # compiled by the host compiler with the CUDA execution model emulated on the CPU
    # (csrc/cuda_emu/): a testing backend for machines without a GPU (backend="cuda_emu";
    # scripts/test.sh builds it). -O1: the fibers' switches, not the kernels' arithmetic, set its
    # speed, and it compiles in ~30 s.
    if os.environ.get("GATED_OPS_CUDA_EMU", "0") == "1":
        ext_modules.append(
            CppExtension(
                "gated_ops._cuda_emu",
                [os.path.join("csrc", "cuda_emu", "module.cpp")],
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": ["-O0", "-g"] if debug else
                                    ["-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                                     "-g0"]},
                extra_link_args=extra_link_args,
                py_limited_api=False,
            )
        )

    if "sdist" in sys.argv[1:]:  # the source, for any torch
        version, torch_requirement = release(), f"torch>={MIN_TORCH}"
    else:
        version, torch_requirement = torch_pin(release(), torch.__version__, torch.version.cuda,
                                               torch.version.hip)
    # What import gated_ops checks before it loads _C, one entry per extension file name (a
    # checkout may hold builds for several Pythons: scripts/prebuild_for_gpu.sh).
    so_name = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    record = {
        "version": version,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": torch.version.hip,
        "cuda_kernels": use_cuda,
        "cuda_arch_list": cuda_arch_list,
        "debug": debug,
    }

    class BuildExtensionRecordingTorch(BuildExtension):
        """build_ext that writes the build's record beside _C (in the build tree, and in the
        source tree for in-place / editable builds), and rebuilds when the record changed: torch
        builds with ninja relink every time anyway, but without ninja setuptools skips an
        extension newer than its sources, whatever torch it was built against."""

        def run(self):
            build_dir = os.path.join(self.build_lib, "gated_ops")
            if read_build_info(build_dir).get(so_name) != record:
                self.force = True
            super().run()
            dirs = [build_dir]
            if self.inplace:
                dirs.append(self.get_finalized_command("build_py").get_package_dir("gated_ops"))
            for d in dirs:
                write_build_info(d, so_name, record)

    setup(
        name="gated_ops",
        version=version,
        description="Fused gated multi-pathway matmuls for PyTorch (Gated Deep Linear Networks)",
        packages=find_packages(include=["gated_ops", "gated_ops.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtensionRecordingTorch},
        python_requires=">=3.10",
        # numpy: gated_ops does not use it, but torch warns at every import without it
        install_requires=[torch_requirement, "numpy"],
        extras_require=EXTRAS,
    )


def read_build_info(package_dir: str) -> dict:
    try:
        with open(os.path.join(package_dir, BUILD_INFO)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_build_info(package_dir: str, so_name: str, record: dict) -> None:
    info = read_build_info(package_dir)
    info[so_name] = record
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
