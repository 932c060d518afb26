"""Both CPU paths of the 16-bit (bfloat16 / float16 storage) GEMMs, whichever the machine picks:
oneDNN's 16-bit GEMM (force_kernel(cpu_widen_gemm=False), the default on AVX-512 CPUs) and a
float32 GEMM on widened operands, rounded once (True, the default elsewhere: csrc/cpu/common.h,
widen_gemm): forward, every gradient and the fused SGD step, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from gated_ops.testing import force_kernel
from test_nn import KINDS
from test_nn import test_fused_sgd_16bit_storage_rounds_a_float_update_once as _sgd16_check
from test_pathway_matmul import SMALL, _check

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(params=[True, False], ids=["widened", "16bit"])
def widen(request):
    with force_kernel(cpu_widen_gemm=request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_both_16bit_gemm_paths_match_the_reference(case, dtype, widen):
    _check(case, "cpu", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("kind", KINDS)
def test_both_16bit_gemm_paths_step_like_torch_optim_sgd(kind, dtype, widen):
    _sgd16_check(kind, dtype)
