"""torch.compile(fullgraph=True) with the Inductor backend: each public function (pathway_matmul,
gated_cross_entropy, the GatedPathwayLinear module) compiled, its forward and every gradient
against eager, on contiguous and non-contiguous inputs (a router's (B, P) output transposed into
the (P, B) gate, x cut from a wider tensor, the k-path decoder's strided 5-D logits). Inductor
trusts the fake kernels' strides (tests/test_fake_kernels.py checks them op by op); these tests
check the whole graphs.

Inductor compiles slowly on a small CPU machine (seconds to tens of seconds a graph): the
default run takes a representative subset, one of each kind of input; the whole shape table
is marked slow.
"""
from __future__ import annotations

import copy

import pytest
import torch

import gated_ops
from gated_ops import GatedPathwayLinear
from gated_ops.testing import SHAPES, make_inputs

NAMES = ("x", "weight", "bias", "gate")


@pytest.fixture(autouse=True)
def fresh_inductor():
    """A fresh Dynamo cache (each test compiles its own graphs, whatever the recompile limit),
    and no on-disk graph caches: their keys do not cover this package's fake kernels, so a
    graph compiled before a fake kernel changed would be served again."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def _compiled(fn):
    return torch.compile(fn, backend="inductor", fullgraph=True)


def _assert_one_graph():
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(
        torch._dynamo.utils.counters["stats"])


def _close(a, b, what: str) -> None:
    """float64: the same kernels in both, the surrounding ops fused or not by Inductor."""
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _case(name):
    return next(c for c in SHAPES if c.name == name)


def _check_pathway(case, layout: str) -> None:
    """layout: "contiguous", or "strided" (x, weight, bias cut from wider tensors; a per-sample
    gate made in the graph from a router's (B, P) logits, softmax then transpose; a per-path
    gate cut from a wider tensor)."""
    strided = layout == "strided"
    inp = make_inputs(case, dtype=torch.float64, noncontiguous=strided)
    plan = case.table.plan()
    router = strided and case.gate == "sample"
    if router:  # (B, P) router logits: the gate is their softmax, transposed
        inp["gate"] = torch.randn(case.batch, case.table.num_paths, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(4)).requires_grad_()
    w_out = torch.randn(plan.num_dst, case.batch, case.d_out, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))

    def f(x, weight, bias, gate):
        if router:
            gate = gate.softmax(-1).t()
        y = gated_ops.pathway_matmul(x, weight, plan, bias, gate)
        return y, (y * w_out).sum()

    names = [n for n in NAMES if inp[n] is not None]
    args = [inp[n] for n in NAMES]
    leaves = [inp[n] for n in names]
    y, loss = f(*args)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    cy, closs = _compiled(f)(*args)
    _assert_one_graph()
    cgrads = torch.autograd.grad(closs, leaves, allow_unused=True)
    _close(cy, y, f"{case.name}: y")
    for n, a, b in zip(names, cgrads, grads):
        if b is None:
            assert a is None, n
            continue
        _close(a, b, f"{case.name}: grad {n}")


# a router's MoE layer, a fan-out decoder with a per-path gate, a grouped graph, an ungated
# layer without bias
DEFAULT_PATHWAY = [("moe", "strided"), ("odd_decoder", "strided"), ("tiny_grouped", "contiguous"),
                   ("decoder_no_bias", "contiguous")]
FULL_PATHWAY = [(c.name, layout) for c in SHAPES for layout in ("contiguous", "strided")
                if (c.name, layout) not in DEFAULT_PATHWAY]


@pytest.mark.parametrize("case_name,layout", DEFAULT_PATHWAY, ids=lambda v: str(v))
def test_pathway_matmul_inductor(case_name, layout):
    _check_pathway(_case(case_name), layout)


@pytest.mark.slow
@pytest.mark.parametrize("case_name,layout", FULL_PATHWAY, ids=lambda v: str(v))
def test_pathway_matmul_inductor_shape_table(case_name, layout):
    _check_pathway(_case(case_name), layout)


def _check_ce(layout: str) -> None:
    """layout: "5d" (the k-path decoder's (R*I, B, J*C) output viewed in the graph as
    (R, I, J, B, C)), "4d" (contiguous) or "4d_strided_classes" (cut from a wider tensor)."""
    R, I, J, B, C = 2, 2, 3, 4, 5
    P = I * J
    g = torch.Generator().manual_seed(0)
    shape = {"5d": (R * I, B, J * C), "4d": (R, P, B, C), "4d_strided_classes": (R, P, B, 2 * C)}
    out = (3 * torch.randn(shape[layout], generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, C, (R, P, B), generator=g)
    gate = (torch.rand(R, P, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    w = torch.randn(R, P, generator=g, dtype=torch.float64)

    def f(out, gate):
        logits = (out.view(R, I, B, J, C).permute(0, 1, 3, 2, 4) if layout == "5d"
                  else out[..., ::2] if layout == "4d_strided_classes" else out)
        loss, path_loss, correct = gated_ops.gated_cross_entropy(logits, target, gate)
        return loss, path_loss, correct, loss.sum() + (path_loss * w).sum()

    eager = f(out, gate)
    grads = torch.autograd.grad(eager[-1], (out, gate))
    comp = _compiled(f)(out, gate)
    _assert_one_graph()
    cgrads = torch.autograd.grad(comp[-1], (out, gate))
    for name, a, b in zip(("loss", "path_loss"), comp, eager):
        _close(a, b, name)
    assert torch.equal(comp[2], eager[2])
    _close(cgrads[0], grads[0], "grad logits")
    _close(cgrads[1], grads[1], "grad gate")


@pytest.mark.parametrize("layout", ["5d"])
def test_gated_cross_entropy_inductor(layout):
    _check_ce(layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["4d", "4d_strided_classes"])
def test_gated_cross_entropy_inductor_layouts(layout):
    _check_ce(layout)


@pytest.mark.parametrize("router", [True, False], ids=["moe_router", "batched"])
def test_module_inductor(router):
    """GatedPathwayLinear (plain, without the fused SGD) compiled as a module: output and the
    gradients of its parameters, x and a router's logits against the eager module."""
    torch.manual_seed(0)
    if router:
        layer = GatedPathwayLinear.mixture_of_experts(4, 8, 5, dtype=torch.float64)
        x = torch.randn(1, 2 * 6, 8, dtype=torch.float64)[:, ::2].requires_grad_()  # strided
        logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    else:
        layer = GatedPathwayLinear.batched(3, 8, 5, dtype=torch.float64)
        x = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
        logits = None
    ref = copy.deepcopy(layer)
    compiled = _compiled(layer)

    def run(m):
        y = m(x, logits.softmax(-1).t()) if router else m(x)
        leaves = [x, *m.parameters()] + ([logits] if router else [])
        return y, torch.autograd.grad(y.square().sum(), leaves)
    y, grads = run(ref)
    cy, cgrads = run(compiled)
    _assert_one_graph()
    _close(cy, y, "y")
    for i, (a, b) in enumerate(zip(cgrads, grads)):
        _close(a, b, f"grad {i}")
