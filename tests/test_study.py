"""experiments/study.py: every part is a valid k-path command, and the report's tables and
figure come from the runs' own files (a tiny grid trained for real)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from experiments import kpath as E
from experiments import study
from experiments.configs import parse_args

from test_kpath_experiment import one_thread, smoke_argv, write_mnist_like  # noqa: F401


@pytest.mark.parametrize("name", sorted(study.PARTS))
def test_every_part_is_a_valid_kpath_command(name, tmp_path):
    part = study.PARTS[name]
    cfg = parse_args(part.args(tmp_path, threads=2))
    assert (cfg.K, cfg.lr, cfg.mode) == (part.K, part.lr, "N_plus_mod_permute")
    assert sorted(cfg.Ns) == sorted(part.Ns) and sorted(cfg.seeds) == sorted(part.seeds)
    assert cfg.epochs * cfg.max_steps_per_epoch == part.steps  # evaluated every eval_steps
    assert cfg.eval_samples is None  # the full test set


def test_runs_record_their_output_directory_relative_to_the_working_directory(tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = study.PARTS["K10-lr0.05"].args(tmp_path / "study", threads=1)
    assert args[args.index("--out") + 1] == str(Path("study") / "K10-lr0.05")
    outside = study.PARTS["K10-lr0.05"].args(tmp_path.parent / "elsewhere", threads=1)
    assert outside[outside.index("--out") + 1] == str(tmp_path.parent / "elsewhere" / "K10-lr0.05")


def test_same_lr_times_steps_across_learning_rates():
    """The two learning rates of a K are compared at the same lr x steps."""
    by_k: dict[int, set[float]] = {}
    for p in study.PARTS.values():
        if not p.converge and p.K in (10, 30):
            by_k.setdefault(p.K, set()).add(round(p.lr * p.steps, 6))
    assert by_k and all(len(v) == 1 for v in by_k.values()), by_k


TINY = study.Part("tiny", 3, (1, 2), 0.05, 12, 6, gains=(1.0, 0.1), seeds=(1, 2))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    data = write_mnist_like(tmp_path_factory.mktemp("data"), n_train=600, n_test=200)
    out = tmp_path_factory.mktemp("study")
    E.main(smoke_argv(data, out / "tiny", "--Ns", "1", "2", "--gains", "1", "0.1",
                      "--seeds", "1", "2"))
    return out


def _final(out: Path) -> dict[tuple[int, float], list[tuple[float, float]]]:
    """(N, gain) -> the runs' last (trained, untrained) test accuracies, read independently."""
    cells: dict = {}
    for cfg_path in out.glob("tiny/*/config.json"):
        c = json.loads(cfg_path.read_text())["config"]
        last = [json.loads(x) for x in (cfg_path.parent / "metrics.jsonl").read_text()
                .splitlines() if "test_trained_acc" in x][-1]
        cells.setdefault((c["N"], c["gain"]), []).append(
            (last["test_trained_acc"], last["test_untrained_acc"]))
    return cells


def test_report_tables_are_the_runs_mean_and_std(tiny_study, monkeypatch):
    monkeypatch.setattr(study, "PARTS", {"tiny": TINY})
    study.main(["report", "--out", str(tiny_study)])
    text = (tiny_study / "results.md").read_text()
    summary = json.loads((tiny_study / "summary.json").read_text())["tiny"]
    assert (tiny_study / "study.png").stat().st_size > 0 and summary["runs"] == 8
    for (N, gain), vals in _final(tiny_study).items():
        assert len(vals) == 2  # two seeds per cell
        tr = [v[0] for v in vals]
        un = [v[1] for v in vals]
        cell = summary["final"][f"N{N}_gain{gain:g}"]
        assert cell["trained"][0] == pytest.approx(statistics.fmean(tr))
        assert cell["untrained"][1] == pytest.approx(statistics.stdev(un))
        shown = "%.3f ± %.3f / %.3f ± %.3f" % (statistics.fmean(tr), statistics.stdev(tr),
                                               statistics.fmean(un), statistics.stdev(un))
        row = next(r for r in text.splitlines() if r.startswith(f"| {N} |"))
        assert shown in row
    # a grid's directory alone (the GPU study's output): the same rows
    table = study.report_dir(tiny_study / "tiny")
    assert (tiny_study / "tiny" / "study_table.md").read_text().strip() == table.strip()
    for N in (1, 2):
        row = next(r for r in text.splitlines() if r.startswith(f"| {N} |"))
        assert row in table


def test_separated_needs_the_difference_beyond_the_spread():
    assert study.separated((0.70, 0.01), (0.10, 0.01), n=3)
    assert not study.separated((0.70, 0.20), (0.50, 0.20), n=3)  # 0.2 < 2 * 0.163
    assert not study.separated((0.70, math.nan), (0.10, 0.01), n=1)  # one seed: no spread
