"""The experiment CLIs fail in words, and one at a time per output directory.

A bad flag of ``python -m experiments.kpath`` (and of experiments.plot, experiments.theory_figures)
exits with status 2 and one line on stderr naming the flag and what it accepts, before anything is
loaded or written; a damaged checkpoint names its file and how to recover; a second run given the
same --out stops at once without writing, and a run killed with SIGKILL leaves no stale lock.
CPU only, synthetic data in the real IDX format (no network)."""
from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments import kpath as E
from experiments import plot
from experiments.configs import PRESETS, ConfigError, KPathConfig, smoke
from experiments.run_lock import LOCK_NAME, hold_out_dir
from test_kpath_experiment import read_metrics, smoke_argv, write_mnist_like

REPO = Path(__file__).resolve().parents[1]
PREFIX = "python -m experiments.kpath: error: "
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_mnist_like(tmp_path_factory.mktemp("data"), n_train=600, n_test=200)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file below root: (inode, mtime, bytes); an atomic rewrite changes the inode."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(err: str, prefix: str = PREFIX) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(prefix), err
    return lines[0]


# -- flags -----------------------------------------------------------------------------------
# (extra flags after the smoke preset's, the flag the error must name, words of what it accepts)
BAD_FLAGS = [
    (["--hidden", "0"], "--hidden", "an integer >= 1, got 0"),  # was a ZeroDivisionError
    (["--hidden", "abc"], "--hidden", "an integer >= 1, got 'abc'"),
    (["--hiddens", "8", "0"], "--hiddens", "an integer >= 1 (each value)"),
    (["--K", "0"], "--K", "an integer in 1..3628800"),
    (["--N", "4"], "--N", "an integer in 1..K=3"),
    (["--Ns", "1", "4"], "--Ns", "integers in 1..K=3"),
    (["--Ns", "1", "1"], "--Ns", "distinct values"),
    (["--gains", "0.1", "0.1000001"], "--gains", "the same run name"),
    (["--gain", "-1"], "--gain", "a finite number >= 0"),
    (["--gains", "1", "nan"], "--gains", "a finite number >= 0"),
    (["--seed", "-1"], "--seed", "an integer in 0..9223372036854775807"),
    (["--seeds", "1", "1"], "--seeds", "distinct values"),
    (["--modes", "N_plus_mod", "bogus"], "--modes", "invalid choice"),
    (["--lr", "nan"], "--lr", "a finite number > 0"),  # trained NaNs and exited 0
    (["--lr", "inf"], "--lr", "a finite number > 0"),
    (["--lr", "0"], "--lr", "a finite number > 0"),
    (["--lr", "-1"], "--lr", "a finite number > 0"),
    (["--momentum", "1"], "--momentum", "a finite number >= 0 and < 1"),
    (["--momentum", "-0.1"], "--momentum", "a finite number >= 0 and < 1"),
    (["--batch-size", "0"], "--batch-size", "an integer >= 1"),
    (["--epochs", "0"], "--epochs", "an integer >= 1"),
    (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch", "none or an integer >= 1"),
    (["--max-replicas", "-1"], "--max-replicas", "an integer >= 0"),
    (["--eval-every", "0"], "--eval-every", "an integer >= 1"),
    (["--eval-samples", "0"], "--eval-samples", "none or an integer >= 1"),  # failed after training
    (["--eval-batch-size", "0"], "--eval-batch-size", "an integer >= 1"),
    (["--threads", "-1"], "--threads", "an integer >= 0"),
    (["--max-precompute-gb", "nan"], "--max-precompute-gb", "a finite number >= 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every", "a finite number >= 0"),
    (["--checkpoint-every", "2.5"], "--checkpoint-every", "a whole number of steps"),
    (["--stop-after-steps", "0"], "--stop-after-steps", "none or an integer >= 1"),
    (["--dataset", "imagenet"], "--dataset", "invalid choice"),
    (["--device", "gpu"], "--device", "auto, cpu, cuda or cuda:N"),
    (["--fused-sgd", "maybe"], "--fused-sgd", "true or false"),
    (["--out", ""], "--out", "a non-empty path"),
    (["--cuda-graph", "true", "--model", "loop"], "--cuda-graph", "--model fused --fused-sgd true"),
    (["--lookahead", "true", "--fused-sgd", "false"], "--lookahead", "--fused-sgd true"),
    (["--backend", "triton", "--model", "loop"], "--backend", "needs --model fused"),
    (["--backend", "triton"], "--backend", "triton"),  # on the CPU, without TRITON_INTERPRET=1
    (["--hid", "8"], "--hid", "unrecognized arguments"),  # no abbreviations
    pytest.param(["--device", "cuda"], "--device", "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
]


@pytest.mark.parametrize("extra,flag,accepts", BAD_FLAGS,
                         ids=[" ".join(c.values[0] if hasattr(c, "values") else c[0])
                              for c in BAD_FLAGS])
def test_bad_flag_exits_2_naming_it_before_writing(data_root, tmp_path, monkeypatch, capsys,
                                                    extra, flag, accepts):
    """Exit status 2, one line naming the flag and what it accepts, no traceback, and nothing
    written (the working directory too: --out "" would be it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit_:
        E.main(smoke_argv(data_root, tmp_path / "out", *extra))
    assert exit_.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert flag in line and accepts in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_data_dir_must_be_an_existing_directory(data_root, tmp_path, capsys, kind):
    """A --data-dir that is not a directory is an error naming it and the path; it used to fall
    back silently to another copy of the data ($GATED_OPS_DATA, the download cache)."""
    bad = tmp_path / "nowhere"
    if kind == "file":
        bad.write_text("")
    with pytest.raises(SystemExit) as exit_:
        E.main(smoke_argv(data_root, tmp_path / "out", "--data-dir", str(bad)))
    assert exit_.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--data-dir" in line and str(bad) in line, line
    assert ("does not exist" if kind == "missing" else "not a directory") in line
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("keep")
    with pytest.raises(SystemExit) as exit_:
        E.main(smoke_argv(data_root, out))
    assert exit_.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--out" in line and str(out) in line and "not a directory" in line
    assert out.read_text() == "keep"


def test_batch_larger_than_the_data_is_a_flag_error(data_root, tmp_path, capsys):
    """Checked once the data is loaded (600 training samples here), before any run starts:
    the output directory holds only its lock file."""
    with pytest.raises(SystemExit) as exit_:
        E.main(smoke_argv(data_root, tmp_path / "out", "--batch-size", "601"))
    assert exit_.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--batch-size" in line and "at most the 600 training samples" in line, line
    assert [p.name for p in (tmp_path / "out").iterdir()] == [LOCK_NAME]


@pytest.mark.parametrize("extra", [["--lr", "nan"], ["--eval-samples", "0"], ["--hidden", "0"]])
def test_bad_flag_from_the_shell(data_root, tmp_path, extra):
    """The real command line: status 2, one line, no traceback, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.kpath",
                           *smoke_argv(data_root, out, *extra)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert extra[0] in one_error_line(proc.stderr)
    assert proc.stdout == "" and not out.exists()


def test_every_preset_is_a_valid_config():
    for name, preset in PRESETS.items():
        cfg = preset()
        assert len(E.expand_grid(cfg)) >= 1, name


def test_config_checks_programmatic_configs_too():
    """The rules live in KPathConfig: a preset edited in Python is checked like a flag."""
    with pytest.raises(ConfigError, match=r"--hidden: expected an integer >= 1, got 0"):
        KPathConfig(hidden=0)
    with pytest.raises(ConfigError, match=r"--lr: expected a finite number > 0, got nan"):
        KPathConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match=r"--hidden: expected an integer >= 1, got True"):
        KPathConfig(hidden=True)
    with pytest.raises(ConfigError, match=r"--Ns: expected integers in 1..K=3"):
        dataclasses.replace(smoke(), Ns=[1, 5])
    assert KPathConfig(mode="fully_connected", N=500, K=3).N == 500  # that gate ignores N


def test_missing_data_is_one_line_with_the_way_to_get_it(data_root, tmp_path, monkeypatch,
                                                         capsys):
    """An existing --data-dir without the data set, and nowhere else to find it: status 1, one
    line saying where it looked and how to get the data (experiments.data's advice)."""
    monkeypatch.delenv("GATED_OPS_DATA", raising=False)
    monkeypatch.setattr("experiments.data.DEFAULT_CACHE_DIR", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        E.main(smoke_argv(data_root, tmp_path / "out", "--data-dir", str(tmp_path / "empty")))
    assert exit_.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "MNIST not found" in line and "--data-dir DIR" in line, line


# -- checkpoints -----------------------------------------------------------------------------
def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00 not a checkpoint \xff" * 100)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":  # a readable torch file that this script did not write
        torch.save({"model": {}, "epoch": 1}, path)
    elif how == "wrong_shapes":
        state = torch.load(path, weights_only=True)
        state["model"]["encoder.weight"] = state["model"]["encoder.weight"][:1]
        torch.save(state, path)


def killed_run(data_root: Path, out: Path) -> Path:
    """A run stopped after step 5 (its checkpoint: step 4); returns the checkpoint."""
    with pytest.raises(E.SimulatedKill):
        E.main(smoke_argv(data_root, out, "--stop-after-steps", "5"))
    (ckpt,) = (out / "_checkpoints").glob("*.pt")
    return ckpt


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "foreign", "wrong_shapes"])
def test_damaged_checkpoint_names_its_file_and_the_way_out(data_root, tmp_path, capsys, how):
    """Resuming from a damaged checkpoint: status 1, one line naming the file, that it is
    damaged, and the recovery (delete it and its runs' directories, or a fresh --out); nothing
    in --out changes. Following the advice then gives the uninterrupted run's metrics."""
    out = tmp_path / "out"
    ckpt = killed_run(data_root, out)
    damage(ckpt, how)
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        E.main(smoke_argv(data_root, out))
    assert exit_.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{ckpt}: cannot resume from this checkpoint, the file is damaged" in line, line
    assert "delete it and their directories" in line and "fresh --out" in line, line
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != LOCK_NAME} == {
        k: v for k, v in before.items() if k != LOCK_NAME}
    if how != "truncated":
        return
    names = re.search(r"directories in \S+ \(([^)]*)\)", line).group(1).split(", ")
    assert sorted(names) == sorted(E.run_name(c) for c in E.expand_grid(smoke()))
    ckpt.unlink()
    for name in names:
        shutil.rmtree(out / name)
    E.main(smoke_argv(data_root, out))
    E.main(smoke_argv(data_root, tmp_path / "whole"))
    assert read_metrics(out) == read_metrics(tmp_path / "whole")


