"""CIFAR-10 on ResNet-20 features (experiments/resnet20.py, experiments/cifar_features.py and the
kpath flags --features resnet20 --checkpoint): the network's layout and checkpoint forms, the
feature cache (reuse, invalidation, corruption, resume after an interrupted extraction), the
train command, the flags' checks and one run of the paper_cifar10 preset through the CLI.

CPU only: small CIFAR-format files written here (tests/test_data.py's helpers) and randomly
initialised ResNet-20s saved as pytorch_resnet_cifar10 saves its checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments import cifar_features as CF
from experiments import kpath as E
from experiments import resnet20 as R
from experiments.data import load_dataset, rotate_images, rotation_angles, to_float
from test_cli import one_error_line
from test_data import BATCHES, cifar_pickle, write, write_cifar_dir

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    """One thread (tiny convolutions on a shared 2-core machine), and no data but the tests'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("GATED_OPS_DATA", raising=False)
    monkeypatch.setattr("experiments.data.DEFAULT_CACHE_DIR", tmp_path / "no-cache")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """CIFAR-10 batches of 4 images each: 20 training and 4 test images."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_dir(root / "cifar-10-batches-py", n=4)
    return root


def small(root: Path):
    return load_dataset("cifar10", root, expect_counts=False, verify_checksums=False)


def save_like_pytorch_resnet_cifar10(path: Path, seed: int, prefix: bool = True,
                                     wrapper: bool = True) -> R.ResNet:
    """A random ResNet-20 written as that repository's trainer writes one: {"state_dict": the
    DataParallel model's state dict (module.*), "best_prec1": ...}, no normalisation recorded."""
    model = R.resnet20(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(seed))
                m.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(seed))
    state = {("module." if prefix else "") + k: v for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "best_prec1": 91.25} if wrapper else state, path)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.th"
    save_like_pytorch_resnet_cifar10(path, seed=0)
    return path


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts the ResNet forwards of the feature extraction (images per call)."""
    seen: list[int] = []
    features = R.features

    def counting(model, images):
        seen.append(len(images))
        return features(model, images)
    monkeypatch.setattr(R, "features", counting)
    return seen


# -- the network and its checkpoints ---------------------------------------------------------
def test_resnet20_layout_and_feature_shapes():
    """He et al.'s CIFAR ResNet-20: 0.27M parameters (269,722) under the checkpoints' names;
    features are the 64-d input of `linear`."""
    model = R.resnet20(generator=torch.Generator().manual_seed(0)).eval()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 269722
    assert state["conv1.weight"].shape == (16, 3, 3, 3) and state["linear.weight"].shape == (10, 64)
    assert state["layer2.0.conv1.weight"].shape == (32, 16, 3, 3)  # option A: no shortcut weights
    assert {k.split(".")[0] for k in state} == {"conv1", "bn1", "layer1", "layer2", "layer3",
                                                "linear"}
    x = torch.rand(5, 3, 32, 32)
    f = R.features(model, x)
    assert f.shape == (5, 64) and f.dtype == torch.float32 and (f >= 0).all()  # after a ReLU
    with torch.no_grad():
        logits = model(R.normalize(x, "cifar10"))
    torch.testing.assert_close(model.linear(f), logits)
    with pytest.raises(ValueError, match=r"images: expected a float \(N, 3, H, W\)"):
        R.features(model, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("prefix,wrapper", [(True, True), (False, True), (True, False),
                                            (False, False)])
def test_checkpoint_loads_with_or_without_prefix_and_wrapper(tmp_path, prefix, wrapper):
    path = tmp_path / "r.th"
    original = save_like_pytorch_resnet_cifar10(path, 1, prefix, wrapper)
    model = R.load_resnet20(path)
    assert model.normalization == "cifar10" and not model.training
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(R.features(model, x), R.features(original, x))
    assert R.load_resnet20(path, "imagenet").normalization == "imagenet"


def test_checkpoint_variants_that_load(tmp_path):
    """Without BatchNorm's num_batches_tracked (PyTorch < 0.4.1), and under the names
    compressible_conv1/2 and compressible_linear that pytorch_resnet_cifar10 also used; our own
    checkpoints record their normalisation."""
    original = save_like_pytorch_resnet_cifar10(tmp_path / "a.th", 2)
    state = torch.load(tmp_path / "a.th", weights_only=True)["state_dict"]
    renamed = {k.replace("conv", "compressible_conv").replace("linear", "compressible_linear"): v
               for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": renamed}, tmp_path / "b.th")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(R.features(R.load_resnet20(tmp_path / "b.th"), x), R.features(original, x))
    original.normalization = "imagenet"
    R.save_resnet20(original, tmp_path / "c.th", epoch=3)
    saved = torch.load(tmp_path / "c.th", weights_only=True)
    assert saved["normalization"] == "imagenet" and saved["epoch"] == 3
    assert all(k.startswith("module.") for k in saved["state_dict"])
    assert R.load_resnet20(tmp_path / "c.th").normalization == "imagenet"


def test_foreign_checkpoint_is_refused_naming_the_file_and_keys(tmp_path):
    path = tmp_path / "other.th"
    save_like_pytorch_resnet_cifar10(path, 0)
    ck = torch.load(path, weights_only=True)
    del ck["state_dict"]["module.layer3.2.conv2.weight"]
    ck["state_dict"]["module.fc.weight"] = torch.zeros(10, 64)
    torch.save(ck, path)
    with pytest.raises(R.ResNetCheckpointError) as e:
        R.load_resnet20(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: not a ResNet-20 checkpoint")
    assert "missing keys [layer3.2.conv2.weight]" in message
    assert "unexpected keys [fc.weight]" in message
    save_like_pytorch_resnet_cifar10(path, 0)
    ck = torch.load(path, weights_only=True)
    ck["state_dict"]["module.layer3.2.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(ck, path)
    wrong = r"\(64, 64, 1, 1\) \(expected \(64, 64, 3, 3\)\)"
    with pytest.raises(R.ResNetCheckpointError, match=rf"wrong shapes layer3\.2\.conv2\.weight "
                                                      rf"{wrong}"):
        R.load_resnet20(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(R.ResNetCheckpointError, match=rf"{path}: not a readable PyTorch"):
        R.load_resnet20(path)


# -- the feature cache -----------------------------------------------------------------------
def test_features_are_the_resnet_of_each_rotation(data_dir, ckpt, tmp_path, calls):
    """(K, n, 64) per split; rotation k's features are the ResNet-20's of the images rotated by
    270*k/K degrees, batched (here 8 images per forward)."""
    ds = small(data_dir)
    f = CF.load_or_extract(ds, ckpt, 3, tmp_path, batch_size=8, progress=False)
    assert f.train.shape == (3, 20, 64) and f.test.shape == (3, 4, 64) and not f.reused
    assert calls == [8, 8, 4, 4] * 3  # train in 3 batches, test in 1, per rotation
    model = R.load_resnet20(ckpt)
    for k, angle in enumerate(rotation_angles(3)):
        expect = R.features(model, rotate_images(to_float(ds.test_x), angle))
        torch.testing.assert_close(f.test[k], expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(f.train[0], f.train[1])
    manifest = json.loads(f.path.with_suffix(".json").read_text())
    assert manifest["sha256"] == R.file_sha256(f.path) and manifest["spec"]["K"] == 3
    assert manifest["spec"]["checkpoint_sha256"] == R.file_sha256(ckpt)
    assert manifest["spec"]["angles"] == [0.0, 90.0, 180.0]
    assert manifest["spec"]["data"] == CF.dataset_identity(ds) and manifest["spec"]["data"][
        "n_train"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock", f"features-{f.key}.json", f"features-{f.key}.pt"]  # the parts are gone


def test_cache_is_reused_without_running_the_model(data_dir, ckpt, tmp_path, calls):
    ds = small(data_dir)
    first = CF.load_or_extract(ds, ckpt, 2, tmp_path, progress=False)
    n = len(calls)
    again = CF.load_or_extract(small(data_dir), ckpt, 2, tmp_path, progress=False)
    assert len(calls) == n and again.reused and again.key == first.key
    assert torch.equal(again.train, first.train) and torch.equal(again.test, first.test)


def test_changed_checkpoint_or_data_extracts_again(data_dir, ckpt, tmp_path, calls):
    """Another checkpoint, other data or another K: another key, so an extraction; the first
    cache stays as it was (switching back reuses it)."""
    ds = small(data_dir)
    first = CF.load_or_extract(ds, ckpt, 2, tmp_path, progress=False)
    before = first.path.read_bytes()
    other_ckpt = tmp_path / "other.th"
    save_like_pytorch_resnet_cifar10(other_ckpt, seed=1)
    changed = tmp_path / "changed"
    write_cifar_dir(changed / "cifar-10-batches-py", n=4)
    write(changed / "cifar-10-batches-py" / BATCHES[-1], cifar_pickle(4, 99)[0])
    keys = {first.key}
    for args in ((ds, other_ckpt, 2), (small(changed), ckpt, 2), (ds, ckpt, 3),
                 (ds, ckpt, 2)):
        n = len(calls)
        f = CF.load_or_extract(*args, tmp_path, progress=False)
        assert (len(calls) > n) == (not f.reused)
        keys.add(f.key)
    assert len(keys) == 4 and f.reused and f.key == first.key  # the last: the first again
    assert first.path.read_bytes() == before
    assert not torch.allclose(CF.load_or_extract(ds, other_ckpt, 2, tmp_path, progress=False
                                                 ).train, first.train)


@pytest.mark.parametrize("what", ["features", "manifest"])
def test_corrupt_cache_is_a_one_line_error_naming_the_file(data_dir, ckpt, tmp_path, what):
    f = CF.load_or_extract(small(data_dir), ckpt, 2, tmp_path, progress=False)
    manifest = f.path.with_suffix(".json")
    if what == "features":
        raw = bytearray(f.path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.path.write_bytes(bytes(raw))
    else:
        manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CF.FeatureCacheError) as e:
        CF.load_or_extract(small(data_dir), ckpt, 2, tmp_path, progress=False)
    message = str(e.value)
    assert "\n" not in message and f"delete {f.path} and {manifest}" in message, message
    if what == "features":
        assert message.startswith(f"{f.path}: checksum mismatch (sha256 "), message
    else:
        assert message.startswith(f"{manifest}: unreadable feature manifest"), message


def test_interrupted_extraction_resumes_from_its_last_rotation(data_dir, ckpt, tmp_path,
                                                              monkeypatch, calls):
    """Killed in rotation 2 of 4: no cache that looks valid (no manifest, no features file),
    rotations 0 and 1 on disk. The next call recomputes only what is missing (and rotation 1,
    whose file is then damaged, and ignores a temporary file a kill left behind), and the
    result is bit for bit an uninterrupted extraction's."""
    ds = small(data_dir)
    whole = CF.load_or_extract(ds, ckpt, 4, tmp_path / "whole", progress=False)
    calls.clear()

    class Killed(Exception):
        pass
    counting = R.features

    def dies_at_fifth(model, images):
        if len(calls) == 4:  # two forwards (train, test) per rotation
            raise Killed
        return counting(model, images)
    monkeypatch.setattr(R, "features", dies_at_fifth)
    out = tmp_path / "broken"
    with pytest.raises(Killed):
        CF.load_or_extract(ds, ckpt, 4, out, progress=False)
    pt, manifest, parts = CF.cache_paths(out, whole.key)
    assert not pt.exists() and not manifest.exists()
    done = sorted(p.name for p in parts.iterdir())
    assert [name[:13] for name in done] == ["rotation-0000", "rotation-0001"]
    damaged = parts / done[1]
    damaged.write_bytes(damaged.read_bytes()[:-100])
    (parts / f".{done[0]}.123.tmp").write_bytes(b"half")
    monkeypatch.setattr(R, "features", counting)
    calls.clear()
    resumed = CF.load_or_extract(ds, ckpt, 4, out, progress=False)
    assert len(calls) == 3 * 2  # rotations 1, 2, 3
    assert torch.equal(resumed.train, whole.train) and torch.equal(resumed.test, whole.test)
    assert not parts.exists() and manifest.exists()
    assert pt.read_bytes() == whole.path.read_bytes()


