"""Shared by tests and benchmarks: the curated shape table, sample inputs, the tolerance rule.

One table so that tests and benchmarks cannot drift apart.
"""
from __future__ import annotations

import contextlib
import importlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .plan import PathwayPlan, make_plan

__all__ = [
    "Table", "Case", "SHAPES", "kpath_tables", "replicate", "make_inputs", "assert_close",
    "tolerance", "cuda_emulation", "kernel_census", "RoutedCase", "ROUTED_SHAPES",
    "make_routed_inputs", "force_kernel", "KERNEL_CHOICES",
    "parse_kernel_choices",
]


@dataclass(frozen=True)
class Table:
    """A pathway table: pathway p reads src[p], uses weight wgt[p], adds into dst[p]."""

    src: tuple[int, ...]
    wgt: tuple[int, ...]
    dst: tuple[int, ...]
    num_sources: int
    num_weights: int
    num_dst: int

    def plan(self, device: torch.device | str = "cpu", layout: str = "auto") -> PathwayPlan:
        return make_plan(self.src, self.wgt, self.dst, num_sources=self.num_sources,
                         num_weights=self.num_weights, num_dst=self.num_dst, device=device,
                         layout=layout)

    @property
    def num_paths(self) -> int:
        return len(self.src)


def kpath_tables(K: int) -> dict[str, Table]:
    """The three layers of the paper's k-path network (docs/math.md section 3) as pathway tables.

    encoder: K sources (one input transformation each) -> K weights -> K hidden activations.
    hidden: one weight shared by the K pathways.
    decoder: every hidden activation i through every decoder j: destination i*K + j.
    """
    r = tuple(range(K))
    pairs = [(i, j) for i in range(K) for j in range(K)]
    return {
        "encoder": Table(r, r, r, K, K, K),
        "hidden": Table(r, (0,) * K, r, K, 1, K),
        "decoder": Table(tuple(i for i, _ in pairs), tuple(j for _, j in pairs),
                         tuple(range(K * K)), K, K, K * K),
    }


def replicate(t: Table, R: int) -> Table:
    """R independent replicas of a table: disjoint sources, weights and destinations."""
    def rep(v: tuple[int, ...], n: int) -> tuple[int, ...]:
        return tuple(r * n + i for r in range(R) for i in v)
    return Table(rep(t.src, t.num_sources), rep(t.wgt, t.num_weights), rep(t.dst, t.num_dst),
                 R * t.num_sources, R * t.num_weights, R * t.num_dst)


def _random_table(P: int, S: int, M: int, T: int, seed: int) -> Table:
    g = torch.Generator().manual_seed(seed)
    return Table(*(tuple(torch.randint(0, n, (P,), generator=g).tolist()) for n in (S, M, T)),
                 S, M, T)


@dataclass(frozen=True)
class Case:
    """One row of the shape table."""

    name: str
    table: Table
    batch: int
    d_in: int
    d_out: int
    gate: str = "sample"  # "none", "path" (P,), "sample" (P, B)
    bias: bool = True
    gate_off: tuple[int, ...] = ()  # pathways whose gate is zero for the whole batch
    large: bool = False  # the paper's sizes: fewer dtype/backend combinations in tests


_KP = kpath_tables(100)
_K4 = kpath_tables(4)

