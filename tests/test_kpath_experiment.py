"""The k-path experiment script (experiments/kpath.py): equivalence of the fused step with the
paper-style loop, replica independence, bit-identical resume, learning, torchrun sharding, the
plot and the CLI. CPU only, synthetic data in the real IDX format (no network)."""
from __future__ import annotations

import copy
import dataclasses
import gzip
import importlib.util
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from experiments import kpath as E
from experiments import plot
from experiments.configs import KPathConfig, build_parser, parse_args, smoke
from experiments.data import class_label_maps, pixel_permutations
from experiments.baselines import LoopKPath
from experiments.kpath_net import KPathNet, kpath_gate, transform_batch
from gated_ops.nn import SGDConfig
from gated_ops.testing import assert_close, cuda_emulation

REPO = Path(__file__).resolve().parents[1]


def write_mnist_like(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Learnable synthetic MNIST (one noisy template per class) as the four IDX .gz files."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 28, 28, generator=g)
    d = root / "mnist"
    d.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = torch.randint(0, 10, (n,), generator=g)
        x = (0.6 * templates[y] + 0.4 * torch.rand(n, 28, 28, generator=g)) * 255
        (d / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">IIII", 0x803, n, 28, 28) + x.to(torch.uint8).numpy().tobytes()))
        (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">II", 0x801, n) + y.to(torch.uint8).numpy().tobytes()))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine, two OpenMP threads make these small steps several
    times slower (the results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_mnist_like(tmp_path_factory.mktemp("data"), n_train=600, n_test=200)


def smoke_argv(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--data-dir", str(data_root), "--verify-data", "false",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def smoke_out(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    E.main(smoke_argv(data_root, out))
    return out


@pytest.fixture
def _on_emulated_cuda():
    """The test inside gated_ops.testing.cuda_emulation: the CUDA kernels, emulated, for every
    registered op it calls."""
    with cuda_emulation() as calls:
        yield calls
    assert calls["pathway_sgd_lookahead_"] > 0


def read_metrics(out: Path) -> dict[str, list[dict]]:
    """Every run's metrics lines, without the wall-clock timings (the only fields that differ
    between two executions of the same computation)."""
    return {p.parent.name: [{k: v for k, v in json.loads(s).items() if not k.startswith("time_")}
                            for s in p.read_text().splitlines()]
            for p in sorted(out.glob("*/metrics.jsonl"))}


def test_fused_step_equals_paper_loop_step():
    """Two SGD-with-momentum steps of the fused model equal the paper-style loop model's from
    the same weights and batches: losses, per-path metrics and every updated weight, within the
    house tolerance (error vs float64 at most twice plain float32 PyTorch's)."""
    R, K, B, D, H = 2, 3, 5, 12, 6
    net64 = KPathNet(K, D, H, 10, replicas=R, dtype=torch.float64)
    net64.xavier_init_([1.0, 0.5], [torch.Generator().manual_seed(r) for r in range(R)])
    with torch.no_grad():  # non-zero biases, so that their updates are compared too
        for layer in net64.layers:
            layer.bias.normal_(generator=torch.Generator().manual_seed(3))
    net32 = copy.deepcopy(net64).float()
    cfg = KPathConfig(lr=0.1, momentum=0.9)
    fused, _ = E.build_model(cfg, copy.deepcopy(net32))
    loop32, opt32 = E.build_model(dataclasses.replace(cfg, model="loop"), net32)
    loop64, opt64 = E.build_model(dataclasses.replace(cfg, model="loop"), net64)
    assert isinstance(loop32, LoopKPath) and fused.encoder.sgd == SGDConfig(0.1, 0.9)
    perms, maps = pixel_permutations(K, D), class_label_maps(K)
    gate = torch.stack([kpath_gate(K, 1).flatten(), kpath_gate(K, 2).flatten()])
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        x = torch.rand(R, B, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (R, B), generator=g)
        xk, target = transform_batch(x, y, perms, maps)
        out_f = E.sgd_step(fused, None, xk.float(), target, gate)
        out_32 = E.sgd_step(loop32, opt32, xk.float(), target, gate)
        out_64 = E.sgd_step(loop64, opt64, xk, target, gate.double())
        for name, f, p32, p64 in zip(("loss", "path_loss"), out_f, out_32, out_64):
            assert_close(f"step {step} {name}", f, p64, p32)
        assert torch.equal(out_f[2], out_32[2]) and torch.equal(out_f[2], out_64[2])
        ref, plain, state = loop64.kpath_state(), loop32.kpath_state(), fused.state_dict()
        assert len(ref) == 6
        for name in ref:
            assert_close(f"step {step} {name}", state[name], ref[name], plain[name])


def test_replicas_equal_separate_runs(data_root, tmp_path):
    """Three runs (different N, gain, seed) trained as R=3 replicas end exactly where three
    single-replica runs end: weights, momentum and metrics."""
    base = dataclasses.replace(smoke(), data_dir=str(data_root), verify_data=False, epochs=2,
                               max_steps_per_epoch=4, Ns=[], gains=[], checkpoint_every=0)
    runs = [dataclasses.replace(base, N=n, gain=gain, seed=seed)
            for n, gain, seed in ((1, 0.5, 1), (2, 1.0, 2), (3, 0.1, 3))]
    data = E.load_task_data(base, torch.device("cpu"))
    together = E.GroupTrainer(runs, data, torch.device("cpu"), tmp_path / "together", [None])
    together.train()
    state = together.model.state_dict()
    for r, run in enumerate(runs):
        alone = E.GroupTrainer([run], data, torch.device("cpu"), tmp_path / f"alone{r}", [None])
        alone.train()
        for name, t in alone.model.state_dict().items():
            n = t.shape[0]
            assert torch.equal(state[name][r * n:(r + 1) * n], t), (r, name)
    assert read_metrics(tmp_path / "together") == {
        k: v for r in range(3) for k, v in read_metrics(tmp_path / f"alone{r}").items()}


def test_lookahead_does_not_change_the_run(data_root, tmp_path):
    """--lookahead auto (the default: on the CPU each step's encoder update computes the next
    batch's encoder forward) and false train the same weights and write the same metrics, bit
    for bit, in the eager step and in the static-buffer step that --cuda-graph captures (run
    eagerly here). Both read every step's encoder output from the lookahead's buffer, primed
    at each epoch's first step (the eager step keeps the next batch it formed, the static one
    forms it again from its index buffer)."""
    base = dataclasses.replace(smoke(), data_dir=str(data_root), verify_data=False, epochs=2,
                               max_steps_per_epoch=4, Ns=[], gains=[], checkpoint_every=0, N=2,
                               gain=0.5, seed=1)
    data = E.load_task_data(base, torch.device("cpu"))
    states, counts = {}, {}
    for graph in (False, True):
        for ahead in ("false", "auto"):
            key = f"{'graph' if graph else 'eager'}-{ahead}"
            tr = E.GroupTrainer([dataclasses.replace(base, lookahead=ahead, cuda_graph=graph)],
                                data, torch.device("cpu"), tmp_path / key, [None])
            enc, n = tr.model.encoder, Counter()

            def counting(name, fn, n=n, used=lambda out: True):
                def wrapped(*args, **kw):
                    out = fn(*args, **kw)
                    n[name] += used(out)
                    return out
                return wrapped
            enc.forward_lookahead = counting("static", enc.forward_lookahead)
            enc.prime_lookahead = counting("prime", enc.prime_lookahead)
            tr.train()
            states[key], counts[key] = tr.model.state_dict(), dict(n)
    assert counts == {"eager-false": {}, "eager-auto": {"static": 2 * 4, "prime": 2},
                      "graph-false": {}, "graph-auto": {"static": 2 * 4, "prime": 2}}
    for key in states:
        assert read_metrics(tmp_path / key) == read_metrics(tmp_path / "eager-false"), key
        for name in states[key]:
            assert torch.equal(states[key][name], states["eager-false"][name]), (key, name)


@pytest.mark.parametrize("dtype,graph", [("float32", "false"), ("bfloat16", "false"),
                                         ("float32", "true"), ("float32", "emu")])
def test_resume_after_kills_is_bit_identical(data_root, tmp_path, dtype, graph, request):
    """Killed twice (mid-epoch and at an epoch's end, with a stale line appended to a metrics
    file as if written after the last checkpoint) and resumed: the same weights, momentum and
    metrics lines as an uninterrupted run, no line lost or duplicated. bfloat16: with stochastic
    rounding, whose step counter is saved with the weights. graph: the static-buffer step of
    --cuda-graph with the lookahead (eager on the CPU), primed again on resume; emu: the same on
    the CUDA kernels (emulated), whose lookahead sums Z in another order than their forward, so
    the resume keeps the bits only because priming runs the update kernel's lookahead."""
    if graph == "emu":
        if importlib.util.find_spec("gated_ops._cuda_emu") is None:
            if os.environ.get("GATED_OPS_REQUIRE_CUDA_EMU") == "1":
                pytest.fail("gated_ops._cuda_emu is not built")
            pytest.skip("gated_ops._cuda_emu is not built (GATED_OPS_CUDA_EMU=1 pip install ...)")
        request.getfixturevalue("_on_emulated_cuda")
        graph = "true"
    extra = ("--dtype", dtype, "--cuda-graph", graph, "--lookahead", "true")
    E.main(smoke_argv(data_root, tmp_path / "whole", *extra))
    broken = tmp_path / "broken"
    with pytest.raises(E.SimulatedKill):  # checkpoint at step 4
        E.main(smoke_argv(data_root, broken, *extra, "--stop-after-steps", "7"))
    with open(next(broken.glob("*/metrics.jsonl")), "a") as f:
        f.write('{"epoch": 99, "stale": true}\n{"epoch": 1')  # and a torn last line
    with pytest.raises(E.SimulatedKill):  # steps 5..6: epoch end
        E.main(smoke_argv(data_root, broken, *extra, "--stop-after-steps", "2"))
    E.main(smoke_argv(data_root, broken, *extra))
    whole = read_metrics(tmp_path / "whole")
    assert read_metrics(broken) == whole
    assert all([m["epoch"] for m in lines] == [1, 2] for lines in whole.values())
    (a,), (b,) = (list((d / "_checkpoints").glob("*.pt")) for d in (tmp_path / "whole", broken))
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["model"].keys() == sb["model"].keys() and "encoder.weight_momentum" in sa["model"]
    assert ("encoder.sgd_step" in sa["model"]) == (dtype == "bfloat16")
    for name in sa["model"]:
        assert torch.equal(sa["model"][name], sb["model"][name]), name
    assert sa["global_step"] == sb["global_step"] == 12 and sb["finished"]


def test_tiny_run_learns(data_root, tmp_path):
    """K=4, N=2, 300 SGD steps on learnable data: trained paths far above chance (0.1)."""
    summary = E.main(smoke_argv(data_root, tmp_path, "--K", "4", "--Ns", "2", "--gains", "1.0",
                                "--hidden", "16", "--batch-size", "10", "--epochs", "5",
                                "--max-steps-per-epoch", "none", "--eval-samples", "none",
                                "--eval-every", "5", "--checkpoint-every", "0"))
    (row,) = summary["runs"]
    assert row["epoch"] == 5 and row["test_trained_acc"] > 0.6, row
    assert row["test_untrained_acc"] is not None
    last = json.loads((tmp_path / row["run"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 300 and len(last["test_acc_matrix"]) == 4


def test_two_ranks_shard_runs_and_merge_summary(data_root, tmp_path):
    """Two gloo ranks, started as torchrun starts them (RANK, WORLD_SIZE, MASTER_* in the
    environment), each train half the runs; rank 0's summary has them all."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "experiments.kpath", *smoke_argv(data_root, tmp_path)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                              "PYTHONPATH": str(REPO), "RANK": str(rank),
                                              "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = [E.run_name(c) for c in E.expand_grid(parse_args(smoke_argv(data_root, tmp_path)))]
    assert summary["world_size"] == 2 and [r["run"] for r in summary["runs"]] == names
    ranks = [json.loads((tmp_path / n / "config.json").read_text())["rank"] for n in names]
    assert ranks == [0, 1, 0, 1] and all(r["test_trained_acc"] is not None for r in summary["runs"])


def test_cifar_rotations_precomputed_equal_per_batch(tmp_path):
    """CIFAR-10's K rotations (270*k/K degrees): the pre-rotated copies on the device and the
    rotation of each batch give the same inputs; a run trains on them."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = torch.randint(0, 256, (6, 3072), generator=g, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 10, (6,), generator=g).tolist()
        (d / name).write_bytes(pickle.dumps({b"data": x, b"labels": labels}))
    cfg = dataclasses.replace(smoke(), dataset="cifar10", K=4, data_dir=str(tmp_path),
                              verify_data=False, Ns=[2], gains=[1.0], epochs=1,
                              max_steps_per_epoch=2, checkpoint_every=0)
    pre = E.load_task_data(cfg, torch.device("cpu"))
    per = E.load_task_data(dataclasses.replace(cfg, max_precompute_gb=0), torch.device("cpu"))
    assert pre.angles is None and per.angles == [0.0, 67.5, 135.0, 202.5]
    assert pre.x["train"].shape == (4, 30, 3072)
    idx = torch.tensor([[0, 5, 2], [3, 3, 1]])
    for split in ("train", "test"):
        (xa, ta), (xb, tb) = pre.batch(split, idx), per.batch(split, idx)
        assert xa.shape == (2 * 4, 3, 3072) and ta.shape == (2, 16, 3)
        torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)
        assert torch.equal(ta, tb)
    trainer = E.GroupTrainer(E.expand_grid(cfg), pre, torch.device("cpu"), tmp_path / "out")
    trainer.train()
    assert trainer.global_step == 2 and len(trainer.lines[0]) == 1


def test_plot_writes_figure_and_table(smoke_out):
    assert (smoke_out / "kpath.png").stat().st_size > 0  # written by the run itself
    png, table = plot.make_report(smoke_out)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (smoke_out / "results.md").read_text() == table
    assert "| N | gain 1 | gain 0.1 |" in table and "| 1 |" in table and "| 2 |" in table
    acc = plot.final_accuracies(plot.load_runs(smoke_out))
    assert sorted(acc) == [(8, "N_plus_mod", 0.1), (8, "N_plus_mod", 1.0)]


def test_config_json_records_the_run(smoke_out):
    meta = json.loads(next(smoke_out.glob("*N1_gain1_seed1/config.json")).read_text())
    assert meta["config"]["N"] == 1 and meta["config"]["gain"] == 1.0
    assert meta["group"]["replicas"] == 4 and meta["machine"]["torch"] == torch.__version__
    assert "git_commit" in meta["machine"]


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(KPathConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "--preset" in text and "(default: 0.0001)" in text
    cfg = parse_args(["--preset", "quick", "--Ns", "2", "7", "--fused-sgd", "false"])
    assert cfg.dataset == "fashion_mnist" and cfg.Ns == [2, 7] and not cfg.fused_sgd
    assert len(E.expand_grid(parse_args(["--preset", "paper_mnist"]))) == 216
    assert len(E.expand_grid(parse_args(["--preset", "paper_cifar10"]))) == 168


def test_explicit_scalar_overrides_the_presets_grid_axis():
    from experiments.configs import parse_args
    cfg = parse_args(["--preset", "quick", "--N", "3", "--seed", "7"])
    assert cfg.N == 3 and cfg.Ns == [] and cfg.seed == 7 and cfg.seeds == []
    assert cfg.gains == [0.03, 1.0]  # untouched axes keep the preset's grid
    cfg = parse_args(["--preset", "quick", "--N", "3", "--Ns", "2", "4"])
    assert cfg.Ns == [2, 4]


def test_checkpoint_older_than_a_config_field_resumes_with_its_default(data_root, tmp_path,
                                                                        capsys):
    """A checkpoint written before a config field existed (here `rounding`) resumes when the run
    uses the field's default, and is refused (one line, exit status 1) when it does not."""
    E.main(smoke_argv(data_root, tmp_path))
    (ckpt,) = (tmp_path / "_checkpoints").glob("*.pt")
    state = torch.load(ckpt, weights_only=True)
    for c in state["configs"]:
        del c["rounding"]
    torch.save(state, ckpt)
    assert E.main(smoke_argv(data_root, tmp_path))["runs"]  # finished: nothing to redo
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        E.main(smoke_argv(data_root, tmp_path, "--rounding", "nearest"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different configuration (['rounding'])" in err, err


def test_regrouped_rerun_refuses_to_overwrite_results(data_root, tmp_path, capsys):
    """Runs trained in one grouping are not silently restarted (and their metrics emptied) by a
    rerun that groups them differently: one line, exit status 1."""
    E.main(smoke_argv(data_root, tmp_path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        E.main(smoke_argv(data_root, tmp_path, "--max-replicas", "1"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already has results" in err, err


def test_training_stops_when_every_run_has_converged(data_root, tmp_path):
    """--converge-delta: training ends at the first evaluation where every run meets the rule
    (E.converged_at), before the --epochs cap; resuming the finished group trains nothing."""
    cfg = dataclasses.replace(smoke(), data_dir=str(data_root), verify_data=False, epochs=6,
                              max_steps_per_epoch=3, Ns=[], gains=[], N=2, gain=0.5, seed=1,
                              converge_delta=0.9, converge_window=1, out=str(tmp_path / "c"))
    E.train_grid(cfg)
    (lines,) = read_metrics(tmp_path / "c").values()
    assert len(lines) == 2  # evaluation 1 meets the rule with window 1: any rise <= 0.9
    text = [json.dumps(d) for d in lines]
    assert E.converged_at(text, 0.9, 1) == lines[1]["step"]
    assert E.converged_at(text, 0.0, 1) in (None, lines[1]["step"])
    E.train_grid(cfg)  # resume: already finished
    assert len(next(iter(read_metrics(tmp_path / "c").values()))) == 2


def test_convergence_rule():
    def lines(accs):
        return [json.dumps({"step": 10 * (i + 1), "test_trained_acc": a})
                for i, a in enumerate(accs)]
    assert E.converged_at(lines([0.1, 0.5, 0.7, 0.71, 0.712, 0.713]), 0.005, 2) == 60
    assert E.converged_at(lines([0.1, 0.5, 0.7, 0.71, 0.712, 0.713]), 0.02, 2) == 50
    assert E.converged_at(lines([0.1, 0.5, 0.7, 0.8]), 0.005, 2) is None
