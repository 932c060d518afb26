"""Figure and table of a k-path run directory, from its config.json + metrics.jsonl files only.

    python -m experiments.plot experiments/runs/quick

writes RUN_DIR/kpath.png (final test accuracy on trained and untrained paths versus N, one line
per init gain and hidden width, mean over seeds, chance marked; accuracy versus epoch) and
RUN_DIR/results.md (N x gain: trained / untrained test accuracy, mean over seeds).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .configs import OneLineParser  # noqa: E402

__all__ = ["load_runs", "final_accuracies", "results_table", "make_figure", "make_report"]
CHANCE = 0.1  # 10 classes


def load_runs(run_dir: str | Path) -> list[dict]:
    """Every run below run_dir: {"name", "config", "metrics": [one dict per epoch]}."""
    runs = []
    for path in sorted(Path(run_dir).glob("**/config.json")):
        meta = json.loads(path.read_text())
        metrics_path = path.with_name("metrics.jsonl")
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        runs.append({"name": meta["run"], "config": meta["config"],
                     "metrics": [json.loads(s) for s in lines if s.strip()]})
    return runs


def _final(run: dict) -> dict | None:
    return next((m for m in reversed(run["metrics"]) if "test_trained_acc" in m), None)


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def final_accuracies(runs: list[dict]) -> dict[tuple, dict[int, tuple]]:
    """{(H, mode, gain): {N: (trained, untrained, n_seeds)}}: final test accuracies, mean over
    the seeds of the runs that have been evaluated."""
    cells: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        c, last = run["config"], _final(run)
        if last is not None:
            cells[(c["hidden"], c["mode"], c["gain"])][c["N"]].append(last)
    return {key: {n: (_mean([m["test_trained_acc"] for m in ms]),
                      _mean([m["test_untrained_acc"] for m in ms]), len(ms))
                  for n, ms in sorted(by_n.items())}
            for key, by_n in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2]))}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def results_table(runs: list[dict]) -> str:
    """Markdown: per hidden width and gate mode, rows N, columns gain, cells trained / untrained."""
    acc = final_accuracies(runs)
    if not acc:
        return "No evaluated runs.\n"
    sections: dict[tuple, dict[float, dict]] = defaultdict(dict)
    for (h, mode, gain), by_n in acc.items():
        sections[(h, mode)][gain] = by_n
    c = runs[0]["config"]
    out = [f"Final test accuracy on trained / untrained paths ({c['dataset']}, K={c['K']}; "
           f"mean over seeds; chance {CHANCE}).\n"]
    for (h, mode), by_gain in sorted(sections.items()):
        gains = list(by_gain)
        Ns = sorted({n for by_n in by_gain.values() for n in by_n})
        out.append(f"\n**H={h}, {mode}**\n\n| N | " + " | ".join(f"gain {g:g}" for g in gains)
                   + " |\n|---|" + "---|" * len(gains))
        for n in Ns:
            cells = [by_gain[g].get(n) for g in gains]
            out.append(f"| {n} | " + " | ".join(
                "" if x is None else f"{_fmt(x[0])} / {_fmt(x[1])}" for x in cells) + " |")
    return "\n".join(out) + "\n"


def make_figure(runs: list[dict], path: str | Path) -> Path:
    """Final accuracy versus N (trained, untrained) and test accuracy versus epoch."""
    acc = final_accuracies(runs)
    several_h = len({k[0] for k in acc}) > 1
    several_modes = len({k[1] for k in acc}) > 1
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    gains = sorted({k[2] for k in acc}, reverse=True)
    colors = {g: plt.cm.viridis(i / max(len(gains) - 1, 1)) for i, g in enumerate(gains)}
    for ax, which, title in ((axes[0, 0], 0, "trained paths"), (axes[0, 1], 1, "untrained paths")):
        for (h, mode, gain), by_n in acc.items():
            pts = [(n, v[which]) for n, v in by_n.items() if v[which] is not None]
            if not pts:
                continue
            label = f"gain {gain:g}" + (f", H={h}" if several_h else "") + (
                f", {mode}" if several_modes else "")
            ax.plot(*zip(*pts), marker="o", color=colors[gain], label=label,
                    linestyle="-" if h == min(k[0] for k in acc) else "--")
        ax.axhline(CHANCE, color="gray", linestyle=":", label="chance")
        ax.set(title=f"final test accuracy, {title}", xlabel="N (trained paths per encoder)",
               ylabel="accuracy", ylim=(0, 1))
    axes[0, 1].legend(fontsize=7)
    Ns = sorted({r["config"]["N"] for r in runs})
    ncolor = {n: plt.cm.plasma(i / max(len(Ns) - 1, 1) * 0.85) for i, n in enumerate(Ns)}
    styles = ["-", "--", ":", "-."]
    gstyle = {g: styles[i % len(styles)] for i, g in enumerate(gains)}
    for ax, key, title in ((axes[1, 0], "test_trained_acc", "trained paths"),
                           (axes[1, 1], "test_untrained_acc", "untrained paths")):
        for run in runs:
            c = run["config"]
            pts = [(m["epoch"], m[key]) for m in run["metrics"] if m.get(key) is not None]
            if pts and c["gain"] in gstyle:
                ax.plot(*zip(*pts), color=ncolor[c["N"]], linestyle=gstyle[c["gain"]], lw=1,
                        alpha=0.8, label=f"N={c['N']}, gain {c['gain']:g}")
        ax.axhline(CHANCE, color="gray", linestyle=":")
        ax.set(title=f"test accuracy vs epoch, {title}", xlabel="epoch", ylabel="accuracy",
               ylim=(0, 1))
    handles, labels = axes[1, 1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if 0 < len(unique) <= 16:
        axes[1, 1].legend(unique.values(), unique.keys(), fontsize=6, ncol=2)
    c = runs[0]["config"] if runs else {"dataset": "?", "K": "?"}
    fig.suptitle(f"k-path network, {c['dataset']}, K={c['K']} ({len(runs)} runs)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_report(run_dir: str | Path) -> tuple[Path, str]:
    """Write RUN_DIR/kpath.png and RUN_DIR/results.md; return the PNG path and the table."""
    run_dir = Path(run_dir)
    runs = load_runs(run_dir)
    table = results_table(runs)
    (run_dir / "results.md").write_text(table)
    return make_figure(runs, run_dir / "kpath.png"), table


def main(argv: list[str] | None = None) -> None:
    """The CLI: a run_dir that is not a directory of runs exits with one line, status 2."""
    p = OneLineParser(prog="python -m experiments.plot", allow_abbrev=False,
                      description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="directory holding <run>/config.json + metrics.jsonl")
    run_dir = Path(p.parse_args(argv).run_dir)
    if not run_dir.is_dir():
        p.error(f"run_dir: {run_dir} is not a directory; expected the --out of a k-path run")
    if next(run_dir.glob("**/config.json"), None) is None:
        p.error(f"run_dir: no <run>/config.json below {run_dir}; expected the --out of a k-path "
                "run")
    png, table = make_report(run_dir)
    print(table)
    print(f"figure: {png}")


if __name__ == "__main__":
    main()
