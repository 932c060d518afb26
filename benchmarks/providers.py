"""The benchmark cases and every provider's way of running them.

k-path providers (docs/math.md section 3; all start from the weights of one KPathNet and see the
same batch, so they compute the same function):

    naive          LoopKPath, the paper-style Python loop over nn.Linear modules, one model per
                   replica, + torch.optim.SGD (defaults)
    torch          BatchedKPath (baddbmm), the best plain PyTorch, + torch.optim.SGD(foreach=True)
    torch_compile  the torch provider's step under torch.compile (Inductor); compile time is
                   excluded by the warm-up
    torch_graph    the torch provider's full step captured in one CUDA graph (CUDA only)
    reference      the spec: reference.pathway_matmul_ref per layer with the plan tables of
                   testing.kpath_tables/replicate, gated_cross_entropy_ref, torch.optim.SGD
    cpu            KPathNet on the CPU kernels; step = SGD fused into backward (fuse_sgd)
    cuda           KPathNet on the CUDA kernels, the same code
    cuda_graph     the cuda provider's work replayed from CUDA graphs (step: the whole fused step,
                   input transformation to SGD update, in one graph)
    triton         KPathNet(backend="triton"): the same model on gated_ops.triton (needs it
                   and CUDA); step = SGD fused into backward, as cpu / cuda

Modes: ``forward`` (forward + gated loss, no grad, from transformed inputs), ``backward``
(autograd backward of a prepared forward, gradients written, not applied), ``step`` (input
transformation on device, forward, loss, backward, SGD momentum 0.9 lr 1e-4, the provider's
best way). The MoE layer case has ``forward``, ``backward`` and ``full`` (forward + backward).

A provider that cannot run on this machine raises :class:`Unavailable` with the reason; the
benchmark skips with it. Nothing is ever substituted.
"""
from __future__ import annotations

import abc

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gated_ops import GatedPathwayLinear, SGDConfig
from experiments.baselines import BatchedKPath, LoopKPath
from experiments.kpath_net import KPathNet, kpath_gate, transform_batch
from gated_ops.reference import gated_cross_entropy_ref, pathway_matmul_ref
from gated_ops.testing import kpath_tables, replicate

PROVIDERS = ("naive", "torch", "torch_compile", "torch_graph", "reference", "cpu", "cuda",
             "cuda_graph", "triton")
LR, MOMENTUM = 1e-4, 0.9  # the authors' optimizer (docs/math.md section 3)


class Unavailable(Exception):
    """The provider (or this mode of it) cannot run here; the message says why."""


# ------------------------------------------------------------------------------------------------
# Cases. ``size`` is the CPU cost class used as a marker (see README.md): tiny (< 10 ms),
# small (a step well under 0.1 s on 2 CPU cores), medium (~0.1-1 s), large (seconds, or GBs).
@dataclass(frozen=True)
class KPathCase:
    name: str
    dataset: str  # "mnist": K pixel permutations; "cifar": K rotations by 270*k/K degrees
    K: int
    B: int
    D: int
    H: int
    C: int = 10
    R: int = 1
    size: str = "small"
    group: str = "paper"  # paper | large_batch | replicas | tiny | bf16
    modes: tuple[str, ...] = ("forward", "backward", "step")
    dtype: str = "float32"  # bfloat16: weights, momenta, activations stored in 16 bits

    @property
    def shape(self) -> dict[str, int]:
        return {"R": self.R, "K": self.K, "B": self.B, "D": self.D, "H": self.H, "C": self.C}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class MoECase:
    name: str
    E: int  # experts
    B: int  # tokens
    Di: int
    Do: int
    top_k: int = 2  # router: softmax over experts, top-k kept (others gate 0), renormalised
    size: str = "small"
    group: str = "moe"
    modes: tuple[str, ...] = ("forward", "backward", "full")

    @property
    def shape(self) -> dict[str, int]:
        return {"E": self.E, "B": self.B, "Di": self.Di, "Do": self.Do, "top_k": self.top_k}


KPATH_CASES = [
    KPathCase("tiny-K4-B2-D16-H8", "mnist", 4, 2, 16, 8, size="tiny", group="tiny"),
    KPathCase("mnist-K100-B8-H128", "mnist", 100, 8, 784, 128, size="small"),
    KPathCase("mnist-K100-B8-H1024", "mnist", 100, 8, 784, 1024, size="medium"),
    KPathCase("cifar-K40-B8-H128", "cifar", 40, 8, 3072, 128, size="small"),
    KPathCase("cifar-K40-B8-H1024", "cifar", 40, 8, 3072, 1024, size="medium"),
    KPathCase("mnist-K100-B512-H128", "mnist", 100, 512, 784, 128, size="large",
              group="large_batch"),
    # R configurations of the K=100 H=128 model in one call; reported per replica as well.
    KPathCase("mnist-K100-B8-H128-R1", "mnist", 100, 8, 784, 128, R=1, size="small",
              group="replicas", modes=("step",)),
    KPathCase("mnist-K100-B8-H128-R8", "mnist", 100, 8, 784, 128, R=8, size="medium",
              group="replicas", modes=("step",)),
    KPathCase("mnist-K100-B8-H128-R54", "mnist", 100, 8, 784, 128, R=54, size="large",
              group="replicas", modes=("step",)),
    KPathCase("mnist-K100-B8-H1024-R6", "mnist", 100, 8, 784, 1024, R=6, size="large",
              group="replicas", modes=("step",)),
    # bfloat16 storage (fp32 arithmetic; ours: stochastic rounding of the update),
    # reported apart from float32, never in its place
    KPathCase("tiny-K4-B2-D16-H8-bf16", "mnist", 4, 2, 16, 8, size="tiny", group="tiny",
              modes=("step",), dtype="bfloat16"),
    KPathCase("mnist-K100-B8-H128-bf16", "mnist", 100, 8, 784, 128, size="small", group="bf16",
              modes=("step",), dtype="bfloat16"),
    KPathCase("mnist-K100-B8-H1024-bf16", "mnist", 100, 8, 784, 1024, size="medium",
              group="bf16", modes=("step",), dtype="bfloat16"),
]

