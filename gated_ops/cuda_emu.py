"""The CUDA kernels on the CPU: ``backend="cuda_emu"``, a testing backend.

``gated_ops._cuda_emu`` is the CUDA sources (csrc/cuda/) themselves, compiled by the host compiler with the
CUDA execution model emulated (csrc/cuda_emu/cuda_emu.h: the threads of a block as fibers, real
barriers and warp shuffles, a failed device assert raised as an error) and registered for CPU
tensors as ``torch.ops.gated_ops_cudaemu.*``, with the schemas of ``torch.ops.gated_ops.*``.
It runs the kernels' own indexing, tiling, reductions and fused epilogues where there is no GPU,
so CI tests them against the float64 reference; it says nothing about their speed, and it is
slow (tiny shapes only). Build it with ``GATED_OPS_CUDA_EMU=1 pip install --no-build-isolation
-e .`` (scripts/test.sh does).

    layer = GatedPathwayLinear.batched(4, 16, 8, backend="cuda_emu")   # CPU tensors
"""
from __future__ import annotations

try:
    from . import _cuda_emu  # noqa: F401  (registers torch.ops.gated_ops_cudaemu)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "gated_ops._cuda_emu (the CUDA kernels emulated on the CPU) is not built: rebuild with "
        "GATED_OPS_CUDA_EMU=1 pip install --no-build-isolation -e ."
    ) from e

from .registration import register_python_parts

NAMESPACE = "gated_ops_cudaemu"
register_python_parts(NAMESPACE)

