"""The README's Python blocks run and say what they claim: the spec of the op (its einsum form
against gated_ops.pathway_matmul) and the "use it in a model" example."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

import gated_ops

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _block(first_line_part: str) -> str:
    found = [b for b in _python_blocks() if first_line_part in b.splitlines()[0]]
    assert len(found) == 1, f"README: expected one python block starting with {first_line_part!r}"
    return found[0]


def test_the_spec_block_is_pathway_matmul():
    """The README's reference form of the op, run on a table that sums, gates per sample and
    has a destination without pathways, equals the registered op (float64)."""
    g = torch.Generator().manual_seed(0)
    src, wgt, dst = [0, 1, 2, 0, 2], [0, 1, 1, 2, 0], [0, 0, 1, 1, 3]
    S, M, T, B, D_in, D_out = 3, 3, 4, 5, 7, 6
    P = len(src)
    x = torch.randn(S, B, D_in, generator=g, dtype=torch.float64)
    W = torch.randn(M, D_out, D_in, generator=g, dtype=torch.float64)
    bias = torch.randn(M, D_out, generator=g, dtype=torch.float64)
    gate = torch.rand(P, B, generator=g, dtype=torch.float64)
    env = dict(torch=torch, x=x, W=W, bias=bias, gate=gate, src=torch.tensor(src),
               wgt=torch.tensor(wgt), dst=torch.tensor(dst), P=P, T=T, B=B, D_out=D_out)
    exec(_block("torch.einsum"), env)
    y = env["y"].to(torch.float64)
    plan = gated_ops.make_plan(src, wgt, dst, num_sources=S, num_weights=M, num_dst=T)
    torch.testing.assert_close(y, gated_ops.pathway_matmul(x, W, plan, bias, gate))
    assert torch.equal(y[2], torch.zeros(B, D_out, dtype=torch.float64))  # no pathway into 2


def test_the_model_example_runs_and_trains_its_router():
    """The MoE block trains (experts and router get gradients); the routed layer equals the
    dense layer with the equivalent gate."""
    env: dict = {}
    torch.manual_seed(0)
    exec(_block("import torch, gated_ops"), env)
    moe, y, z, layer, w, idx, x = (env[k] for k in ("moe", "y", "z", "layer", "w", "idx", "x"))
    assert y.shape == (4, 32, 512) and z.shape == (32, 256)
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.w1.grad is not None and moe.w1.grad.abs().sum() > 0
    dense = torch.zeros(32, 8).scatter(1, idx, w)  # (B, E): the router's layout
    torch.testing.assert_close(z, layer(x[0], dense), rtol=1e-5, atol=1e-5)
