"""k-path network benchmarks: provider x mode x shape (docs/math.md section 3).

    pytest benchmarks/bench_kpath.py -m "mnist and (small or medium)" \
        --benchmark-json benchmarks/results/cpu-$(date +%F).json

Test ids read ``<case>-<mode>-<provider>``; markers carry the size class, the case group and the
provider (benchmarks/conftest.py), so ``-m`` and ``-k`` pick feasible subsets.
"""
from __future__ import annotations

import pytest

import flops
from providers import KPATH_CASES, KPathCase, bench_case, bench_params, make_kpath


def _marks(case: KPathCase) -> list:
    marks = [getattr(pytest.mark, case.size), getattr(pytest.mark, case.group)]
    return marks + ([getattr(pytest.mark, case.dataset)] if case.group != "tiny" else [])


@pytest.mark.parametrize("case,mode,provider", list(bench_params(KPATH_CASES, _marks)))
def test_kpath(measure, bench_env, case: KPathCase, mode: str, provider: str):
    elem = case.torch_dtype.itemsize
    counts = flops.kpath(mode, case.R, case.K, case.B, case.D, case.H, case.C, elem)
    bench_case(measure, bench_env, make_kpath, case, mode, provider, counts,
               {"dataset": case.dataset, "dtype": case.dtype}, per=case.R)