def test_damaged_checkpoint_from_the_shell(data_root, tmp_path):
    out = tmp_path / "out"
    ckpt = killed_run(data_root, out)
    damage(ckpt, "garbage")
    proc = subprocess.run([sys.executable, "-m", "experiments.kpath",
                           *smoke_argv(data_root, out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    error = [s for s in proc.stderr.splitlines() if s.startswith(PREFIX)]
    assert "Traceback" not in proc.stderr and len(error) == 1, proc.stderr
    assert str(ckpt) in error[0] and "damaged" in error[0]


# -- one run per output directory ------------------------------------------------------------
HOLD = ("import sys, time\n"
        "from experiments.run_lock import hold_out_dir\n"
        "with hold_out_dir(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n")


@pytest.fixture
def finished_out(data_root, tmp_path) -> Path:
    out = tmp_path / "out"
    E.main(smoke_argv(data_root, out))
    return out


def test_second_run_on_a_held_out_refuses_and_writes_nothing(data_root, finished_out, capsys):
    """While another process holds --out, a run stops at once with status 1 and one line naming
    the directory and the holder, and changes no file (the lock file included). Without the
    lock it would resume this finished run and rewrite config.json, metrics.jsonl,
    summary.json, results.md and kpath.png."""
    out = finished_out
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(out)
        assert f"pid {holder.pid} " in (out / LOCK_NAME).read_text()
        capsys.readouterr()
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as exit_:
            E.main(smoke_argv(data_root, out))
        assert exit_.value.code == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"{out}: another run is writing this directory" in line, line
        assert f"pid {holder.pid} " in line and "pass another --out" in line, line
        assert snapshot(out) == before
        assert time.monotonic() - t0 < 30  # refused, not waiting for the holder (600 s)
    finally:
        holder.kill()
        holder.wait()
    assert E.main(smoke_argv(data_root, out))["runs"]  # the holder gone, the run goes on


def test_run_killed_with_sigkill_leaves_no_stale_lock(data_root, tmp_path):
    """A real run holds --out's lock while it trains; after SIGKILL (no clean-up code runs) the
    lock file is still there, yet the next run takes the lock and resumes."""
    out, log = tmp_path / "out", tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.kpath",
             *smoke_argv(data_root, out, "--epochs", "100000")],
            cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("_checkpoints/*.pt")):  # training, past its first checkpoint
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        with open(out / LOCK_NAME) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"pid {proc.pid} " in (out / LOCK_NAME).read_text()  # the stale file stays
    summary = E.main(smoke_argv(data_root, out, "--epochs", "1"))  # epochs: free on resume
    assert len(summary["runs"]) == 4
    with open(out / LOCK_NAME) as f:  # and the new run released it when it ended
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lock_is_released_when_a_run_fails(data_root, tmp_path):
    """An exception out of the run (here a simulated kill) releases the lock: the same process
    can take it again."""
    out = tmp_path / "out"
    killed_run(data_root, out)
    with hold_out_dir(out):
        pass


# -- the other scripts -----------------------------------------------------------------------
def test_plot_refuses_a_directory_without_runs(tmp_path, capsys):
    for run_dir, words in ((tmp_path / "missing", "is not a directory"),
                           (tmp_path, "no <run>/config.json below")):
        with pytest.raises(SystemExit) as exit_:
            plot.main([str(run_dir)])
        assert exit_.value.code == 2
        line = one_error_line(capsys.readouterr().err, "python -m experiments.plot: error: ")
        assert "run_dir" in line and str(run_dir) in line and words in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def theory_figures():
    from experiments import theory_figures
    return theory_figures


@pytest.mark.parametrize("extra,flag,accepts", [
    (["--threads", "0"], "--threads", "an integer >= 1"),
    (["--seeds", "0"], "--seeds", "an integer >= 1"),
    (["--seeds", "-2"], "--seeds", "an integer >= 1"),
    (["--engine", "numpy"], "--engine", "invalid choice"),
    (["--out", ""], "--out", "a non-empty path"),
    (["--thr", "2"], "--thr", "unrecognized arguments"),
])
def test_theory_figures_bad_flag(theory_figures, tmp_path, monkeypatch, capsys, extra, flag,
                                 accepts):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        theory_figures.main(["--out", str(tmp_path / "out"), *extra])
    assert exit_.value.code == 2
    line = one_error_line(capsys.readouterr().err, f"{Path(sys.argv[0]).name}: error: ")
    assert flag in line and accepts in line, line
    assert list(tmp_path.iterdir()) == []


def test_theory_figures_refuses_a_held_out(theory_figures, tmp_path, capsys):
    out = tmp_path / "out"
    with hold_out_dir(out):
        with pytest.raises(SystemExit) as exit_:
            theory_figures.main(["--out", str(out), "--engine", "einsum"])
    assert exit_.value.code == 1
    line = one_error_line(capsys.readouterr().err, f"{Path(sys.argv[0]).name}: error: ")
    assert "another run is writing this directory" in line
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]