MOE_CASES = [
    MoECase("moe-tiny-E4-B2-D16-8", 4, 2, 16, 8, size="tiny", group="tiny"),
    MoECase("moe-E8-B512-D256", 8, 512, 256, 256, size="small"),
    MoECase("moe-E8-B4096-D1024", 8, 4096, 1024, 1024, size="large"),
]


def in_smoke_set(case: KPathCase | MoECase, mode: str, provider: str) -> bool:
    """CI's smoke set: the tiny cases, every provider and mode, except torch_compile, which runs
    only its widest mode (step / full): each compiled mode is a separate trace of seconds."""
    return case.size == "tiny" and (provider != "torch_compile" or mode in ("step", "full"))


# ------------------------------------------------------------------------------------------------
# Where a provider runs, and whether it can.
def default_device(choice: str = "auto") -> torch.device:
    """The device of the device-agnostic providers: CUDA when present (or asked for), else CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise Unavailable("--bench-device cuda: no CUDA device")
    return torch.device(choice)


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("gated_ops::pathway_matmul", "CUDA")


def triton_ops():
    """The gated_ops.triton package, or :class:`Unavailable` saying what is missing."""
    if importlib.util.find_spec("gated_ops.triton") is None:
        raise Unavailable("no gated_ops.triton package (the Triton kernels are not written yet)")
    if not torch.cuda.is_available():
        raise Unavailable("Triton kernels need a CUDA device")
    import gated_ops.triton as t
    missing = [n for n in ("pathway_matmul", "gated_cross_entropy") if not hasattr(t, n)]
    if missing:
        raise Unavailable(f"gated_ops.triton has no {', '.join(missing)} (the public "
                          "functions this provider calls)")
    return t


def provider_device(provider: str, device_choice: str = "auto") -> torch.device:
    """The device ``provider`` runs on here, or :class:`Unavailable`."""
    if provider == "cpu":
        return torch.device("cpu")
    if provider in ("cuda", "cuda_graph", "triton", "torch_graph"):
        if provider == "triton":
            triton_ops()  # says what is missing: the module, CUDA or its entry points
        if not torch.cuda.is_available():
            raise Unavailable(f"{provider}: needs a CUDA device, none present")
        if provider in ("cuda", "cuda_graph") and not _has_cuda_kernels():
            raise Unavailable(f"{provider}: gated_ops was built without CUDA kernels "
                              "(no CUDA dispatch key for gated_ops::pathway_matmul)")
        return torch.device("cuda")
    if provider in ("naive", "torch", "torch_compile", "reference", "loop", "grouped_mm",
                    "dense", "gdln_dense", "gdln_routed"):
        return default_device(device_choice)
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# The k-path batch, prepared once on the device (input preparation is never timed).
def rotation_grid(K: int, n: int, side: int, device: torch.device) -> Tensor:
    """Sampling grid of K rotations by 270*k/K degrees for n images of side x side pixels.

    The affine map is experiments/data.py ``rotate_images``' (counter-clockwise about the centre,
    bilinear, zeros outside), for all K angles at once: one grid_sample per step instead of K.
    Returns (K*n, side, side, 2), angle-major.
    """
    thetas = []
    for k in range(K):
        a = math.radians(270.0 * k / K)
        c, s = math.cos(a), math.sin(a)
        thetas.append([[c, -s, 0.0], [s, c, 0.0]])  # square images: the h/w factors are 1
    theta = torch.tensor(thetas, device=device).repeat_interleave(n, 0)  # (K*n, 2, 3)
    return F.affine_grid(theta, [K * n, 1, side, side], align_corners=False)


class KPathData:
    """Batch (x, y), transformations, gate for one case; ``xk``/``target`` already transformed."""

    def __init__(self, case: KPathCase, device: torch.device, seed: int = 0):
        R, K, B, D, C = case.R, case.K, case.B, case.D, case.C
        g = torch.Generator().manual_seed(seed)
        self.case, self.device = case, device
        dt = case.torch_dtype
        self.y = torch.randint(0, C, (R, B), generator=g).to(device)
        self.maps = torch.stack([torch.randperm(C, generator=g) for _ in range(K)]).to(device)
        self.perms = self.grid = None
        if case.dataset == "mnist":
            self.x = torch.rand(R, B, D, generator=g).to(device, dt)  # pixels / 255
            self.perms = torch.stack([torch.randperm(D, generator=g) for _ in range(K)]).to(device)
        elif case.dataset == "cifar":
            side = math.isqrt(D // 3)
            if 3 * side * side != D:
                raise ValueError(f"cifar case: D = {D} is not 3 * side^2")
            self.x = torch.rand(R, B, 3, side, side, generator=g).to(device, dt)
            self.grid = rotation_grid(K, R * B, side, device).view(K, R * B, side, side, 2).to(dt)
        else:
            raise ValueError(f"dataset: expected 'mnist' or 'cifar', got {case.dataset!r}")
        self.gate = torch.stack([
            kpath_gate(K, max(1, K // 2), "N_plus_mod_permute", seed=r).flatten() for r in range(R)
        ]).to(device, dt)  # (R, K*K): the authors' gate, N = K/2 trained paths per encoder
        self.xk, self.target = self.transform(self.x, self.y)

    def transform(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(R, B, ...) batch -> xk (R*K, B, D), target (R, K*K, B) (None if y is None); on
        device, no host sync."""
        if self.perms is not None:
            return transform_batch(x, y, self.perms, self.maps)
        R, B, K = x.shape[0], x.shape[1], self.case.K
        imgs = x.reshape(1, R * B, *x.shape[2:]).expand(K, -1, -1, -1, -1).reshape(
            K * R * B, *x.shape[2:])
        grid = self.grid[:, :R * B].reshape(K * R * B, *self.grid.shape[2:])  # R may be a slice
        rot = F.grid_sample(imgs, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (K*R*B, 3, side, side)
        xk = rot.view(K, R, B, -1).transpose(0, 1)  # (R, K, B, D)
        return transform_batch(xk, y, None, self.maps)


# ------------------------------------------------------------------------------------------------
# Mode callables. A provider returns, per mode, (fn, setup): setup (or None) runs before each
# timed call, untimed, and returns fn's (args, kwargs) as pytest-benchmark's pedantic expects.
Fns = tuple[Callable, Callable | None]


class Provider(abc.ABC):
    """Shared mode logic over three provider hooks: infer(), objective(), step()."""

    name = "?"
    device: torch.device

    @abc.abstractmethod
    def infer(self):
        """Forward + loss under no_grad."""

    @abc.abstractmethod
    def objective(self) -> Tensor:
        """Forward + loss with grad, a scalar."""

    @abc.abstractmethod
    def grad_tensors(self) -> list[Tensor]:
        """The tensors whose .grad backward writes."""

    def step(self) -> None:
        raise Unavailable(f"{self.name}: no step mode for this case")

    def zero_grad(self) -> None:
        for t in self.grad_tensors():
            t.grad = None

    def fns(self, mode: str) -> Fns:
        if mode == "forward":
            def forward():
                with torch.no_grad():
                    return self.infer()
            return forward, None
        if mode == "backward":
            def setup():
                self.zero_grad()  # gradients written fresh, never accumulated
                return (self.objective(),), {}

            def backward(loss):
                loss.backward()
            return backward, setup
        if mode == "full":
            def full_setup():
                self.zero_grad()
                return (), {}

            def full():
                self.objective().backward()
            return full, full_setup
        if mode == "step":
            return self.step, None
        raise ValueError(f"mode: unknown {mode!r}")


class KPathProvider(Provider):
    """A model with ``.loss(xk, target, gate) -> (loss (R,), path_loss, correct)``."""

    def __init__(self, data: KPathData, model: nn.Module):
        self.data, self.model, self.device = data, model, data.device
        self.opt: torch.optim.Optimizer | None = None

    def loss(self, xk, target, gate):
        return self.model.loss(xk, target, gate)

    def infer(self):
        d = self.data
        return self.loss(d.xk, d.target, d.gate)

    def objective(self) -> Tensor:
        d = self.data
        return self.loss(d.xk, d.target, d.gate)[0].sum()

    def grad_tensors(self) -> list[Tensor]:
        return list(self.model.parameters())

    def step(self) -> None:
        d = self.data
        xk, target = d.transform(d.x, d.y)
        self.opt.zero_grad(set_to_none=True)
        self.loss(xk, target, d.gate)[0].sum().backward()
        self.opt.step()


class NaiveKPath(KPathProvider):
    """One LoopKPath per replica, each its own torch.optim.SGD: the R runs as separate jobs."""

    name = "naive"

    def __init__(self, data: KPathData, net: KPathNet):
        self.data, self.device = data, data.device
        self.models = [LoopKPath.from_kpath(net, r) for r in range(net.R)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)
                     for m in self.models]
        self.K = net.K

    def _replica(self, r: int, xk, target, gate):
        K = self.K
        return self.models[r].loss(xk[r * K:(r + 1) * K], target[r:r + 1], gate[r:r + 1])

    def infer(self):
        d = self.data
        return [self._replica(r, d.xk, d.target, d.gate) for r in range(len(self.models))]

    def objective(self) -> Tensor:
        d = self.data
        return sum(self._replica(r, d.xk, d.target, d.gate)[0].sum()
                   for r in range(len(self.models)))

    def grad_tensors(self) -> list[Tensor]:
        return [p for m in self.models for p in m.parameters()]

    def step(self) -> None:
        d = self.data
        for r, opt in enumerate(self.opts):
            xk, target = d.transform(d.x[r:r + 1], d.y[r:r + 1])
            opt.zero_grad(set_to_none=True)
            self.models[r].loss(xk, target, d.gate[r:r + 1])[0].sum().backward()
            opt.step()


