"""Typed configuration of the k-path experiment (docs/math.md section 3), its presets and its CLI.

``KPathConfig``'s defaults are the authors' script defaults (MNIST, K=100, N_plus_mod, H=128,
gain 1, SGD lr 1e-4 momentum 0.9, batch 8, 1000 epochs, seed 1). The grid fields (``seeds``,
``gains``, ``Ns``, ``modes``, ``hiddens``) expand one config into many runs; runs of the same shape
(dataset, K, H) train together as the R replicas of one ``KPathNet``. A named preset replaces the
defaults; explicit command-line options then override the preset.

Every field carries its accepted values (``choices``, bounds ``ge`` / ``gt`` / ``le`` / ``lt``, a
``pattern``); a ``KPathConfig`` checks them, and the combinations of fields, when it is built
(``ConfigError`` naming the flag and what it accepts), so presets, tests and the command line
share one set of rules. ``check_machine`` adds what depends on this machine (paths that must
exist, the device); ``parse_args`` runs both and turns an error into one line on stderr and exit
status 2, before anything is loaded or written.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

__all__ = ["ConfigError", "KPathConfig", "OneLineParser", "PRESETS", "PROG", "build_parser",
           "parse_args", "usage_error"]

PROG = "python -m experiments.kpath"


class ConfigError(ValueError):
    """A field (a flag) out of its accepted values, or fields that contradict each other."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_MODES = ("N_plus_mod", "N_plus_mod_permute", "fully_connected")
_MAX_K = math.factorial(10)  # the label maps are distinct permutations of the 10 classes
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any int64 (and more); keep it plain
_PATH = (r"(?s).+", "a non-empty path")


