"""The k-path experiment of "The Neural Race Reduction" (docs/math.md section 3), whole grids at once.

Every configuration of the grid is a run; runs of the same shape (dataset, K, H) train together
as the R replicas of one fused ``KPathNet``. Replica r has its own gate (its N, mode, seed), its
own Xavier init (its gain, a generator seeded with its seed) and its own data order (another
generator seeded with its seed, one permutation per epoch), so it computes exactly what a
separate run would. Each run writes ``OUT/<run>/config.json`` and ``metrics.jsonl`` (one line
per epoch); ``OUT/summary.json``, the figure and ``results.md`` come at the end.

    python -m experiments.kpath --preset quick    # Fashion-MNIST, K=10, ~3 min on 2 CPU cores
    python -m experiments.kpath --preset smoke --data-dir DIR   # tiny (tests)
    python -m experiments.kpath --preset paper_mnist --cuda-graph true   # the authors' 216 runs
    python -m experiments.kpath --preset paper_cifar10 --resnet-checkpoint resnet20.th  # ResNet-20 features
    torchrun --nproc-per-node 8 -m experiments.kpath --preset paper_mnist   # runs split over ranks
    python -m experiments.plot experiments/runs/quick     # redraw the figure and table
    # time per step of each implementation (logged; metrics.jsonl "time_train_s"):
    T="--preset quick --epochs 1 --max-steps-per-epoch 60 --eval-samples 200"
    python -m experiments.kpath $T --out runs/fused
    python -m experiments.kpath $T --out runs/unfused --fused-sgd false  # torch.optim.SGD
    python -m experiments.kpath $T --out runs/loop --model loop  # the paper-style loop

metrics.jsonl, one line per epoch: epoch, step, steps; {train_running, train, test}_{trained,
untrained}_{acc, loss}: mean over the run's trained (gate 1) and untrained (gate 0) paths, where
train_running is over the epoch's SGD batches (before each update, the authors' train metric)
and train / test are evaluated after the epoch on ``eval_samples`` fixed samples of each split
(all of it by default), every ``eval_every`` epochs and at the last; test_acc_matrix, the K x K
test accuracy of every path, on the last epoch; time_train_s, time_steps, time_eval_s (wall
clock, the only fields that differ between two executions of the same run).

A run killed at any moment resumes from its group's checkpoint (OUT/_checkpoints/) when started
again with the same command, and ends bit-identical (on CPU) to an uninterrupted run.

Failures the user can fix end the process with one line on stderr and no traceback: a bad flag
(exit status 2, before anything is loaded or written; experiments.configs); another run writing
OUT (experiments.run_lock: the second run stops at once, exit status 1, having written
nothing); a damaged checkpoint, a checkpoint or results of another configuration (or, with
--features resnet20, of other features), missing or corrupt data, an unreadable ResNet-20
checkpoint or a corrupt feature cache (exit status 1, naming the file and what to do).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from experiments.baselines import LoopKPath
from experiments.kpath_net import KPathNet, kpath_gate, transform_batch
from gated_ops.nn import SGDConfig

from .configs import PROG, ConfigError, KPathConfig, parse_args, usage_error
from .data import (DataError, class_label_maps, load_dataset, pixel_permutations,
                   rotate_images, rotation_angles, to_float)
from .run_lock import OutDirBusy, hold_out_dir

log = logging.getLogger("experiments.kpath")
CLASSES = 10
# An evaluation chunk holds about R*K*b*(D + 2H + K*C) floats; 2**28 of them (1 GiB in float32)
# gives the paper's R=54, K=100, H=1024 group b=12 samples per chunk, small groups b=1000.
EVAL_CHUNK_ELEMENTS = 1 << 28
# Fields a resumed group may change: they do not change what is computed.
# (threads and eval_batch_size can change float rounding, so they are not free: a resumed run
# ends bit-identical to an uninterrupted one. max_replicas and the torchrun world size change
# the grouping, hence the checkpoint a group looks for: see GroupTrainer's existing-results check.)
RESUME_FREE = {"epochs", "checkpoint_every", "checkpoint_unit", "progress", "stop_after_steps",
               "out", "data_dir", "download", "device", "cuda_graph", "max_replicas",
               "verify_data", "max_precompute_gb", "lookahead", "resnet_checkpoint", "features_cache"}
# (the ResNet-20 checkpoint may move: a resume compares the features' key, TaskData.identity)


# What a checkpoint holds (GroupTrainer._state); a file without all of it is not one.
CHECKPOINT_KEYS = {"runs", "configs", "model", "optimizer", "shuffle_states", "epoch",
                   "step_in_epoch", "global_step", "acc_loss", "acc_correct", "metrics",
                   "finished"}


class SimulatedKill(RuntimeError):
    """Raised by ``stop_after_steps``: the process stops as if killed, saving nothing."""


class RunError(RuntimeError):
    """The run cannot go on as asked, and the message says what to do (the CLI prints it and
    exits with status 1): results or a checkpoint of another configuration in OUT."""


class CheckpointError(RunError):
    """A group's checkpoint cannot be read back: truncated, overwritten or not a checkpoint."""


