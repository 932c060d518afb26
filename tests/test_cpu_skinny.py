"""Every CPU path of the blocked skinny layers (the k-path encoders), whichever the machine picks
(gated_ops.testing.force_kernel): the hand-vectorised kernels of csrc/cpu/simd.h (cpu_skinny=True;
the default for float32 on AVX2 and AVX-512 CPUs and for 16-bit storage) in 16 lanes
(cpu_lanes=16, the AVX-512 default) and 8 (cpu_lanes=8, the AVX2 default), and BLAS with the
streamed update (cpu_skinny=False; the default for float32 on older CPUs): forward, gradients and
the fused SGD step, against the reference and torch.optim.SGD; the two widths' updates bit for
bit."""
from __future__ import annotations

import pytest
import torch

import gated_ops

from gated_ops import SGDConfig
from gated_ops.testing import SHAPES, assert_close, force_kernel

from test_nn import test_fused_sgd_equals_torch_optim_sgd as _fused_sgd_check
from test_pathway_matmul import _check

BLOCKED_SKINNY = [c for c in SHAPES if not c.large and c.table.plan().kind == "blocked"]


@pytest.fixture(params=[(True, 16), (True, 8), (False, 16)],
                ids=["skinny16", "skinny8", "blas"])
def cpu_path(request):
    skinny, lanes = request.param
    with force_kernel(cpu_skinny=skinny, cpu_lanes=lanes):  # (8: where the CPU has AVX2)
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", BLOCKED_SKINNY, ids=lambda c: c.name)
def test_both_cpu_paths_match_the_reference(case, dtype, cpu_path):
    _check(case, "cpu", dtype)


@pytest.mark.parametrize("kind", ["batched", "fanout"])
def test_both_cpu_paths_step_like_torch_optim_sgd(kind, cpu_path):
    _fused_sgd_check(SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-2), kind)


@pytest.mark.parametrize("rounding_seed", [-1, 7], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(100, 8, 784, 128), (6, 3, 37, 13), (3, 1, 9, 5), (4, 12, 20, 6),
                                   (3, 8, 2100, 5)],
                         ids=lambda s: "K{}-B{}-D{}-H{}".format(*s))
def test_update_bits_do_not_depend_on_the_vector_width(shape, dtype, rounding_seed):
    """The fused update sums each gradient element over the activation rows in one order at
    both widths (nr = B <= 8 takes the 8-lane kernel, B = 12 the 16-lane one at both), so the
    weights and momenta come out identical; the forward's sums are ordered by lane and may
    differ in the last bits (D = 2100: the 8-lane forward in pieces of D, with a tail)."""
    if rounding_seed >= 0 and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bfloat16 weights")
    K, B, D, H = shape
    g = torch.Generator().manual_seed(K * 1000 + D)
    plan = gated_ops.make_plan(list(range(K)), list(range(K)), list(range(K)),
                               num_sources=K, num_weights=K, num_dst=K)
    x = torch.randn(K, B, D, generator=g).to(dtype)
    w0 = (torch.randn(K, H, D, generator=g) * 0.1).to(dtype)
    b0 = torch.randn(K, H, D, generator=g).to(dtype)
    dz = torch.randn(K * B, H, generator=g).to(dtype)
    out = {}
    for lanes in (8, 16):
        w, b = w0.clone(), b0.clone()
        with force_kernel(cpu_skinny=True, cpu_lanes=lanes):
            gated_ops.pathway_sgd_(dz, x, w, b, plan, lr=0.05, momentum=0.9, weight_decay=1e-2,
                                   rounding_seed=rounding_seed)
            z = gated_ops.pathway_matmul(x, w0, plan)
        out[lanes] = (w, b)
        ref = torch.bmm(x.double(), w0.double().transpose(1, 2)).reshape(z.shape)
        plain = torch.bmm(x, w0.transpose(1, 2)).reshape(z.shape)
        assert_close(f"z ({lanes} lanes)", z, ref, plain)
    assert not torch.equal(out[8][0], w0)
    assert torch.equal(out[8][0], out[16][0])
    assert torch.equal(out[8][1], out[16][1])

