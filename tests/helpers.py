"""Checks shared by the test files of several backends (CPU, the CUDA kernels on a GPU or their
emulation, Triton): each takes the backend's op namespace or device and asserts one property.
The shape table, sample inputs and the tolerance rule, shared with the benchmarks, are in
``gated_ops.testing``."""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from gated_ops.testing import (Case, _random_table, _wider, kpath_tables,  # noqa: F401
                               make_inputs)

def gradcheck_pathway(case: Case, device: str = "cpu", backend: str = "auto") -> bool:
    """float64 gradcheck of pathway_matmul w.r.t. every input the case has."""
    from gated_ops import pathway_matmul

    inp = make_inputs(case, dtype=torch.float64, device=device)
    plan = case.table.plan(device)
    names = [n for n in ("x", "weight", "bias", "gate") if inp[n] is not None]

    def f(*args: Tensor) -> Tensor:
        kw = dict(zip(names, args))
        return pathway_matmul(kw["x"], kw["weight"], plan, kw.get("bias"), kw.get("gate"),
                              backend=backend)
    return torch.autograd.gradcheck(f, tuple(inp[n] for n in names))


def check_ce_special_values(gated_cross_entropy, device: str) -> None:
    """A device backend's gated cross-entropy on NaN, +inf and tied logits against the
    reference, and its loss for a gate row summing to zero: NaN (the CPU kernel raises there
    instead; a device kernel cannot without a host synchronisation)."""
    import math

    from gated_ops.reference import gated_cross_entropy_ref

    logits = torch.zeros(1, 3, 3, 4, device=device)
    logits[0, 1, 0, 2] = float("nan")
    logits[0, 2, 1, 0] = float("inf")
    target = torch.tensor([[[0, 1, 3], [2, 0, 0], [1, 0, 0]]], device=device)
    gate = torch.ones(1, 3, device=device)
    loss, path_loss, correct = gated_cross_entropy(logits, target, gate)
    ref = gated_cross_entropy_ref(logits, target, gate)
    assert math.isnan(loss.item()) and math.isnan(ref[0].item())
    assert torch.equal(path_loss.isnan(), ref[1].isnan())
    assert torch.equal(correct, ref[2])  # ties: the first maximum; a NaN counts as the maximum
    loss, _, _ = gated_cross_entropy(logits[:, :1], target[:, :1], gate[:, :1] * 0)
    assert math.isnan(loss.item())


