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
