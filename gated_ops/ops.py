"""The public op functions: ``pathway_matmul`` and ``gated_cross_entropy``.

The schemas are declared once in the C++ library (``define_schemas``) and dispatched by device
to its CPU and CUDA kernels; ``backend=`` picks the other implementations explicitly: the
Triton kernels, the CUDA kernels' CPU emulation (tests) or the pure-PyTorch reference (the
spec, :mod:`gated_ops.reference`). Fake kernels, autograd and vmap rules: :mod:`.registration`.
The fused SGD ops: :mod:`.optim`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import BACKENDS, _op_namespace
from .plan import PathwayPlan
from .reference import gated_cross_entropy_ref, pathway_matmul_ref
from .registration import _gated_cross_entropy, _pathway_matmul, _transformed

__all__ = ["pathway_matmul", "gated_cross_entropy", "BACKENDS"]

_AUTOCAST_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the active ``torch.autocast`` region on this device type, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t in dtype where autocast would cast it (float32 / 16-bit; float64 and None stay)."""
    return t.to(dtype) if t is not None and t.dtype in _AUTOCAST_TYPES else t


def pathway_matmul(
    x: Tensor,
    weight: Tensor,
    plan: PathwayPlan,
    bias: Tensor | None = None,
    gate: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Gated multi-pathway matmul (reference: ``gated_ops.reference.pathway_matmul_ref``).

    y[t] = sum_{p : dst_p = t} gate[p] * (x[src_p] @ weight[wgt_p]^T + bias[wgt_p])

    Args:
        x: (S, B, D_in) sources.
        weight: (M, D_out, D_in) weight bank.
        plan: the compiled pathway table (:func:`gated_ops.make_plan`), on x's device.
        bias: (M, D_out) or None.
        gate: None, (P,) or (P, B).
        backend: "auto" (the compiled kernels of x's device), "triton" (gated_ops.triton:
            CUDA, or CPU under TRITON_INTERPRET=1), "cuda_emu" (the CUDA kernels emulated on
            CPU tensors, for tests: gated_ops.cuda_emu) or "reference" (pure PyTorch).
    Returns:
        (T, B, D_out).

    In a ``torch.autocast`` region the op runs in the region's dtype (as ``nn.Linear`` does):
    float32 and 16-bit x, weight, bias and gate are cast to it; float64 stays.

    Transforms: differentiable w.r.t. x, weight, bias and gate under autograd and under
    ``torch.func`` (``grad``, ``vjp``, ``jacrev``, ``functional_call`` over a module), and
    traceable by ``torch.compile(fullgraph=True)``; forward-mode AD (``jvp``, ``jacfwd``) is not
    implemented. ``torch.vmap`` runs the whole vmapped batch as one op call. A vmapped
    dimension carried by x and/or the gate only is more batch: folded into B. One carried by
    the weight, the bias or the plan's tensors is V independent replicas (an ensemble:
    ``torch.func.stack_module_state`` and ``vmap(functional_call(...))``), run over the
    replicated plan (:func:`replicate_plan`); vmapped plan tensors (stacked module buffers)
    give each replica its own table, and must share the plan's layout, as copies of one
    module do. The gradients follow the same rules, so per-sample gradients
    (``vmap(grad(...))``) take one call of each gradient op.

    Double backward (differentiating through this op's gradient: a penalty on grad_x, a
    Hessian) is not implemented: it raises a RuntimeError saying so when that second
    derivative is taken, not before, so gradients taken with ``create_graph=True`` serve any
    first-order use (a gradient penalty on other parameters). ``backend="reference"`` is plain
    PyTorch and twice differentiable.
    """
    if x.dim() != 3:
        raise ValueError(f"x: expected (S, B, D_in), got shape {tuple(x.shape)}")
    if x.shape[0] != plan.num_sources or weight.shape[0] != plan.num_weights:
        raise ValueError(
            f"x, weight: the plan was built for S={plan.num_sources} sources and "
            f"M={plan.num_weights} weights, got x {tuple(x.shape)} and weight "
            f"{tuple(weight.shape)}"
        )
    if plan.device != x.device:
        raise ValueError(f"plan: its index tensors are on {plan.device}, x is on {x.device}; "
                         "move the plan with plan.to(x.device)")
    plan.check_unmodified()
    dt = autocast_dtype(x.device.type)
    if dt is not None and x.dtype in _AUTOCAST_TYPES:
        x, weight, bias, gate = (_cast(t, dt) for t in (x, weight, bias, gate))
    if backend == "reference":
        _check_reference_args(x, weight, bias, gate, plan.num_paths)
        return pathway_matmul_ref(x, weight, bias, gate, plan.src, plan.wgt, plan.dst,
                                  plan.num_dst)
    ns = _op_namespace(backend)
    if _transformed():
        return _pathway_matmul.apply(x, weight, bias, gate, plan.paths, plan.csr,
                                     list(plan.layout), ns.name)
    return ns.pathway_matmul(x, weight, bias, gate, plan.paths, plan.csr, list(plan.layout))


def _check_reference_args(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor | None,
                          P: int) -> None:
    """The argument checks the compiled kernels make (csrc/checks.h), for the reference
    backend: the same refusals, in the same words, whatever the backend."""
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    if weight.dim() != 3 or weight.shape[2] != x.shape[2]:
        raise ValueError(f"weight: expected (M, D_out, D_in) with D_in = {x.shape[2]}, got "
                         f"shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: expected dtype {x.dtype} on {x.device} (those of x), "
                             f"got {t.dtype} on {t.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0], weight.shape[1]):
        raise ValueError(f"bias: expected shape (M, D_out) = {tuple(weight.shape[:2])}, got "
                         f"{tuple(bias.shape)}")
    if gate is not None and tuple(gate.shape) not in ((P,), (P, x.shape[1])):
        raise ValueError(f"gate: expected (P,) or (P, B) with P = {P}, B = {x.shape[1]}, got "
                         f"shape {tuple(gate.shape)}")


def gated_cross_entropy(
    logits: Tensor, target: Tensor, gate: Tensor, *, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused per-path cross-entropy (reference: ``gated_cross_entropy_ref``).

    Args:
        logits: (R, P, B, C); or (R, I, J, B, C) with path p = i * J + j, any strides (the
            k-path decoder's output viewed in place: KPathNet.loss); target: (R, P, B) int64;
            gate: (R, P), each row summing to > 0.
        backend: as for :func:`pathway_matmul`.
    Returns:
        loss (R,) gated mean loss per replica, path_loss (R, P), correct (R, P) int64.
        Differentiable w.r.t. logits and gate through loss and path_loss.

    A gate row summing to zero raises on the CPU; on CUDA and Triton, where checking would need
    a host synchronisation, it gives a NaN loss. A target outside [0, C) raises on the CPU, is a
    device-side assert on CUDA (as in torch's nll_loss) and gives NaN in Triton.

    In a ``torch.autocast`` region the loss runs in float32 (as ``F.cross_entropy`` does): 16-bit
    logits and the gate are cast to it.

    Transforms, as for :func:`pathway_matmul`: ``torch.func`` (``grad``, ``vjp``, ``jacrev``)
    and ``torch.compile`` work, forward-mode AD does not; a ``torch.vmap`` dimension is more
    replicas (V * R in one op call); double backward is not implemented and raises, saying so,
    when it is taken.
    """
    if autocast_dtype(logits.device.type) is not None:
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        gate = gate.to(logits.dtype)
    if logits.dim() == 5 and backend == "reference":
        # the compiled and Triton kernels read the 5-D strided form; the reference takes
        # (R, P, B, C)
        R, I, J, B, C = logits.shape
        logits = logits.reshape(R, I * J, B, C)
    if backend == "reference":
        return gated_cross_entropy_ref(logits, target, gate)
    ns = _op_namespace(backend)
    if _transformed():
        loss, path_loss, correct, _ = _gated_cross_entropy.apply(logits, target, gate, ns.name)
    else:
        loss, path_loss, correct, _ = ns.gated_cross_entropy(logits, target, gate)
    return loss, path_loss, correct


