"""benchmarks/summarize.py: each benchmark family is compared with its own baselines, as ratios
of medians within one JSON."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import summarize  # noqa: E402


def _bench(case, group, provider, t):
    return {"extra_info": {"case": case, "mode": "full", "group": group, "provider": provider,
                           "device": "cpu", "time_s": t, "time_min_s": t, "gbs": 1.0,
                           "tflops": 0.1, "floor_s": t / 2, "ratio_to_floor": 2.0}}


def _rows(md: str, case: str) -> dict[str, list[str]]:
    out, current = {}, None
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 4 and line.startswith("|") and cells[2] not in ("provider", "---"):
            current = cells[0] or current
            if current == case:
                out[cells[2]] = cells
    return out


def test_routed_rows_are_compared_with_the_loop_grouped_mm_and_dense():
    data = {"benchmarks": [_bench("r", "routed", "loop", 0.008),
                           _bench("r", "routed", "grouped_mm", 0.004),
                           _bench("r", "routed", "dense", 0.006),
                           _bench("r", "routed", "cpu", 0.002),
                           _bench("k", "kpath", "naive", 0.030),
                           _bench("k", "kpath", "torch", 0.020),
                           _bench("k", "kpath", "cpu", 0.010)]}
    md = summarize.table(data)
    assert "vs grouped_mm" in md and "vs naive" in md
    cpu = _rows(md, "r")["cpu"]
    # vs loop, vs grouped_mm, vs dense (ours), vs best plain (= grouped_mm, the faster plain one)
    assert cpu[6:10] == ["4.00x", "2.00x", "3.00x", "2.00x"]
    k = _rows(md, "k")["cpu"]
    assert k[6:9] == ["3.00x", "2.00x", "2.00x"]
