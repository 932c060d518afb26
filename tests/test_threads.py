"""The CPU kernels split work over threads (at::parallel_for, OpenMP): every op's result must be
bitwise the same for any thread count, and ATen calls inside worker threads must behave as on
the calling thread (a weight that requires grad, grad mode, dispatch keys).

The skinny layers run on our kernels here (force_kernel(cpu_skinny=True); the default on AVX2
and AVX-512 CPUs): on older CPUs their float32 default is BLAS (csrc/cpu/common.h,
use_skinny_blocked), whose bits, like those of the wide layers' GEMMs, are BLAS's and may
depend on the thread count."""
from __future__ import annotations

import pytest
import torch

import gated_ops
from gated_ops import GatedPathwayLinear, SGDConfig
from experiments.kpath_net import KPathNet, kpath_gate
from gated_ops.testing import SHAPES, force_kernel, make_inputs

@pytest.fixture(autouse=True)
def _our_skinny_kernels():
    with force_kernel(cpu_skinny=True):
        yield


CASES = ["tiny_grouped", "skinny_encoder", "odd_decoder", "replicas_hidden", "moe",
         "duplicate_pairs"]


def _with_threads(n: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _pathway_outputs(case_name: str) -> list[torch.Tensor]:
    case = next(c for c in SHAPES if c.name == case_name)
    inp = make_inputs(case, dtype=torch.float32)
    plan = case.table.plan()
    y = gated_ops.pathway_matmul(inp["x"], inp["weight"], plan, inp["bias"], inp["gate"])
    leaves = [v for v in (inp["x"], inp["weight"], inp["bias"], inp["gate"]) if v is not None]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    return [y.detach(), *torch.autograd.grad(y, leaves, gy)]


@pytest.mark.parametrize("case_name", CASES)
def test_pathway_matmul_same_bits_for_any_thread_count(case_name):
    one = _with_threads(1, lambda: _pathway_outputs(case_name))
    three = _with_threads(3, lambda: _pathway_outputs(case_name))
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def _kpath_step() -> list[torch.Tensor]:
    """One fused-SGD step of a small k-path net (skinny encoder update, wide hidden/decoder
    updates, CE forward and backward), on 2 replicas."""
    torch.manual_seed(0)
    K, B, D, H, R = 6, 8, 40, 12, 2
    net = KPathNet(K, D, H, replicas=R).fuse_sgd(SGDConfig(lr=0.1, momentum=0.9))
    net.xavier_init_([1.0, 0.5], [torch.Generator().manual_seed(r) for r in range(R)])
    g = torch.Generator().manual_seed(1)
    xk = torch.randn(R * K, B, D, generator=g)
    target = torch.randint(0, 10, (R, K * K, B), generator=g)
    gate = torch.stack([kpath_gate(K, 3, "N_plus_mod_permute", seed=r).flatten()
                        for r in range(R)])
    outs = []
    for _ in range(2):  # the second step uses the momentum written by the first
        loss, path_loss, correct = net.loss(xk, target, gate)
        loss.sum().backward()
        outs += [loss.detach(), path_loss.detach(), correct]
    return outs + [p.detach().clone() for p in net.parameters()]


def test_kpath_fused_step_same_bits_for_any_thread_count():
    one = _with_threads(1, _kpath_step)
    three = _with_threads(3, _kpath_step)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def test_grouped_layer_with_trainable_weight_runs_in_worker_threads():
    """A grouped plan's per-weight GEMMs run inside at::parallel_for on a weight that requires
    grad: the workers must inherit the op's dispatch state (they once failed with 'functions
    with out=... arguments don't support automatic differentiation')."""
    m = GatedPathwayLinear([0, 1, 1, 2, 0, 2], [0, 0, 2, 3, 4, 1], [0, 0, 1, 2, 2, 1],
                           num_sources=3, num_weights=5, num_dst=3, in_features=20,
                           out_features=7).fuse_sgd(SGDConfig(lr=0.1, momentum=0.9))
    assert m.plan.kind == "grouped"
    x = torch.randn(3, 4, 20, requires_grad=True)

    def run():
        y = m(x)
        y.square().sum().backward()
        return y

    _with_threads(3, run)
    assert x.grad is not None and torch.isfinite(x.grad).all()
