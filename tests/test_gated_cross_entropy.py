"""gated_cross_entropy against its float64 reference: values, gradients, opcheck, edge cases."""
from __future__ import annotations

import math

import pytest
import torch

import gated_ops
from gated_ops.reference import gated_cross_entropy_ref
from gated_ops.testing import assert_close
from helpers import check_ce_backward_missing_grads, check_ce_backward_rejects_bad_input, check_strided_ce_logits

# (R, P, B, C): float32 takes rows 8 at a time in vector lanes (B = 5, 9: partial groups) and
# C > 64 classes in chunks
SHAPES = [(1, 1, 1, 2), (1, 9, 8, 10), (3, 16, 5, 7), (2, 100, 8, 10), (1, 3, 9, 70)]


def _inputs(R, P, B, C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(R, P, B, C, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, C, (R, P, B), generator=g)
    gate = (torch.rand(R, P, generator=g) < 0.5).to(dtype)
    gate[:, 0] = 1  # every replica trains at least one path
    return logits.requires_grad_(), target, gate.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    l64, t, g64 = _inputs(*shape)
    ref = gated_cross_entropy_ref(l64, t, g64)
    lp, _, gp = _inputs(*shape, dtype=dtype)
    plain = gated_cross_entropy_ref(lp, t, gp)
    lo, _, go = _inputs(*shape, dtype=dtype)
    out = gated_ops.gated_cross_entropy(lo, t, go)
    for name, a, r, p in zip(("loss", "path_loss"), out[:2], ref[:2], plain[:2]):
        assert_close(name, a.detach(), r.detach(), p.detach())
    # argmax is exact on the values given: equal to PyTorch's on the same (rounded) logits
    assert torch.equal(out[2], plain[2]) and out[2].dtype == torch.int64
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(out[2], ref[2])
    # gradients through both differentiable outputs, w.r.t. logits and gate
    w = torch.randn(shape[:2], dtype=torch.float64)
    grads = [torch.autograd.grad(o[0].sum() + (o[1] * w.to(o[1].dtype)).sum(), (lg, gg))
             for o, lg, gg in ((ref, l64, g64), (plain, lp, gp), (out, lo, go))]
    for i, name in enumerate(("grad logits", "grad gate")):
        assert_close(name, grads[2][i], grads[0][i], grads[1][i])


def test_opcheck_and_gradcheck():
    logits, target, gate = _inputs(2, 5, 3, 4)
    torch.library.opcheck(torch.ops.gated_ops.gated_cross_entropy, (logits, target, gate))
    f = lambda l, g: gated_ops.gated_cross_entropy(l, target, g)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(f, (logits, gate))


def test_compile_fullgraph_parity():
    logits, target, gate = _inputs(2, 6, 4, 5, dtype=torch.float32)
    f = lambda l: gated_ops.gated_cross_entropy(l, target, gate)[0].sum()  # noqa: E731
    eager = torch.autograd.grad(f(logits), logits)[0]
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(comp(logits), logits)[0], eager)


def test_gate_summing_to_zero_is_an_error():
    logits, target, gate = _inputs(2, 4, 3, 5)
    gate = gate.detach().clone()
    gate[1] = 0
    with pytest.raises(RuntimeError, match="replica 1 sums to zero"):
        gated_ops.gated_cross_entropy(logits, target, gate)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