@dataclass
class KPathConfig:
    # -- the task and one run (the authors' defaults) ----------------------------------------
    dataset: str = _f("mnist", "mnist, fashion_mnist (pixel permutations) or cifar10 (rotations)",
                      choices=("mnist", "fashion_mnist", "cifar10"))
    K: int = _f(100, "number of input and of output transformations (encoders, decoders)",
                ge=1, le=_MAX_K)
    N: int = _f(10, "trained paths per encoder: the gate's ones per row (at most K)", ge=1)
    mode: str = _f("N_plus_mod", "gate of a run (see experiments.kpath_net.kpath_gate)", choices=_MODES)
    hidden: int = _f(128, "hidden width H", ge=1)
    gain: float = _f(1.0, "Xavier-uniform init gain (biases start at 0)", ge=0)
    seed: int = _f(1, "seeds the init, the gate permutation and the data order of a run",
                   ge=0, le=_MAX_SEED)
    lr: float = _f(1e-4, "SGD learning rate", gt=0)
    momentum: float = _f(0.9, "SGD momentum (dampening 0)", ge=0, lt=1)
    batch_size: int = _f(8, "samples per SGD step (per run; at most the training set)", ge=1)
    epochs: int = _f(1000, "passes over the training set", ge=1)
    max_steps_per_epoch: int | None = _f(
        None, "cap on SGD steps per epoch (none: full epochs of n_train // batch_size steps)",
        ge=1)
    # -- the grid: runs of one shape train together as replicas -------------------------------
    seeds: list[int] = _f([], "grid of seeds (empty: [seed])", ge=0, le=_MAX_SEED)
    gains: list[float] = _f([], "grid of init gains (empty: [gain])", ge=0)
    Ns: list[int] = _f([], "grid of N (empty: [N])", ge=1)
    modes: list[str] = _f([], "grid of gate modes (empty: [mode])", choices=_MODES)
    hiddens: list[int] = _f([], "grid of hidden widths (empty: [hidden]); each H is its own group",
                            ge=1)
    max_replicas: int = _f(0, "most runs trained together in one model (0: no limit); "
                              "bounds memory: a replica holds K*H*(D+C)+H*H weights + momentum",
                       ge=0)
    # -- evaluation ---------------------------------------------------------------------------
    eval_every: int = _f(1, "evaluate train and test every this many epochs (and the last)",
                         ge=1)
    eval_samples: int | None = _f(
        None, "evaluate on a fixed random subset (generator seed 0) of this many samples of "
              "each split, the same for every run and epoch (none: the full splits)", ge=1)
    eval_train_samples: int | None = _f(
        None, "the training split's subset size, if other than eval_samples (none: as "
              "eval_samples); e.g. the full test set and 1000 training samples", ge=1)
    converge_delta: float = _f(
        0.0, "stop at convergence (0: off; then --epochs is a cap): once every run's trained-path "
             "test accuracy has risen by at most this much over its last --converge-window "
             "evaluations (the best of those against the best before them)", ge=0, lt=1)
    converge_window: int = _f(3, "evaluations in the convergence rule's window", ge=1)
    eval_batch_size: int = _f(1000, "samples per evaluation chunk (lowered automatically so a "
                                    "chunk's activations stay under ~1 GiB)", ge=1)
    # -- implementation -----------------------------------------------------------------------
    model: str = _f("fused", "fused: KPathNet on gated_ops; loop: the paper-style per-pathway "
                             "loop of nn.Linear (for timing comparisons)",
                    choices=("fused", "loop"))
    fused_sgd: bool = _f(True, "fused model: SGD inside backward (false: torch.optim.SGD)")
    backend: str = _f("auto", "fused model: auto (the compiled CPU / CUDA kernels) or triton "
                              "(gated_ops.triton, fused SGD included; a GPU, or CPU tensors "
                              "under TRITON_INTERPRET=1)", choices=("auto", "triton"))
    cuda_graph: bool = _f(False, "capture the training step in a CUDA graph over static "
                                 "buffers (on CUDA; elsewhere the same step runs eagerly)")
    lookahead: str = _f("auto", "fused model with fused SGD: each step's encoder update also "
                               "computes the next batch's encoder forward (KPathNet.lookahead; "
                               "under --cuda-graph a static buffer, KPathNet.prime_lookahead), "
                               "so the encoder weights are read once per step. auto: where "
                               "measured faster (the CPU kernels; not yet on CUDA); true: "
                               "wherever the fused SGD runs. Bit for bit the same training on "
                               "the CPU, to float rounding on CUDA",
                         choices=("auto", "true", "false"))
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda | cuda:N",
                     pattern=(r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N"))
    dtype: str = _f("float32", "parameter and data dtype; bfloat16 / float16: 16-bit storage of "
                    "weights, momenta and activations, arithmetic in float32 (the fused model's "
                    "update is computed in float32 and rounded once)",
                    choices=("float32", "float64", "bfloat16", "float16"))
    rounding: str = _f("stochastic", "bfloat16 with the fused SGD: how updated weights are "
                       "stored; stochastic (unbiased, see gated_ops.SGDConfig) or nearest (small "
                       "updates are lost)", choices=("stochastic", "nearest"))
    threads: int = _f(0, "CPU threads of torch (0: torch's default); on a busy machine 1 can be "
                         "several times faster than oversubscribed cores", ge=0)
    # -- data ---------------------------------------------------------------------------------
    data_dir: str | None = _f(None, "root to search for the data first (see experiments.data); "
                                    "an existing directory", pattern=_PATH)
    download: bool = _f(False, "download the data set if it is not found")
    verify_data: bool = _f(True, "require the canonical sizes and MD5s (tests with small "
                                 "synthetic files turn this off)")
    max_precompute_gb: float = _f(8.0, "cifar10: keep the K rotated copies of the data on the "
                                       "device if they fit in this many GB, else rotate per batch",
                                ge=0)
    features: str = _f("pixels", "cifar10: what encoder k sees of the image rotated by 270*k/K "
                                 "degrees; pixels: the rotated image (D = 3072); resnet20: its "
                                 "64-d features under a pretrained ResNet-20 (--resnet-checkpoint), "
                                 "the authors' inputs, extracted once and cached "
                                 "(experiments.cifar_features)", choices=("pixels", "resnet20"))
    resnet_checkpoint: str | None = _f(None, "--features resnet20: the ResNet-20 checkpoint "
                                      "(pytorch_resnet_cifar10 format; python -m "
                                      "experiments.resnet20 train makes one); an existing file",
                                pattern=_PATH)
    normalization: str = _f("auto", "--features resnet20: mean / std of the images before the "
                                    "ResNet; auto: what the checkpoint records, else cifar10 "
                                    "(pytorch_resnet_cifar10's own checkpoints want imagenet)",
                            choices=("auto", "cifar10", "imagenet"))
    features_cache: str | None = _f(None, "--features resnet20: directory of the feature cache "
                                          "(none: OUT/_features); one directory can serve many "
                                          "--out", pattern=_PATH)
    # -- output, checkpoints ------------------------------------------------------------------
    out: str = _f("experiments/runs/kpath", "output directory: one sub-directory per run; one "
                  "run at a time writes it (OUT/.lock)", pattern=_PATH)
    checkpoint_every: float = _f(600.0, "checkpoint interval in checkpoint_unit "
                                        "(0: only at the end; whole steps in steps)", ge=0)
    checkpoint_unit: str = _f("seconds", "unit of checkpoint_every", choices=("seconds", "steps"))
    progress: bool = _f(True, "progress bar on stderr")
    stop_after_steps: int | None = _f(
        None, "testing: raise SimulatedKill after this many steps of this process, without "
              "saving (as if the process were killed)", ge=1)

    def __post_init__(self) -> None:
        if isinstance(self.lookahead, bool):  # configs from before it had three values
            self.lookahead = "auto" if self.lookahead else "false"
        for f in dataclasses.fields(self):
            base, optional, many = _field_type(f.name)
            value = getattr(self, f.name)
            values = value if many and isinstance(value, list) else [value]
            if many and not isinstance(value, list):
                raise ConfigError(_flag(f.name), f"expected a list, got {value!r}")
            for v in values:
                if not (optional and v is None) and not _accepts(base, f.metadata, v):
                    raise ConfigError(_flag(f.name), f"expected {_expected(f)}, got {v!r}")
        self._check_combinations()

    def _check_combinations(self) -> None:
        modes, Ns = self.modes or [self.mode], self.Ns or [self.N]
        n_flag = "--Ns" if self.Ns else "--N"
        if any(m != "fully_connected" for m in modes):  # (fully_connected ignores N)
            for n in Ns:
                if n > self.K:
                    what = "integers" if self.Ns else "an integer"
                    raise ConfigError(n_flag, f"expected {what} in 1..K={self.K} (trained paths "
                                              f"per encoder, at most --K), got {n}")
        # Each grid value names runs (experiments.kpath.run_name, gains to 6 digits): two equal
        # names would make two runs write one directory.
        for axis, key in (("Ns", str), ("seeds", str), ("modes", str), ("hiddens", str),
                          ("gains", lambda g: f"{g:g}")):
            names: dict[str, Any] = {}
            for v in getattr(self, axis):
                if key(v) in names:
                    same = (f"{v!r} appears twice" if names[key(v)] == v else
                            f"{names[key(v)]!r} and {v!r} give the same run name ({key(v)})")
                    raise ConfigError(_flag(axis), f"expected distinct values, each naming its "
                                                   f"runs; {same}")
                names[key(v)] = v
        fused_sgd = self.model == "fused" and self.fused_sgd
        if self.cuda_graph and not fused_sgd:
            raise ConfigError("--cuda-graph", "true needs --model fused --fused-sgd true (the "
                                              "captured step is the fused SGD's)")
        if self.lookahead == "true" and not fused_sgd:
            raise ConfigError("--lookahead", "true needs --model fused --fused-sgd true (the "
                                             "lookahead is part of the fused update)")
        if self.backend == "triton" and self.model != "fused":
            raise ConfigError("--backend", "triton needs --model fused (the loop model is "
                                           "plain nn.Linear)")
        if self.features == "resnet20" and self.dataset != "cifar10":
            raise ConfigError("--features", f"resnet20 needs --dataset cifar10 (a CIFAR-10 "
                                            f"network), got --dataset {self.dataset}")
        if self.features != "resnet20":
            for name, unset in (("resnet_checkpoint", None), ("features_cache", None),
                                ("normalization", "auto")):
                if getattr(self, name) != unset:
                    raise ConfigError(_flag(name), f"only read with --features resnet20, got "
                                                   f"--features {self.features}")
        if self.checkpoint_unit == "steps" and self.checkpoint_every != int(self.checkpoint_every):
            raise ConfigError("--checkpoint-every", f"expected a whole number of steps with "
                                                    f"--checkpoint-unit steps, got "
                                                    f"{self.checkpoint_every!r}")

    def check_machine(self) -> None:
        """The checks that look at this machine: --data-dir exists, --out can be a directory
        here, the device and the Triton backend are available. ConfigError otherwise."""
        if self.data_dir is not None:
            d = Path(self.data_dir).expanduser()
            if not d.is_dir():
                what = "is not a directory" if d.exists() else "does not exist"
                raise ConfigError("--data-dir", f"{self.data_dir} {what}; expected an existing "
                                                "directory (create it to --download into it)")
        out = Path(self.out).expanduser()
        if out.exists() and not out.is_dir():
            raise ConfigError("--out", f"{self.out} exists and is not a directory; expected a "
                                       "directory (created if missing)")
        parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError("--out", f"{self.out}: cannot create or write it ({parent} is not "
                                       "a writable directory)")
        if self.resnet_checkpoint is not None:
            ckpt = Path(self.resnet_checkpoint).expanduser()
            if not ckpt.is_file():
                what = "is a directory" if ckpt.is_dir() else "does not exist"
                raise ConfigError("--resnet-checkpoint", f"{self.resnet_checkpoint} {what}; expected a ResNet-20 "
                                                  "checkpoint file (python -m experiments.resnet20 "
                                                  "train makes one)")
        if self.features_cache is not None:
            cache = Path(self.features_cache).expanduser()
            if cache.exists() and not cache.is_dir():
                raise ConfigError("--features-cache", f"{self.features_cache} exists and is not "
                                                      "a directory; expected a directory")
        device = self.device
        if device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise ConfigError("--device", f"{device}: CUDA is not available on this "
                                              "machine; expected auto or cpu")
            index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
            if index >= count:
                raise ConfigError("--device", f"expected cuda:0..cuda:{count - 1} on this "
                                              f"machine, got {device}")
        if self.backend == "triton":
            import importlib.util
            if importlib.util.find_spec("triton") is None:
                raise ConfigError("--backend", "triton: the triton package is not installed")
            if device == "cpu" or (device == "auto" and not _cuda_available()):
                if os.environ.get("TRITON_INTERPRET") != "1":
                    raise ConfigError("--backend", "triton on the CPU runs only under the "
                                                   "interpreter: set TRITON_INTERPRET=1")

    def check_inputs(self) -> None:
        """What a run needs that a config may leave open (a preset cannot name the user's
        files): --features resnet20 needs --checkpoint. ConfigError otherwise; checked before
        anything is loaded or written (experiments.kpath.train_grid)."""
        if self.features == "resnet20" and self.resnet_checkpoint is None:
            raise ConfigError("--resnet-checkpoint", "--features resnet20 needs the ResNet-20 "
                                                     "checkpoint: pass --resnet-checkpoint FILE "
                                                     "(python -m "
                                              "experiments.resnet20 train makes one)")


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _field_type(name: str) -> tuple[type, bool, bool]:
    """(base type, None allowed, list) of a field: int | None -> (int, True, False)."""
    annotation = _HINTS[name]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    optional = origin in (typing.Union, types.UnionType)
    if optional:
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return args[0], optional, True
    return annotation, optional, False


def _accepts(base: type, meta: typing.Mapping[str, Any], v: Any) -> bool:
    """Whether v is one of the values a field of type ``base`` with metadata ``meta`` takes."""
    if base is bool:
        return isinstance(v, bool)
    if base is str:
        if not isinstance(v, str):
            return False
        if "choices" in meta:
            return v in meta["choices"]
        return "pattern" not in meta or re.fullmatch(meta["pattern"][0], v) is not None
    numbers = (int, float) if base is float else (int,)
    if isinstance(v, bool) or not isinstance(v, numbers):
        return False
    if base is float and not math.isfinite(v):
        return False
    return (("ge" not in meta or v >= meta["ge"]) and ("gt" not in meta or v > meta["gt"])
            and ("le" not in meta or v <= meta["le"]) and ("lt" not in meta or v < meta["lt"]))


def _expected(f: dataclasses.Field) -> str:
    """A field's accepted values in words: "an integer >= 1", "none or ...", "a list of ..."."""
    base, optional, many = _field_type(f.name)
    m = f.metadata
    if base is bool:
        text = "true or false"
    elif "choices" in m:
        text = "one of " + ", ".join(m["choices"])
    elif "pattern" in m:
        text = m["pattern"][1]
    else:
        noun = "an integer" if base is int else "a finite number"
        if base is int and "ge" in m and "le" in m:
            text = f"{noun} in {m['ge']}..{m['le']}"
        else:
            bounds = [f"{op} {m[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="),
                                                    ("lt", "<")) if k in m]
            text = f"{noun} {' and '.join(bounds)}".rstrip()
    if many:
        text = f"{text} (each value)"
    return f"none or {text}" if optional else text