# ---------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    """The data set on the device and the K input / output transformations."""

    x: dict[str, Tensor]  # split -> (n, D) images, or (K, n, D) pre-rotated copies
    y: dict[str, Tensor]  # split -> (n,) int64 labels
    pixel_perms: Tensor | None  # (K, D) input permutations (MNIST, Fashion-MNIST)
    angles: list[float] | None  # rotations applied per batch (CIFAR-10 when not pre-rotated)
    image_shape: tuple[int, ...]
    label_maps: Tensor  # (K, C): label y becomes label_maps[j, y] on decoder j
    eval_idx: dict[str, Tensor]  # split -> indices evaluated every epoch
    source: str
    identity: str | None = None  # what the inputs are, where not the data set alone (features)

    @property
    def d_in(self) -> int:
        return self.x["train"].shape[-1]

    def batch(self, split: str, idx: Tensor, targets: bool = True
              ) -> tuple[Tensor, Tensor | None]:
        """idx (R, B): one batch per replica -> xk (R*K, B, D), target (R, K*K, B) (None
        without ``targets``: the lookahead's next inputs, a few kernels fewer)."""
        x = self.x[split]
        y = self.y[split][idx] if targets else None
        if self.pixel_perms is not None:
            return transform_batch(x[idx], y, self.pixel_perms, self.label_maps)
        if self.angles is None:
            xb = x[:, idx].transpose(0, 1)  # (R, K, B, D)
        else:
            (R, B), K = idx.shape, len(self.angles)
            img = x[idx.flatten()].view(R * B, *self.image_shape)
            xb = torch.stack([rotate_images(img, a).flatten(1) for a in self.angles])
            xb = xb.view(K, R, B, -1).transpose(0, 1)
        return transform_batch(xb, y, None, self.label_maps)


def load_task_data(cfg: KPathConfig, device: torch.device) -> TaskData:
    """The whole data set as float tensors on ``device`` (pixels / 255), with the K transforms;
    with --features resnet20, the (cached) ResNet-20 features of the K rotations instead."""
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, expect_counts=cfg.verify_data,
                      verify_checksums=cfg.verify_data)
    dtype = getattr(torch, cfg.dtype)
    y = {"train": ds.train_y.to(device), "test": ds.test_y.to(device)}
    perms = angles = identity = None
    source = ds.source
    if cfg.features == "resnet20":
        # (K, n, 64) per split: the features of each rotation, as the pre-rotated pixels are
        from .cifar_features import load_or_extract
        cache = Path(cfg.features_cache) if cfg.features_cache else Path(cfg.out) / "_features"
        feats = load_or_extract(ds, Path(cfg.resnet_checkpoint).expanduser(), cfg.K,
                                cache.expanduser(), device=device,
                                normalization=cfg.normalization, progress=cfg.progress)
        x = {"train": feats.train.to(device, dtype), "test": feats.test.to(device, dtype)}
        image_shape = tuple(x["train"].shape[2:])
        identity = f"resnet20 features {feats.key}"
        source = (f"{ds.source}; ResNet-20 features {feats.path} (checkpoint sha256 "
                  f"{feats.manifest['spec']['checkpoint_sha256']})")
    else:
        image_shape = tuple(ds.train_x.shape[1:])
        x = {s: to_float(v, flatten=True).to(device, dtype) for s, v in
             (("train", ds.train_x), ("test", ds.test_x))}
        if cfg.dataset == "cifar10":
            angles = rotation_angles(cfg.K)
            size_gb = (cfg.K * sum(v.numel() for v in x.values()) * x["train"].element_size()
                       / 1e9)
            if size_gb <= cfg.max_precompute_gb:
                log.info("pre-rotating %d copies of %s (%.1f GB)", cfg.K, cfg.dataset, size_gb)
                x = {s: torch.stack([rotate_images(v.view(-1, *image_shape), a).flatten(1)
                                     for a in angles]) for s, v in x.items()}
                angles = None
        else:
            perms = pixel_permutations(cfg.K, x["train"].shape[1]).to(device)
    eval_idx = {}
    for split, labels in y.items():
        n = len(labels)
        size = cfg.eval_samples
        if split == "train" and cfg.eval_train_samples is not None:
            size = cfg.eval_train_samples
        if size is None or size >= n:
            eval_idx[split] = torch.arange(n, device=device)
        else:
            g = torch.Generator().manual_seed(0)
            subset = torch.randperm(n, generator=g)[:size].sort().values
            eval_idx[split] = subset.to(device)
    return TaskData(x, y, perms, angles, image_shape, class_label_maps(cfg.K, CLASSES).to(device),
                    eval_idx, source, identity)