def check_strided_ce_logits(device: str, dtype: torch.dtype, C: int = 6,
                            backend: str = "auto") -> None:
    """(R, I, J, B, C) logits read in place (the k-path decoder's output (R*I, B, J*C) viewed
    without a copy) give the same loss, path losses, counts and gradients, bit for bit, as the
    same values copied to (R, I*J, B, C); the gradient keeps the logits' strides."""
    import gated_ops

    R, I, J, B = 2, 3, 4, 5
    g = torch.Generator().manual_seed(4)
    out = (3 * torch.randn(R * I, B, J * C, generator=g)).to(device, dtype).requires_grad_()
    l5 = out.view(R, I, B, J, C).permute(0, 1, 3, 2, 4)
    l4 = l5.detach().reshape(R, I * J, B, C).requires_grad_()
    target = torch.randint(0, C, (R, I * J, B), generator=g).to(device)
    gate = (torch.rand(R, I * J, generator=g) < 0.5).to(device, dtype)
    gate[:, 0] = 1
    w = torch.randn(R, I * J, generator=g).to(device, dtype)
    a = gated_ops.gated_cross_entropy(l5, target, gate, backend=backend)
    b = gated_ops.gated_cross_entropy(l4, target, gate, backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    (ga,) = torch.autograd.grad(a[0].sum() + (a[1] * w).sum(), out)
    (gb,) = torch.autograd.grad(b[0].sum() + (b[1] * w).sum(), l4)
    assert ga.is_contiguous()  # the permuted gradient is the decoder output's layout
    assert torch.equal(ga.view(R, I, B, J, C).permute(0, 1, 3, 2, 4).reshape(R, I * J, B, C), gb)
    ns = torch.ops.gated_ops if backend == "auto" else torch.ops.gated_ops_triton
    torch.library.opcheck(ns.gated_cross_entropy, (l5.detach().requires_grad_(), target, gate))


def opcheck_pathway_ops(ns, case: Case, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        opcheck_context=contextlib.nullcontext) -> None:
    """``torch.library.opcheck`` of every op of namespace ``ns`` that returns a tensor (the fake
    kernels against the real ones: shapes, strides, dtypes; the autograd registration), on the
    case's inputs laid out as models hand them over: x cut from a wider tensor, a (P, B) gate
    that is a router's (B, P) output transposed, grad_y cut from a wider batch, grad_z and
    x_next from wider rows (inside ``opcheck_context()``)."""
    inp = make_inputs(case, dtype=dtype, device=device, noncontiguous=True, transposed_gate=True)
    plan = case.table.plan(device)
    x_grad = inp["x"]  # (a leaf view: strided, requiring grad)
    x, w, b, g = (None if v is None else v.detach() for v in inp.values())
    pc = (plan.paths, plan.csr, list(plan.layout))
    S, M, B, Do = x.shape[0], w.shape[0], x.shape[1], w.shape[1]
    gen = torch.Generator().manual_seed(3)
    gy = _wider(torch.randn(plan.num_dst, B, Do, generator=gen).to(device, dtype), dim=1)
    dz = _wider(torch.randn(plan.z_shape(B, Do), generator=gen).to(device, dtype))
    x_next = _wider(torch.randn(S, B + 1, x.shape[2], generator=gen).to(device, dtype))
    assert not (x.is_contiguous() or gy.is_contiguous() or dz.is_contiguous())
    with opcheck_context():
        torch.library.opcheck(ns.pathway_matmul, (x_grad, w, b, g, *pc))
        torch.library.opcheck(ns.pathway_grad_z, (gy, g, *pc, S, M))
        torch.library.opcheck(ns.pathway_grad_x, (dz, w, *pc, S, B))
        torch.library.opcheck(ns.pathway_grad_weight, (dz, x, *pc, M, Do))
        torch.library.opcheck(ns.pathway_grad_bias, (dz, *pc, S, M, Do))
        if g is not None:
            torch.library.opcheck(ns.pathway_grad_gate, (gy, x, w, b, g, *pc))
            if hasattr(ns, "pathway_grad_x_gate"):
                torch.library.opcheck(ns.pathway_grad_x_gate, (gy, x, w, b, g, *pc))
        torch.library.opcheck(ns.pathway_sgd_lookahead_.default, (
            dz, x, w.contiguous(), None, *pc, 0.1, 0.0, 0.0, False, -1, x_next))


def opcheck_ce_ops(ns, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   opcheck_context=contextlib.nullcontext) -> None:
    """``torch.library.opcheck`` of ``ns.gated_cross_entropy`` and its backward on logits of
    every layout the kernels take: contiguous, the k-path decoder's (R, I, J, B, C) strided view
    (the gradient keeps its strides), classes not contiguous (cut from a wider tensor, or
    stored before the batch: read from a contiguous copy, and so is the gradient laid out) and
    a batch cut from a wider one."""
    R, I, J, B, C = 2, 2, 3, 4, 5
    gen = torch.Generator().manual_seed(5)
    out = torch.randn(R * I, B, J * C, generator=gen).to(device, dtype)
    target = torch.randint(0, C, (R, I * J, B), generator=gen).to(device)
    gate = torch.rand(R, I * J, generator=gen).to(device, dtype) + 0.5
    flat = torch.randn(R, I * J, B, C, generator=gen).to(device, dtype)
    layouts = {"contiguous": flat, "kpath_view": out.view(R, I, B, J, C).permute(0, 1, 3, 2, 4),
               "strided_classes": _wider(flat), "strided_batch": _wider(flat, dim=2),
               "classes_outer": flat.transpose(2, 3).contiguous().transpose(2, 3)}
    grad_loss = torch.randn(R, generator=gen).to(device, dtype)
    grad_path_loss = torch.randn(R, I * J, generator=gen).to(device, dtype)
    for logits in layouts.values():
        with opcheck_context():
            torch.library.opcheck(ns.gated_cross_entropy,
                                  (logits.detach().requires_grad_(), target, gate))
            _, _, _, lse = ns.gated_cross_entropy(logits, target, gate)
            torch.library.opcheck(ns.gated_cross_entropy_backward,
                                  (grad_loss, grad_path_loss, logits, target, gate, lse))


def check_ce_backward_missing_grads(ns, device: str, dtype: torch.dtype,
                                    opcheck_context=contextlib.nullcontext) -> None:
    """``ns.gated_cross_entropy_backward`` with grad_loss or grad_path_loss None (an output
    nobody differentiates, as autograd hands it) equals the call with zeros in its place, bit for
    bit; both None give an exactly zero gradient; opcheck passes with the Nones (run inside
    ``opcheck_context()``)."""
    R, P, B, C = 2, 7, 3, 5
    g = torch.Generator().manual_seed(6)
    logits = (3 * torch.randn(R, P, B, C, generator=g)).to(device, dtype)
    target = torch.randint(0, C, (R, P, B), generator=g).to(device)
    gate = (torch.rand(R, P, generator=g) < 0.5).to(device, dtype)
    gate[:, 0] = 1
    gl = torch.randn(R, generator=g).to(device, dtype)
    gp = torch.randn(R, P, generator=g).to(device, dtype)
    _, _, _, lse = ns.gated_cross_entropy(logits, target, gate)

    def bwd(a, b):
        return ns.gated_cross_entropy_backward(a, b, logits, target, gate, lse)
    assert torch.equal(bwd(gl, None), bwd(gl, torch.zeros_like(gp)))
    assert torch.equal(bwd(None, gp), bwd(torch.zeros_like(gl), gp))
    none = bwd(None, None)
    assert torch.equal(none, torch.zeros_like(none))
    assert not torch.equal(bwd(gl, None), none)  # (the gradients above are not all zero)
    with opcheck_context():
        torch.library.opcheck(ns.gated_cross_entropy_backward,
                              (None, gp, logits, target, gate, lse))


def check_ce_backward_rejects_bad_input(ns, device: str) -> None:
    """``ns.gated_cross_entropy_backward`` called directly (not after its forward, which checks
    target and gate) with one bad argument raises, naming it: every backend checks the backward's
    arguments as its forward's, since it reads them through raw pointers."""
    R, P, B, C = 2, 3, 4, 5
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(R, P, B, C, generator=g).to(device)
    target = torch.randint(0, C, (R, P, B), generator=g).to(device)
    gate = torch.ones(R, P, device=device)
    _, _, _, lse = ns.gated_cross_entropy(logits, target, gate)
    good = dict(grad_loss=torch.ones(R, device=device), grad_path_loss=None, target=target,
                gate=gate, lse=lse)
    bad = [("target", target.int()), ("target", target[:, :2]), ("gate", gate.double()),
           ("gate", gate[:, :2]), ("lse", lse.double()), ("lse", lse[..., :2]),
           ("grad_loss", torch.ones(R + 1, device=device)),
           ("grad_loss", torch.ones(R, device=device, dtype=torch.float64)),
           ("grad_path_loss", torch.ones(R, P + 1, device=device)),
           ("grad_path_loss", torch.ones(R, P, device=device, dtype=torch.float16))]
    if device != "cpu":
        bad += [(name, good[name].cpu()) for name in ("target", "gate", "lse", "grad_loss")]
    for name, value in bad:
        a = dict(good, **{name: value})
        try:
            ns.gated_cross_entropy_backward(a["grad_loss"], a["grad_path_loss"], logits,
                                            a["target"], a["gate"], a["lse"])
        except (RuntimeError, ValueError) as e:
            assert str(e).startswith(f"{name}: expected") or f"\n{name}: expected" in str(e), \
                f"{name} {tuple(value.shape)} {value.dtype} {value.device}: {e}"
        else:
            raise AssertionError(f"{name} {tuple(value.shape)} {value.dtype} {value.device}: "
                                 "accepted")


def check_layer_sgd_with_bias(ns, device: str, dtype: torch.dtype = torch.float32,
                              opcheck_context=contextlib.nullcontext) -> None:
    """``ns.pathway_sgd_`` / ``ns.pathway_sgd_lookahead_`` given the layer's bias step the
    weight, its momentum, the bias and its momentum bit for bit as the weight op followed by
    ``ns.pathway_bias_sgd_`` (with their own rounding seeds, the same step counter), for a
    skinny blocked plan (the k-path encoders), a wide one (K * B rows past the skinny kernels:
    the cuBLAS gradient on CUDA) and a grouped one; opcheck passes with the bias arguments
    (inside ``opcheck_context()``). A refused bias leaves the weight untouched."""
    from gated_ops import make_plan

    g = torch.Generator().manual_seed(11)
    bf16 = dtype == torch.bfloat16
    tables = {"skinny": (kpath_tables(3)["encoder"], 4, "auto"),
              "wide": (kpath_tables(10)["hidden"], 8, "auto"),
              "grouped": (_random_table(7, 3, 3, 4, seed=2), 3, "grouped")}
    for name, (tab, B, layout) in tables.items():
        plan = make_plan(tab.src, tab.wgt, tab.dst, num_sources=tab.num_sources,
                         num_weights=tab.num_weights, num_dst=tab.num_dst, layout=layout,
                         device=device)
        S, M, Di, Do = tab.num_sources, tab.num_weights, 6, 5

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)
        x, x_next, dz = rnd(S, B, Di), rnd(S, B, Di), rnd(*plan.z_shape(B, Do))
        w0, wb0, b0, bb0 = rnd(M, Do, Di), rnd(M, Do, Di), rnd(M, Do), rnd(M, Do)
        step = torch.tensor([5], device=device)
        seeds = (3, 4) if bf16 else (-1, -1)
        lay = list(plan.layout)
        common = (0.05, 0.9, 0.01, False, seeds[0])
        for lookahead in (False, True):
            w1, wb1, b1, bb1 = w0.clone(), wb0.clone(), b0.clone(), bb0.clone()
            w2, wb2, b2, bb2 = w0.clone(), wb0.clone(), b0.clone(), bb0.clone()
            if lookahead:
                z1 = ns.pathway_sgd_lookahead_(dz, x, w1, wb1, plan.paths, plan.csr, lay,
                                               *common, x_next, step, b1, bb1, seeds[1])
                z2 = ns.pathway_sgd_lookahead_(dz, x, w2, wb2, plan.paths, plan.csr, lay,
                                               *common, x_next, step)
                assert torch.equal(z1, z2), (name, "Z_next")
            else:
                ns.pathway_sgd_(dz, x, w1, wb1, plan.paths, plan.csr, lay, *common, step, b1, bb1,
                                seeds[1])
                ns.pathway_sgd_(dz, x, w2, wb2, plan.paths, plan.csr, lay, *common, step)
            ns.pathway_bias_sgd_(dz, b2, bb2, plan.paths, plan.csr, lay, S, M, *common[:4],
                                 seeds[1], step)
            for what, a, b in (("weight", w1, w2), ("momentum", wb1, wb2), ("bias", b1, b2),
                               ("bias momentum", bb1, bb2)):
                assert torch.equal(a, b), (name, lookahead, what)
            assert not torch.equal(b1, b0), (name, "the bias did not move")
        # a bad bias is refused before the weight moves
        w1 = w0.clone()
        for bad, bbuf in ((rnd(M, Do + 1), bb0.clone()), (b0.clone(), None)):
            try:
                ns.pathway_sgd_(dz, x, w1, wb0.clone(), plan.paths, plan.csr, lay, *common, step,
                                bad, bbuf, seeds[1])
            except (RuntimeError, ValueError) as e:
                assert "bias: expected" in str(e) or "momentum_buffer: expected" in str(e), e
            else:
                raise AssertionError(f"{name}: a bad bias was accepted")
            assert torch.equal(w1, w0), (name, "the weight moved on a refused call")
        if name == "skinny":
            with opcheck_context():
                torch.library.opcheck(ns.pathway_sgd_, (
                    dz, x, w0.clone(), wb0.clone(), plan.paths, plan.csr, lay, *common, step,
                    b0.clone(), bb0.clone(), seeds[1]))


