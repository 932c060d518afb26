"""Bad input gets a clear error naming the argument and what was expected."""
from __future__ import annotations

import pytest
import torch

import gated_ops
from gated_ops import make_plan

F64 = torch.float64


def _good():
    plan = gated_ops.make_plan([0, 1, 1], [0, 0, 1], [0, 1, 1], num_sources=2, num_weights=2,
                               num_dst=2)
    x = torch.randn(2, 3, 4, dtype=F64)
    w = torch.randn(2, 5, 4, dtype=F64)
    return plan, x, w


@pytest.mark.parametrize("kw, match", [
    (dict(src=[0, 5], wgt=[0, 0], dst=[0, 0]), r"src: indices must lie in \[0, 2\)"),
    (dict(src=[0, 1], wgt=[0, -1], dst=[0, 0]), r"wgt: indices must lie in \[0, 2\)"),
    (dict(src=[0, 1], wgt=[0, 1], dst=[0, 3]), r"dst: indices must lie in \[0, 2\)"),
    (dict(src=[0, 1], wgt=[0], dst=[0, 0]), "expected the same length"),
    (dict(src=[[0, 1]], wgt=[0, 1], dst=[0, 0]), "src: expected a 1-D integer tensor"),
    (dict(src=[0.5, 1.0], wgt=[0, 1], dst=[0, 0]), "src: expected a 1-D integer tensor"),
])
def test_make_plan_rejects_bad_tables(kw, match):
    with pytest.raises(ValueError, match=match):
        gated_ops.make_plan(**kw, num_sources=2, num_weights=2, num_dst=2)


def test_make_plan_rejects_negative_sizes():
    with pytest.raises(ValueError, match="num_dst: expected >= 0"):
        gated_ops.make_plan([], [], [], num_sources=1, num_weights=1, num_dst=-1)


@pytest.mark.parametrize("make, exc, match", [
    (lambda p, x, w: (x[0], w, p, None, None), ValueError, r"x: expected \(S, B, D_in\)"),
    (lambda p, x, w: (x[:1], w, p, None, None), ValueError, "plan was built for S=2"),
    (lambda p, x, w: (x, w[:1], p, None, None), ValueError, "M=2 weights"),
    (lambda p, x, w: (x, w[:, :, :3], p, None, None), RuntimeError, "weight: expected D_in = 4"),
    (lambda p, x, w: (x, w.float(), p, None, None), RuntimeError,
     "weight: expected dtype Double"),
    (lambda p, x, w: (x.int(), w.int(), p, None, None), RuntimeError,
     "x: the CPU kernels support float32, float64, bfloat16 and float16, got Int"),
    (lambda p, x, w: (x, w, p, torch.zeros(2, 4, dtype=F64), None), RuntimeError,
     r"bias: expected shape \[2, 5\]"),
    (lambda p, x, w: (x, w, p, None, torch.ones(2, dtype=F64)), RuntimeError,
     r"gate: expected \(P,\) or \(P, B\) = \(3,\) or \(3, 3\)"),
    (lambda p, x, w: (x, w, p, None, torch.ones(3, 2, dtype=F64)), RuntimeError,
     r"gate: expected \(P,\) or \(P, B\)"),
    (lambda p, x, w: (x, w, p, None, torch.ones(3)), RuntimeError, "gate: expected dtype Double"),
    (lambda p, x, w: (x, w, p.to("meta"), None, None), ValueError, "move the plan"),
])
def test_pathway_matmul_rejects_bad_input(make, exc, match):
    plan, x, w = _good()
    with pytest.raises(exc, match=match):
        gated_ops.pathway_matmul(*make(plan, x, w))


def test_raw_op_rejects_out_of_range_indices():
    """The registered op re-checks indices on the CPU, for callers that bypass make_plan."""
    plan, x, w = _good()
    paths = plan.paths.clone()
    paths[0, 1] = 7
    with pytest.raises(RuntimeError, match=r"source index 7 of pathway 1 out of range \[0, 2\)"):
        torch.ops.gated_ops.pathway_matmul(x, w, None, None, paths, plan.csr, list(plan.layout))


