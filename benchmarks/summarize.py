"""Markdown table from one pytest-benchmark JSON of benchmarks/ (one run, one machine).

    python benchmarks/summarize.py benchmarks/results/cpu-2026-11-26.json
    python benchmarks/summarize.py benchmarks/results/cpu-2026-11-26.json --readme README.md \
        --modes step full       # the README's table: full training steps only

Per case and mode, one row per provider: median time, min time, speedups over the baselines
measured in the same run (same JSON: ``naive`` and ``torch`` for the k-path cases; the expert
loop, ``grouped_mm`` and our dense op for sparse routing; ``COMPARE``), achieved GB/s and TFLOP/s from the explicit counts
of benchmarks/flops.py, the floor (max(bytes / peak GB/s, FLOPs / peak FLOP/s) at the peaks
measured in that run) and the time's ratio to it. With ``--readme``, the table replaces the text
between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->``; without both markers the
file is left alone and the table printed. Reads only the JSON (no torch import).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PROVIDER_ORDER = ("naive", "torch", "torch_compile", "torch_graph", "reference", "cpu", "cuda",
                  "cuda_graph", "triton")
PLAIN = ("torch", "torch_compile", "torch_graph")  # the plain-PyTorch baselines
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def header(data: dict) -> str:
    facts = data.get("machine_info", {}).get("gated_ops", {})
    commit = data.get("commit_info", {})
    sha = facts.get("commit") or commit.get("id") or "unknown"
    dirty = facts.get("dirty", commit.get("dirty"))
    devices = sorted({b["extra_info"].get("device", "?") for b in data["benchmarks"]})
    names = []
    for dev in devices:
        if dev.startswith("cuda"):
            names.append(f"{dev}: {facts.get('gpu')}")
        else:
            names.append(f"{dev}: {facts.get('cpu')}, torch threads={facts.get('cpu_threads')}")
    peaks = "; ".join(
        f"{dev} {p['peak_gbs']:.1f} GB/s (best of read/update/copy), "
        f"{p['peak_tflops'] * 1e3:.0f} GFLOP/s fp32 mm"
        + (f", {p['peak_tflops_bf16'] * 1e3:.0f} GFLOP/s bf16 mm (floors of the bf16 cases)"
           if "peak_tflops_bf16" in p else "")
        for dev, p in sorted(facts.get("peaks", {}).items()))
    return (f"Device: {', '.join(names)}. Date: {data.get('datetime', '?')[:16]}. "
            f"Commit: {sha[:10]}{' (dirty tree)' if dirty else ''}. "
            f"torch {facts.get('torch')}, triton {facts.get('triton')}. "
            f"Measured peaks: {peaks or 'none'}.")


# Per benchmark group: the providers each row is compared with (column title, provider) and the
# plain-PyTorch providers whose fastest is "best plain". Groups not listed use the k-path set.
COMPARE = {
    "default": ((("vs naive", "naive"), ("vs torch", "torch")), PLAIN),
    # sparse routing: the expert loop, sorted tokens through grouped_mm, our dense op
    "routed": ((("vs loop", "loop"), ("vs grouped_mm", "grouped_mm"), ("vs dense (ours)", "dense")),
               ("loop", "grouped_mm")),
    # a GDLN with context gates: dense (every pathway) against routed (the active ones)
    "gdln": ((("vs dense", "gdln_dense"),), ()),
}
ORDER = PROVIDER_ORDER[:1] + ("loop", "grouped_mm", "dense", "gdln_dense") + PROVIDER_ORDER[1:]


def _family(group: str) -> str:
    return group if group in COMPARE else "default"


def table(data: dict, modes: list[str] | None = None) -> str:
    families: dict[str, dict[tuple[str, str], dict[str, dict]]] = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "time_s" not in e:  # a --benchmark-disable run has no timings
            continue
        if modes and e["mode"] not in modes:
            continue
        fam = families.setdefault(_family(e.get("group", "")), {})
        fam.setdefault((e["case"], e["mode"]), {})[e["provider"]] = e
    lines = [header(data)]
    for family, groups in families.items():
        columns, plain_set = COMPARE[family]
        titles = [t for t, _ in columns] + (["vs best plain"] if plain_set else [])
        lines += ["", "| case | mode | provider | device | median ms | min ms | "
                  + " | ".join(titles) + " | GB/s | TFLOP/s | floor ms | x floor |",
                  "|---|---|---|---|--:|--:|" + "--:|" * len(titles) + "--:|--:|--:|--:|"]
        for (case, mode), rows in groups.items():
            plain = [rows[p]["time_s"] for p in plain_set if p in rows]
            best_plain = min(plain) if plain else None
            first = True
            for prov in sorted(rows, key=lambda p: (ORDER + (p,)).index(p)):
                e = rows[prov]
                t = e["time_s"]
                time = _ms(t)
                if e.get("per", 1) > 1:
                    time += f" ({_ms(e['time_per_unit_s'])}/replica)"
                name = prov
                if e.get("compile_backend", "inductor") != "inductor":
                    name += f" [{e['compile_backend']}]"
                ratios = [_x(rows[b]["time_s"] / t) if b in rows else "-" for _, b in columns]
                if plain_set:
                    ratios.append(_x(best_plain / t) if best_plain else "-")
                lines.append(
                    f"| {case if first else ''} | {mode if first else ''} | {name} | {e['device']} "
                    f"| {time} | {_ms(e['time_min_s'])} | " + " | ".join(ratios) +
                    f" | {e['gbs']:.2f} | {e['tflops']:.3f} | {_ms(e['floor_s'])} "
                    f"| {e['ratio_to_floor']:.1f} |")
                first = False
    if not families:
        lines += ["", "| (no timed benchmarks in this file) ||||||||||||"]
    lines += ["", "Speedups are ratios of medians within this run: vs X = X's time / this row's "
              "time; vs best plain: the fastest plain-PyTorch provider of the row's case and mode "
              "in this file (torch, torch_compile, torch_graph; for sparse routing the expert "
              "loop and grouped_mm). x floor = median / floor."]
    return "\n".join(lines)


def replace_between_markers(text: str, new: str) -> str | None:
    """``text`` with the block between the perf-table markers replaced, or None if absent."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _: f"{START}\n{new}\n{END}", text, count=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--readme", type=Path, help="markdown file whose perf-table block to replace")
    ap.add_argument("--modes", nargs="*", help="only these modes (e.g. step full)")
    args = ap.parse_args(argv)
    data = json.loads(args.results.read_text())
    md = table(data, args.modes)
    if args.readme is not None:
        text = args.readme.read_text() if args.readme.exists() else ""
        updated = replace_between_markers(text, md)
        if updated is not None:
            args.readme.write_text(updated)
            print(f"{args.readme}: perf table updated", file=sys.stderr)
            return 0
        print(f"{args.readme}: no {START} ... {END} markers; table printed instead",
              file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
