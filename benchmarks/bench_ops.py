"""Layer-level benchmarks: the mixture-of-experts GatedPathwayLinear with per-sample router gates.

    pytest benchmarks/bench_ops.py -m "moe and small" --benchmark-json benchmarks/results/....json

Dense MoE: every token through every expert, unrouted experts with gate 0 (top-2 router), so all
providers compute the same function. Modes: forward, backward (of a prepared forward; gradients
for x, the weights, the biases and the router gates), full (forward + backward).
"""
from __future__ import annotations

import pytest

import flops
from providers import MOE_CASES, MoECase, bench_case, bench_params, make_moe


def _marks(case: MoECase) -> list:
    return [getattr(pytest.mark, case.size), getattr(pytest.mark, case.group), pytest.mark.moe]


@pytest.mark.parametrize("case,mode,provider", list(bench_params(MOE_CASES, _marks)))
def test_moe(measure, bench_env, case: MoECase, mode: str, provider: str):
    counts = flops.moe(mode, case.E, case.B, case.Di, case.Do)
    bench_case(measure, bench_env, make_moe, case, mode, provider, counts)