# -------------------------------------------------------------------------------------- models
def build_model(cfg: KPathConfig, net: KPathNet) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """The model that trains ``net``'s weights, and its optimizer (None: fused SGD)."""
    sgd = {"lr": cfg.lr, "momentum": cfg.momentum}
    if cfg.model == "loop":
        model = LoopKPath.from_kpath(net)
        return model, torch.optim.SGD(model.parameters(), **sgd)
    if cfg.fused_sgd:
        sr = cfg.dtype == "bfloat16" and cfg.rounding == "stochastic"
        return net.fuse_sgd(SGDConfig(**sgd, stochastic_rounding=sr)), None
    return net, torch.optim.SGD(net.parameters(), **sgd)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer | None, xk: Tensor, target: Tensor,
             gate: Tensor, lookahead: tuple[Tensor, Tensor] | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """One SGD step of every replica; no host synchronisation. Returns loss (R,), path_loss
    (R, P), correct (R, P) of the batch (before the update). ``lookahead=(xk_next, enc)``:
    the fused model's encoder output is read from ``enc`` and its update writes the next
    step's there (KPathNet.loss)."""
    loss, path_loss, correct = (model.loss(xk, target, gate) if lookahead is None
                                else model.loss(xk, target, gate, lookahead=lookahead))
    loss.sum().backward()  # replica r's loss depends only on its own weights
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach(), path_loss.detach(), correct


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, split: str, gate: Tensor, max_chunk: int
             ) -> tuple[Tensor, Tensor]:
    """Mean loss and accuracy of every path on ``data.eval_idx[split]``: (R, P) float64 each."""
    idx, R = data.eval_idx[split], gate.shape[0]
    loss_sum = torch.zeros(gate.shape, dtype=torch.float64, device=gate.device)
    correct = torch.zeros(gate.shape, dtype=torch.int64, device=gate.device)
    for chunk in idx.split(max_chunk):
        xk, target = data.batch(split, chunk.expand(R, -1))
        _, path_loss, c = model.loss(xk, target, gate)
        loss_sum += path_loss.double() * len(chunk)
        correct += c
    return loss_sum / len(idx), correct.double() / len(idx)


def path_summary(prefix: str, loss: Tensor, acc: Tensor, gate: Tensor) -> list[dict]:
    """Per replica: mean accuracy and loss over trained (gate 1) and untrained (gate 0) paths;
    None where a replica has no such path."""
    loss, acc, on = loss.double().cpu(), acc.double().cpu(), gate.cpu() > 0
    rows = []
    for r in range(gate.shape[0]):
        row = {}
        for part, mask in (("trained", on[r]), ("untrained", ~on[r])):
            any_ = bool(mask.any())
            row[f"{prefix}_{part}_acc"] = acc[r][mask].mean().item() if any_ else None
            row[f"{prefix}_{part}_loss"] = loss[r][mask].mean().item() if any_ else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- the grid
def expand_grid(cfg: KPathConfig) -> list[KPathConfig]:
    """One config per run: the product of the grid lists (an empty list keeps the scalar)."""
    axes = [cfg.hiddens or [cfg.hidden], cfg.modes or [cfg.mode], cfg.Ns or [cfg.N],
            cfg.gains or [cfg.gain], cfg.seeds or [cfg.seed]]
    return [dataclasses.replace(cfg, hidden=h, mode=m, N=n, gain=g, seed=s, hiddens=[],
                                modes=[], Ns=[], gains=[], seeds=[])
            for h, m, n, g, s in itertools.product(*axes)]


def run_name(c: KPathConfig) -> str:
    return f"{c.dataset}_K{c.K}_H{c.hidden}_{c.mode}_N{c.N}_gain{c.gain:g}_seed{c.seed}"