def test_extraction_killed_with_sigkill_resumes(data_dir, ckpt, tmp_path, calls):
    """The extraction command killed with SIGKILL (no clean-up code runs) once it has written a
    rotation: no manifest, so no cache that looks valid; the next extraction computes only the
    rotations not yet on disk and gives the features of an uninterrupted one."""
    out, K = tmp_path / "feats", 40
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cifar_features", "--checkpoint",
                             str(ckpt), "--data-dir", str(data_dir), "--K", str(K), "--out",
                             str(out), "--verify-data", "false", "--device", "cpu",
                             "--progress", "false"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("features-*.parts/rotation-*.pt")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(out.glob("features-*.json")) == [] and list(out.glob("features-*.pt")) == []
    done = len(list(out.glob("features-*.parts/rotation-*.pt")))
    assert 1 <= done < K
    resumed = CF.load_or_extract(small(data_dir), ckpt, K, out, progress=False)
    assert len(calls) == 2 * (K - done) and not resumed.reused
    calls.clear()
    assert CF.load_or_extract(small(data_dir), ckpt, K, out, progress=False).reused and not calls
    whole = CF.load_or_extract(small(data_dir), ckpt, K, tmp_path / "whole", progress=False)
    assert torch.equal(resumed.train, whole.train) and torch.equal(resumed.test, whole.test)


