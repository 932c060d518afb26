"""Layer-level benchmarks: the mixture-of-experts GatedPathwayLinear with per-sample router gates.

    pytest benchmarks/bench_ops.py -m "moe and small" --benchmark-json benchmarks/results/....json

Dense MoE: every token through every expert, unrouted experts with gate 0 (top-2 router), so all
providers compute the same function. Modes: forward, backward (of a prepared forward; gradients
for x, the weights, the biases and the router gates), full (forward + backward).
"""
from __future__ import annotations

import pytest

import flops
from providers import MOE_CASES, MoECase, Unavailable, bench_params, make_moe


def _marks(case: MoECase) -> list:
    return [getattr(pytest.mark, case.size), getattr(pytest.mark, case.group), pytest.mark.moe]


@pytest.mark.parametrize("case,mode,provider", list(bench_params(MOE_CASES, _marks)))
def test_moe(measure, bench_env, case: MoECase, mode: str, provider: str):
    device = bench_env.device(provider)
    try:
        prov = make_moe(provider, case, mode, device, bench_env.compile_backend)
        fn, setup = prov.fns(mode)
    except Unavailable as e:
        pytest.skip(str(e))
    counts = flops.moe(mode, case.E, case.B, case.Di, case.Do)
    info = {"provider": provider, "mode": mode, "case": case.name, "shape": case.shape,
            "size": case.size, "group": case.group}
    if provider == "torch_compile":
        info["compile_backend"] = prov.backend
    measure(fn, setup, device, counts, info)
