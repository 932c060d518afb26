"""Typed configuration of the k-path experiment (GDLN.md section 2), its presets and its CLI.

``KPathConfig``'s defaults are the authors' script defaults (MNIST, K=100, N_plus_mod, H=128,
gain 1, SGD lr 1e-4 momentum 0.9, batch 8, 1000 epochs, seed 1). The grid fields (``seeds``,
``gains``, ``Ns``, ``modes``, ``hiddens``) expand one config into many runs; runs of the same shape
(dataset, K, H) train together as the R replicas of one ``KPathNet``. A named preset replaces the
defaults; explicit command-line options then override the preset.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["KPathConfig", "PRESETS", "build_parser", "parse_args"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_MODES = ("N_plus_mod", "N_plus_mod_permute", "fully_connected")


@dataclass
class KPathConfig:
    # -- the task and one run (the authors' defaults) ----------------------------------------
    dataset: str = _f("mnist", "mnist, fashion_mnist (pixel permutations) or cifar10 (rotations)",
                      choices=("mnist", "fashion_mnist", "cifar10"))
    K: int = _f(100, "number of input and of output transformations (encoders, decoders)")
    N: int = _f(10, "trained paths per encoder: the gate's ones per row")
    mode: str = _f("N_plus_mod", "gate of a run (see gated_ops.kpath.kpath_gate)", choices=_MODES)
    hidden: int = _f(128, "hidden width H")
    gain: float = _f(1.0, "Xavier-uniform init gain (biases start at 0)")
    seed: int = _f(1, "seeds the init, the gate permutation and the data order of a run")
    lr: float = _f(1e-4, "SGD learning rate")
    momentum: float = _f(0.9, "SGD momentum (dampening 0)")
    batch_size: int = _f(8, "samples per SGD step (per run)")
    epochs: int = _f(1000, "passes over the training set")
    max_steps_per_epoch: int | None = _f(
        None, "cap on SGD steps per epoch (none: full epochs of n_train // batch_size steps)")
    # -- the grid: runs of one shape train together as replicas -------------------------------
    seeds: list[int] = _f([], "grid of seeds (empty: [seed])")
    gains: list[float] = _f([], "grid of init gains (empty: [gain])")
    Ns: list[int] = _f([], "grid of N (empty: [N])")
    modes: list[str] = _f([], "grid of gate modes (empty: [mode])", choices=_MODES)
    hiddens: list[int] = _f([], "grid of hidden widths (empty: [hidden]); each H is its own group")
    max_replicas: int = _f(0, "most runs trained together in one model (0: no limit); "
                              "bounds memory: a replica holds K*H*(D+C)+H*H weights + momentum")
    # -- evaluation ---------------------------------------------------------------------------
    eval_every: int = _f(1, "evaluate train and test every this many epochs (and the last)")
    eval_samples: int | None = _f(
        None, "evaluate on a fixed random subset (generator seed 0) of this many samples of "
              "each split, the same for every run and epoch (none: the full splits)")
    eval_batch_size: int = _f(1000, "samples per evaluation chunk (lowered automatically so a "
                                    "chunk's activations stay under ~1 GiB)")
    # -- implementation -----------------------------------------------------------------------
    model: str = _f("fused", "fused: KPathNet on gated_ops; loop: the paper-style per-pathway "
                             "loop of nn.Linear (for timing comparisons)",
                    choices=("fused", "loop"))
    fused_sgd: bool = _f(True, "fused model: SGD inside backward (false: torch.optim.SGD)")
    backend: str = _f("auto", "fused model: auto (the compiled CPU / CUDA kernels) or triton "
                              "(gated_ops.triton_ops, fused SGD included; a GPU, or CPU tensors "
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
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    dtype: str = _f("float32", "parameter and data dtype; bfloat16 / float16: 16-bit storage of "
                    "weights, momenta and activations, arithmetic in float32 (the fused model's "
                    "update is computed in float32 and rounded once)",
                    choices=("float32", "float64", "bfloat16", "float16"))
    rounding: str = _f("stochastic", "bfloat16 with the fused SGD: how updated weights are "
                       "stored; stochastic (unbiased, see gated_ops.SGDConfig) or nearest (small "
                       "updates are lost)", choices=("stochastic", "nearest"))
    threads: int = _f(0, "CPU threads of torch (0: torch's default); on a busy machine 1 can be "
                         "several times faster than oversubscribed cores")
    # -- data ---------------------------------------------------------------------------------
    data_dir: str | None = _f(None, "root to search for the data first (see experiments.data)")
    download: bool = _f(False, "download the data set if it is not found")
    verify_data: bool = _f(True, "require the canonical sizes and MD5s (tests with small "
                                 "synthetic files turn this off)")
    max_precompute_gb: float = _f(8.0, "cifar10: keep the K rotated copies of the data on the "
                                       "device if they fit in this many GB, else rotate per batch")
    # -- output, checkpoints ------------------------------------------------------------------
    out: str = _f("experiments/runs/kpath", "output directory: one sub-directory per run")
    checkpoint_every: float = _f(600.0, "checkpoint interval in checkpoint_unit "
                                        "(0: only at the end)")
    checkpoint_unit: str = _f("seconds", "unit of checkpoint_every", choices=("seconds", "steps"))
    progress: bool = _f(True, "progress bar on stderr")
    stop_after_steps: int | None = _f(
        None, "testing: raise SimulatedKill after this many steps of this process, without "
              "saving (as if the process were killed)")

    def __post_init__(self) -> None:
        if isinstance(self.lookahead, bool):  # configs from before it had three values
            self.lookahead = "auto" if self.lookahead else "false"
        choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(self)
                   if "choices" in f.metadata}
        checks = {
            name: all(v in allowed for v in (value if isinstance(value, list) else [value]))
            for name, allowed in choices.items() for value in [getattr(self, name)]}
        checks |= {
            "K": self.K >= 1, "batch_size": self.batch_size >= 1, "epochs": self.epochs >= 0,
            "eval_every": self.eval_every >= 1, "max_replicas": self.max_replicas >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            raise ValueError(f"KPathConfig: invalid {values}")
        if self.cuda_graph and (self.model != "fused" or not self.fused_sgd):
            raise ValueError("cuda_graph: needs --model fused --fused-sgd true")


def paper_mnist() -> KPathConfig:
    """The authors' MNIST grid: 9 N x 2 H x 6 gains x 2 seeds = 216 runs, 1000 epochs each."""
    return KPathConfig(dataset="mnist", K=100, Ns=list(range(10, 100, 10)), hiddens=[128, 1024],
                       gains=[10, 1, 0.1, 0.01, 0.001, 0.0001], seeds=[1, 2],
                       max_replicas=54, out="experiments/runs/paper_mnist")


