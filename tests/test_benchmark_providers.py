"""The benchmark providers' step bodies train what they claim (benchmarks are not tests, but
a provider that silently trained something else would make its timings meaningless)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import providers as P  # noqa: E402

CASE = P.KPathCase("tiny-K4", "mnist", K=4, B=8, D=40, H=16, R=2, group="tiny")


@pytest.mark.parametrize("lookahead", ["0", "1"])
def test_graph_provider_step_trains_as_the_eager_step(monkeypatch, lookahead):
    """cuda_graph's step body (what it captures; run eagerly here), with and without the
    captured form of the lookahead (GATED_OPS_BENCH_LOOKAHEAD=1: the encoder output in a static
    buffer), trains the same weights as the cpu provider's step, bit for bit on the CPU."""
    monkeypatch.setenv("GATED_OPS_BENCH_LOOKAHEAD", "0")
    cpu = P.make_kpath("cpu", CASE, "step", torch.device("cpu"))
    monkeypatch.setenv("GATED_OPS_BENCH_LOOKAHEAD", lookahead)
    torch.manual_seed(0)
    net = P.KPathNet(CASE.K, CASE.D, CASE.H, CASE.C, replicas=CASE.R)
    graph = P.FusedGraphKPath(P.KPathData(CASE, torch.device("cpu")), net, "cuda_graph",
                              "step")
    assert graph.lookahead == (lookahead == "1")
    for name, t in cpu.model.state_dict().items():
        assert torch.equal(t, graph.model.state_dict()[name]), name
    for _ in range(4):
        cpu.step()
        graph.step()
    for name, t in cpu.model.state_dict().items():
        assert torch.equal(t, graph.model.state_dict()[name]), name
    assert (graph._enc is not None) == (lookahead == "1")


ROUTED_TINY = next(c for c in P.ROUTED_CASES if c.size == "tiny")


def _routed_grads(prov):
    """(y, and the gradients of x, the top-k weights, the expert weights and biases)."""
    prov.zero_grad()
    y = prov.infer().detach()
    prov.objective().backward()
    d = prov.data
    if isinstance(prov, P.LoopRouted):
        weight = torch.stack([p.grad for p in prov.weights])
        bias = torch.stack([p.grad for p in prov.biases])
    else:
        weight, bias = prov.weight.grad, prov.bias.grad
    return [y, d.x.grad.clone(), d.w.grad.clone(), weight, bias]


@pytest.mark.parametrize("provider", ["loop", "grouped_mm", "dense"])
def test_routed_providers_compute_the_routed_layer(provider):
    """Every sparse-routing provider computes y and the four gradients of gated_ops.routed_matmul
    (the benchmark times the same function and backward in each)."""
    device = torch.device("cpu")
    try:
        prov = P.make_routed(provider, ROUTED_TINY, "full", device)
    except P.Unavailable as e:
        pytest.skip(str(e))
    ours = _routed_grads(P.make_routed("cpu", ROUTED_TINY, "full", device))
    for name, a, b in zip(("y", "x", "topk_weight", "weight", "bias"), _routed_grads(prov), ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