SHAPES: list[Case] = [
    Case("tiny_grouped", _random_table(7, 3, 2, 4, seed=0), 2, 3, 5),
    Case("odd_encoder", kpath_tables(3)["encoder"], 5, 13, 7),
    # ns*B = 11 rows (two row groups of the skinny float32 forward), D_in = 37 (vector + tail)
    Case("skinny_encoder", kpath_tables(3)["encoder"], 11, 37, 5),
    Case("odd_decoder", kpath_tables(3)["decoder"], 3, 7, 11, gate="path"),
    # the one-pathway-per-destination epilogue's other compiled cases: no bias, with and
    # without a gate
    Case("decoder_no_bias", kpath_tables(3)["decoder"], 3, 7, 11, gate="none", bias=False),
    Case("encoder_no_bias", kpath_tables(3)["encoder"], 4, 9, 6, gate="path", bias=False),
    # Z is y (blocked, one pathway per destination in Z's order), ungated, no bias: no epilogue
    Case("hidden_plain", kpath_tables(3)["hidden"], 4, 6, 5, gate="none", bias=False),
    Case("one_pathway", Table((0,), (0,), (0,), 1, 1, 1), 4, 6, 3),
    Case("gated_off", _random_table(6, 3, 3, 3, seed=1), 4, 5, 6, gate_off=(2,)),
    Case("empty_batch", kpath_tables(3)["hidden"], 0, 4, 5),
    Case("no_pathways", Table((), (), (), 2, 2, 3), 3, 4, 5),
    Case("orphan_destination", Table((0, 1, 1), (0, 1, 0), (0, 0, 2), 2, 2, 4), 3, 4, 5),
    Case("moe", Table((0,) * 4, (0, 1, 2, 3), (0,) * 4, 1, 4, 1), 6, 8, 5),
    Case("replicas_hidden", replicate(_K4["hidden"], 3), 2, 5, 5, gate="none"),
    Case("replicas_decoder", replicate(_K4["decoder"], 2), 2, 5, 3, gate="none", bias=True),
    # shared weights over K * B = 80 rows (past the skinny tiles): y written by one GEMM (with
    # its bias) / by a bmm over the replicas without bias
    Case("hidden_wide", kpath_tables(10)["hidden"], 8, 6, 5, gate="none"),
    Case("replicas_hidden_wide", replicate(kpath_tables(10)["hidden"], 2), 8, 6, 5, gate="none",
         bias=False),
    Case("duplicate_pairs", Table((0, 0, 1), (1, 1, 0), (0, 1, 1), 2, 2, 2), 3, 4, 3),
    Case("paper_encoder", _KP["encoder"], 8, 784, 128, gate="none", large=True),
    Case("paper_hidden", _KP["hidden"], 8, 128, 128, gate="none", large=True),
    Case("paper_decoder", _KP["decoder"], 8, 128, 10, gate="none", large=True),
    Case("cifar_encoder", kpath_tables(40)["encoder"], 8, 3072, 128, gate="none", large=True),
]


def make_inputs(case: Case, dtype: torch.dtype = torch.float64, device: str = "cpu",
                seed: int = 0, noncontiguous: bool = False, requires_grad: bool = True,
                transposed_gate: bool = False) -> dict[str, Tensor | None]:
    """x, weight, bias, gate for a case; with ``noncontiguous``, each is a strided slice; with
    ``transposed_gate``, a (P, B) gate is the transpose of a (B, P) tensor (a router's output,
    ``logits.softmax(-1).t()``)."""
    g = torch.Generator().manual_seed(seed)
    t = case.table
    B, P = case.batch, t.num_paths

    def make(*shape: int, scale: float = 1.0) -> Tensor:
        if noncontiguous:  # (the values of a draw twice as wide, every other one)
            v = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)
            v = v[..., ::2]
        else:
            v = torch.randn(*shape, generator=g, dtype=torch.float64)
        # (the arithmetic and the cast return contiguous tensors, whatever v's strides)
        return (v * scale).to(device=device, dtype=dtype)

    def lay_out(v: Tensor) -> Tensor:
        # cut from a wider tensor: last-dim stride 2, made last (any copy would undo it)
        return _wider(v) if noncontiguous else v

    x = lay_out(make(t.num_sources, B, case.d_in))
    weight = lay_out(make(t.num_weights, case.d_out, case.d_in, scale=case.d_in ** -0.5))
    bias = lay_out(make(t.num_weights, case.d_out)) if case.bias else None
    gate = None
    if case.gate != "none":
        per_sample = case.gate == "sample"
        gate = make(B, P).t() if per_sample and transposed_gate else make(P, B) if per_sample \
            else make(P)
        if case.gate_off:
            gate[list(case.gate_off)] = 0
        gate = lay_out(gate.t()).t() if per_sample and transposed_gate else lay_out(gate)
    out = {"x": x, "weight": weight, "bias": bias, "gate": gate}
    for v in out.values():
        if v is not None:
            v.requires_grad_(requires_grad)
    return out


@dataclass(frozen=True)
class RoutedCase:
    """One row of the routed shape table: a plan, and per sample k slots naming pathways.

    ``slots``: "topk" (k distinct pathways per sample, as a router's top-k), "unused" (some
    slots -1, a variable number per sample), "one" (every slot on pathway 0), "dup" (a pathway
    named twice in some rows), "all" (k = P: every pathway, the dense op)."""

    name: str
    table: Table
    batch: int
    k: int
    d_in: int
    d_out: int
    slots: str = "topk"
    bias: bool = True
    gate: bool = True
    large: bool = False