_HINTS = typing.get_type_hints(KPathConfig)


def paper_mnist() -> KPathConfig:
    """The authors' MNIST grid: 9 N x 2 H x 6 gains x 2 seeds = 216 runs, 1000 epochs each,
    with their gate mode: N consecutive decoders per encoder, the columns permuted by a random
    permutation per seed (``N_plus_mod_permute``)."""
    return KPathConfig(dataset="mnist", K=100, Ns=list(range(10, 100, 10)), hiddens=[128, 1024],
                       gains=[10, 1, 0.1, 0.01, 0.001, 0.0001], seeds=[1, 2],
                       mode="N_plus_mod_permute", max_replicas=54,
                       out="experiments/runs/paper_mnist")


def paper_cifar10() -> KPathConfig:
    """The authors' CIFAR-10 grid: K=40 rotations, each image mapped to its 64-d features by a
    pretrained ResNet-20 (--checkpoint, which the run needs), the gate N_plus_mod_permute,
    7 N x 2 H x 6 gains x 2 seeds = 168 runs; the rest as paper_mnist (the authors' script
    defaults). --features pixels trains on the rotated pixels instead."""
    return dataclasses.replace(paper_mnist(), dataset="cifar10", K=40, Ns=list(range(5, 40, 5)),
                               features="resnet20", mode="N_plus_mod_permute",
                               out="experiments/runs/paper_cifar10")