def autocast_kpath_step(backend: str = "auto", fused: bool = False):
    """One k-path step (K=3, R=2, CPU) in a bfloat16 autocast region and the same step without
    it, from the same weights and batch, each followed by its backward (and, with ``fused``, its
    fused SGD update, lr 0.1). Returns (net, ref, loss, loss_ref): the autocast net and loss,
    then the plain ones."""
    import copy

    from experiments.kpath_net import KPathNet, kpath_gate
    from gated_ops import SGDConfig

    K, R, B, D, H, C = 3, 2, 4, 16, 8, 5
    torch.manual_seed(0)
    net = KPathNet(K, D, H, C, replicas=R, backend=backend)
    if fused:
        net.fuse_sgd(SGDConfig(lr=0.1))
    ref = copy.deepcopy(net)
    xk, target = torch.randn(R * K, B, D), torch.randint(0, C, (R, K * K, B))
    gate = kpath_gate(K, 2).reshape(1, K * K).expand(R, -1).contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = net.loss(xk, target, gate)
    loss.sum().backward()
    loss_ref, _, _ = ref.loss(xk, target, gate)
    loss_ref.sum().backward()
    return net, ref, loss, loss_ref


class _OpCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("gated_ops"):
            self.calls[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def op_calls() -> Iterator[Counter]:
    """Counts the calls of every gated_ops op (any backend's namespace) within this context, by
    op name, as the kernels see them: below autograd and torch.func's transforms (a vmapped
    call that PyTorch runs sample by sample counts once per sample)."""
    mode = _OpCalls()
    with mode:
        yield mode.calls