class TorchKPath(KPathProvider):
    name = "torch"

    def __init__(self, data: KPathData, net: KPathNet):
        super().__init__(data, BatchedKPath.from_kpath(net))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM,
                                   foreach=True)


class TorchCompileKPath(TorchKPath):
    """The torch step under torch.compile: forward + loss (and the transform, in step mode) as one
    compiled graph whose backward AOTAutograd compiles too, and the optimizer step compiled
    separately (PyTorch's "compiling the optimizer" recipe). ``dynamic=False``: one graph per
    shape, as a training run sees one shape."""

    name = "torch_compile"

    def __init__(self, data: KPathData, net: KPathNet, backend: str = "inductor"):
        super().__init__(data, net)
        torch._dynamo.reset()  # fresh caches: no recompile limit or dynamic-shape carry-over
        self.backend = backend
        self._loss = torch.compile(self.model.loss, dynamic=False, backend=backend)
        d = self.data

        def step_objective(x, y):
            xk, target = d.transform(x, y)
            return self.model.loss(xk, target, d.gate)[0].sum()

        self._step_objective = torch.compile(step_objective, dynamic=False, backend=backend)
        opt = self.opt

        def opt_step():
            opt.step()

        self._opt_step = torch.compile(opt_step, backend=backend)

    def loss(self, xk, target, gate):
        return self._loss(xk, target, gate)

    def step(self) -> None:
        d = self.data
        self.opt.zero_grad(set_to_none=True)
        self._step_objective(d.x, d.y).backward()
        self._opt_step()