_MOE4 = Table((0,) * 4, (0, 1, 2, 3), (0,) * 4, 1, 4, 1)
_MOE8 = Table((0,) * 8, tuple(range(8)), (0,) * 8, 1, 8, 1)

ROUTED_SHAPES: list[RoutedCase] = [
    RoutedCase("moe_top2", _MOE4, 6, 2, 8, 5),
    RoutedCase("moe_top1", _MOE8, 9, 1, 7, 6),
    RoutedCase("moe_all_experts", _MOE4, 5, 4, 6, 3, slots="all"),  # k = E: the dense op
    RoutedCase("moe_unused_slots", _MOE8, 7, 3, 5, 4, slots="unused"),
    RoutedCase("moe_one_expert", _MOE4, 6, 1, 5, 4, slots="one"),  # the others never chosen
    RoutedCase("moe_duplicates", _MOE4, 5, 2, 4, 6, slots="dup"),
    RoutedCase("moe_no_tokens", _MOE4, 0, 2, 4, 3),
    RoutedCase("moe_no_bias_no_gate", _MOE8, 6, 2, 9, 5, bias=False, gate=False),
    RoutedCase("grouped_table", _random_table(9, 3, 4, 3, seed=2), 5, 3, 6, 4),
    RoutedCase("grouped_unused", _random_table(7, 2, 3, 4, seed=3), 6, 2, 5, 3, slots="unused"),
    RoutedCase("replicas_moe", replicate(_MOE4, 3), 4, 2, 6, 5),
    RoutedCase("kpath_decoder", kpath_tables(3)["decoder"], 4, 3, 7, 5),
    RoutedCase("moe_paper_mlp", _MOE8, 64, 2, 128, 96, large=True),
]


def make_routed_inputs(case: RoutedCase, dtype: torch.dtype = torch.float64,
                       device: str = "cpu", seed: int = 0, requires_grad: bool = True
                       ) -> dict[str, Tensor | None]:
    """x, weight, bias, idx (B, k) int64, gate (B, k) of a routed case, on ``device``."""
    t, B, k = case.table, case.batch, case.k
    P = len(t.src)
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    x = make(t.num_sources, B, case.d_in)
    weight = make(t.num_weights, case.d_out, case.d_in, scale=case.d_in ** -0.5)
    bias = make(t.num_weights, case.d_out) if case.bias else None
    if case.slots == "all":
        idx = torch.arange(P).repeat(B, 1)
    elif case.slots == "one":
        idx = torch.zeros(B, k, dtype=torch.int64)
    else:
        idx = torch.stack([torch.randperm(P, generator=g)[:k] for _ in range(B)]) if B else \
            torch.zeros(0, k, dtype=torch.int64)
        if case.slots == "unused" and B:
            idx[torch.rand(B, k, generator=g) < 0.4] = -1
        if case.slots == "dup" and B:
            idx[::2, 1] = idx[::2, 0]
    gate = torch.rand(B, k, generator=g, dtype=torch.float64).add(0.5).to(device, dtype) \
        if case.gate else None
    out = {"x": x, "weight": weight, "bias": bias, "idx": idx.to(device), "gate": gate}
    for name in ("x", "weight", "bias", "gate"):
        if out[name] is not None:
            out[name].requires_grad_(requires_grad)
    return out


def _wider(t: Tensor, dim: int = -1) -> Tensor:
    """t's values in a view cut from a wider tensor (every other element along ``dim``)."""
    d = dim % t.dim()
    shape = list(t.shape)
    shape[d] *= 2
    view = t.new_zeros(shape).unflatten(d, (t.shape[d], 2)).select(d + 1, 0)
    return view.copy_(t)


