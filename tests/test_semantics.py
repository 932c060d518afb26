"""The one formulation expresses every pattern of the core issue; each is checked against a plain
loop written differently from the reference (per sample, per edge, nn.functional.linear)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import gated_ops
from gated_ops import GatedPathwayLinear
from gated_ops.testing import kpath_tables, replicate

D = torch.float64


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gdln_layer_node_and_edge_gates():
    """h_v = g_v * sum_{e=(u->v)} g_e W_e h_u on a small graph with a summation node."""
    torch.manual_seed(0)
    B, Din, Dout = 6, 4, 3
    edges = [(0, 0), (1, 0), (2, 0), (1, 1), (2, 2), (0, 2)]  # (u, v); node 0 sums three edges
    h = torch.randn(3, B, Din, dtype=D)
    W = torch.randn(len(edges), Dout, Din, dtype=D)
    g_node = (torch.rand(3, B) < 0.7).to(D)
    g_edge = (torch.rand(len(edges), B) < 0.7).to(D)
    layer_gate = g_node[[v for _, v in edges]] * g_edge  # (P, B): node gate times edge gate
    plan = gated_ops.make_plan([u for u, _ in edges], range(len(edges)), [v for _, v in edges],
                               num_sources=3, num_weights=len(edges), num_dst=3)
    y = gated_ops.pathway_matmul(h, W, plan, gate=layer_gate)
    for v in range(3):
        for b in range(B):
            acc = torch.zeros(Dout, dtype=D)
            for e, (u, vv) in enumerate(edges):
                if vv == v:
                    acc += g_edge[e, b] * (W[e] @ h[u, b])
            _close(y[v, b], g_node[v, b] * acc)


def test_batched_encoders_shared_hidden_and_fanout_decoders():
    """The k-path network's three layers against per-pathway nn.functional.linear loops."""
    torch.manual_seed(1)
    K, B, Din, H, C = 4, 3, 7, 5, 2
    enc = GatedPathwayLinear.batched(K, Din, H, dtype=D)
    hid = GatedPathwayLinear.shared(K, H, H, dtype=D)
    dec = GatedPathwayLinear.fanout(K, K, H, C, dtype=D)
    x = torch.randn(K, B, Din, dtype=D)
    h1, h2, out = enc(x), None, None
    h2 = hid(h1)
    out = dec(h2).view(K, K, B, C)
    for i in range(K):
        e = F.linear(x[i], enc.weight[i], enc.bias[i])
        _close(h1[i], e)
        s = F.linear(e, hid.weight[0], hid.bias[0])
        _close(h2[i], s)
        for j in range(K):
            _close(out[i, j], F.linear(s, dec.weight[j], dec.bias[j]))


def test_mixture_of_experts_routing():
    torch.manual_seed(2)
    E, B, Din, Dout = 5, 9, 6, 4
    moe = GatedPathwayLinear.mixture_of_experts(E, Din, Dout, dtype=D)
    x = torch.randn(1, B, Din, dtype=D)
    router = torch.softmax(torch.randn(B, E, dtype=D), -1)
    top2 = router * (router >= router.topk(2, -1).values[:, 1:])  # top-2 routing
    y = moe(x, gate=top2.t().contiguous())
    for b in range(B):
        want = sum(top2[b, e] * (moe.weight[e] @ x[0, b] + moe.bias[e]) for e in range(E))
        _close(y[0, b], want)
    # the router gets a gradient through the gate
    g = top2.t().contiguous().requires_grad_()
    moe(x, gate=g).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_replicas_equal_independent_runs():
    """R replicas in one call equal R separate calls, forward and gradients."""
    torch.manual_seed(3)
    K, R, B, Din, Dout = 3, 4, 2, 5, 3
    t1, tr = kpath_tables(K)["decoder"], replicate(kpath_tables(K)["decoder"], R)
    plan1, planr = t1.plan(), tr.plan()
    assert planr.kind == "blocked"
    x = torch.randn(R * K, B, Din, dtype=D, requires_grad=True)
    W = torch.randn(R * K, Dout, Din, dtype=D, requires_grad=True)
    y = gated_ops.pathway_matmul(x, W, planr)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, W), gy)
    for r in range(R):
        xs = x[r * K:(r + 1) * K].detach().requires_grad_()
        ws = W[r * K:(r + 1) * K].detach().requires_grad_()
        ys = gated_ops.pathway_matmul(xs, ws, plan1)
        _close(y[r * K * K:(r + 1) * K * K], ys)
        gxs, gws = torch.autograd.grad(ys, (xs, ws), gy[r * K * K:(r + 1) * K * K])
        _close(gx[r * K:(r + 1) * K], gxs)
        _close(gw[r * K:(r + 1) * K], gws)


def test_destination_without_pathway_is_zero_and_nan_propagates():
    plan = gated_ops.make_plan([0, 1], [0, 0], [0, 0], num_sources=2, num_weights=1, num_dst=3)
    x = torch.ones(2, 2, 3, dtype=D)
    x[1, 0, 0] = float("nan")
    y = gated_ops.pathway_matmul(x, torch.ones(1, 2, 3, dtype=D), plan)
    assert torch.equal(y[1:], torch.zeros(2, 2, 2, dtype=D))
    assert y[0, 0].isnan().all() and not y[0, 1].isnan().any()
    # a zero gate does not hide a NaN (0 * NaN = NaN, as in the reference)
    y = gated_ops.pathway_matmul(x, torch.ones(1, 2, 3, dtype=D), plan,
                                 gate=torch.tensor([1.0, 0.0], dtype=D))
    assert y[0, 0].isnan().all()