class ReferenceKPathNet(nn.Module):
    """The k-path network written with the spec op: one pathway_matmul_ref per layer over the
    replicated plan tables of gated_ops.testing, gated_cross_entropy_ref for the loss."""

    LAYERS = ("encoder", "hidden", "decoder")

    def __init__(self, net: KPathNet):
        super().__init__()
        self.K, self.R, self.C = net.K, net.R, net.C
        tables = kpath_tables(net.K)
        self.num_dst = {}
        for name, layer in zip(self.LAYERS, net.layers):
            t = replicate(tables[name], net.R)
            self.register_parameter(f"{name}_weight", nn.Parameter(layer.weight.detach().clone()))
            self.register_parameter(f"{name}_bias", nn.Parameter(layer.bias.detach().clone()))
            self.register_buffer(f"{name}_table",
                                 torch.tensor([t.src, t.wgt, t.dst], device=layer.weight.device))
            self.num_dst[name] = t.num_dst

    def _layer(self, name: str, x: Tensor) -> Tensor:
        src, wgt, dst = getattr(self, f"{name}_table")
        return pathway_matmul_ref(x, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"),
                                  None, src, wgt, dst, self.num_dst[name])

    def forward(self, xk: Tensor) -> Tensor:
        out = self._layer("decoder", self._layer("hidden", self._layer("encoder", xk)))
        return out.view(self.R, self.K * self.K, xk.shape[1], self.C)

    def loss(self, xk: Tensor, target: Tensor, gate: Tensor):
        return gated_cross_entropy_ref(self(xk), target, gate)


class ReferenceKPath(KPathProvider):
    name = "reference"

    def __init__(self, data: KPathData, net: KPathNet):
        super().__init__(data, ReferenceKPathNet(net))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)


class FusedKPath(KPathProvider):
    """KPathNet on the registered ops (CPU or CUDA kernels). In step mode the SGD update
    runs inside backward (fuse_sgd): no optimizer, no .grad tensors."""

    def __init__(self, data: KPathData, net: KPathNet, name: str, mode: str,
                 lookahead: bool | None = None):
        super().__init__(data, net)
        self.name = name
        if mode == "step":  # bfloat16: stochastic rounding (every backend has it; its cost:
            # GATED_OPS_BENCH_ROUNDING=nearest rounds to nearest instead, an A/B)
            sr = (net.encoder.weight.dtype == torch.bfloat16
                  and os.environ.get("GATED_OPS_BENCH_ROUNDING", "stochastic") != "nearest")
            net.fuse_sgd(SGDConfig(lr=LR, momentum=MOMENTUM, stochastic_rounding=sr))
        # The next batch's encoder forward inside this step's update (KPathNet.lookahead):
        # where the fused kernel is (CPU); elsewhere it would be the same two ops. The batch is
        # transformed one step ahead, so each step still does one transformation.
        # GATED_OPS_BENCH_LOOKAHEAD=0 / 1 forces (benchmarks/NOTES.md A/B).
        env = os.environ.get("GATED_OPS_BENCH_LOOKAHEAD")
        if lookahead is None:
            lookahead = env == "1" if env in ("0", "1") else (
                data.device.type == "cpu" and net.backend == "auto")
        self.lookahead = lookahead and mode == "step"
        self._next: tuple[Tensor, Tensor] | None = None
        self._enc: Tensor | None = None  # the lookahead's buffer: this step's encoder output

    def step(self) -> None:
        d = self.data
        if not self.lookahead:
            xk, target = d.transform(d.x, d.y)
            self.loss(xk, target, d.gate)[0].sum().backward()  # updates weights and biases
            return
        if self._next is None:
            self._next = d.transform(d.x, d.y)
            self._enc = self.model.prime_lookahead(self._next[0])
        xk, target = self._next
        self._next = d.transform(d.x, d.y)  # (the benchmark's batch is the same every step)
        # the encoder output read from the buffer, the update writing the next step's there
        self.model.loss(xk, target, d.gate, lookahead=(self._next[0], self._enc)
                        )[0].sum().backward()


