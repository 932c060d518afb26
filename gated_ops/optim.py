"""The fused SGD ops: a layer's weight gradient and torch.optim.SGD's step in one kernel (and,
with the lookahead, the next step's forward from the stepped weight), apart from the matmul and
loss ops (:mod:`gated_ops.ops`). The schemas are declared once in the C++ library
(``define_schemas``); this module adds their Python functions, fake kernels and the composite
lookahead for devices without a fused kernel. ``GatedPathwayLinear.fuse_sgd`` is how a model
uses them (docs/design.md, "The fused SGD").

These functions change ``weight``, ``bias`` and the momentum buffers in place and bump their
version counters, so autograd refuses a graph that saved them before the step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import _op_namespace
from .plan import PathwayPlan, z_shape

__all__ = ["pathway_sgd_", "pathway_sgd_lookahead_", "pathway_bias_sgd_"]

_ops = torch.ops.gated_ops


def _bump(*tensors: Tensor | None) -> None:
    """In-place changes made by a kernel, told to autograd (the ops' C++ kernels write through
    raw pointers; the dispatcher does not bump counters for them)."""
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def pathway_sgd_(
    grad_z: Tensor,
    x: Tensor,
    weight: Tensor,
    momentum_buffer: Tensor | None,
    plan: PathwayPlan,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    rounding_seed: int = -1,
    rounding_step: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    bias_momentum_buffer: Tensor | None = None,
    bias_rounding_seed: int = -1,
) -> None:
    """Fused weight gradient + SGD step, in place (grad_W never stored for skinny blocks).

    ``grad_z`` is the gradient of the pathways' pre-gate outputs (``pathway_grad_z``). Equal to
    computing grad_W with ``pathway_grad_weight`` and stepping torch.optim.SGD (dampening 0)
    whose momentum buffer starts at zero (``reference.sgd_momentum_ref``). 16-bit weights and
    buffers: the step is computed in float32 and rounded once when stored; with
    ``rounding_seed >= 0`` (bfloat16 weights; CPU, CUDA and Triton, the same bits) the weight
    is rounded stochastically (``reference.round_stochastic_bf16``: the seed should change
    every step), the buffer to nearest.

    ``rounding_step`` (an int64 tensor of one element on the weight's device) makes the seed of
    this step ``reference.rounding_seed_at(rounding_seed, step)``, the step read by the kernel
    when it runs, not on the host: the caller advances the counter on the device
    (``step.add_(1)``), so the seed costs no host synchronisation and a step captured in a
    CUDA graph draws new bits at every replay.

    ``bias`` (M, D_out), with ``bias_momentum_buffer`` and ``bias_rounding_seed``: the layer's
    bias is stepped too, bit for bit as :func:`pathway_bias_sgd_` would step it (same ``lr``,
    ``momentum``, ``weight_decay``, ``nesterov`` and ``rounding_step``). On CUDA its blocks run
    in the weight update's launch: a layer's whole SGD step is one kernel (two with cuBLAS's
    weight gradient).
    """
    _ops.pathway_sgd_(grad_z, x, weight, momentum_buffer, plan.paths, plan.csr,
                      list(plan.layout), lr, momentum, weight_decay, nesterov, rounding_seed,
                      rounding_step, bias, bias_momentum_buffer, bias_rounding_seed)
    _bump(weight, momentum_buffer, bias, bias_momentum_buffer)


def pathway_sgd_lookahead_(
    grad_z: Tensor,
    x: Tensor,
    weight: Tensor,
    momentum_buffer: Tensor | None,
    plan: PathwayPlan,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    rounding_seed: int = -1,
    *,
    x_next: Tensor,
    backend: str = "auto",
    rounding_step: Tensor | None = None,
    bias: Tensor | None = None,
    bias_momentum_buffer: Tensor | None = None,
    bias_rounding_seed: int = -1,
) -> Tensor:
    """:func:`pathway_sgd_`, then the next step's forward from the updated weight: returns
    Z_next, every pathway's pre-gate output ``x_next[src_p] @ weight[wgt_p]^T`` without bias,
    in Z's layout (``plan.z_shape(B_next, D_out)``; for a plan with ``z_is_y``, the layer's
    output before its bias, as ``(T, B_next, D_out)`` after a ``view``).

    For blocked plans with at most 8 rows per block in both batches (the k-path encoders) the
    forward is fused into the update, so the weight is read from memory once for both: on the
    CPU's skinny kernels (float32, bfloat16) each group of updated rows is dotted with x_next
    while in cache, bit for bit the update of :func:`pathway_sgd_` followed by the forward; on
    CUDA in the update kernel's epilogue (each weight tile's share of Z_next, the tiles' partial
    sums then added in a fixed order: deterministic, equal to the forward to float rounding).
    The Triton backend (``backend="triton"``) fuses it in its update kernel too (each new
    weight tile times the next batch, the column tiles' shares summed in a fixed order).
    Elsewhere (other plans, dtypes and batch sizes) it is those two ops one after the other.
    ``bias``: stepped too, as in :func:`pathway_sgd_` (Z_next stays without bias).
    """
    z = _op_namespace(backend).pathway_sgd_lookahead_(
        grad_z, x, weight, momentum_buffer, plan.paths, plan.csr, list(plan.layout), lr,
        momentum, weight_decay, nesterov, rounding_seed, x_next, rounding_step, bias,
        bias_momentum_buffer, bias_rounding_seed)
    _bump(weight, momentum_buffer, bias, bias_momentum_buffer)
    return z


def _compute_z(ns, x: Tensor, weight: Tensor, paths: Tensor, layout) -> Tensor:
    """Z (the pre-gate pathway outputs, without bias) from a namespace's ops and PyTorch:
    blocked plans as one bmm over views, grouped ones per pathway (the fallback of
    pathway_sgd_lookahead_ on devices without its fused kernel)."""
    _, n, s0, ns_, m0, nm, _ = layout
    B, D_out = x.shape[1], weight.shape[1]
    if n > 0:
        xb = x[s0:s0 + n * ns_].reshape(n, ns_ * B, x.shape[2])
        wb = weight[m0:m0 + n * nm].reshape(n, nm * D_out, weight.shape[2])
        return torch.bmm(xb, wb.transpose(1, 2)).reshape(n * ns_ * B, nm * D_out)
    src, wgt, zrow = paths[0], paths[1], paths[3]
    z = x.new_empty(paths.shape[1] * B, D_out)
    zp = torch.bmm(x.index_select(0, src), weight.index_select(0, wgt).transpose(1, 2))
    z.view(-1, B, D_out).index_copy_(0, zrow, zp)
    return z


def _sgd_lookahead_composite(ns):
    def impl(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum, weight_decay,
             nesterov, rounding_seed, x_next, rounding_step=None, bias=None,
             bias_momentum_buffer=None, bias_rounding_seed=-1):
        ns.pathway_sgd_(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum,
                        weight_decay, nesterov, rounding_seed, rounding_step, bias,
                        bias_momentum_buffer, bias_rounding_seed)
        return _compute_z(ns, x_next, weight, paths, layout)
    return impl


def pathway_bias_sgd_(
    grad_z: Tensor,
    bias: Tensor,
    momentum_buffer: Tensor | None,
    plan: PathwayPlan,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    rounding_seed: int = -1,
    rounding_step: Tensor | None = None,
) -> None:
    """The bias's share of the fused SGD step, in place: ``pathway_grad_bias`` (accumulated in
    float32 for 16-bit storage, not rounded) then torch.optim.SGD's step (dampening 0), one
    kernel on CUDA. Equal to ``sgd_momentum_ref(bias, grad_bias, momentum_buffer, ...)``;
    16-bit biases, ``rounding_seed`` and ``rounding_step`` as in :func:`pathway_sgd_`."""
    _ops.pathway_bias_sgd_(grad_z, bias, momentum_buffer, plan.paths, plan.csr,
                           list(plan.layout), plan.num_sources, plan.num_weights, lr, momentum,
                           weight_decay, nesterov, rounding_seed, rounding_step)
    _bump(bias, momentum_buffer)


def register_sgd_parts(ns: str) -> None:
    """Fake kernels of the fused SGD ops of ``torch.ops.<ns>`` and the composite lookahead
    (the update, then the forward) for devices without a fused kernel for it."""
    ops = getattr(torch.ops, ns)

    def fake(name):
        return torch.library.register_fake(f"{ns}::{name}")

    @fake("pathway_sgd_")
    def _(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum, weight_decay,
          nesterov, rounding_seed=-1, rounding_step=None, bias=None, bias_momentum_buffer=None,
          bias_rounding_seed=-1):
        return None

    @fake("pathway_sgd_lookahead_")
    def _(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum, weight_decay,
          nesterov, rounding_seed, x_next, rounding_step=None, bias=None,
          bias_momentum_buffer=None, bias_rounding_seed=-1):
        return x_next.new_empty(z_shape(layout, paths.shape[1], x_next.shape[1],
                                        weight.shape[1]))

    # devices without a kernel for it: the two ops in turn
    torch.library.impl(f"{ns}::pathway_sgd_lookahead_", "CompositeExplicitAutograd")(
        _sgd_lookahead_composite(ops))

    @fake("pathway_bias_sgd_")
    def _(grad_z, bias, momentum_buffer, paths, csr, layout, num_sources, num_weights, lr,
          momentum, weight_decay, nesterov, rounding_seed=-1, rounding_step=None):
        return None