def make_groups(runs: list[KPathConfig], max_replicas: int = 0) -> list[list[KPathConfig]]:
    """Runs of one shape (dataset, K, H) in order, cut into groups of at most max_replicas."""
    shapes: dict[tuple, list[KPathConfig]] = {}
    for c in runs:
        shapes.setdefault((c.dataset, c.K, c.hidden), []).append(c)
    size = max_replicas or len(runs)
    return [v[i:i + size] for v in shapes.values() for i in range(0, len(v), size)]


def group_id(runs: list[KPathConfig]) -> str:
    c, names = runs[0], [run_name(r) for r in runs]
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:10]
    return f"{c.dataset}_K{c.K}_H{c.hidden}_R{len(runs)}_{digest}"


# ------------------------------------------------------------------------- files and machine
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then os.replace: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device) -> dict:
    status = _git("status", "--porcelain")
    info = {"hostname": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(status) if status is not None else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Progress:
    """A one-line progress bar on stderr: steps, rate, ETA and a status string (computed only
    when the bar is redrawn: at most every 0.5 s on a terminal, every 30 s otherwise)."""

    def __init__(self, total: int, desc: str, start: int = 0, enabled: bool = True):
        self.total, self.desc, self.start, self.enabled = total, desc, start, enabled
        self.tty = sys.stderr.isatty()
        self.interval = 0.5 if self.tty else 30.0
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, status: Callable[[], str]) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.interval and done < self.total):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = int((self.total - done) / rate) if rate > 0 else 0
        fill = int(20 * done / max(self.total, 1))
        line = (f"{self.desc} [{'#' * fill}{'.' * (20 - fill)}] {done}/{self.total} "
                f"{rate:.1f} it/s ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d} {status()}")
        sys.stderr.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


