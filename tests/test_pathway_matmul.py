"""pathway_matmul: every backend x dtype x shape against the float64 reference, forward and every
gradient, plus opcheck, gradcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch

import gated_ops
from gated_ops.testing import SHAPES, Case, assert_close, make_inputs
from helpers import gradcheck_pathway

from conftest import BACKENDS, run_pathway

SMALL = [c for c in SHAPES if not c.large]
NAMES = ["x", "weight", "bias", "gate"]


def _ref_outputs(case: Case, dtype: torch.dtype, noncontiguous: bool):
    """Forward and gradients of the reference on the same inputs in `dtype` (plain PyTorch)."""
    inp = make_inputs(case, dtype=dtype, noncontiguous=noncontiguous)
    plan = case.table.plan()
    y = run_pathway("reference", inp, plan)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [inp[n] for n in NAMES if inp[n] is not None]
    grads = torch.autograd.grad(y, leaves, gy.to(dtype), allow_unused=True) if y.numel() else \
        [torch.zeros_like(v) for v in leaves]
    return y.detach(), gy, grads


def _check(case: Case, backend: str, dtype: torch.dtype, noncontiguous: bool = False,
           layout: str = "auto"):
    device = BACKENDS[backend]
    y64, gy, g64 = _ref_outputs(case, torch.float64, noncontiguous)
    y_plain, _, g_plain = _ref_outputs(case, dtype, noncontiguous)
    inp = make_inputs(case, dtype=dtype, device=device, noncontiguous=noncontiguous)
    y = run_pathway(backend, inp, case.table.plan(device, layout=layout))
    assert y.dtype == dtype and y.device.type == device
    assert_close(f"{case.name}: y", y.detach().cpu(), y64, y_plain)
    leaves = [inp[n] for n in NAMES if inp[n] is not None]
    names = [n for n in NAMES if inp[n] is not None]
    grads = torch.autograd.grad(y, leaves, gy.to(device=device, dtype=dtype), allow_unused=True)
    for name, g, r, p in zip(names, grads, g64, g_plain):
        g = torch.zeros_like(r) if g is None else g
        assert g.shape == r.shape
        assert_close(f"{case.name}: grad {name}", g.detach().cpu(), r, p)


DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16,
          "f16": torch.float16}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_pathway_matmul_matches_reference(case, backend, dtype):
    """16-bit dtypes: the CPU kernels compute in float and round once (csrc/cpu/);
    "plain" (the tolerance's yardstick) is the reference run in that dtype by PyTorch."""
    _check(case, backend, dtype)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_pathway_matmul_noncontiguous_inputs(case, backend):
    _check(case, backend, torch.float32, noncontiguous=True)


@pytest.mark.parametrize("case", [c for c in SMALL if c.table.plan().kind == "blocked"],
                         ids=lambda c: c.name)
def test_grouped_layout_matches_blocked(case):
    """Forcing the general (grouped) layout on a blocked table must give the same result."""
    _check(case, "cpu", torch.float64, layout="grouped")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", [c for c in SHAPES if c.large], ids=lambda c: c.name)
def test_pathway_matmul_paper_shapes(case, dtype):
    """The paper's sizes, where the skinny kernels (float32 and bfloat16 weights) run."""
    _check(case, "cpu", dtype)


def test_plan_kinds():
    kinds = {c.name: c.table.plan().kind for c in SHAPES}
    for name in ("odd_encoder", "odd_decoder", "moe", "replicas_hidden", "replicas_decoder",
                 "paper_encoder", "paper_hidden", "paper_decoder"):
        assert kinds[name] == "blocked", name
    for name in ("tiny_grouped", "no_pathways", "duplicate_pairs"):
        assert kinds[name] == "grouped", name


OPCHECK_CASES = [c for c in SMALL if c.batch > 0 and c.table.num_paths > 0]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
def test_opcheck(case, layout):
    """strided: inputs cut from wider tensors, a per-sample gate transposed from (B, P) (every
    op on such inputs: tests/test_fake_kernels.py)."""
    strided = layout == "strided"
    inp = make_inputs(case, dtype=torch.float32, noncontiguous=strided, transposed_gate=strided)
    plan = case.table.plan()
    torch.library.opcheck(torch.ops.gated_ops.pathway_matmul,
                          (inp["x"], inp["weight"], inp["bias"], inp["gate"], plan.paths,
                           plan.csr, list(plan.layout)))


@pytest.mark.parametrize("case", [c for c in OPCHECK_CASES if c.table.num_paths <= 40],
                         ids=lambda c: c.name)
def test_gradcheck(case):
    assert gradcheck_pathway(case)


def test_torch_compile_fullgraph_parity():
    case = next(c for c in SHAPES if c.name == "odd_decoder")
    inp = make_inputs(case, dtype=torch.float32)
    plan = case.table.plan()

    def f(x, w, b, g):
        return gated_ops.pathway_matmul(x, w, plan, b, g).square().sum()

    args = (inp["x"], inp["weight"], inp["bias"], inp["gate"])
    eager = f(*args)
    ge = torch.autograd.grad(eager, args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    gc = torch.autograd.grad(compiled, args)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_deterministic_bitwise():
    case = next(c for c in SHAPES if c.name == "tiny_grouped")
    outs = []
    for _ in range(2):
        inp = make_inputs(case, dtype=torch.float32)
        y = run_pathway("cpu", inp, case.table.plan())
        g = torch.autograd.grad(y.sum(), [inp["x"], inp["weight"], inp["gate"]])
        outs.append([y.detach(), *g])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case_name", ["tiny_grouped", "moe", "odd_encoder", "odd_decoder",
                                       "duplicate_pairs", "encoder_no_bias", "gated_off"])
