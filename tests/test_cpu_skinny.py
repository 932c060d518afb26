"""Both CPU paths of the blocked skinny layers (the k-path encoders), whichever the machine picks:
the hand-vectorised kernels of csrc/cpu_simd.h (GATED_OPS_CPU_SKINNY=1; the default for float32
on AVX-512 CPUs and for 16-bit storage) and BLAS with the streamed update (=0; the default for
float32 on AVX2-only CPUs), forward, gradients and the fused SGD step, against the reference and
torch.optim.SGD."""
from __future__ import annotations

import pytest
import torch

from gated_ops import SGDConfig
from gated_ops.testing import SHAPES

from test_nn import test_fused_sgd_equals_torch_optim_sgd as _fused_sgd_check
from test_pathway_matmul import _check

BLOCKED_SKINNY = [c for c in SHAPES if not c.large and c.table.plan().kind == "blocked"]


@pytest.fixture(params=["1", "0"], ids=["skinny", "blas"])
def cpu_path(request, monkeypatch):
    monkeypatch.setenv("GATED_OPS_CPU_SKINNY", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", BLOCKED_SKINNY, ids=lambda c: c.name)
def test_both_cpu_paths_match_the_reference(case, dtype, cpu_path):
    _check(case, "cpu", dtype)


@pytest.mark.parametrize("kind", ["batched", "fanout"])
def test_both_cpu_paths_step_like_torch_optim_sgd(kind, cpu_path):
    _fused_sgd_check(SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-2), kind)