def paper_cifar10() -> KPathConfig:
    """The authors' CIFAR-10 grid: K=40 rotations, 7 N x 2 H x 6 gains x 2 seeds = 168 runs
    (on raw pixels: the authors' preprocessed inputs are not rebuilt, see experiments.data)."""
    return dataclasses.replace(paper_mnist(), dataset="cifar10", K=40, Ns=list(range(5, 40, 5)),
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


def smoke() -> KPathConfig:
    """Tiny, for tests: seconds on a CPU."""
    return KPathConfig(dataset="mnist", K=3, Ns=[1, 2], gains=[0.1, 1.0], hidden=8, lr=0.05,
                       batch_size=4, epochs=2, max_steps_per_epoch=6, eval_samples=40,
                       eval_batch_size=16, device="cpu", checkpoint_every=4,
                       checkpoint_unit="steps", progress=False, out="experiments/runs/smoke")


PRESETS: dict[str, Callable[[], KPathConfig]] = {
    "paper_mnist": paper_mnist, "paper_cifar10": paper_cifar10, "quick": quick, "smoke": smoke}


# -- argparse from the dataclass ----------------------------------------------------------------
def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(s: str) -> Any:
        return None if s.strip().lower() == "none" else parse(s)
    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def _argument(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: int, float, str, bool, X | None, list[X]."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        kw = _argument(inner[0])
        kw["type"] = _optional(kw["type"])
        return kw
    if origin is list:
        return {"type": _argument(args[0])["type"], "nargs": "*"}
    if annotation is bool:
        return {"type": _parse_bool, "metavar": "BOOL"}
    return {"type": annotation}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.kpath",
        description="The k-path experiment of 'The Neural Race Reduction' (GDLN.md section 2). "
                    "--preset sets the defaults; the other options override it.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named configuration applied before the other options (default: none)")
    hints = typing.get_type_hints(KPathConfig)
    for f in dataclasses.fields(KPathConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {default})",
                       choices=f.metadata.get("choices"), **_argument(hints[f.name]))
    return p


def parse_args(argv: list[str] | None = None) -> KPathConfig:
    """KPathConfig from the command line: the preset (or the defaults), then explicit options."""
    ns = vars(build_parser().parse_args(argv))
    preset = ns.pop("preset")
    base = PRESETS[preset]() if preset else KPathConfig()
    # An explicit scalar (--N 3) replaces the preset's grid axis (Ns) unless that is given too.
    for scalar, axis in _GRID_AXES.items():
        if scalar in ns and axis not in ns:
            ns[axis] = []
    return dataclasses.replace(base, **ns)


# scalar option -> the grid list that takes precedence over it when non-empty
_GRID_AXES = {"N": "Ns", "seed": "seeds", "gain": "gains", "mode": "modes", "hidden": "hiddens"}
