"""Both CPU paths of the 16-bit (bfloat16 / float16 storage) GEMMs: oneDNN's 16-bit GEMM
(GATED_OPS_CPU_WIDEN_GEMM=0, the default on AVX-512 CPUs) and a float32 GEMM on widened
operands, rounded once (=1, the default elsewhere: csrc/gated_ops.cpp, widen_gemm): forward,
every gradient and the fused SGD step, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from test_nn import KINDS
from test_nn import test_fused_sgd_16bit_storage_rounds_a_float_update_once as _sgd16_check
from test_pathway_matmul import SMALL, _check

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["1", "0"], ids=["widened", "16bit"])
def widen(request, monkeypatch):
    monkeypatch.setenv("GATED_OPS_CPU_WIDEN_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_both_16bit_gemm_paths_match_the_reference(case, dtype, widen):
    _check(case, "cpu", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("kind", KINDS)
def test_both_16bit_gemm_paths_step_like_torch_optim_sgd(kind, dtype, widen):
    _sgd16_check(kind, dtype)