def tolerance(ref64: Tensor, plain: Tensor) -> float:
    """The house tolerance (flash-attention's rule; docs/design.md).

    A backend's max error against the float64 reference may be at most twice the max error of
    plain PyTorch computing the same thing in the backend's dtype (``plain``), plus a floor of
    4 eps * max(|ref|, 1) (plain PyTorch can be exact by luck).
    """
    base = (plain.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = 4 * torch.finfo(plain.dtype).eps * max(scale, 1.0)
    return 2 * base + floor


def assert_close(name: str, out: Tensor, ref64: Tensor, plain: Tensor) -> None:
    """Assert ``out`` is within :func:`tolerance` of ``ref64``, naming the tensor on failure."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if not ref64.numel():
        return
    ref64 = ref64.to(out.device)
    err = (out.double() - ref64).abs().max().item()
    tol = tolerance(ref64, plain.to(out.device))
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


# ATen operations that launch no kernel on a GPU (views, metadata, allocation, host-side work),
# and composites whose work their children do (for kernel_census).
_NO_KERNEL = frozenset(
    "aten::" + n for n in (
        "empty", "empty_like", "empty_strided", "view", "reshape", "_reshape_alias",
        "as_strided", "permute", "expand", "unsqueeze", "squeeze", "select", "slice", "t",
        "transpose", "detach", "detach_", "alias", "lift_fresh", "resize_", "resolve_conj",
        "resolve_neg", "_unsafe_view", "result_type", "item", "_local_scalar_dense",
        "is_nonzero", "set_", "contiguous", "flatten", "unflatten", "split", "chunk", "narrow",
        "expand_as", "view_as", "unbind", "to", "_to_copy", "ones_like", "zeros_like", "zeros",
        "ones", "full", "new_empty", "new_empty_strided", "new_zeros", "clone", "matmul",
        "linear", "_has_compatible_shallow_copy_type", "record_stream", "scalar_tensor"))
EMULATED_KERNEL = "cuda_emu_kernel: "
# GEMMs: one cuBLAS(Lt) kernel on a GPU whatever they run on the CPU (addmm there first copies
# its bias into the output: on a GPU cuBLASLt adds it in the GEMM's epilogue)
_GEMM = frozenset("aten::" + n for n in ("mm", "bmm", "addmm", "baddbmm"))


def kernel_census(fn) -> list[tuple[str, str]]:
    """The kernels a GPU would launch for ``fn()`` run on the emulated CUDA kernels (inside
    :func:`cuda_emulation`, or a model with ``backend="cuda_emu"``), in launch order, without a
    GPU: each emulated launch (csrc/cuda_emu/cuda_emu.h makes every ``GATED_LAUNCH`` a profiler
    event) and each ATen operation that launches a kernel (the cuBLAS GEMMs, elementwise ops,
    fills, copies; an operation counts only where none of its children does). Returns (kernel,
    the nearest enclosing gated_ops op or autograd node, or "") pairs. Counts, not times: the
    emulation says nothing about speed (benchmarks/kernel_census.py prints a step's list)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)

    def launches(e) -> bool:
        return e.name.startswith(EMULATED_KERNEL) or (
            e.name.startswith("aten::") and e.name not in _NO_KERNEL)

    def context(e) -> str:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith(("gated_ops", "autograd::engine::evaluate_function: ")):
                return p.name.removeprefix("autograd::engine::evaluate_function: ")
            p = p.cpu_parent
        return ""

    out = []
    for e in events:
        if not launches(e):
            continue
        if e.name.startswith(EMULATED_KERNEL):
            out.append((e.name[len(EMULATED_KERNEL):], context(e)))
            continue
        if e.name not in _GEMM and any(launches(c) for c in e.cpu_children):
            continue
        p, inside_kernel = e.cpu_parent, False
        while p is not None and not inside_kernel:  # host work of an emulated launch or GEMM
            inside_kernel = p.name.startswith(EMULATED_KERNEL) or p.name in _GEMM
            p = p.cpu_parent
        if not inside_kernel:
            out.append((e.name, context(e)))
    return out


class _CudaEmulation(TorchDispatchMode):
    """Sends every ``torch.ops.gated_ops.*`` call to ``torch.ops.gated_ops_cudaemu.*`` (the same
    schema: the CUDA kernels emulated on the CPU), below autograd; counts the emulated calls by
    op (direct calls of gated_ops_cudaemu included)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("gated_ops", "gated_ops_cudaemu"):
            name = func.__name__.split(".")[0]
            self.calls[name] += 1
            func = getattr(getattr(torch.ops.gated_ops_cudaemu, name), func._overloadname)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_emulation() -> Iterator[Counter]:
    """Within this context, gated_ops' ops on CPU tensors run the CUDA kernels
    (csrc/cuda/) emulated on the CPU (gated_ops.cuda_emu) instead of the CPU
    kernels: the same calls, modules and training steps as on a GPU, without one, so
    tests/test_cuda.py runs in CI. Yields the count of emulated calls per op. Autograd, the
    fused-SGD layers and the k-path loss are unchanged: only the registered ops are swapped, at
    the dispatcher, for this thread."""
    from . import cuda_emu  # noqa: F401  (raises with the build command if not built)
    mode = _CudaEmulation()
    with mode:
        yield mode.calls


# The kernel choices a test or a benchmark may force (csrc/kernel_choice.h: otherwise the code
# makes each one itself, from the CPU's features, the device and the plan): the values each
# takes, and the int the compiled op gated_ops::_force_kernel takes for each.
KERNEL_CHOICES: dict[str, dict] = {
    "cpu_lanes": {8: 8, 16: 16},  # the skinny kernels' vector width (8: where AVX2 runs)
    "cpu_skinny": {False: 0, True: 1},  # our skinny kernels (True) or BLAS, blocked plans
    "cpu_widen_gemm": {False: 0, True: 1},  # 16-bit GEMMs in float32 on widened operands
    "cpu_lookahead": {"grouped": 0, "onepass": 1},  # the 16-lane fused lookahead's form
    "cuda_prefetch": {False: 0, True: 1},  # L2 prefetch in the skinny forward and fused SGD
    "cuda_ce": {"rows": 0, "thread": 1},  # few-class CE forward: a thread per row or per path
    "cuda_routed_gemm": {"tiled": 0, "grouped_mm": 1},  # routed GEMM: ours or at::_grouped_mm
}


def _kernel_choice_namespaces(names) -> list:
    """The libraries whose choices these are: the compiled ops, and for the CUDA choices the
    CUDA kernels' CPU emulation too where it is built (it keeps its own choices)."""
    namespaces = [torch.ops.gated_ops]
    if any(n.startswith("cuda_") for n in names):
        try:
            importlib.import_module("gated_ops._cuda_emu")
        except ImportError:
            pass
        else:
            namespaces.append(torch.ops.gated_ops_cudaemu)
    return namespaces


@contextlib.contextmanager
def force_kernel(**choices) -> Iterator[None]:
    """Within this context the kernels named are the ones chosen, whatever the machine would pick
    (tests that run both sides of a choice on one machine and demand the same bits; benchmark
    A/Bs): e.g. ``force_kernel(cpu_lanes=8, cpu_lookahead="onepass")``, ``force_kernel(
    cpu_skinny=False)``, ``force_kernel(cuda_ce="thread")``; None leaves a choice to the code.
    The values are those of :data:`KERNEL_CHOICES`. On exit every choice is what it was before
    (contexts nest). The choices are process-wide, not per thread, and are read when a kernel is
    launched (a captured CUDA graph keeps the kernels it recorded)."""
    settings = []
    for name, value in choices.items():
        if name not in KERNEL_CHOICES:
            raise ValueError(f"force_kernel: unknown kernel choice {name!r} (known: "
                             f"{', '.join(KERNEL_CHOICES)})")
        allowed = KERNEL_CHOICES[name]
        if value is not None and value not in allowed:
            raise ValueError(f"force_kernel: {name} takes one of {list(allowed)} or None, got "
                             f"{value!r}")
        settings.append((name, -1 if value is None else allowed[value]))
    previous = []  # (namespace, name, the setting before), in the order they were set
    try:
        # below any dispatch mode: cuda_emulation() would send the op to its own namespace
        with _disable_current_modes():
            for ns in _kernel_choice_namespaces([name for name, _ in settings]):
                for name, value in settings:
                    previous.append((ns, name, ns._force_kernel(name, value)))
        yield
    finally:
        with _disable_current_modes():
            for ns, name, value in reversed(previous):
                ns._force_kernel(name, value)


def parse_kernel_choices(items: list[str]) -> dict:
    """``["cuda_prefetch=1", "cpu_lookahead=onepass"]`` (a command line's NAME=VALUE words) as
    :func:`force_kernel`'s keywords: a VALUE of digits is an int (1 / 0 for the on / off
    choices), any other a name. Raises ValueError naming a malformed word."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"kernel choice {item!r}: expected NAME=VALUE, e.g. cuda_prefetch=1 "
                             f"(names: {', '.join(KERNEL_CHOICES)})")
        out[name] = int(value) if value.lstrip("-").isdigit() else value
    return out
