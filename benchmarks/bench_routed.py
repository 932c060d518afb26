"""Sparse routing benchmarks: a top-k expert layer on its active (token, expert) pairs, and a
GDLN with context gates, dense against routed.

    pytest benchmarks/bench_routed.py -m "routed and small" --benchmark-json benchmarks/results/....json

Routed layer providers, all computing y[t] = sum_j w[t, j] (x[t] W_e^T + b_e), e = idx[t, j], with
gradients for x, W, b and w: ``loop`` (the expert loop with index_add_), ``grouped_mm`` (tokens
sorted by expert through torch.nn.functional.grouped_mm), ``dense`` (our dense op: every token
through every expert, gate 0 where unrouted), ``cpu`` / ``cuda`` (gated_ops.routed_matmul),
``triton``. The floor counts the active FLOPs only (flops.routed). Modes: forward, full (forward
+ backward).

GDLN providers: ``gdln_dense`` and ``gdln_routed`` (GDLN.forward(..., routed=True)) on the
routing network of experiments/routing_net.py, one forward + backward of its loss.
"""
from __future__ import annotations

import pytest

import flops
from providers import (GDLN_PROVIDERS, GDLN_ROUTING_CASES, ROUTED_CASES, ROUTED_PROVIDERS,
                       bench_case, make_gdln_routing, make_routed)


def _params(cases, providers, group):
    for case in cases:
        for mode in case.modes:
            for provider in providers:
                marks = [getattr(pytest.mark, case.size), getattr(pytest.mark, group),
                         getattr(pytest.mark, provider)]
                if case.size == "tiny":
                    marks.append(pytest.mark.smoke)
                if "bf16" in case.name:
                    marks.append(pytest.mark.bf16)
                yield pytest.param(case, mode, provider, id=f"{case.name}-{mode}-{provider}",
                                   marks=marks)


@pytest.mark.parametrize("case,mode,provider",
                         list(_params(ROUTED_CASES, ROUTED_PROVIDERS, "routed")))
def test_routed(measure, bench_env, case, mode, provider):
    elem = 2 if case.dtype == "bfloat16" else 4
    counts = flops.routed(mode, case.T, case.D, case.E, case.k, elem)
    bench_case(measure, bench_env, make_routed, case, mode, provider, counts)


@pytest.mark.parametrize("case,mode,provider",
                         list(_params(GDLN_ROUTING_CASES, GDLN_PROVIDERS, "gdln")))
def test_gdln_routing(measure, bench_env, case, mode, provider):
    counts = flops.gdln_routing(mode, case.M, case.K, case.H, case.D, case.items)
    bench_case(measure, bench_env, make_gdln_routing, case, mode, provider, counts)
