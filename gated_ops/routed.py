"""The routed (sparse) form of the pathway matmul: gates that are zero cost nothing.

Per sample b, k slots name active pathways ``idx[b, j]`` (int64 into the plan's pathways, -1 for
an unused slot) with gates ``gate[b, j]``. The result is the dense op's with the (P, B) gate that
holds ``gate[b, j]`` at pathway ``idx[b, j]`` and 0 elsewhere (``reference.routed_gate_ref``;
a pathway named twice in a row gets the sum), but the work follows the k active pathways: the
slots are grouped by weight once per call (:func:`make_route`, a counting sort on the device,
no host synchronisation on a GPU), one GEMM per weight runs over its slots' rows, and the gate
multiply and the sum back into the destinations run in the op's epilogue. The same grouping
serves the backward and, through :func:`routed_linear`'s grouped rows, both layers of an
expert MLP (:class:`gated_ops.MoE`).

Two forms:

* :func:`routed_pathway_matmul` on any plan: x (S, B, D_in) -> (T, B, D_out).
* :func:`routed_matmul`, the mixture-of-experts form in the ecosystem's conventions (tokens
  first, as ``nn.Linear``, scattermoe and the grouped GEMM libraries take it):
  x (T, D_in), weight (E, D_out, D_in), topk_idx (T, k), topk_weight (T, k) -> (T, D_out).

Defined behaviour: an expert no token chose gets a zero gradient; all tokens on one expert is
one GEMM; k = E equals the dense op; T = 0 gives an empty result; duplicate indices in a row
are summed. On the CPU an index out of [-1, P), a wrong dtype or a NaN routing weight raises an
error naming the argument; on a GPU the index and NaN checks would need a host synchronisation,
so they are not made: an out-of-range index is a device-side assert and a NaN weight gives NaN
outputs, as the dense op's NaN gate does.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .backends import _op_namespace
from .plan import PathwayPlan, make_plan
from .reference import routed_pathway_matmul_ref

__all__ = ["Route", "make_route", "routed_pathway_matmul", "routed_matmul", "routed_linear",
           "moe_plan", "slots_from_gate"]


class Route(NamedTuple):
    """The slots of one call grouped by weight (:func:`make_route`).

    idx: (B, k) int64 pathway per slot (-1: unused); table: the route table (int64, 2 N + M + 1
    entries for N = B k slots and M weights: the slots sorted by weight, its inverse, the
    groups' offsets; ``csrc/routed.h``); plan: the plan whose pathways idx names.
    """

    idx: Tensor
    table: Tensor
    plan: PathwayPlan

    @property
    def num_slots(self) -> int:
        return self.idx.numel()


_MOE_PLANS: dict = {}


def moe_plan(num_experts: int, device: torch.device | str = "cpu") -> PathwayPlan:
    """The mixture-of-experts plan: one source, ``num_experts`` weights summed into one
    destination (pathway e is expert e). Cached per size and device."""
    device = torch.device(device)
    key = (int(num_experts), device)
    plan = _MOE_PLANS.get(key)
    if plan is None:
        E = int(num_experts)
        plan = make_plan([0] * E, list(range(E)), [0] * E, num_sources=1, num_weights=E,
                         num_dst=1, device=device)
        _MOE_PLANS[key] = plan
    return plan


def make_route(idx: Tensor, plan: PathwayPlan, *, backend: str = "auto") -> Route:
    """Groups the slots of ``idx`` (B, k) by their pathway's weight: a stable counting sort on
    idx's device (no host synchronisation on a GPU). Build it once per call and pass it to
    every op that shares the routing (both layers of an expert MLP, the backward)."""
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
        raise ValueError(f"idx: expected a (B, k) int64 tensor of pathway indices, got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} of shape "
                         f"{tuple(getattr(idx, 'shape', ()))}")
    if plan.device != idx.device:
        raise ValueError(f"plan: its index tensors are on {plan.device}, idx is on "
                         f"{idx.device}; move the plan with plan.to(idx.device)")
    plan.check_unmodified()
    ns = _op_namespace("auto" if backend == "reference" else backend)
    return Route(idx, ns.pathway_route(idx, plan.paths, plan.num_weights), plan)


def slots_from_gate(gate: Tensor) -> tuple[Tensor, Tensor]:
    """The routed form of a dense (P, B) gate whose zeros mean "off": idx (B, k) and weights
    (B, k), with k the most pathways any sample has on, each sample's pathways in increasing
    order (unused slots -1, weight 0). ``routed_pathway_matmul(x, W, plan, *slots_from_gate(g))``
    equals ``pathway_matmul(x, W, plan, gate=g)``. Reading k is one host synchronisation."""
    if gate.dim() != 2:
        raise ValueError(f"gate: expected (P, B), got shape {tuple(gate.shape)}")
    on = (gate != 0).t()  # (B, P)
    k = int(on.sum(1).max()) if on.numel() else 0
    order = torch.sort(on.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    used = on.gather(1, order)
    idx = torch.where(used, order, torch.full_like(order, -1))
    weights = torch.where(used, gate.t().gather(1, order), torch.zeros((), dtype=gate.dtype,
                                                                       device=gate.device))
    return idx, weights


def routed_linear(x: Tensor, weight: Tensor, bias: Tensor | None, route: Route,
                  gate: Tensor | None = None, *, grouped_in: bool = False,
                  grouped_out: bool = False, backend: str = "auto") -> Tensor:
    """The building block: one routed layer over a :class:`Route`.

    Args:
        x: (S, B, D_in), or grouped rows (N, D_in) with ``grouped_in`` (one row per sorted slot:
            the output of a ``grouped_out`` call on the same route).
        weight: (M, D_out, D_in); bias: (M, D_out) or None.
        gate: (B, k) or None (ones); only when the output is combined (not ``grouped_out``).
    Returns:
        (T, B, D_out): each destination the gated sum of its slots' outputs; or, with
        ``grouped_out``, the grouped rows (N, D_out) before any gate (zero rows for unused
        slots), for an activation in between and a second ``grouped_in`` layer.
    """
    plan = route.plan
    if backend == "reference":
        raise ValueError("backend: 'reference' has no grouped layout; use "
                         "routed_pathway_matmul(..., backend='reference')")
    ns = _op_namespace(backend)
    y, _ = ns.routed_matmul(x, weight, bias, gate, route.idx, route.table, plan.paths,
                            plan.num_dst, grouped_in, grouped_out)
    return y


def _check_reference(x: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor,
                     gate: Tensor | None, plan: PathwayPlan) -> None:
    """The compiled kernels' refusals, in their words, for the reference backend."""
    if idx.dim() != 2 or idx.dtype != torch.int64:
        raise ValueError(f"idx: expected (B, k) int64 pathway indices, got {idx.dtype} of "
                         f"shape {tuple(idx.shape)}")
    if x.dim() != 3 or x.shape[0] != plan.num_sources or x.shape[1] != idx.shape[0]:
        raise ValueError(f"x: expected (S, B, D_in) with S = {plan.num_sources}, B = "
                         f"{idx.shape[0]} (idx.size(0)), got shape {tuple(x.shape)}")
    if weight.dim() != 3 or weight.shape[0] != plan.num_weights or weight.shape[2] != x.shape[2]:
        raise ValueError(f"weight: expected (M, D_out, D_in) with M = {plan.num_weights}, "
                         f"D_in = {x.shape[2]}, got shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: expected dtype {x.dtype} on {x.device} (those of x), "
                             f"got {t.dtype} on {t.device}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"bias: expected shape {tuple(weight.shape[:2])}, got "
                         f"{tuple(bias.shape)}")
    if gate is not None and gate.shape != idx.shape:
        raise ValueError(f"gate: expected shape {tuple(idx.shape)} (idx's), got "
                         f"{tuple(gate.shape)}")
    if idx.device.type == "cpu" and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= plan.num_paths:
            raise ValueError(f"idx: pathway indices must lie in [-1, {plan.num_paths}), got "
                             f"range [{lo}, {hi}]")
        if gate is not None and bool(gate.isnan().any()):
            raise ValueError("gate: NaN routing weight")


def routed_pathway_matmul(x: Tensor, weight: Tensor, plan: PathwayPlan, idx: Tensor,
                          gate: Tensor | None = None, bias: Tensor | None = None, *,
                          route: Route | None = None, backend: str = "auto") -> Tensor:
    """The routed form of :func:`gated_ops.pathway_matmul` (reference:
    ``gated_ops.reference.routed_pathway_matmul_ref``).

    Args:
        x: (S, B, D_in); weight: (M, D_out, D_in); plan: the pathway table, on x's device.
        idx: (B, k) int64: sample b's active pathways (-1: an unused slot).
        gate: (B, k) the slots' gates, or None (ones). bias: (M, D_out) or None.
        route: :func:`make_route` of (idx, plan), if already built (else built here).
        backend: "auto" (the compiled kernels of x's device), "triton", "cuda_emu" or
            "reference" (pure PyTorch: the dense op with the equivalent gate).
    Returns:
        (T, B, D_out), differentiable w.r.t. x, weight, bias and gate.
    """
    if backend == "reference":
        _check_reference(x, weight, bias, idx, gate, plan)
        return routed_pathway_matmul_ref(x, weight, bias, idx, gate, plan.src, plan.wgt,
                                         plan.dst, plan.num_dst)
    if route is None:
        route = make_route(idx, plan, backend=backend)
    elif route.idx is not idx or route.plan is not plan:
        raise ValueError("route: made for another idx or plan")
    return routed_linear(x, weight, bias, route, gate, backend=backend)


def routed_matmul(x: Tensor, weight: Tensor, topk_idx: Tensor, topk_weight: Tensor,
                  bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """Mixture of experts, tokens first (reference: ``reference.routed_matmul_ref``):

        y[t] = sum_j topk_weight[t, j] * (x[t] @ weight[topk_idx[t, j]]^T + bias[topk_idx[t, j]])

    Args:
        x: (T, D_in) tokens; weight: (E, D_out, D_in) experts; bias: (E, D_out) or None.
        topk_idx: (T, k) int64 experts per token (-1: unused slot); topk_weight: (T, k).
    Returns:
        (T, D_out); gradients reach x, weight, bias and topk_weight (the router trains through
        it). Cost follows the T k active (token, expert) pairs, not T E.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected (T, D_in) tokens, got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"weight: expected (E, D_out, D_in) experts, got shape "
                         f"{tuple(weight.shape)}")
    plan = moe_plan(weight.shape[0], x.device)
    return routed_pathway_matmul(x.unsqueeze(0), weight, plan, topk_idx, topk_weight, bias,
                                 backend=backend).squeeze(0)  # (a view: no copy back)


# ------------------------------------------------------------------------------------------------
# Fake kernels and autograd of the registered routed ops, for a namespace holding the schemas.
def _routed_setup_context(ctx, inputs, output):
    x, weight, bias, gate, idx, route, paths, num_dst, grouped_in, grouped_out = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)  # (no zero-filled gradient for z, which nobody differentiates)
    need_x, need_w, need_b, need_g = ctx.needs_input_grad[:4]
    ctx.flags = (grouped_in, grouped_out, x.shape[0] if not grouped_in else 0, weight.shape[0])
    ctx.save_for_backward(x if need_w else None, weight if need_x else None, gate, idx, route,
                          paths, z if need_g else None)


def _routed_backward(ns):
    def backward(ctx, grad_y, _grad_z):
        x, weight, gate, idx, route, paths, z = ctx.saved_tensors
        grouped_in, grouped_out, S, M = ctx.flags
        need_x, need_w, need_b, need_g = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_g = None
        if grad_y is None:
            return (None,) * 10
        if need_x or need_w or need_b:
            dz = ns.routed_grad_z(grad_y, gate, idx, route, paths, grouped_out)
            if need_x:
                grad_x = ns.routed_grad_x(dz, weight, idx, route, paths, S, grouped_in)
            if need_w:
                grad_w = ns.routed_grad_weight(dz, x, idx, route, paths, M, grouped_in)
            if need_b:
                grad_b = ns.routed_grad_bias(dz, route, M)
        if need_g:
            grad_g = ns.routed_grad_gate(grad_y, z, idx, route, paths)
        return grad_x, grad_w, grad_b, grad_g, None, None, None, None, None, None
    return backward


def register_routed_parts(ns: str) -> None:
    """Fake kernels and the autograd formula of the routed ops of ``torch.ops.<ns>``."""
    ops = getattr(torch.ops, ns)

    def fake(name):
        return torch.library.register_fake(f"{ns}::{name}")

    @fake("pathway_route")
    def _(idx, paths, num_weights):
        return idx.new_empty(2 * idx.numel() + num_weights + 1)

    @fake("routed_matmul")
    def _(x, weight, bias, gate, idx, route, paths, num_dst, grouped_in=False,
          grouped_out=False):
        N, Do = idx.numel(), weight.shape[1]
        if grouped_out:
            return x.new_empty(N, Do), x.new_empty(0)
        return x.new_empty(num_dst, idx.shape[0], Do), x.new_empty(N, Do)

    @fake("routed_grad_z")
    def _(grad_y, gate, idx, route, paths, grouped_out=False):
        return grad_y.new_empty(idx.numel(), grad_y.shape[-1])

    @fake("routed_grad_x")
    def _(grad_z, weight, idx, route, paths, num_sources, grouped_in=False):
        if grouped_in:
            return grad_z.new_empty(idx.numel(), weight.shape[2])
        return grad_z.new_empty(num_sources, idx.shape[0], weight.shape[2])

    @fake("routed_grad_weight")
    def _(grad_z, x, idx, route, paths, num_weights, grouped_in=False):
        return grad_z.new_empty(num_weights, grad_z.shape[1], x.shape[-1])

    @fake("routed_grad_bias")
    def _(grad_z, route, num_weights):
        return grad_z.new_empty(num_weights, grad_z.shape[1])

    @fake("routed_grad_gate")
    def _(grad_y, z, idx, route, paths):
        return grad_y.new_empty(idx.shape)

    torch.library.register_autograd(f"{ns}::routed_matmul", _routed_backward(ops),
                                    setup_context=_routed_setup_context)