# ------------------------------------------------------------------------------------------------
# CUDA graphs (torch_graph): capture on a side stream after warm-up, then replay.
def _warmup_on_side_stream(fn: Callable, n: int = 3) -> None:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


class GraphMixin:
    """Replaces a provider's mode callables by CUDA-graph replays of the same work.

    forward: the no-grad forward captured. backward: the forward and the backward captured as two
    graphs sharing a memory pool (as torch.cuda.make_graphed_callables does); setup replays the
    forward, the timed call replays the backward. step / full: the whole thing in one graph, the
    optimizer's momentum buffers and the grads created during warm-up (PyTorch's "whole network
    capture" recipe), zero_grad(set_to_none=True) before capture.
    """

    def fns(self, mode: str) -> Fns:
        if mode == "forward":
            def fwd():
                with torch.no_grad():
                    return self.infer()
            _warmup_on_side_stream(fwd)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._static_out = fwd()
            return g.replay, None
        if mode == "backward":
            tensors = self.grad_tensors()

            def fwd_bwd():
                torch.autograd.grad(self.objective(), tensors)
            _warmup_on_side_stream(fwd_bwd)
            gf, gb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(gf):
                loss = self.objective()
            with torch.cuda.graph(gb, pool=gf.pool()):
                self._static_grads = torch.autograd.grad(loss, tensors, retain_graph=True)

            def setup():
                gf.replay()
                return (), {}
            return gb.replay, setup
        if mode in ("step", "full"):
            def work():
                if mode == "step":
                    self.step()
                else:
                    self.objective().backward()
            _warmup_on_side_stream(work)
            self.zero_grad()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                work()
            return g.replay, None
        raise ValueError(f"mode: unknown {mode!r}")


class TorchGraphKPath(GraphMixin, TorchKPath):
    """The torch provider (BatchedKPath + SGD(foreach=True)) replayed from CUDA graphs."""

    name = "torch_graph"


class FusedGraphKPath(GraphMixin, FusedKPath):
    """The cuda provider (KPathNet on the CUDA kernels, SGD fused into backward) replayed from
    CUDA graphs: what a training loop with ``--cuda-graph true`` runs.

    With GATED_OPS_BENCH_LOOKAHEAD=1 the step uses the captured form of the lookahead, as the
    trainer's ``--lookahead true --cuda-graph true``: the encoder output in a static buffer
    that each step's update rewrites for the next batch (KPathNet.loss(..., lookahead=)), so
    the encoder weights are read once per step; the step then transforms two batches (this
    one, for the weight gradient, and the next). Off by default until measured on a GPU."""

    def __init__(self, data: KPathData, net: KPathNet, name: str, mode: str):
        super().__init__(data, net, name, mode,
                         lookahead=os.environ.get("GATED_OPS_BENCH_LOOKAHEAD") == "1")
        self._enc: Tensor | None = None

    def step(self) -> None:
        if not self.lookahead:
            return super().step()
        d = self.data
        if self._enc is None:  # primed once, before warm-up and capture (eagerly)
            self._enc = self.model.prime_lookahead(d.transform(d.x, None)[0])
        xk, target = d.transform(d.x, d.y)
        xk_next = d.transform(d.x, None)[0]  # (the benchmark's batch is the same every step)
        self.model.loss(xk, target, d.gate, lookahead=(xk_next, self._enc))[0].sum().backward()


def make_kpath(provider: str, case: KPathCase, mode: str, device: torch.device,
               compile_backend: str = "inductor") -> KPathProvider:
    """Build ``provider`` for ``case`` on ``device``: one KPathNet (seeded) whose weights every
    provider copies, and the batch."""
    torch.manual_seed(0)
    net = KPathNet(case.K, case.D, case.H, case.C, replicas=case.R, device=device,
                   dtype=case.torch_dtype, backend="triton" if provider == "triton" else "auto")
    data = KPathData(case, device)
    if provider == "naive":
        return NaiveKPath(data, net)
    if provider == "torch":
        return TorchKPath(data, net)
    if provider == "torch_compile":
        return TorchCompileKPath(data, net, compile_backend)
    if provider == "torch_graph":
        return TorchGraphKPath(data, net)
    if provider == "reference":
        return ReferenceKPath(data, net)
    if provider in ("cpu", "cuda"):
        return FusedKPath(data, net, provider, mode)
    if provider == "cuda_graph":
        return FusedGraphKPath(data, net, provider, mode)
    if provider == "triton":  # the same KPathNet code on gated_ops.triton (fused SGD too)
        return FusedKPath(data, net, provider, mode)
    raise ValueError(f"provider: unknown {provider!r}")


