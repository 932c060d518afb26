"""GatedPathwayLinear: constructors, repr, state, and the fused SGD update against torch.optim.SGD."""
from __future__ import annotations

import copy

import pytest
import torch

import gated_ops
from gated_ops import GatedPathwayLinear, SGDConfig
from gated_ops.reference import sgd_momentum_ref


def test_repr_names_the_structure():
    m = GatedPathwayLinear.fanout(3, 4, 5, 6)
    r = repr(m)
    for part in ("in_features=5", "out_features=6", "sources=3", "weights=4", "destinations=12",
                 "pathways=12", "blocked(n=1, ns=3, nm=4)", "bias=True"):
        assert part in r
    assert "fused_sgd=SGDConfig(lr=0.1" in repr(m.fuse_sgd(SGDConfig(lr=0.1)))


def test_state_dict_round_trip_and_plan_buffers_are_not_saved():
    m = GatedPathwayLinear.batched(3, 4, 5)
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias"}
    m2 = GatedPathwayLinear.batched(3, 4, 5)
    m2.load_state_dict(sd)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(m(x), m2(x))


@pytest.mark.parametrize("cfg", [
    SGDConfig(lr=0.1),
    SGDConfig(lr=0.05, momentum=0.9),
    SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-2),
    SGDConfig(lr=0.05, momentum=0.9, nesterov=True),
], ids=["plain", "momentum", "weight_decay", "nesterov"])
@pytest.mark.parametrize("kind", ["batched", "fanout", "grouped", "wide", "wide_offset"])
def test_fused_sgd_equals_torch_optim_sgd(cfg, kind):
    """Three steps of the fused update equal autograd + torch.optim.SGD to float32 tolerance.
    D_in = 37: the float32 kernels' 16-wide vector loop and its scalar tail both run."""
    torch.manual_seed(0)
    D = 37
    if kind == "batched":
        m = GatedPathwayLinear.batched(4, D, 6)
    elif kind == "fanout":
        m = GatedPathwayLinear.fanout(3, 2, D, 6, replicas=2)
    elif kind == "grouped":  # a GDLN-like table with a weight that no pathway uses
        m = GatedPathwayLinear([0, 1, 1, 2], [0, 0, 2, 3], [0, 0, 1, 2], num_sources=3,
                               num_weights=5, num_dst=3, in_features=D, out_features=6)
        assert m.plan.kind == "grouped"
    elif kind == "wide":  # blocks of ns*B = 80 rows: the one-GEMM-per-block path
        m = GatedPathwayLinear.shared(8, D, 6, replicas=2)
    else:  # a wide block over weight 1 only: weights 0 and 2 get zero-gradient updates
        m = GatedPathwayLinear(list(range(8)), [1] * 8, list(range(8)), num_sources=8,
                               num_weights=3, num_dst=8, in_features=D, out_features=6)
        assert m.plan.layout[1:] == (1, 0, 8, 1, 1)
    B = 10 if kind.startswith("wide") else 5
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    m.fuse_sgd(cfg)
    S = m.num_sources
    for step in range(3):
        x = torch.randn(S, B, D, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        gy = torch.randn(m.num_dst, B, 6)
        (m(x) * gy).sum().backward()
        opt.zero_grad()
        (ref(x_ref) * gy).sum().backward()
        opt.step()
        assert m.weight.grad is None and m.bias.grad is None
        torch.testing.assert_close(x.grad, x_ref.grad)  # computed before the update
        torch.testing.assert_close(m.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.bias, ref.bias, rtol=1e-5, atol=1e-6)


def test_fused_sgd_op_equals_reference_update_float64():
    torch.manual_seed(1)
    m = GatedPathwayLinear.shared(4, 7, 3, replicas=2, dtype=torch.float64)
    plan = m.plan
    x = torch.randn(8, 5, 7, dtype=torch.float64)
    gy = torch.randn(8, 5, 3, dtype=torch.float64)
    dz = torch.ops.gated_ops.pathway_grad_z(gy, None, plan.paths, plan.csr, list(plan.layout),
                                            8, 2)
    gw = torch.ops.gated_ops.pathway_grad_weight(dz, x, plan.paths, plan.csr, list(plan.layout),
                                                 2, 3)
    w, buf = m.weight.detach().clone(), torch.randn(2, 3, 7, dtype=torch.float64)
    w_ref, buf_ref = w.clone(), buf.clone()
    gated_ops.pathway_sgd_(dz, x, w, buf, plan, lr=0.3, momentum=0.8, weight_decay=0.1)
    sgd_momentum_ref(w_ref, gw, buf_ref, lr=0.3, momentum=0.8, weight_decay=0.1)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf, buf_ref, rtol=1e-12, atol=1e-12)


def test_fused_sgd_rejects_missing_buffer():
    m = GatedPathwayLinear.batched(2, 3, 4)
    plan = m.plan
    dz = torch.zeros(plan.z_shape(1, 4))
    with pytest.raises(RuntimeError, match="momentum_buffer: expected a buffer exactly when"):
        gated_ops.pathway_sgd_(dz, torch.zeros(2, 1, 3), m.weight.detach(), None, plan, lr=0.1,
                               momentum=0.9)


def test_sgd_config_validates():
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        SGDConfig(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="expected lr, momentum, weight_decay >= 0"):
        SGDConfig(lr=-1.0)


def test_fused_sgd_leaves_frozen_parameters_and_refuses_gate_grads():
    m = GatedPathwayLinear.batched(2, 4, 3).fuse_sgd(SGDConfig(lr=0.1))
    m.weight.requires_grad_(False)
    w0, b0 = m.weight.detach().clone(), m.bias.detach().clone()
    m(torch.randn(2, 5, 4)).sum().backward()
    assert torch.equal(m.weight, w0) and not torch.equal(m.bias, b0)
    with pytest.raises(RuntimeError, match="gradients for the gate are not supported"):
        m(torch.randn(2, 5, 4), gate=torch.ones(2, requires_grad=True))