@pytest.mark.parametrize("layout", ["auto", "grouped"])
def test_raw_cpu_op_refuses_every_corrupted_table_entry(layout):
    """Raw callers bypass PathwayPlan's validation: the CPU kernels check every index they
    read, so each corrupted entry of paths or csr is refused or harmless, never read out of
    bounds."""
    plan = make_plan([0, 1, 1, 2], [2, 0, 2, 1], [1, 0, 0, 1], num_sources=3, num_weights=3,
                     num_dst=2, layout=layout)
    x, w = torch.randn(3, 2, 4), torch.randn(3, 5, 4)
    for name in ("paths", "csr"):
        t = getattr(plan, name)
        for i in range(t.numel()):
            for bad in (-1, 10 ** 6):
                c = t.clone()
                c.view(-1)[i] = bad
                tables = (c, plan.csr) if name == "paths" else (plan.paths, c)
                with pytest.raises(RuntimeError, match="out of range|corrupt plan"):
                    for op in ("pathway_matmul", "pathway_grad_gate"):
                        args = ((x, w, None, None) if op == "pathway_matmul" else
                                (torch.randn(2, 2, 5), x, w, None, torch.rand(4, 2)))
                        getattr(torch.ops.gated_ops, op)(*args, *tables, list(plan.layout))


def test_raw_op_rejects_plan_for_other_sizes():
    plan, x, w = _good()
    with pytest.raises(RuntimeError, match="a plan built for other sizes"):
        torch.ops.gated_ops.pathway_matmul(x, torch.cat([w, w]), None, None, plan.paths,
                                           plan.csr, list(plan.layout))


@pytest.mark.parametrize("flags, match", [
    (0, r"layout: flags 0 do not match the pathway table \(expected 3\)"),
    (1, r"layout: flags 1 do not match the pathway table \(expected 3\)"),
    (2, "flags say Z is y, which needs one pathway per destination"),
    (4, "layout: unknown flags 4"),
    (None, "layout: expected 7 ints"),
])
def test_raw_op_rejects_flags_that_do_not_match_the_table(flags, match):
    """The layout's flags (what the GPU backends take on trust to skip a pass) are checked
    against the tables by the CPU kernels."""
    plan = gated_ops.make_plan([0, 1, 2], [0, 1, 2], [0, 1, 2], num_sources=3, num_weights=3,
                               num_dst=3)
    assert plan.one_per_dst and plan.z_is_y
    layout = list(plan.layout[:6]) + ([] if flags is None else [flags])
    x, w = torch.randn(3, 2, 4, dtype=F64), torch.randn(3, 5, 4, dtype=F64)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.gated_ops.pathway_matmul(x, w, None, None, plan.paths, plan.csr, layout)


def test_raw_op_rejects_one_per_dst_flags_on_a_summing_table():
    plan, x, w = _good()  # destination 1 sums two pathways
    assert not plan.one_per_dst and not plan.z_is_y
    layout = list(plan.layout[:6]) + [1]
    with pytest.raises(RuntimeError, match="flags say one pathway per destination, but T=2 and "
                                           "P=3"):
        torch.ops.gated_ops.pathway_matmul(x, w, None, None, plan.paths, plan.csr, layout)


def test_empty_batch_and_no_pathways():
    plan, x, w = _good()
    x0 = x[:, :0].requires_grad_()
    y = gated_ops.pathway_matmul(x0, w, plan)
    assert y.shape == (2, 0, 5)
    y.sum().backward()
    assert x0.grad.shape == x0.shape
    empty = gated_ops.make_plan([], [], [], num_sources=2, num_weights=2, num_dst=4)
    w = w.clone().requires_grad_()
    y = gated_ops.pathway_matmul(x, w, empty)
    assert torch.equal(y, torch.zeros(4, 3, 5, dtype=F64))
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_backend_option():
    plan, x, w = _good()
    ref = gated_ops.pathway_matmul(x, w, plan, backend="reference")
    torch.testing.assert_close(gated_ops.pathway_matmul(x, w, plan), ref)
    with pytest.raises(ValueError, match="backend: expected one of"):
        gated_ops.pathway_matmul(x, w, plan, backend="cuda")


def test_module_backend_option():
    """Modules run on the compiled kernels ("auto") or on Triton; anything else is refused when
    the module is built, naming the option."""
    from gated_ops import GatedPathwayLinear
    from experiments.kpath_net import KPathNet

    with pytest.raises(ValueError,
                       match="backend: expected 'auto', 'triton' or 'cuda_emu', got 'cuda'"):
        GatedPathwayLinear.batched(2, 3, 4, backend="cuda")
    with pytest.raises(ValueError,
                       match="backend: expected 'auto', 'triton' or 'cuda_emu', got 'reference'"):
        KPathNet(2, 3, 4, 5, backend="reference")
    assert "backend=triton" in repr(GatedPathwayLinear.batched(2, 3, 4, backend="triton"))