def quick() -> KPathConfig:
    """Real data, small: Fashion-MNIST, K=10, 8 runs in one model; about 3 min on 2 CPU cores.

    Departures from the paper, for speed: lr 0.05 instead of 1e-4 and 4000 steps instead of
    7.5M; small gain 0.03 instead of 1e-3, whose plateau would outlast the budget (at lr 0.05,
    gain 0.03 leaves it after ~700 steps, gain 0.01 not within 800); the metrics are measured on
    1000 fixed samples of each split. One thread: on a shared 2-core machine two OpenMP threads
    measured 4x slower per step while other jobs ran (171 vs 38 ms).
    """
    return KPathConfig(dataset="fashion_mnist", K=10, Ns=[1, 3, 5, 9], gains=[0.03, 1.0],
                       seeds=[1], hidden=128, lr=0.05, batch_size=8, epochs=8,
                       max_steps_per_epoch=500, eval_samples=1000, threads=1,
                       checkpoint_every=60, out="experiments/runs/quick")


def gpu_study() -> KPathConfig:
    """The K = 100 study for one H100, about 5 minutes: Fashion-MNIST, H = 128, N across its
    range, gains 1 to 1e-3, 2 seeds (40 runs as the replicas of one captured model), the
    authors' gate mode, at the paper's lr x steps (1e-4 x 7.5M = 750) compressed to lr 0.05 x
    15,000 steps (the CPU study finds this compression safe for the escape times from a small
    start, not for what follows them: experiments/README.md); the full test set every 1500
    steps. ``bash scripts/gpu_check.sh OUTDIR study`` runs it."""
    return KPathConfig(dataset="fashion_mnist", K=100, Ns=[10, 30, 50, 70, 90],
                       gains=[1.0, 0.1, 0.01, 0.001], seeds=[1, 2], hidden=128,
                       mode="N_plus_mod_permute", lr=0.05, batch_size=8, epochs=10,
                       max_steps_per_epoch=1500, eval_samples=None, eval_train_samples=1000,
                       cuda_graph=True, lookahead="true", checkpoint_every=120,
                       out="experiments/runs/gpu_study")