def test_nan_and_inf_propagate(dtype):
    """A NaN or +inf logit makes its row's loss and gradient NaN, as in the reference (the
    backward's vector path recomputes 16-bit rows' max and sum: NaN must survive both)."""
    logits, target, gate = _inputs(1, 3, 2, 4, dtype=dtype)
    logits = logits.detach().clone()
    logits[0, 1, 0, 2] = float("nan")
    logits[0, 2, 1, 0] = float("inf")
    gate = torch.ones_like(gate)
    lg, lr = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, path_loss, correct = gated_ops.gated_cross_entropy(lg, target, gate)
    ref = gated_cross_entropy_ref(lr, target, gate)
    assert math.isnan(loss.item()) and math.isnan(ref[0].item())
    assert torch.equal(path_loss.isnan(), ref[1].isnan())
    if dtype != torch.bfloat16:  # (the reference's bf16 argmax sees rounded logits too)
        assert torch.equal(correct, ref[2])  # argmax picks the NaN, as torch.argmax does
    (loss.sum() + path_loss.sum()).backward()
    (ref[0].sum() + ref[1].sum()).backward()
    assert torch.equal(lg.grad.isnan(), lr.grad.isnan()) and lg.grad[0, 1, 0].isnan().all()
    finite = ~lr.grad.isnan()
    torch.testing.assert_close(lg.grad[finite], lr.grad[finite], rtol=0.02, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_argmax_ties_take_the_first_maximum(dtype):
    logits = torch.zeros(1, 1, 3, 4, dtype=dtype)
    logits[0, 0, 2, 1:] = 1.0  # row 2: a tie between classes 1, 2, 3
    target = torch.tensor([[[0, 1, 1]]])
    _, _, correct = gated_ops.gated_cross_entropy(logits, target, torch.ones(1, 1, dtype=dtype))
    assert correct.item() == 2  # rows 0 and 2: the first of the tied maxima


@pytest.mark.parametrize("bad, match", [
    (lambda l, t, g: (l[0], t, g), "logits: expected \\(R, P, B, C\\)"),
    (lambda l, t, g: (l, t.float(), g), "target: expected int64"),
    (lambda l, t, g: (l, t[:, :2], g), "target: expected shape"),
    (lambda l, t, g: (l, t, g[:, :2]), "gate: expected shape"),
    (lambda l, t, g: (l, t, g.float()), "gate: expected dtype"),
    (lambda l, t, g: (l, t + 100, g), "target: class index"),
    (lambda l, t, g: (l[:, :, :0], t[:, :, :0], g), "B > 0"),
])
def test_bad_input(bad, match):
    l, t, g = _inputs(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match=match):
        gated_ops.gated_cross_entropy(*bad(l.detach(), t, g.detach()))


def test_backward_op_refuses_a_bad_target():
    """The backward op called directly (not after its forward, which checks the targets) with a
    class index out of range raises before it writes there."""
    l, t, g = _inputs(2, 3, 4, 5)
    _, pl, _, lse = torch.ops.gated_ops.gated_cross_entropy(l.detach(), t, g.detach())
    bad = t.clone()
    bad[1, 2, 3] = 5
    with pytest.raises(RuntimeError, match=r"target: class index 5 out of range \[0, 5\)"):
        torch.ops.gated_ops.gated_cross_entropy_backward(
            torch.ones(2, dtype=l.dtype), torch.zeros_like(pl), l.detach(), bad, g.detach(), lse)


def test_backward_op_rejects_bad_input():
    check_ce_backward_rejects_bad_input(torch.ops.gated_ops, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
def test_backward_op_takes_missing_gradients(dtype):
    """autograd hands None for the outputs nobody differentiates (path_loss in training): the
    backward op reads a None as zeros, so the step allocates and fills no zero tensor."""
    check_ce_backward_missing_grads(torch.ops.gated_ops, "cpu", dtype)


def test_backward_of_ungated_paths_is_zero_and_still_propagates_nan():
    """Paths with gate 0 and no path-loss gradient get an exactly zero gradient (the kernel skips
    their softmax), unless a logit of the path is NaN or +inf, where 0 * NaN stays NaN as in
    the reference."""
    logits, target, gate = _inputs(2, 6, 3, 5, dtype=torch.float32)
    gate = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 1]])
    logits = logits.detach().clone()
    logits[0, 3, 1, 2] = float("nan")  # an ungated path
    logits[1, 2, 0, 0] = float("inf")  # another ungated path
    lg = logits.clone().requires_grad_()
    gated_ops.gated_cross_entropy(lg, target, gate)[0].sum().backward()
    lr = logits.clone().requires_grad_()
    gated_cross_entropy_ref(lr, target, gate)[0].sum().backward()
    assert torch.equal(lg.grad.isnan(), lr.grad.isnan())
    finite = ~lr.grad.isnan()
    torch.testing.assert_close(lg.grad[finite], lr.grad[finite])
    ungated_clean = (gate == 0).clone()
    ungated_clean[0, 3] = ungated_clean[1, 2] = False
    assert (lg.grad[ungated_clean] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
def test_strided_five_dim_logits_equal_the_copied_four_dim_ones(dtype):
    """The CPU kernels read the k-path's strided (R, I, J, B, C) logits in place and write the
    gradient in their strides (check_strided_ce_logits)."""
    check_strided_ce_logits("cpu", dtype)


def test_autocast_runs_the_loss_in_float32():
    """In an autocast region (bf16 logits, a float32 gate) the loss runs in float32, as
    F.cross_entropy does: the same values as the logits cast by hand."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 4, 5, generator=g).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 5, (2, 6, 4), generator=g)
    gate = (torch.rand(2, 6, generator=g) < 0.5).float()
    gate[:, 0] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_ops.gated_cross_entropy(logits, target, gate)
    ref = gated_ops.gated_cross_entropy(logits.detach().float(), target, gate)
    assert out[0].dtype == torch.float32
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    out[0].sum().backward()
    assert logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("C", [2, 10, 37], ids=lambda c: f"C{c}")
def test_float32_lse_is_the_logsumexp_to_a_few_ulp(C):
    """The float32 forward's vectorised exp and log: every row's log-sum-exp within 4 ulp of
    float64 torch.logsumexp, logits from -60 to 60 (row sums of exponentials from 1 to C)."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.rand(2, 50, 8, C, generator=g) * 120 - 60).float()
    logits[0, 0, 0] = 0.0  # equal logits: the sum is exactly C
    target = torch.randint(0, C, (2, 50, 8), generator=g)
    _, _, _, lse = torch.ops.gated_ops.gated_cross_entropy(logits, target, torch.ones(2, 50))
    ref = torch.logsumexp(logits.double(), -1)
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(1.0)
    assert ((lse.double() - ref).abs() <= 4 * ulp).all(), (lse.double() - ref).abs().max()
