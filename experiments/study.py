"""The k-path study: multi-seed grids with error bars, at two learning rates of the same
lr x steps, and to convergence (experiments/README.md, "The study").

    python -m experiments.study plan                 # parts, runs, steps, estimated hours
    python -m experiments.study run K10-lr0.05       # one part (at most ~2 h on 2 CPU cores)
    python -m experiments.study report               # figure, mean +- std table, JSON

Each part is one call of the k-path trainer (experiments.kpath) on Fashion-MNIST with a grid of
N x initial gain x seed, all runs of a shape trained together as the replicas of one model, the
authors' gate mode (N_plus_mod_permute), evaluation on the full 10,000-image test set (and 1000
fixed training images) every ``eval_steps``; a part resumes where it stopped. The report reads
only the parts' ``config.json`` / ``metrics.jsonl`` files.

Separating training length from SGD noise: the lr 0.05 and lr 0.0125 parts of a K have the same
lr x steps (400), so a difference between them is the SGD noise of the larger step, not the
length of training; the ``converge`` part trains at lr 0.05 until every run's trained-path test
accuracy stops rising (the rule of ``experiments.kpath.converged_at``: the best of the last 3
evaluations at most 0.005 above the best before them), so the gains are also compared at
convergence.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results" / "study"
GAINS = (1.0, 0.1, 0.03, 0.01)
SEEDS = (1, 2, 3)


@dataclass(frozen=True)
class Part:
    """One part of the study: a grid trained as one group of replicas."""

    name: str
    K: int
    Ns: tuple[int, ...]
    lr: float
    steps: int
    eval_steps: int
    gains: tuple[float, ...] = GAINS
    seeds: tuple[int, ...] = SEEDS
    converge: bool = False  # train until converged (steps: the cap)
    note: str = ""

    @property
    def runs(self) -> int:
        return len(self.Ns) * len(self.gains) * len(self.seeds)

    def args(self, out: Path, threads: int) -> list[str]:
        """The command line of experiments.kpath for this part."""
        a = ["--dataset", "fashion_mnist", "--K", str(self.K), "--hidden", "128",
             "--mode", "N_plus_mod_permute", "--Ns", *map(str, self.Ns),
             "--gains", *map(str, self.gains), "--seeds", *map(str, self.seeds),
             "--lr", str(self.lr), "--momentum", "0.9", "--batch-size", "8",
             "--max-steps-per-epoch", str(self.eval_steps),
             "--epochs", str(self.steps // self.eval_steps),
             "--eval-samples", "none", "--eval-train-samples", "1000",
             "--threads", str(threads), "--checkpoint-every", "600", "--progress", "false",
             "--out", _shown(out / self.name)]
        if self.converge:
            a += ["--converge-delta", "0.005", "--converge-window", "3"]
        return a


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (what the runs' files
    record as their output directory), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


PARTS = {p.name: p for p in (
    Part("K10-lr0.05", 10, (1, 2, 3, 5, 7, 9), 0.05, 8000, 500),
    Part("K10-lr0.0125", 10, (1, 2, 3, 5, 7, 9), 0.0125, 32000, 2000,
         note="the same lr x steps as K10-lr0.05"),
    Part("K10-converge", 10, (3, 5, 9), 0.05, 64000, 2000, gains=(1.0, 0.03, 0.01),
         converge=True, note="lr 0.05 until every run's trained-path accuracy stops rising"),
    Part("K30-lr0.05", 30, (1, 5, 10, 15, 20, 25, 29), 0.05, 8000, 800),
    Part("K30-lr0.0125", 30, (5, 10, 20), 0.0125, 32000, 3200, gains=(1.0, 0.1, 0.01),
         note="the same lr x steps as K30-lr0.05, where the gains part"),
    Part("K30-converge", 30, (5, 20, 29), 0.05, 64000, 2000, gains=(1.0, 0.03, 0.01),
         converge=True, note="lr 0.05 until every run's trained-path accuracy stops rising"),
    Part("K100-cpu", 100, (10, 50, 90), 0.05, 15000, 3000, gains=(1.0, 0.01), seeds=(1,),
         note="a cut-down gpu_study on the CPU: the K = 100 trend predicted"),
)}

# Measured on this project's 2-core CPU VM (Intel Xeon, 2 threads, fused KPathNet, H = 128,
# Fashion-MNIST): ms per step per replica, and seconds per replica for one evaluation (the full
# test set and 1000 training images), from 72- and 84-replica groups.
MS_PER_REPLICA_STEP = {10: 0.75, 30: 2.44, 100: 13.5}
EVAL_S_PER_REPLICA = {10: 0.32, 30: 2.0, 100: 20.0}


def _estimate_hours(part: Part) -> float:
    train = part.runs * MS_PER_REPLICA_STEP[part.K] * part.steps / 1e3
    evals = part.steps // part.eval_steps
    return (train + part.runs * EVAL_S_PER_REPLICA[part.K] * evals) / 3600


def cmd_plan(ns) -> None:
    print(f"{'part':16s} {'K':>3s} {'runs':>5s} {'lr':>7s} {'steps':>6s} {'est. hours':>10s}")
    for p in PARTS.values():
        print(f"{p.name:16s} {p.K:3d} {p.runs:5d} {p.lr:7g} {p.steps:6d} "
              f"{_estimate_hours(p):10.2f}  {p.note}")


def cmd_run(ns) -> None:
    from experiments import kpath
    part = PARTS[ns.part]
    kpath.main(part.args(Path(ns.out), ns.threads))


# ------------------------------------------------------------------------------------ report
def load_runs(run_dir: Path) -> list[dict]:
    """The runs of a grid's directory: each run's configuration (``config.json``'s "config",
    written by experiments.kpath) and its evaluated metrics lines, for runs with at least one
    evaluation."""
    runs = []
    for cfg_path in sorted(run_dir.glob("*/config.json")):
        cfg = json.loads(cfg_path.read_text())["config"]
        metrics = cfg_path.parent / "metrics.jsonl"
        lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() \
            else []
        evals = [d for d in lines if d.get("test_trained_acc") is not None]
        if evals:
            runs.append({"config": cfg, "evals": evals})
    return runs


def load_part(out: Path, part: Part) -> list[dict]:
    """The runs of a part (``load_runs`` of its directory)."""
    return load_runs(out / part.name)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def cell_stats(runs: list[dict], pick) -> dict[tuple[int, float], dict]:
    """(N, gain) -> mean and std over seeds of the values ``pick(run)`` returns (a dict)."""
    cells: dict[tuple[int, float], list[dict]] = {}
    for r in runs:
        c = r["config"]
        v = pick(r)
        if v is not None:
            cells.setdefault((c["N"], c["gain"]), []).append(v)
    out = {}
    for key, vals in cells.items():
        out[key] = {k: _mean_std([v[k] for v in vals if v.get(k) is not None])
                    for k in ("trained", "untrained") if any(v.get(k) is not None for v in vals)}
        out[key]["n"] = len(vals)
    return out


def final(r: dict) -> dict:
    d = r["evals"][-1]
    return {"trained": d["test_trained_acc"], "untrained": d.get("test_untrained_acc"),
            "step": d["step"]}


def at_convergence(r: dict, delta: float = 0.005, window: int = 3) -> dict | None:
    """The run's accuracies at the evaluation where it met the convergence rule."""
    from experiments.kpath import converged_at
    step = converged_at([json.dumps(d) for d in r["evals"]], delta, window)
    if step is None:
        return None
    d = next(d for d in r["evals"] if d["step"] == step)
    return {"trained": d["test_trained_acc"], "untrained": d.get("test_untrained_acc"),
            "step": step}