# -- the train command -----------------------------------------------------------------------
def test_train_command_writes_a_loadable_checkpoint(data_dir, tmp_path):
    out = tmp_path / "ck" / "resnet20.th"
    row = R.main(["train", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "2",
                  "--limit", "16", "--batch-size", "8", "--verify-data", "false",
                  "--device", "cpu", "--progress", "false", "--milestones", "1"])
    assert row["epoch"] == 2 and 0 <= row["test_acc"] <= 1
    ck = torch.load(out, weights_only=True)
    assert ck["normalization"] == "cifar10" and ck["epoch"] == 2
    assert all(k.startswith("module.") for k in ck["state_dict"])
    model = R.load_resnet20(out)
    assert R.features(model, torch.rand(2, 3, 32, 32)).shape == (2, 64)
    lines = [json.loads(s) for s in (tmp_path / "ck" / "resnet20.metrics.jsonl").read_text()
             .splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert [m["lr"] for m in lines] == pytest.approx([0.1, 0.01])  # --milestones 1
    config = json.loads((tmp_path / "ck" / "resnet20.config.json").read_text())
    assert config["config"]["epochs"] == 2 and config["n_train"] == 16 and config["n_test"] == 4
    result = R.main(["eval", "--checkpoint", str(out), "--data-dir", str(data_dir),
                     "--verify-data", "false", "--device", "cpu"])
    assert result["n_test"] == 4 and result["test_acc"] == pytest.approx(row["test_acc"])


@pytest.mark.parametrize("extra,flag", [(["--lr", "nan"], "--lr"), (["--epochs", "0"], "--epochs"),
                                        (["--limit", "0"], "--limit")])
def test_train_command_bad_flag(data_dir, tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as exit_:
        R.main(["train", "--data-dir", str(data_dir), "--out", str(tmp_path / "r.th"), *extra])
    assert exit_.value.code == 2
    assert flag in one_error_line(capsys.readouterr().err, f"{R.PROG}: error: ")
    assert list(tmp_path.iterdir()) == []


# -- the k-path experiment on features -------------------------------------------------------
def paper_argv(data_dir: Path, ckpt: Path | None, out: Path, *extra: str) -> list[str]:
    return ["--preset", "paper_cifar10", "--data-dir", str(data_dir), "--verify-data", "false",
            *(["--resnet-checkpoint", str(ckpt)] if ckpt else []), "--K", "3", "--Ns", "1", "2",
            "--hiddens", "8", "--gains", "1", "--seeds", "1", "--epochs", "2",
            "--max-steps-per-epoch", "2", "--device", "cpu", "--progress", "false",
            "--checkpoint-every", "1", "--checkpoint-unit", "steps", "--out", str(out), *extra]


def test_paper_cifar10_on_features_through_the_cli(data_dir, ckpt, tmp_path, calls):
    """python -m experiments.kpath --preset paper_cifar10 (small K, few steps): the encoders see
    the 64-d features (N_plus_mod_permute gates), every run writes its metrics, and the
    features land in OUT/_features; a second output directory given that cache reuses it."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.kpath",
                           *paper_argv(data_dir, ckpt, out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in out.glob("*/metrics.jsonl") if p.parent.name[0] != "_")
    assert len(runs) == 2
    for run in out.glob("cifar10_*"):
        config = json.loads((run / "config.json").read_text())
        assert config["config"]["features"] == "resnet20"
        assert config["config"]["mode"] == "N_plus_mod_permute" and run.name.startswith(
            "cifar10_K3_H8_N_plus_mod_permute_N")
        assert "ResNet-20 features" in config["data_source"]
        lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["test_trained_acc"] is not None
    (manifest,) = (out / "_features").glob("features-*.json")
    assert json.loads(manifest.read_text())["shape"] == {"train": [3, 20, 64],
                                                         "test": [3, 4, 64]}
    summary = E.main(paper_argv(data_dir, ckpt, tmp_path / "again", "--features-cache",
                                str(out / "_features")))
    assert calls == [] and len(summary["runs"]) == 2
    assert not (tmp_path / "again" / "_features").exists()
    trainer_inputs = torch.load(next((tmp_path / "again" / "_checkpoints").glob("*.pt")),
                                weights_only=True)["inputs"]
    assert trainer_inputs == f"resnet20 features {manifest.stem.removeprefix('features-')}"


def test_resume_refuses_features_of_another_checkpoint(data_dir, ckpt, tmp_path, capsys):
    """A run killed and resumed with a different ResNet-20 (at the same path or another) stops
    with one line instead of going on with other inputs; the same checkpoint moved resumes."""
    out = tmp_path / "out"
    with pytest.raises(E.SimulatedKill):
        E.main(paper_argv(data_dir, ckpt, out, "--stop-after-steps", "2"))
    other = tmp_path / "other.th"
    save_like_pytorch_resnet_cifar10(other, seed=5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        E.main(paper_argv(data_dir, other, out))
    assert exit_.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "trained on other inputs" in line and "use another --out" in line, line
    moved = tmp_path / "moved.th"
    moved.write_bytes(ckpt.read_bytes())
    assert len(E.main(paper_argv(data_dir, moved, out))["runs"]) == 2


def test_corrupt_feature_cache_from_the_cli(data_dir, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    E.main(paper_argv(data_dir, ckpt, out))
    (pt,) = (out / "_features").glob("features-*.pt")
    pt.write_bytes(pt.read_bytes()[:-10])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        E.main(paper_argv(data_dir, ckpt, out, "--epochs", "3"))
    assert exit_.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{pt}: checksum mismatch" in line and "to extract the features again" in line, line


@pytest.mark.parametrize("extra,flag,accepts", [
    (["--features", "resnet20", "--dataset", "mnist"], "--features", "needs --dataset cifar10"),
    (["--features", "bogus"], "--features", "invalid choice"),
    (["--normalization", "bogus"], "--normalization", "invalid choice"),
    (["--resnet-checkpoint", "MISSING"], "--resnet-checkpoint", "does not exist"),
    (["--resnet-checkpoint", "DIR"], "--resnet-checkpoint", "is a directory"),
    (["--features", "pixels", "--resnet-checkpoint", "CKPT"], "--resnet-checkpoint",
     "only read with --features resnet20"),
    (["--features", "pixels", "--normalization", "imagenet"], "--normalization",
     "only read with --features resnet20"),
    (["--features-cache", "CKPT"], "--features-cache", "not a directory"),
    (["--resnet-checkpoint", ""], "--resnet-checkpoint", "a non-empty path"),
    ([], "--resnet-checkpoint", "--features resnet20 needs the ResNet-20 checkpoint"),
])
def test_bad_feature_flags_exit_2_before_any_work(data_dir, ckpt, tmp_path, capsys, calls,
                                                  extra, flag, accepts):
    """Exit status 2, one line naming the flag, nothing loaded or written (no output
    directory): the paper_cifar10 preset without --resnet-checkpoint included."""
    subst = {"MISSING": str(tmp_path / "missing.th"), "DIR": str(tmp_path), "CKPT": str(ckpt)}
    extra = [subst.get(a, a) for a in extra]
    argv = paper_argv(data_dir, None, tmp_path / "out", *extra)
    with pytest.raises(SystemExit) as exit_:
        E.main(argv)
    assert exit_.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert flag in line and accepts in line, line
    assert not (tmp_path / "out").exists() and calls == []