# -------------------------------------------------------------------------------- training
class GroupTrainer:
    """R runs of one shape trained as one model; checkpoints and resumes as a unit."""

    def __init__(self, runs: list[KPathConfig], data: TaskData, device: torch.device,
                 out: Path, stop_after_steps: int | None = None, extra: dict | None = None):
        c = self.cfg = runs[0]
        self.runs, self.names = runs, [run_name(r) for r in runs]
        self.data, self.device = data, device
        self.R, self.K, self.id = len(runs), c.K, group_id(runs)
        self.out, self.stop_after_steps, self.steps_run = out, stop_after_steps, 0
        dtype = getattr(torch, c.dtype)
        net = KPathNet(c.K, data.d_in, c.hidden, CLASSES, replicas=self.R, device=device,
                       dtype=dtype, backend=c.backend)
        net.xavier_init_([r.gain for r in runs],
                         [torch.Generator().manual_seed(r.seed) for r in runs])
        self.model, self.opt = build_model(c, net)
        self.gate = torch.stack([kpath_gate(c.K, r.N, r.mode, seed=r.seed).flatten()
                                 for r in runs]).to(device, dtype)  # (R, K*K)
        # Each replica's data order: state of its generator at the start of the current epoch.
        self.shuffle_states = [torch.Generator().manual_seed(r.seed).get_state() for r in runs]
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.acc_loss = torch.zeros(self.gate.shape, dtype=torch.float64, device=device)
        self.acc_correct = torch.zeros(self.gate.shape, dtype=torch.int64, device=device)
        self.lines: list[list[str]] = [[] for _ in runs]
        self.finished = False
        self.converged = False  # every run met the convergence rule (--converge-delta)
        n_train = len(data.y["train"])
        self.steps_per_epoch = min(n_train // c.batch_size,
                                   c.max_steps_per_epoch if c.max_steps_per_epoch is not None
                                   else n_train)
        elems = self.R * c.K * (data.d_in + 2 * c.hidden + c.K * CLASSES)
        self.eval_chunk = max(1, min(c.eval_batch_size, EVAL_CHUNK_ELEMENTS // elems))
        self.ckpt_path = out / "_checkpoints" / f"{self.id}.pt"
        self._last_ckpt = time.monotonic()
        resumed = self._resume()
        if not resumed:  # never overwrite results a differently grouped execution wrote
            for name in self.names:
                done = out / name / "metrics.jsonl"
                if done.exists() and done.stat().st_size > 0:
                    raise RunError(
                        f"{done}: this run already has results but no checkpoint of this group "
                        f"({self.ckpt_path.name}): it was trained in another grouping (changed "
                        "--max-replicas, grid or torchrun world size?); use another --out or "
                        "delete it")
        info = {"machine": machine_info(device), "data_source": data.source, **(extra or {})}
        for r, (run, name) in enumerate(zip(runs, self.names)):
            group = {"id": self.id, "replica": r, "replicas": self.R, "runs": self.names}
            write_text(out / name / "config.json", json.dumps(
                {"run": name, "config": dataclasses.asdict(run), "group": group, **info},
                indent=1) + "\n")
            write_text(out / name / "metrics.jsonl", "".join(self.lines[r]))
        log.info("group %s: %d runs, %s the %s model%s", self.id, self.R,
                 f"resumed at epoch {self.epoch} step {self.step_in_epoch}" if resumed else "new",
                 c.model, "" if c.model == "loop" else f" (fused SGD: {c.fused_sgd})")

    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"runs": self.names, "configs": [dataclasses.asdict(r) for r in self.runs],
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict() if self.opt is not None else None,
                "shuffle_states": self.shuffle_states, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "acc_loss": self.acc_loss, "acc_correct": self.acc_correct,
                "metrics": self.lines, "finished": self.finished, "inputs": self.data.identity}

    def save_checkpoint(self) -> None:
        atomic_write(self.ckpt_path, lambda p: torch.save(self._state(), p))
        self._last_ckpt = time.monotonic()
        log.debug("checkpoint %s at step %d", self.ckpt_path, self.global_step)

    def _resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        try:
            ck = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
            if not isinstance(ck, dict) or not CHECKPOINT_KEYS <= ck.keys():
                raise ValueError("not a checkpoint of this script")
            configs = [dict(c) for c in ck["configs"]]
        except Exception as e:  # torch.load of a damaged file raises almost any type
            raise self._damaged(e) from None
        defaults = {f.name: f.default for f in dataclasses.fields(KPathConfig)}
        for old, new in zip(configs, self.runs):
            # a field the checkpoint predates counts as its default (what that run used)
            diff = {k for k, v in dataclasses.asdict(new).items()
                    if old.get(k, defaults[k]) != v}
            if diff - RESUME_FREE or ck["runs"] != self.names:
                raise RunError(f"{self.ckpt_path}: written by a different configuration "
                               f"({sorted(diff - RESUME_FREE)}); use another --out or delete it")
        if ck.get("inputs", self.data.identity) != self.data.identity:  # (older: no "inputs")
            raise RunError(f"{self.ckpt_path}: trained on other inputs ({ck['inputs']}, now "
                           f"{self.data.identity}: the ResNet-20 checkpoint, its normalisation "
                           "or the data changed); use another --out or delete it")
        try:
            self.model.load_state_dict(ck["model"])
            if self.opt is not None:
                self.opt.load_state_dict(ck["optimizer"])
            for k in ("epoch", "step_in_epoch", "global_step", "finished"):
                setattr(self, k, ck[k])
            self.shuffle_states = [s.cpu() for s in ck["shuffle_states"]]
            self.acc_loss.copy_(ck["acc_loss"])
            self.acc_correct.copy_(ck["acc_correct"])
            self.lines = ck["metrics"]  # lines written after this checkpoint are dropped
        except Exception as e:  # keys, shapes or types that this script did not write
            raise self._damaged(e) from None
        return True

    def _damaged(self, e: Exception) -> CheckpointError:
        reason = next(iter(str(e).strip().splitlines()), "")[:200]
        return CheckpointError(
            f"{self.ckpt_path}: cannot resume from this checkpoint, the file is damaged "
            f"({type(e).__name__}: {reason}). To train its {self.R} run(s) again from the "
            f"start, delete it and their directories in {self.out} ({', '.join(self.names)}); "
            "or pass a fresh --out")

    def _maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint_every
        if every <= 0:
            return
        if (self.global_step % max(int(every), 1) == 0 if self.cfg.checkpoint_unit == "steps"
                else time.monotonic() - self._last_ckpt >= every):
            self.save_checkpoint()

    # -- one step ------------------------------------------------------------------------------
    def _step(self, idx: Tensor, idx_next: Tensor | None = None) -> None:
        """One step on the samples idx (R, B); with idx_next (the next step's samples, where
        the lookahead runs), the next batch is formed now and the update computes its encoder
        forward into the buffer ``_enc`` (KPathNet.loss's lookahead), which the next step reads
        instead of the encoder weights. The last step of such a chain (its next batch not
        known) reads the buffer too and lets the update recompute its own batch there."""
        pending, self._pending = getattr(self, "_pending", None), None
        xk, target = pending if pending is not None else self.data.batch("train", idx)
        ahead = None
        if idx_next is not None or pending is not None:
            if pending is None:  # the buffer does not hold this batch's encoder output yet
                self._enc = self.model.prime_lookahead(xk, getattr(self, "_enc", None))
            if idx_next is not None:
                self._pending = self.data.batch("train", idx_next)
            ahead = (xk if idx_next is None else self._pending[0], self._enc)
        _, path_loss, correct = sgd_step(self.model, self.opt, xk, target, self.gate, ahead)
        self.acc_loss += path_loss
        self.acc_correct += correct

    def _lookahead(self) -> bool:
        """Whether the steps use the lookahead (--lookahead): auto where it was measured
        faster (the CPU kernels), true wherever the fused SGD runs."""
        c = self.cfg
        if c.model != "fused" or not c.fused_sgd or c.lookahead == "false":
            return False
        return c.lookahead == "true" or (self.device.type == "cpu" and c.backend == "auto")

    def _static_step(self, lookahead: bool, capture: bool
                     ) -> Callable[[Tensor, Tensor | None], None]:
        """The step over static buffers, as a CUDA graph replays it: capture=True captures it
        once (the warm-up steps train, so every tensor a step writes is restored after
        capture); capture=False runs the same body eagerly (devices without graphs).

        With the lookahead the encoder output is a static buffer too: each step's update
        writes the next step's (KPathNet.loss(..., lookahead=)), and it is primed
        (KPathNet.prime_lookahead, eagerly) whenever the last step did not know this one's
        batch: the first step of a process, of a resume, of an epoch. Priming computes what
        the update's lookahead would have, so a resumed run keeps the same bits.
        """
        if capture and self.data.angles is not None:
            raise ValueError("cuda_graph: rotations per batch are not capturable; raise "
                             "--max-precompute-gb so the rotated copies are precomputed")
        c, net = self.cfg, self.model
        static_idx = torch.zeros(self.R, c.batch_size, dtype=torch.int64, device=self.device)
        static_next = torch.zeros_like(static_idx)
        enc = (torch.empty(self.R * self.K, c.batch_size, c.hidden, device=self.device,
                           dtype=net.encoder.weight.dtype) if lookahead else None)
        seed: Tensor | None = None  # d(sum of the replicas' losses)/d loss, allocated once

        def body() -> None:
            nonlocal seed
            xk, target = self.data.batch("train", static_idx)
            ahead = None if enc is None else (
                self.data.batch("train", static_next, targets=False)[0], enc)
            loss, path_loss, correct = net.loss(xk, target, self.gate, lookahead=ahead)
            if seed is None:  # (first called eagerly: before any capture)
                seed = torch.ones_like(loss)
            # the fused SGD steps every layer; loss.sum().backward() to the bit, without the
            # sum's kernel and the fill of its gradient's seed
            loss.backward(seed)
            self.acc_loss += path_loss.detach()
            self.acc_correct += correct

        def prime() -> None:
            net.prime_lookahead(self.data.batch("train", static_idx, targets=False)[0],
                                out=enc)

        run = body
        if capture:
            written = [*net.state_dict().values(), self.acc_loss, self.acc_correct]
            saved = [t.clone() for t in written]
            if enc is not None:
                prime()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
            with torch.no_grad():
                for t, v in zip(written, saved):
                    t.copy_(v)
            run = graph.replay
        primed = False  # enc holds the encoder output of static_idx's batch

        def step(idx: Tensor, idx_next: Tensor | None = None) -> None:
            nonlocal primed
            static_idx.copy_(idx)
            if enc is not None:
                if not primed:
                    prime()
                static_next.copy_(idx if idx_next is None else idx_next)  # (None: unused)
            run()
            primed = idx_next is not None
        return step

    def _running(self) -> str:
        n = max(self.step_in_epoch * self.cfg.batch_size, 1)
        rows = path_summary("a", self.acc_loss / n, self.acc_correct.double() / n, self.gate)
        mean = lambda k: sum(r[k] for r in rows if r[k] is not None) / max(  # noqa: E731
            sum(r[k] is not None for r in rows), 1)
        return f"acc trained {mean('a_trained_acc'):.3f} untrained {mean('a_untrained_acc'):.3f}"

    # -- the epochs ------------------------------------------------------------------------------
    def train(self) -> None:
        c, B, steps = self.cfg, self.cfg.batch_size, self.steps_per_epoch
        if self.finished and (self.epoch >= c.epochs or (
                c.converge_delta > 0 and all(converged_at(lines, c.converge_delta,
                                                          c.converge_window) is not None
                                             for lines in self.lines))):
            return
        step = self._step
        lookahead = self._lookahead()
        if c.cuda_graph:
            if self.device.type != "cuda":
                log.info("cuda_graph: nothing to capture on %s; the graph's step runs eagerly",
                         self.device)
            step = self._static_step(lookahead, capture=self.device.type == "cuda")
        n_train = len(self.data.y["train"])
        while self.epoch < c.epochs:
            gens = [torch.Generator() for _ in self.runs]
            for g, s in zip(gens, self.shuffle_states):
                g.set_state(s)
            order = torch.stack([torch.randperm(n_train, generator=g) for g in gens])
            order = order.to(self.device)  # (R, n_train): replica r's data order this epoch
            bar = Progress(steps, f"{self.id} epoch {self.epoch + 1}/{c.epochs}",
                           self.step_in_epoch, c.progress)
            t0, first = time.perf_counter(), self.step_in_epoch
            for s in range(self.step_in_epoch, steps):
                # The lookahead stops at the epoch's last step: the next epoch's order is
                # drawn only when that epoch starts, so its first batch is not known yet.
                step(order[:, s * B:(s + 1) * B],
                     order[:, (s + 1) * B:(s + 2) * B] if lookahead and s + 1 < steps else None)
                self.step_in_epoch += 1
                self.global_step += 1
                self._maybe_checkpoint()
                self.steps_run += 1
                if self.steps_run == self.stop_after_steps:
                    raise SimulatedKill(f"stopped after step {self.global_step}")
                bar.update(s + 1, self._running)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t_train = time.perf_counter() - t0
            bar.close()
            self._end_epoch(steps, first, t_train)
            self.epoch += 1
            self.step_in_epoch = 0
            self.shuffle_states = [g.get_state() for g in gens]
            self.acc_loss.zero_()
            self.acc_correct.zero_()
            if self.converged:
                break
        self.finished = True
        self.save_checkpoint()

    def _end_epoch(self, steps: int, first: int, t_train: float) -> None:
        c = self.cfg
        n = max(steps * c.batch_size, 1)
        rows = path_summary("train_running", self.acc_loss / n,
                            self.acc_correct.double() / n, self.gate)
        last = self.epoch + 1 == c.epochs
        t0 = time.perf_counter()
        if (self.epoch + 1) % c.eval_every == 0 or last:
            for split in ("train", "test"):
                loss, acc = evaluate(self.model, self.data, split, self.gate, self.eval_chunk)
                for row, extra in zip(rows, path_summary(split, loss, acc, self.gate)):
                    row.update(extra)
                if last and split == "test":  # the K x K accuracy matrix of every run
                    for row, a in zip(rows, acc.view(self.R, self.K, self.K).cpu()):
                        row["test_acc_matrix"] = a.tolist()
        t_eval = time.perf_counter() - t0
        for r, row in enumerate(rows):
            line = {"epoch": self.epoch + 1, "step": self.global_step, "steps": steps, **row,
                    "time_train_s": t_train, "time_steps": steps - first,
                    "time_eval_s": t_eval}
            text = json.dumps(line) + "\n"
            with open(self.out / self.names[r] / "metrics.jsonl", "a") as f:
                f.write(text)
            self.lines[r].append(text)
        test = [r["test_trained_acc"] for r in rows if r.get("test_trained_acc") is not None]
        untr = [r["test_untrained_acc"] for r in rows if r.get("test_untrained_acc") is not None]
        if c.converge_delta > 0 and all(converged_at(lines, c.converge_delta,
                                                     c.converge_window) is not None
                                        for lines in self.lines):
            log.info("%s: every run has converged (trained-path test accuracy up by at most %g "
                     "over %d evaluations); stopping", self.id, c.converge_delta,
                     c.converge_window)
            self.converged = True
        log.info("%s epoch %d/%d: %.1f ms/step, eval %.1f s; test acc trained %s untrained %s "
                 "(mean over runs)", self.id, self.epoch + 1, c.epochs,
                 1e3 * t_train / max(steps - first, 1), t_eval,
                 f"{sum(test) / len(test):.3f}" if test else "-",
                 f"{sum(untr) / len(untr):.3f}" if untr else "-")


def converged_at(lines: list[str], delta: float, window: int) -> int | None:
    """The convergence rule: the step of the first evaluation i (i >= window) at which the best
    trained-path test accuracy of evaluations i - window + 1 .. i exceeds the best of the
    evaluations before them by at most ``delta``; None if none yet."""
    evals = [d for d in map(json.loads, lines) if d.get("test_trained_acc") is not None]
    acc = [d["test_trained_acc"] for d in evals]
    for i in range(window, len(acc)):
        if max(acc[i - window + 1:i + 1]) - max(acc[:i - window + 1]) <= delta:
            return evals[i]["step"]
    return None


def summary_row(run: KPathConfig, lines: list[str]) -> dict:
    """Final trained / untrained accuracies of a run: its last evaluated epoch."""
    last = next((d for d in map(json.loads, reversed(lines)) if "test_trained_acc" in d), {})
    keys = ("test_trained_acc", "test_untrained_acc", "train_trained_acc", "train_untrained_acc")
    return {"run": run_name(run), "dataset": run.dataset, "K": run.K, "N": run.N,
            "mode": run.mode, "hidden": run.hidden, "gain": run.gain, "seed": run.seed,
            "epoch": last.get("epoch"), **{k: last.get(k) for k in keys}}


# ------------------------------------------------------------------------------------ main
def _distributed() -> tuple[int, int, int]:
    """rank, world size, local rank from torchrun's environment (0, 1, 0 without it)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    env = os.environ
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def check_data(cfg: KPathConfig, data: TaskData, device: torch.device) -> None:
    """The flags that can only be checked against the loaded data (ConfigError)."""
    n_train = len(data.y["train"])
    if cfg.batch_size > n_train:
        raise ConfigError("--batch-size", f"expected at most the {n_train} training samples "
                                          f"({data.source}), got {cfg.batch_size}")
    if cfg.cuda_graph and device.type == "cuda" and data.angles is not None:
        gb = cfg.K * sum(v.numel() for v in data.x.values()) * data.x["train"].element_size()
        raise ConfigError("--max-precompute-gb", f"--cuda-graph true needs the {cfg.K} rotated "
                                                 f"copies of {cfg.dataset} precomputed: expected "
                                                 f">= {gb / 1e9:.2f}, got {cfg.max_precompute_gb}")


@contextlib.contextmanager
def claim_out(out: Path, rank: int, world: int):
    """Rank 0 holds OUT's lock (experiments.run_lock) for the whole job; every rank goes on only
    once it has it, and every rank stops with its error if it has not."""
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(hold_out_dir(out))
            except OutDirBusy as e:
                error = str(e)
        if world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise OutDirBusy(error)
        yield


def main(argv: list[str] | None = None) -> dict | None:
    """Train the grid (this rank's share of it); rank 0 writes summary.json and the report.
    Returns the summary on rank 0, None on other ranks. A bad flag exits with status 2 before
    anything is loaded or written; another run holding OUT, a damaged checkpoint or missing
    data exit with status 1; each with one line on stderr (SystemExit)."""
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return train_grid(cfg)
    except ConfigError as e:
        usage_error(str(e))
    except (RunError, OutDirBusy, DataError) as e:  # (DataError's advice is a second line)
        sys.stderr.write(f"{PROG}: error: {' '.join(str(e).splitlines())}\n")
        raise SystemExit(1) from None


def train_grid(cfg: KPathConfig) -> dict | None:
    """main's work on a checked config; raises ConfigError, RunError, OutDirBusy, DataError."""
    cfg.check_inputs()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, local_rank = _distributed()
    device = resolve_device(cfg.device, local_rank)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(cfg.out)
    runs = expand_grid(cfg)
    mine = runs[rank::world]  # deterministic round-robin over runs
    with claim_out(out, rank, world):
        log.info("rank %d/%d: %d of %d runs on %s", rank, world, len(mine), len(runs), device)
        rows, t0 = [], time.perf_counter()
        data = load_task_data(cfg, device) if mine else None
        if data is not None:
            check_data(cfg, data, device)
        steps_left = cfg.stop_after_steps
        for group in make_groups(mine, cfg.max_replicas):
            trainer = GroupTrainer(group, data, device, out, steps_left,
                                   {"rank": rank, "world_size": world})
            trainer.train()
            steps_left = None if steps_left is None else steps_left - trainer.steps_run
            rows += [summary_row(run, lines) for run, lines in zip(group, trainer.lines)]
        if world > 1:
            gathered: list[list[dict]] = [[] for _ in range(world)]
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
            dist.barrier()
            dist.destroy_process_group()
            if rank != 0:
                return None
        order = {run_name(r): i for i, r in enumerate(runs)}
        rows.sort(key=lambda row: order[row["run"]])
        summary = {"runs": rows, "num_runs": len(rows), "world_size": world,
                   "wall_time_s": time.perf_counter() - t0, "config": dataclasses.asdict(cfg)}
        write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        from . import plot  # matplotlib: only where the report is drawn
        png, table = plot.make_report(out)
    log.info("wrote %s, %s and %s", out / "summary.json", png, out / "results.md")
    print(table)
    return summary


if __name__ == "__main__":
    main()