def smoke() -> KPathConfig:
    """Tiny, for tests: seconds on a CPU. (N=2: the scalar a cleared grid falls back to must
    fit K=3.)"""
    return KPathConfig(dataset="mnist", K=3, N=2, Ns=[1, 2], gains=[0.1, 1.0], hidden=8,
                       lr=0.05, batch_size=4, epochs=2, max_steps_per_epoch=6, eval_samples=40,
                       eval_batch_size=16, device="cpu", checkpoint_every=4,
                       checkpoint_unit="steps", progress=False, out="experiments/runs/smoke")


PRESETS: dict[str, Callable[[], KPathConfig]] = {
    "paper_mnist": paper_mnist, "paper_cifar10": paper_cifar10, "quick": quick, "smoke": smoke,
    "gpu_study": gpu_study}


# -- argparse from the dataclass ----------------------------------------------------------------
def usage_error(message: str, prog: str = PROG) -> NoReturn:
    """A bad flag: one line on stderr and exit status 2, argparse's convention (no usage: the
    usage of every option would bury the line)."""
    sys.stderr.write(f"{prog}: error: {' '.join(message.splitlines())}\n")
    raise SystemExit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (usage_error); also used by the other scripts."""

    def error(self, message: str) -> NoReturn:
        usage_error(message, self.prog)


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _converter(f: dataclasses.Field) -> Callable[[str], Any]:
    """The argparse type of a field: str -> its type (or None), the accepted values in the
    error; the bounds themselves are checked by KPathConfig."""
    base, optional, _ = _field_type(f.name)

    def convert(s: str) -> Any:
        if optional and s.strip().lower() == "none":
            return None
        if base is bool:
            return _parse_bool(s)
        try:
            return base(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_expected(f)}, got {s!r}") from None
    convert.__name__ = base.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG, allow_abbrev=False,
        description="The k-path experiment of 'The Neural Race Reduction' (docs/math.md section 3). "
                    "--preset sets the defaults; the other options override it.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named configuration applied before the other options (default: none)")
    for f in dataclasses.fields(KPathConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        base, _, many = _field_type(f.name)
        accepts = "" if base is bool or "choices" in f.metadata else f"; accepts {_expected(f)}"
        p.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {default}){accepts}",
                       choices=f.metadata.get("choices"), type=_converter(f),
                       **({"nargs": "*"} if many else {"metavar": "BOOL"} if base is bool
                          else {}))
    return p


def parse_args(argv: list[str] | None = None) -> KPathConfig:
    """KPathConfig from the command line: the preset (or the defaults), then explicit options.
    A bad flag, or one this machine cannot satisfy (KPathConfig.check_machine), exits with one
    line on stderr and status 2."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    preset = ns.pop("preset")
    base = PRESETS[preset]() if preset else KPathConfig()
    # An explicit scalar (--N 3) replaces the preset's grid axis (Ns) unless that is given too.
    for scalar, axis in _GRID_AXES.items():
        if scalar in ns and axis not in ns:
            ns[axis] = []
    try:
        cfg = dataclasses.replace(base, **ns)
        cfg.check_machine()
    except ConfigError as e:
        parser.error(str(e))
    return cfg


# scalar option -> the grid list that takes precedence over it when non-empty
_GRID_AXES = {"N": "Ns", "seed": "seeds", "gain": "gains", "mode": "modes", "hidden": "hiddens"}