# ------------------------------------------------------------------------------------------------
# MoE layer: y[b] = sum_e gate[e, b] (x[b] W_e^T + bias_e); grads for x, W, bias and the gate.
class MoEData:
    def __init__(self, case: MoECase, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        E, B = case.E, case.B
        self.x = torch.randn(B, case.Di, generator=g).to(device).requires_grad_()
        probs = torch.softmax(torch.randn(E, B, generator=g), dim=0)
        top = probs.topk(min(case.top_k, E), dim=0)
        routed = torch.zeros(E, B).scatter_(0, top.indices, top.values)
        self.gate = (routed / routed.sum(0, keepdim=True)).to(device).requires_grad_()  # (E, B)
        self.grad_out = torch.randn(B, case.Do, generator=g).to(device)  # fixed upstream grad
        self.device = device


class MoEProvider(Provider):
    def __init__(self, data: MoEData, layer: GatedPathwayLinear):
        self.data, self.device = data, data.device
        self.weight, self.bias = layer.weight, layer.bias  # (E, Do, Di), (E, Do)

    @abc.abstractmethod
    def layer(self, x: Tensor, gate: Tensor) -> Tensor:
        """(B, Di), (E, B) -> (B, Do)."""

    def infer(self):
        return self.layer(self.data.x, self.data.gate)

    def objective(self) -> Tensor:
        # <y, grad_out>: backward starts from a fixed upstream gradient, as inside a network
        return (self.layer(self.data.x, self.data.gate) * self.data.grad_out).sum()

    def grad_tensors(self) -> list[Tensor]:
        return [self.data.x, self.data.gate, *self.parameters()]

    def parameters(self) -> list[Tensor]:
        return [self.weight, self.bias]


class NaiveMoE(MoEProvider):
    """A loop over experts of nn.Linear, gated sum: what a user writes first."""

    name = "naive"

    def __init__(self, data: MoEData, layer: GatedPathwayLinear):
        super().__init__(data, layer)
        E, Do, Di = layer.weight.shape
        self.experts = nn.ModuleList(nn.Linear(Di, Do) for _ in range(E)).to(data.device)
        with torch.no_grad():
            for e, lin in enumerate(self.experts):
                lin.weight.copy_(layer.weight[e])
                lin.bias.copy_(layer.bias[e])

    def parameters(self) -> list[Tensor]:
        return list(self.experts.parameters())

    def layer(self, x, gate):
        y = 0
        for e, lin in enumerate(self.experts):
            y = y + gate[e].unsqueeze(-1) * lin(x)
        return y


class TorchMoE(MoEProvider):
    """All experts in one baddbmm, gated sum as one einsum: the best plain PyTorch (dense)."""

    name = "torch"

    def __init__(self, data: MoEData, layer: GatedPathwayLinear):
        super().__init__(data, layer)
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def layer(self, x, gate):
        E = self.weight.shape[0]
        z = torch.baddbmm(self.bias.unsqueeze(1), x.expand(E, *x.shape),
                          self.weight.transpose(1, 2))  # (E, B, Do)
        return torch.einsum("eb,ebo->bo", gate, z)


class TorchCompileMoE(TorchMoE):
    name = "torch_compile"

    def __init__(self, data: MoEData, layer: GatedPathwayLinear, backend: str = "inductor"):
        super().__init__(data, layer)
        torch._dynamo.reset()
        self._compiled = torch.compile(super().layer, dynamic=False, backend=backend)
        self.backend = backend

    def layer(self, x, gate):
        return self._compiled(x, gate)


class TorchGraphMoE(GraphMixin, TorchMoE):
    name = "torch_graph"


class ReferenceMoE(TorchMoE):
    name = "reference"

    def __init__(self, data: MoEData, layer: GatedPathwayLinear):
        super().__init__(data, layer)
        self.plan = layer.plan

    def layer(self, x, gate):
        p = self.plan
        return pathway_matmul_ref(x.unsqueeze(0), self.weight, self.bias, gate, p.src, p.wgt,
                                  p.dst, p.num_dst)[0]


class FusedMoE(MoEProvider):
    def __init__(self, data: MoEData, layer: GatedPathwayLinear, name: str):
        super().__init__(data, layer)
        self.module, self.name = layer, name

    def layer(self, x, gate):
        return self.module(x.unsqueeze(0), gate)[0]


class FusedGraphMoE(GraphMixin, FusedMoE):
    """The cuda provider's MoE layer replayed from CUDA graphs."""

    name = "cuda_graph"


class TritonMoE(FusedMoE):
    def __init__(self, data: MoEData, layer: GatedPathwayLinear):
        super().__init__(data, layer, "triton")
        self.t = triton_ops()

    def layer(self, x, gate):
        m = self.module
        return self.t.pathway_matmul(x.unsqueeze(0), m.weight, m.plan, m.bias, gate)[0]


def make_moe(provider: str, case: MoECase, mode: str, device: torch.device,
             compile_backend: str = "inductor") -> MoEProvider:
    torch.manual_seed(0)
    layer = GatedPathwayLinear.mixture_of_experts(case.E, case.Di, case.Do, device=device)
    data = MoEData(case, device)
    if provider == "naive":
        return NaiveMoE(data, layer)
    if provider == "torch":
        return TorchMoE(data, layer)
    if provider == "torch_compile":
        return TorchCompileMoE(data, layer, compile_backend)
    if provider == "torch_graph":
        return TorchGraphMoE(data, layer)
    if provider == "reference":
        return ReferenceMoE(data, layer)
    if provider in ("cpu", "cuda"):
        return FusedMoE(data, layer, provider)
    if provider == "cuda_graph":
        return FusedGraphMoE(data, layer, "cuda_graph")
    if provider == "triton":
        return TritonMoE(data, layer)
    raise ValueError(f"provider: unknown {provider!r}")


def bench_params(cases, marks_of):
    """pytest params ``(case, mode, provider)`` for every mode and provider of ``cases``, with
    the case's marks (``marks_of(case)``), the provider's mark and ``smoke`` where it applies."""
    import pytest

    for case in cases:
        marks = marks_of(case)
        for mode in case.modes:
            for provider in PROVIDERS:
                extra = [getattr(pytest.mark, provider)]
                if in_smoke_set(case, mode, provider):
                    extra.append(pytest.mark.smoke)
                yield pytest.param(case, mode, provider, id=f"{case.name}-{mode}-{provider}",
                                   marks=marks + extra)


def bench_case(measure, bench_env, make: Callable, case, mode: str, provider: str,
               counts, extra_info: dict | None = None, per: int = 1) -> None:
    """The body of every benchmark: build ``make(provider, case, mode, device, backend)`` (skip
    with its reason if it cannot run here) and time its ``mode`` with the ``measure`` fixture,
    recording the case and provider in extra_info."""
    import pytest

    device = bench_env.device(provider)
    try:
        prov = make(provider, case, mode, device, bench_env.compile_backend)
        fn, setup = prov.fns(mode)
    except Unavailable as e:
        pytest.skip(str(e))
    info = {"provider": provider, "mode": mode, "case": case.name, "shape": case.shape,
            "size": case.size, "group": case.group, **(extra_info or {})}
    if getattr(case, "dtype", None) is not None:
        info.setdefault("dtype", str(case.dtype).replace("torch.", ""))  # picks the floor's peak
    if provider == "torch_compile":
        info["compile_backend"] = prov.backend
    measure(fn, setup, device, counts, info, per=per)


# ------------------------------------------------------------------------------------------------
# Sparse routing: one expert layer with top-k routing, y[t] = sum_j w[t, j] (x[t] W_e^T + b_e),
# e = idx[t, j]; gradients for x, the experts' weights and biases, and the routing weights.
ROUTED_PROVIDERS = ("loop", "grouped_mm", "dense", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class RoutedBenchCase:
    name: str
    T: int  # tokens
    D: int  # d_in = d_out
    E: int  # experts
    k: int  # top-k
    dtype: str = "float32"
    size: str = "small"
    modes: tuple[str, ...] = ("forward", "full")
    group: str = "routed"

    @property
    def shape(self) -> dict[str, int]:
        return {"T": self.T, "D": self.D, "E": self.E, "k": self.k}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _routed_cases() -> list[RoutedBenchCase]:
    cases = [RoutedBenchCase("routed-tiny-T8-D16-E4-k2", 8, 16, 4, 2, size="tiny")]
    for dtype in ("float32", "bfloat16"):
        for T, D in ((512, 256), (512, 1024), (4096, 256), (4096, 1024)):
            for E in (8, 64):
                for k in (1, 2):
                    work = T * D * D * k
                    size = "small" if work <= 512 * 256 * 256 * 2 else \
                        "medium" if work <= 4096 * 256 * 256 * 2 else "large"
                    tag = "" if dtype == "float32" else "-bf16"
                    cases.append(RoutedBenchCase(f"routed-T{T}-D{D}-E{E}-k{k}{tag}", T, D, E, k,
                                                 dtype, size))
    return cases


ROUTED_CASES = _routed_cases()


class RoutedData:
    def __init__(self, case: RoutedBenchCase, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        T, D, E, dt = case.T, case.D, case.E, case.torch_dtype
        self.x = torch.randn(T, D, generator=g).to(device, dt).requires_grad_()
        self.weight = (torch.randn(E, D, D, generator=g) * D ** -0.5).to(device, dt)
        self.bias = torch.zeros(E, D).to(device, dt)
        probs = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
        top = probs.topk(case.k, dim=-1)
        self.idx = top.indices.to(device)  # (T, k)
        self.w = (top.values / top.values.sum(-1, keepdim=True)).to(device, dt).requires_grad_()
        self.grad_out = torch.randn(T, D, generator=g).to(device, dt)
        self.device = device


class RoutedProvider(Provider):
    def __init__(self, data: RoutedData):
        self.data, self.device = data, data.device
        self.weight = nn.Parameter(data.weight.clone())
        self.bias = nn.Parameter(data.bias.clone())

    @abc.abstractmethod
    def layer(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        """(T, D), (T, k), (T, k) -> (T, D)."""

    def infer(self):
        d = self.data
        return self.layer(d.x, d.idx, d.w)

    def objective(self) -> Tensor:
        d = self.data
        return (self.layer(d.x, d.idx, d.w) * d.grad_out).sum()

    def grad_tensors(self) -> list[Tensor]:
        return [self.data.x, self.data.w, self.weight, self.bias]


class LoopRouted(RoutedProvider):
    """The expert loop a user writes: per expert, its tokens (nonzero), one GEMM, index_add_."""

    name = "loop"

    def __init__(self, data: RoutedData):
        super().__init__(data)
        # one parameter per expert, as nn.ModuleList([nn.Linear ...]) holds them: indexing one
        # (E, D, D) parameter would cost a zero-filled (E, D, D) gradient per expert in backward
        # (views of the base class's copies: the same values, no second copy of the bank)
        self.weights = [nn.Parameter(w) for w in self.weight.detach().unbind(0)]
        self.biases = [nn.Parameter(b) for b in self.bias.detach().unbind(0)]

    def layer(self, x, idx, w):
        y = torch.zeros(x.shape[0], self.weights[0].shape[0], dtype=x.dtype, device=x.device)
        for e, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                h = torch.addmm(bias, x[tok], weight.t())
                y.index_add_(0, tok, h * w[tok, slot].unsqueeze(-1))
        return y

    def grad_tensors(self) -> list[Tensor]:
        return [self.data.x, self.data.w, *self.weights, *self.biases]


class GroupedMMRouted(RoutedProvider):
    """Tokens sorted by expert through torch.nn.functional.grouped_mm (one grouped GEMM),
    weighted and summed back with index_add."""

    name = "grouped_mm"

    def __init__(self, data: RoutedData):
        super().__init__(data)
        if not hasattr(F, "grouped_mm"):
            raise Unavailable("grouped_mm: torch.nn.functional.grouped_mm is not in this torch")

    def layer(self, x, idx, w):
        T, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.weight.shape[0], dtype=torch.int32, device=x.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        tok = order // k
        h = F.grouped_mm(x[tok], self.weight.transpose(1, 2), offs=offs) + self.bias[flat[order]]
        h = h * w.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros(T, h.shape[1], dtype=x.dtype, device=x.device).index_add(0, tok, h)


class DenseRouted(RoutedProvider):
    """Our dense op: every token through every expert, the unrouted ones with gate 0."""

    name = "dense"

    def __init__(self, data: RoutedData):
        super().__init__(data)
        E, D = self.weight.shape[0], self.weight.shape[1]
        T = data.x.shape[0]
        if data.device.type == "cpu" and E * T * D * D > 8 * 4096 * 1024 * 1024:
            # E T D^2 of dense work: the E = 64, T = 4096, D = 1024 layer takes minutes a call
            raise Unavailable(f"dense: every token through all {E} experts at this size "
                              "takes minutes per call on a CPU")
        self.plan = GatedPathwayLinear.mixture_of_experts(E, 1, 1, device=data.device).plan

    def layer(self, x, idx, w):
        from gated_ops import pathway_matmul
        gate = torch.zeros(x.shape[0], self.weight.shape[0], dtype=x.dtype, device=x.device)
        gate = gate.scatter_add(1, idx, w).t()  # (E, T)
        return pathway_matmul(x.unsqueeze(0), self.weight, self.plan, self.bias, gate)[0]


class OursRouted(RoutedProvider):
    """gated_ops.routed_matmul: the slots grouped by expert once, one GEMM per expert, the
    weighted sum in the epilogue."""

    def __init__(self, data: RoutedData, name: str, backend: str = "auto"):
        super().__init__(data)
        self.name, self.backend = name, backend

    def layer(self, x, idx, w):
        from gated_ops import routed_matmul
        return routed_matmul(x, self.weight, idx, w, self.bias, backend=self.backend)


def make_routed(provider: str, case: RoutedBenchCase, mode: str, device: torch.device,
                compile_backend: str = "inductor") -> RoutedProvider:
    data = RoutedData(case, device)
    if provider == "loop":
        return LoopRouted(data)
    if provider == "grouped_mm":
        return GroupedMMRouted(data)
    if provider == "dense":
        return DenseRouted(data)
    if provider in ("cpu", "cuda"):
        return OursRouted(data, provider)
    if provider == "triton":
        return OursRouted(data, provider, backend="triton")
    raise ValueError(f"provider: unknown {provider!r}")


# ------------------------------------------------------------------------------------------------
# A GDLN with context gates (the paper's routing network, widened): one SGD step's forward and
# backward, dense (every pathway, gate 0 where off) against routed (only the active ones).
@dataclass(frozen=True)
class GDLNRoutingCase:
    name: str
    M: int  # input and output modules
    K: int  # trained output modules per input module
    H: int
    D: int
    items: int  # samples per context
    size: str = "small"
    modes: tuple[str, ...] = ("full",)
    group: str = "gdln"

    @property
    def shape(self) -> dict[str, int]:
        return {"M": self.M, "K": self.K, "H": self.H, "D": self.D, "items": self.items}


GDLN_ROUTING_CASES = [
    GDLNRoutingCase("routing-tiny-M3-H8", 3, 2, 8, 4, 2, size="tiny"),
    GDLNRoutingCase("routing-M7-K4-H512-D256-B896", 7, 4, 512, 256, 32, size="medium"),
]
GDLN_PROVIDERS = ("gdln_dense", "gdln_routed")


class GDLNRoutingProvider(Provider):
    def __init__(self, case: GDLNRoutingCase, device: torch.device, routed: bool):
        from experiments.routing_net import routing_network
        torch.manual_seed(0)
        self.name = "gdln_routed" if routed else "gdln_dense"
        self.routed, self.device = routed, device
        self.rn = routing_network(case.M, case.K, case.H, case.D, case.D, device=device)
        g = torch.Generator().manual_seed(1)
        X = torch.randn(case.items, case.D, generator=g).to(device)
        Y = torch.randn(case.items, case.D, generator=g).to(device)
        self.inputs, self.targets, self.gates = self.rn.batch(X, Y)

    def infer(self):
        return self.objective()

    def objective(self) -> Tensor:
        net = self.rn.net
        return net.loss(net(self.inputs, self.gates, routed=self.routed), self.targets,
                        self.gates)

    def grad_tensors(self) -> list[Tensor]:
        return list(self.rn.net.parameters())


def make_gdln_routing(provider: str, case: GDLNRoutingCase, mode: str, device: torch.device,
                      compile_backend: str = "inductor") -> GDLNRoutingProvider:
    return GDLNRoutingProvider(case, device, routed=provider == "gdln_routed")
