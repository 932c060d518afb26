"""The GDLN graph API: forward equals a hand-written per-edge loop; pathway enumeration; the
k-path network built as a graph equals KPathNet."""
from __future__ import annotations

import pytest
import torch

from gated_ops import GDLN, gated_cross_entropy
from experiments.kpath_net import kpath_gdln, load_kpath_
from experiments.kpath_net import KPathNet, kpath_gate

D = torch.float64


def _random_graph():
    nodes = {"x1": 3, "x2": 4, "a": 5, "b": 5, "y1": 2, "y2": 3}
    edges = [("x1", "a"), ("x2", "a"), ("x2", "b"), ("a", "b"), ("a", "y1"), ("b", "y1"),
             ("b", "y2")]
    return GDLN(nodes, edges, dtype=D, bias=True), nodes, edges


def test_forward_equals_per_edge_loop_with_random_gates():
    torch.manual_seed(0)
    net, nodes, edges = _random_graph()
    with torch.no_grad():
        for b in net.biases.values():
            b.normal_()
    B = 7
    inputs = {n: torch.randn(B, nodes[n], dtype=D) for n in ("x1", "x2")}
    ng = (torch.rand(len(nodes), B) < 0.8).to(D)
    eg = torch.rand(len(edges), B, dtype=D)
    out = net(inputs, ng, eg)
    # hand-written: visit nodes in a fixed topological order, one edge at a time
    names = list(nodes)
    h = {n: inputs[n] * ng[names.index(n)].unsqueeze(-1) for n in inputs}
    for v in ("a", "b", "y1", "y2"):
        acc = torch.zeros(B, nodes[v], dtype=D)
        for i, (u, w) in enumerate(edges):
            if w == v:
                W = net.weight(f"{u}->{w}")
                acc = acc + eg[i].unsqueeze(-1) * (h[u] @ W.T + net.bias(f"{u}->{w}"))
        h[v] = ng[names.index(v)].unsqueeze(-1) * acc
    for n in nodes:
        torch.testing.assert_close(out[n], h[n])
    # one fused call per (depth, weight shape): depth 1 (5x3, 5x4), 2 (5x4, 5x5), 3 (2x5, 3x5)
    assert net.num_layers == 6


def test_pathways_and_pathway_weights():
    net, nodes, edges = _random_graph()
    paths = net.pathways()
    # x1: a-y1, a-b-y1, a-b-y2 ; x2: a-y1, a-b-y1, a-b-y2, b-y1, b-y2
    assert len(paths) == 8
    assert all(p.src in net.inputs and p.dst in net.outputs for p in paths)
    # with biases off, an output is the sum of pathway weight products (gates all on)
    net2 = GDLN(nodes, edges, dtype=D)
    torch.manual_seed(1)
    inputs = {n: torch.randn(4, nodes[n], dtype=D) for n in ("x1", "x2")}
    out = net2(inputs)
    for y in ("y1", "y2"):
        want = sum(inputs[p.src] @ net2.pathway_weight(p).T for p in net2.pathways()
                   if p.dst == y)
        torch.testing.assert_close(out[y], want)


def test_shared_weights_and_bad_graphs():
    net = GDLN({"x": 2, "a": 3, "b": 3}, [("x", "a", "w"), ("x", "b", "w")], dtype=D)
    assert net.weight("x->a").data_ptr() == net.weight("x->b").data_ptr()
    with pytest.raises(ValueError, match="cycle"):
        GDLN({"x": 2, "a": 2, "b": 2}, [("x", "a"), ("a", "b"), ("b", "a")])
    with pytest.raises(ValueError, match="different shapes"):
        GDLN({"x": 2, "a": 3, "b": 4}, [("x", "a", "w"), ("x", "b", "w")])
    with pytest.raises(ValueError, match="declared nodes"):
        GDLN({"x": 2}, [("x", "nope")])


def test_xor_by_gating():
    """XOR of two bits by gating a linear network: the context selects the pathway."""
    net = GDLN({"x": 2, "h": 1, "y": 1}, [("x", "h"), ("h", "y")], dtype=D)
    with torch.no_grad():
        net.weight("x->h").copy_(torch.tensor([[1.0, -1.0]]))
        net.weight("h->y").fill_(1.0)
    x = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=D)
    # edge gate on x->h flips sign by context: +1 when x1 >= x2 else -1 (|x1 - x2| = XOR)
    sign = torch.where(x[:, 0] >= x[:, 1], 1.0, -1.0).to(D)
    _, eg = net.gates(4, edge_gates={"x->h": sign})
    y = net({"x": x}, edge_gates=eg)["y"].squeeze(-1)
    torch.testing.assert_close(y, torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=D))


def test_kpath_graph_equals_kpathnet():
    """The k-path network as a GDLN graph (tied hidden and decoder weights) is KPathNet."""
    torch.manual_seed(2)
    K, B, Din, H, C = 3, 4, 5, 6, 2
    net = KPathNet(K, Din, H, C, dtype=D)
    with torch.no_grad():  # non-zero biases, so that they are compared too
        for layer in net.layers:
            layer.bias.normal_()
    g = load_kpath_(kpath_gdln(K, Din, H, C, dtype=D), net)
    # compiled to the same three fused calls as KPathNet: batched, shared, fan-out
    assert [layer.plan.kind for layer in g._layers] == ["blocked"] * 3
    xk = torch.randn(K, B, Din, dtype=D)
    out = g({f"x{i}": xk[i] for i in range(K)})
    logits = net(xk)[0]  # (K*K, B, C)
    for i in range(K):
        for j in range(K):
            torch.testing.assert_close(out[f"o{i}_{j}"], logits[i * K + j])


def test_kpath_graph_equals_kpathnet_on_one_sgd_step():
    """The k-path GDLN graph trained one SGD step on KPathNet's loss (gated cross-entropy over
    the K*K paths, some gated off) lands on KPathNet's weights after the same step."""
    torch.manual_seed(3)
    K, B, Din, H, C, lr = 3, 5, 4, 6, 4, 0.1
    net = KPathNet(K, Din, H, C, dtype=D)
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.normal_()
    g = load_kpath_(kpath_gdln(K, Din, H, C, dtype=D), net)
    xk = torch.randn(K, B, Din, dtype=D)
    target = torch.randint(0, C, (1, K * K, B))
    gate = kpath_gate(K, 2).reshape(1, K * K).to(D)  # 2 of 3 decoders per encoder
    for model in (net, g):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        if model is net:
            loss = net.loss(xk, target, gate)[0]
        else:
            out = g({f"x{i}": xk[i] for i in range(K)})
            logits = torch.stack([out[f"o{i}_{j}"] for i in range(K) for j in range(K)])[None]
            loss = gated_cross_entropy(logits, target, gate)[0]
        loss.sum().backward()
        opt.step()
    for i in range(K):
        torch.testing.assert_close(g.weight(f"enc{i}"), net.encoder.weight[i])
        torch.testing.assert_close(g.weight(f"dec{i}"), net.decoder.weight[i])
        torch.testing.assert_close(g.bias(f"dec{i}"), net.decoder.bias[i])
    torch.testing.assert_close(g.weight("hidden"), net.hidden.weight[0])
    torch.testing.assert_close(g.bias("hidden"), net.hidden.bias[0])