def test_grad_x_gate_op_equals_the_two_ops_it_replaces(case_name):
    """pathway_grad_x_gate (one GEMM for both gradients) against pathway_grad_z + grad_x and
    pathway_grad_gate, float64, and opcheck."""
    case = next(c for c in SHAPES if c.name == case_name)
    inp = make_inputs(case, dtype=torch.float64, requires_grad=False)
    if inp["gate"] is None:
        pytest.skip("no gate in this case")
    plan = case.table.plan()
    ops, lay = torch.ops.gated_ops, list(plan.layout)
    x, w, b, g = inp["x"], inp["weight"], inp["bias"], inp["gate"]
    gy = torch.randn(plan.num_dst, case.batch, case.d_out, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(2))
    gx, gg = ops.pathway_grad_x_gate(gy, x, w, b, g, plan.paths, plan.csr, lay)
    dz = ops.pathway_grad_z(gy, g, plan.paths, plan.csr, lay, x.shape[0], w.shape[0])
    torch.testing.assert_close(
        gx, ops.pathway_grad_x(dz, w, plan.paths, plan.csr, lay, x.shape[0], x.shape[1]),
        rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        gg, ops.pathway_grad_gate(gy, x, w, b, g, plan.paths, plan.csr, lay),
        rtol=1e-12, atol=1e-12)
    torch.library.opcheck(ops.pathway_grad_x_gate, (gy, x, w, b, g, plan.paths, plan.csr, lay))


def test_grad_x_gate_op_names_bad_arguments():
    case = next(c for c in SHAPES if c.name == "moe")
    inp = make_inputs(case, dtype=torch.float32, requires_grad=False)
    plan = case.table.plan()
    ops, lay = torch.ops.gated_ops, list(plan.layout)
    x, w, b, g = inp["x"], inp["weight"], inp["bias"], inp["gate"]
    gy = torch.zeros(plan.num_dst, case.batch, case.d_out)
    with pytest.raises(RuntimeError, match="grad_y: expected shape"):
        ops.pathway_grad_x_gate(gy[:, :1], x, w, b, g, plan.paths, plan.csr, lay)
    with pytest.raises(RuntimeError, match="gate: expected"):
        ops.pathway_grad_x_gate(gy, x, w, b, g[:, :1], plan.paths, plan.csr, lay)
    with pytest.raises(RuntimeError, match="weight: expected dtype"):
        ops.pathway_grad_x_gate(gy, x, w.double(), b, g, plan.paths, plan.csr, lay)