def separated(a: tuple[float, float], b: tuple[float, float], n: int) -> bool:
    """The two means differ by more than twice the standard error of their difference (the
    seeds' spread): |m_a - m_b| > 2 sqrt((s_a^2 + s_b^2) / n)."""
    (ma, sa), (mb, sb) = a, b
    if math.isnan(sa) or math.isnan(sb):
        return False
    return abs(ma - mb) > 2 * math.sqrt((sa ** 2 + sb ** 2) / n)


def table(stats: dict, gains: tuple[float, ...], title: str) -> str:
    """Markdown: rows N, columns gains, cells trained / untrained mean +- std; a * marks an
    untrained-path mean separated from gain 1's by more than the spread (``separated``)."""
    Ns = sorted({n for n, _ in stats})
    head = "| N | " + " | ".join(f"gain {g:g}" for g in gains) + " |"
    lines = [f"**{title}** (test accuracy, trained / untrained paths, mean ± std over seeds; "
             "* untrained differs from gain 1 by more than twice the spread's standard error)",
             "", head, "|---|" + "---|" * len(gains)]
    for N in Ns:
        cells = []
        for g in gains:
            s = stats.get((N, g))
            if not s or "trained" not in s:
                cells.append("-")
                continue
            tr = "%.3f ± %.3f" % s["trained"]
            un = "-" if "untrained" not in s else "%.3f ± %.3f" % s["untrained"]
            ref = stats.get((N, gains[0]))
            mark = ("*" if g != gains[0] and ref and "untrained" in s and "untrained" in ref
                    and separated(s["untrained"], ref["untrained"], s["n"]) else "")
            cells.append(f"{tr} / {un}{mark}")
        lines.append(f"| {N} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(runs: list[dict]) -> dict:
    """(N, gain) -> steps and mean / std over seeds of the untrained (and trained) test
    accuracy at every evaluation."""
    by: dict[tuple[int, float], list[list[dict]]] = {}
    for r in runs:
        by.setdefault((r["config"]["N"], r["config"]["gain"]), []).append(r["evals"])
    out = {}
    for key, evs in by.items():
        n = min(len(e) for e in evs)
        steps = [evs[0][i]["step"] for i in range(n)]
        un = [[e[i].get("test_untrained_acc") for e in evs] for i in range(n)]
        tr = [[e[i]["test_trained_acc"] for e in evs] for i in range(n)]
        out[key] = {"steps": steps,
                    "untrained": [_mean_std(v) if None not in v else (None, None) for v in un],
                    "trained": [_mean_std(v) for v in tr]}
    return out


def make_figure(out: Path, data: dict[str, list[dict]]) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [p for p in PARTS.values() if data.get(p.name)]
    if not parts:
        return None
    # three N per part: the smallest, the middle and the largest
    shown = {p.name: sorted({p.Ns[0], p.Ns[len(p.Ns) // 2], p.Ns[-1]}) for p in parts}
    fig, axes = plt.subplots(len(parts), max(len(v) for v in shown.values()),
                             figsize=(13, 3.1 * len(parts)), squeeze=False, sharey=True)
    colors = {1.0: "tab:red", 0.1: "tab:orange", 0.03: "tab:green", 0.01: "tab:blue"}
    for row, p in enumerate(parts):
        cur = curves(data[p.name])
        for col, N in enumerate(shown[p.name]):
            ax = axes[row][col]
            for g in p.gains:
                c = cur.get((N, g))
                if not c or c["untrained"][0][0] is None:
                    continue
                m = [u[0] for u in c["untrained"]]
                s = [0 if math.isnan(u[1]) else u[1] for u in c["untrained"]]
                t = [p.lr * x for x in c["steps"]]  # learning time: parts of one K align
                ax.plot(t, m, color=colors.get(g), label=f"gain {g:g}")
                ax.fill_between(t, [a - b for a, b in zip(m, s)],
                                [a + b for a, b in zip(m, s)], color=colors.get(g), alpha=0.2)
                ax.plot(t, [tr[0] for tr in c["trained"]], color=colors.get(g), ls=":",
                        lw=1)
            ax.set_title(f"{p.name}, N = {N}", fontsize=9)
            ax.axhline(0.1, color="grey", lw=0.5)
            if row == len(parts) - 1:
                ax.set_xlabel("lr x SGD steps")
            if col == 0:
                ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Untrained-path test accuracy (solid, mean ± std over seeds) and trained-path "
                 "(dotted), Fashion-MNIST", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # (room for the title)
    path = out / "study.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_dir(run_dir: Path) -> str:
    """The mean +- std table of any grid's run directory (a part, the GPU study's output):
    final evaluation of every (N, gain) over seeds; written to run_dir/study_table.md."""
    runs = load_runs(run_dir)
    if not runs:
        raise SystemExit(f"{run_dir}: no run with an evaluation (config.json + metrics.jsonl)")
    gains = tuple(sorted({r["config"]["gain"] for r in runs}, reverse=True))
    c = runs[0]["config"]
    steps = max(r["evals"][-1]["step"] for r in runs)
    text = table(cell_stats(runs, final), gains,
                 f"{c['dataset']} K={c['K']} H={c['hidden']} lr={c['lr']:g}: {len(runs)} runs, "
                 f"final evaluation (step {steps})")
    (run_dir / "study_table.md").write_text(text + "\n")
    return text


def cmd_report(ns) -> None:
    if ns.runs:
        print(report_dir(Path(ns.runs)))
        return
    out = Path(ns.out)
    data = {name: load_part(out, p) for name, p in PARTS.items()}
    sections, summary = [], {}
    for name, p in PARTS.items():
        runs = data[name]
        if not runs:
            continue
        stats = cell_stats(runs, final)
        summary[name] = {"runs": len(runs), "lr": p.lr, "K": p.K,
                         "final": {f"N{N}_gain{g:g}": v for (N, g), v in stats.items()}}
        steps = max(r["evals"][-1]["step"] for r in runs)
        sections.append(table(stats, p.gains, f"{name}: {len(runs)} runs, final evaluation "
                                              f"(step {steps})"))
        if p.converge:
            conv = cell_stats(runs, at_convergence)
            summary[name]["at_convergence"] = {f"N{N}_gain{g:g}": v
                                               for (N, g), v in conv.items()}
            sections.append(table(conv, p.gains, f"{name}: at each run's convergence"))
    fig = make_figure(out, data)
    text = "# The k-path study\n\n" + ("![study](study.png)\n\n" if fig else "") + \
        "\n\n".join(sections) + "\n"
    (out / "results.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)


def main(argv: list[str] | None = None) -> None:
    from experiments.configs import OneLineParser
    p = OneLineParser(prog="python -m experiments.study", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan")
    r = sub.add_parser("run")
    r.add_argument("part", choices=sorted(PARTS))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--out", default=str(DEFAULT_OUT))
    rep = sub.add_parser("report")
    rep.add_argument("--out", default=str(DEFAULT_OUT))
    rep.add_argument("--runs", default=None,
                     help="instead: the table of one grid's run directory (e.g. the GPU study)")
    ns = p.parse_args(argv)
    if getattr(ns, "threads", 1) < 1:
        p.error(f"--threads: expected an integer >= 1, got {ns.threads}")
    {"plan": cmd_plan, "run": cmd_run, "report": cmd_report}[ns.cmd](ns)


if __name__ == "__main__":
    main(sys.argv[1:])
