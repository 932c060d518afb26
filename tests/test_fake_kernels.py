"""The fake (meta) kernels describe the real outputs exactly: shape, strides and dtype, checked by
torch.library.opcheck on inputs laid out as models hand them over (a transposed router gate, x
and gradients cut from wider tensors, the k-path decoder's strided logits), for the compiled
kernels and the emulated CUDA ones. torch.compile's Inductor backend trusts these strides."""
from __future__ import annotations

import pytest
import torch

from gated_ops.testing import SHAPES
from helpers import opcheck_ce_ops, opcheck_pathway_ops


def _namespace(name: str):
    if name == "gated_ops_cudaemu":
        pytest.importorskip("gated_ops.cuda_emu", reason="gated_ops._cuda_emu is not built",
                            exc_type=ImportError)
    return getattr(torch.ops, name)


NAMESPACES = ["gated_ops", pytest.param("gated_ops_cudaemu", marks=pytest.mark.cuda_emu)]
# a trained MoE router (per-sample gate, one destination), a grouped GDLN graph, a fan-out
# decoder with a per-path gate, a k-path encoder without bias, a layer whose Z is y
CASES = ["moe", "tiny_grouped", "odd_decoder", "encoder_no_bias", "hidden_plain"]


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("ns", NAMESPACES)
def test_pathway_ops_fakes_match_on_strided_inputs(ns, case_name):
    case = next(c for c in SHAPES if c.name == case_name)
    opcheck_pathway_ops(_namespace(ns), case)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_cross_entropy_fakes_match_on_every_logits_layout(ns):
    opcheck_ce_ops(_namespace(ns))


def test_transposed_gate_gradient_is_contiguous_in_fake_and_real():
    """The case Inductor tripped on: a (P, B) gate viewed from a (B, P) router output. The
    gradient ops return contiguous tensors, and so do their fakes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = next(c for c in SHAPES if c.name == "moe")
    plan = case.table.plan()
    P, B = case.table.num_paths, case.batch
    x = torch.randn(1, B, case.d_in)
    w = torch.randn(4, case.d_out, case.d_in)
    gate = torch.rand(B, P).t()
    gy = torch.randn(1, B, case.d_out)
    args = (gy, x, w, None, gate, plan.paths, plan.csr, list(plan.layout))
    ops = torch.ops.gated_ops
    real = [ops.pathway_grad_gate(*args), *ops.pathway_grad_x_gate(*args)]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = [ops.pathway_grad_gate(*fargs), *ops.pathway_grad_x_gate(*fargs)]
    for r, f in zip(real, fake):
        assert r.is_contiguous() and (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(),
                                                                         f.dtype)
