"""What the Triton op families share: the ops' namespace and how a launcher is registered for
it, the dtypes the kernels take, the rule that sends the rest to the compiled ops, and the tile
sizes and precision of the GEMMs."""
from __future__ import annotations

import logging

import torch
import triton

log = logging.getLogger("gated_ops.triton")

#: The registered ops this backend implements: ``torch.ops.gated_ops_triton.<name>``, with the
#: schemas of ``torch.ops.gated_ops.<name>``, declared by gated_ops._C (csrc/triton_schemas.cpp).
NAMESPACE = "gated_ops_triton"

#: Data types the Triton kernels take; others fall back to the compiled ops.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def register_kernels(kernels: dict) -> None:
    """Each launcher of ``{op name: launcher}`` as the CUDA kernel of
    ``torch.ops.gated_ops_triton.<name>``, and as its CPU kernel: Triton runs CPU tensors under
    TRITON_INTERPRET=1 (elsewhere a launch on them fails in Triton, as it always has). The
    dispatcher passes the schema's arguments positionally, leaving out trailing ones that equal
    their defaults, so each launcher takes the schema's defaults too."""
    for name, kernel in kernels.items():
        torch.library.impl(f"{NAMESPACE}::{name}", ("CUDA", "CPU"), kernel)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _uses_triton(layout: list[int], dtype: torch.dtype) -> bool:
    """Blocked plans in float32 / float16 / bfloat16; anything else uses the compiled op."""
    if layout[1] > 0 and dtype in TRITON_DTYPES:
        return True
    log.debug("gated_ops_triton: %s plan in %s -> compiled op (torch.ops.gated_ops)",
              "blocked" if layout[1] > 0 else "grouped", dtype)
    return False


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 tiles in full IEEE precision, as plain PyTorch's default matmul (TF32 would be an
    # error of ~1e-3 against the tolerance rule); "tf32" is tl.dot's default, a no-op for 16-bit.
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_tiles(red: int, block_k: int) -> int:
    # Long reductions are summed in two levels: chunks of 4 K-tiles each into a fresh fp32
    # accumulator, then the chunks. tl.dot accumulates each output along the whole reduction, and
    # at 3072 (a CIFAR encoder) or 800 (a k-path decoder's gradient) that sequential chain was
    # measured on the H100 at 1.1-1.9x the error of cuBLAS, which the tolerance rule caps at 2x.
    # A short reduction keeps one level (a chunk's masked tail tiles would be wasted work).
    return 4 if red > 4 * block_k else 1


def _gemm_blocks(rows: int, cols: int, red: int) -> tuple[int, int, int]:
    # tl.dot needs every dimension >= 16; 64 caps registers per program.
    return _pow2(rows, 16, 64), _pow2(cols, 16, 64), _pow2(red, 16, 64)
