"""Public functions over the registered ops ``torch.ops.gated_ops.*``: fake kernels and autograd.

The schemas are declared once in csrc/gated_ops.cpp; CPU and CUDA kernels are registered there
per dispatch key. This module adds what Python owns (STYLE.md rules 2-3): ``register_fake`` for
every op (torch.compile, meta tensors), ``register_autograd`` and ``register_vmap`` for the
differentiable ones, whose backward is written with the same family of registered ops, and the
``torch.autograd.Function`` the public functions apply under ``torch.func``'s transforms
(setup_context style, with a vmap rule: what those transforms need, and what the Functions
``register_autograd`` generates lack).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .plan import Z_IS_Y, PathwayPlan, z_shape
from .reference import gated_cross_entropy_ref, pathway_matmul_ref

__all__ = ["pathway_matmul", "gated_cross_entropy", "pathway_sgd_", "pathway_sgd_lookahead_",
           "pathway_bias_sgd_", "BACKENDS"]

_ops = torch.ops.gated_ops


BACKENDS = ("auto", "triton", "cuda_emu", "reference")


def _op_namespace(backend: str):
    """The registered ops of a backend: "auto" = gated_ops (C++ CPU / CUDA kernels, picked by
    the dispatcher from the tensors' device); "triton" = gated_ops_triton (loaded on first use,
    since importing Triton reads TRITON_INTERPRET); "cuda_emu" = gated_ops_cudaemu (the CUDA
    kernels emulated on the CPU, for tests: gated_ops.cuda_emu)."""
    if backend == "auto":
        return _ops
    if backend == "triton":
        # (an import statement: torch.compile traces it, not importlib.import_module)
        import gated_ops.triton  # noqa: F401  (registers torch.ops.gated_ops_triton's kernels)
        return torch.ops.gated_ops_triton
    if backend == "cuda_emu":
        from . import cuda_emu  # noqa: F401  (registers torch.ops.gated_ops_cudaemu)
        return torch.ops.gated_ops_cudaemu
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


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
        backend: "auto" (the compiled kernels of x's device), "triton" (gated_ops.triton_ops:
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
    """The argument checks the compiled kernels make (csrc/gated_ops.h), for the reference
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
    return _op_namespace(backend).pathway_sgd_lookahead_(
        grad_z, x, weight, momentum_buffer, plan.paths, plan.csr, list(plan.layout), lr,
        momentum, weight_decay, nesterov, rounding_seed, x_next, rounding_step, bias,
        bias_momentum_buffer, bias_rounding_seed)


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


# ------------------------------------------------------------------------------------------------
# Autograd: backward = the same family of registered ops, honouring needs_input_grad.
#
# Two autograd entries share one backward: the raw ops' register_autograd (what the public
# functions call in plain eager and compiled code), and, under torch.func's transforms, the
# torch.autograd.Functions below (setup_context style, with a vmap rule: what those transforms
# need, and what the Functions register_autograd generates lack). Both backwards run the
# gradient ops inside a second Function whenever the backward records a graph, so that a
# gradient taken with create_graph=True is differentiable only as far as a clear error: the
# second derivative is not implemented, and saying so when it is taken (and only then) beats
# the dispatcher's complaint about an out= GEMM deep inside a kernel.
#
# (Why not the Functions everywhere: Function.apply binds its arguments with inspect.signature
# when setup_context is defined, ~40 us of Python a call; a tiny MoE layer's eager step took
# 255 us with them instead of 168 us.)
def _transformed() -> bool:
    """Inside a torch.func transform (vmap, grad, jvp, functionalize)."""
    return torch._C._are_functorch_transforms_active()


def _recorded() -> bool:
    """A backward that records a graph (create_graph=True) or runs under torch.func."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()


def _double_backward_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"gated_ops.{op}: double backward (differentiating its gradient) is not implemented. "
        "A gradient taken with create_graph=True can be used further (a penalty on other "
        f"parameters, say), but not differentiated through {op}'s backward; "
        "backend='reference' is plain PyTorch and twice differentiable.")


def pathway_setup_context(ctx, inputs, output):
    x, weight, bias, gate, paths, csr, layout = inputs[:7]
    ctx.layout = list(layout)
    ctx.save_for_backward(
        x if ctx.needs_input_grad[1] or ctx.needs_input_grad[3] else None,
        weight if ctx.needs_input_grad[0] or ctx.needs_input_grad[3] else None,
        bias if ctx.needs_input_grad[3] else None,
        gate,
        paths,
        csr,
    )
    ctx.sizes = (x.shape[0], x.shape[1], weight.shape[0], weight.shape[1])


def _pathway_backward(ctx, grad_y, ns: str):
    x, weight, bias, gate, paths, csr = ctx.saved_tensors
    args = (grad_y, x, weight, bias, gate, paths, csr, ctx.layout, ctx.sizes,
            tuple(ctx.needs_input_grad[:4]), ns)
    return _pathway_matmul_grads.apply(*args) if _recorded() else _pathway_grads(*args)


def pathway_backward(ns):
    """The backward of ``ns.pathway_matmul``: its gradient ops, run in a once-differentiable
    Function (shared by the public function and the raw ops of the compiled, emulated and
    Triton backends)."""
    def backward(ctx, grad_y):
        return (*_pathway_backward(ctx, grad_y, ns.name), None, None, None)
    return backward


def _pathway_grads(grad_y, x, weight, bias, gate, paths, csr, layout, sizes, needs, ns: str):
    """(grad_x, grad_weight, grad_bias, grad_gate) of pathway_matmul from the gradient ops of
    namespace ``ns`` (its name); None where ``needs`` (needs_input_grad) says so. sizes:
    (S, B, M, D_out)."""
    ops = getattr(torch.ops, ns)
    S, B, M, d_out = sizes
    need_x, need_w, need_b, need_g = needs
    grad_x = grad_w = grad_b = grad_g = None
    if need_x and need_g and ns != "gated_ops_triton":  # (Triton: no fused kernel)
        # one GEMM shared by both gradients (a trained MoE router: x and gate need grads)
        grad_x, grad_g = ops.pathway_grad_x_gate(grad_y, x, weight, bias, gate, paths, csr,
                                                 layout)
        need_x = need_g = False
    if need_x or need_w or need_b:
        dz = ops.pathway_grad_z(grad_y, gate, paths, csr, layout, S, M)
        if need_x:
            grad_x = ops.pathway_grad_x(dz, weight, paths, csr, layout, S, B)
        if need_w:
            grad_w = ops.pathway_grad_weight(dz, x, paths, csr, layout, M, d_out)
        if need_b:
            grad_b = ops.pathway_grad_bias(dz, paths, csr, layout, S, M, d_out)
    if need_g:
        grad_g = ops.pathway_grad_gate(grad_y, x, weight, bias, gate, paths, csr, layout)
    return grad_x, grad_w, grad_b, grad_g


def ce_grad_like(logits: Tensor) -> Tensor:
    """An uninitialised tensor laid out as every backend's ``gated_cross_entropy_backward``
    returns its gradient (the fake kernels' answer): ``empty_like`` of the logits the kernels
    read, which are the logits themselves (a strided 5-D view keeps its strides) unless their
    classes are not contiguous (then a contiguous copy: csrc/gated_ops.h logits_view)."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    return torch.empty_like(logits)


def ce_setup_context(ctx, inputs, output):
    logits, target, gate = inputs[:3]
    loss, path_loss, correct, lse = output
    ctx.save_for_backward(logits, target, gate, lse, loss, path_loss)
    ctx.mark_non_differentiable(correct, lse)
    # outputs nobody differentiates (correct, lse; path_loss in training) get None, not a
    # zero-filled gradient each: three fill kernels fewer per CUDA training step
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_loss, grad_path_loss, ns: str):
    logits, target, gate, lse, loss, path_loss = ctx.saved_tensors
    args = (grad_loss, grad_path_loss, logits, target, gate, lse, loss, path_loss,
            (ctx.needs_input_grad[0], ctx.needs_input_grad[2]), ns)
    return _gated_cross_entropy_grads.apply(*args) if _recorded() else _ce_grads(*args)


def ce_backward(ns):
    """The backward of ``ns.gated_cross_entropy`` (shared as :func:`pathway_backward` is)."""
    def backward(ctx, grad_loss, grad_path_loss, _grad_correct, _grad_lse):
        grad_logits, grad_gate = _ce_backward(ctx, grad_loss, grad_path_loss, ns.name)
        return grad_logits, None, grad_gate
    return backward


def _ce_grads(grad_loss, grad_path_loss, logits, target, gate, lse, loss, path_loss, needs,
              ns: str):
    """(grad_logits, grad_gate) of gated_cross_entropy from namespace ``ns`` (its name); a None
    incoming gradient (an output nobody differentiates: path_loss in training) goes to the
    kernel as None, read as zeros there: no zero-filled tensor, no fill kernel."""
    grad_logits = grad_gate = None
    if needs[0] and (grad_loss is not None or grad_path_loss is not None):
        grad_logits = getattr(torch.ops, ns).gated_cross_entropy_backward(
            grad_loss, grad_path_loss, logits, target, gate, lse)
    if needs[1] and grad_loss is not None:
        # d loss_r / d gate[r, p] = (path_loss[r, p] - loss[r]) / sum_p gate[r, p]
        grad_gate = grad_loss.unsqueeze(-1) * (path_loss - loss.unsqueeze(-1)) / gate.sum(
            -1, keepdim=True)
    return grad_logits, grad_gate


# ------------------------------------------------------------------------------------------------
# vmap: a vmapped dimension is more batch (only x, the gate, or grad_y carry it: folded into B,
# one op call) or replicas (weight, bias or the plan carry it, as torch.func.stack_module_state
# hands over an ensemble: V replicas of the plan in one op call over a replicated plan). The
# cross-entropy's vmapped dimension is more replicas R.
def _logical_shape(t: Tensor, bdim: int | None) -> tuple[int, ...]:
    return tuple(t.shape) if bdim is None else tuple(t.shape[:bdim]) + tuple(t.shape[bdim + 1:])


def _stacked(t: Tensor | None, bdim: int | None, V: int) -> Tensor | None:
    """A per-sample (A, ...) tensor, vmapped at bdim or shared, as (V * A, ...)."""
    if t is None:
        return None
    t = t.movedim(bdim, 0) if bdim is not None else t.expand(V, *t.shape)
    return t.flatten(0, 1)


def _folded(t: Tensor | None, bdim: int | None, V: int) -> Tensor | None:
    """A per-sample (A, B, ...) tensor, vmapped at bdim or shared, as (A, V * B, ...)."""
    if t is None:
        return None
    if bdim is not None:
        t = t.movedim(bdim, 1)
    else:
        t = t.unsqueeze(1).expand(t.shape[0], V, *t.shape[1:])
    return t.flatten(1, 2)


def _folded_gate(gate: Tensor | None, bdim: int | None, V: int, B: int,
                 per_sample: bool) -> Tensor | None:
    """The gate of a call whose batch is V * B: a (P, B) gate folded like x; a (P,) gate kept
    if shared (unless ``per_sample``: its gradient is then wanted per vmapped sample), else
    spread over each sample's B rows, (P, V * B)."""
    if gate is None:
        return None
    if len(_logical_shape(gate, bdim)) == 2:
        return _folded(gate, bdim, V)
    if bdim is None and not per_sample:
        return gate
    g = gate.movedim(bdim, 1) if bdim is not None else gate.unsqueeze(1).expand(-1, V)  # (P, V)
    return g.unsqueeze(-1).expand(g.shape[0], V, B).flatten(1, 2)


def replicate_plan(plan: PathwayPlan, replicas: int) -> PathwayPlan:
    """The plan of ``replicas`` independent copies of plan's table (replica v's pathways read
    sources v*S.., weights v*M.., write destinations v*T..), computed from the plan's tensors on
    their device, without a host synchronisation (vmap over a module's weights runs the copies
    in one op call over this plan). Equal, tensor for tensor, to :func:`make_plan` on the
    replicated table (``gated_ops.testing.replicate``) built with the plan's layout mode."""
    paths, csr, layout = _replicated_plan(plan.paths, plan.csr, plan.layout, plan.num_sources,
                                          plan.num_weights, replicas)
    return PathwayPlan(replicas * plan.num_sources, replicas * plan.num_weights,
                       replicas * plan.num_dst, paths, csr, tuple(layout))


def _replicated_plan(paths: Tensor, csr: Tensor, layout, S: int, M: int, V: int
                     ) -> tuple[Tensor, Tensor, list[int]]:
    """paths (5, P), csr, layout of V replicas of a plan; paths (V, 5, P) and csr (V, L) give
    each replica its own tables (stacked module buffers), sharing the layout."""
    T, n, _, ns_, _, nm, flags = layout
    P = paths.shape[-1]
    if V == 1:  # the plan itself (a blocked one may start past source or weight 0)
        return paths.reshape(5, P), csr.reshape(-1), list(layout)
    if paths.dim() == 2:
        paths = paths.expand(V, *paths.shape)
    if csr.dim() == 1:
        csr = csr.expand(V, csr.shape[0])
    v = torch.arange(V, device=paths.device).unsqueeze(1)  # (V, 1)
    dst_ptr, dst_perm, src_ptr, src_perm, wgt_ptr, wgt_perm, owner = csr.split(
        [T + 1, P, S + 1, P, M + 1, P, P], dim=1)

    def ptr(p: Tensor) -> Tensor:  # (V, K + 1) CSR offsets -> (V * K + 1,)
        return torch.cat([(p[:, :-1] + v * P).flatten(), p.new_full((1,), V * P)])

    def perm(q: Tensor) -> Tensor:  # (V, P) pathway indices -> (V * P,)
        return (q + v * P).flatten()

    src, wgt, dst, zrow, zcol = paths.unbind(1)  # each (V, P)
    if V > 0 and n > 0 and S == n * ns_ and M == n * nm:
        # the blocks of replica v follow those of replica v - 1 (then s0 = m0 = 0): blocked
        zrow = zrow + v * (n * ns_)
        owner = perm(owner)
        layout = [V * T, V * n, 0, ns_, 0, nm, flags]
    else:
        # grouped: Z's row block of a pathway is its rank in the by-weight order, replica by
        # replica (make_plan: zrow[wgt_perm] = arange(P)); Z is y only for blocked plans
        rank = torch.empty_like(wgt_perm).scatter_(
            1, wgt_perm, torch.arange(P, device=paths.device).expand(V, P))
        zrow, zcol = rank + v * P, torch.zeros_like(zcol)
        owner = perm(wgt_perm)
        layout = [V * T, 0, 0, 0, 0, 0, flags & ~Z_IS_Y]
    paths = torch.stack([src + v * S, wgt + v * M, dst + v * T, zrow, zcol]).flatten(1)
    csr = torch.cat([ptr(dst_ptr), perm(dst_perm), ptr(src_ptr), perm(src_perm), ptr(wgt_ptr),
                     perm(wgt_perm), owner])
    return paths, csr, layout


def _pathway_vmap(op, info, in_dims, x, weight, bias, gate, paths, csr, layout):
    """pathway_matmul over a vmapped dimension, in one call of ``op`` (same signature)."""
    V = info.batch_size
    xd, wd, bd, gd, pd, cd = in_dims[:6]
    T = layout[0]
    if wd is not None or bd is not None or pd is not None or cd is not None:  # replicas
        S, M = _logical_shape(x, xd)[0], _logical_shape(weight, wd)[0]
        rp, rc, rl = _replicated_plan(paths if pd is None else paths.movedim(pd, 0),
                                      csr if cd is None else csr.movedim(cd, 0), layout, S, M, V)
        y = op(_stacked(x, xd, V), _stacked(weight, wd, V), _stacked(bias, bd, V),
               _stacked(gate, gd, V), rp, rc, rl)  # (V * T, B, D_out)
        return y.unflatten(0, (V, T)), 0
    B = _logical_shape(x, xd)[1]
    y = op(_folded(x, xd, V), weight, bias, _folded_gate(gate, gd, V, B, per_sample=False),
           paths, csr, layout)  # (T, V * B, D_out)
    return y.unflatten(1, (V, B)), 1


def _pathway_grads_vmap(grads, info, in_dims, grad_y, x, weight, bias, gate, paths, csr, layout,
                        sizes, needs):
    """The gradients over a vmapped dimension in one call of ``grads`` (same signature). A
    weight or bias gradient is per vmapped sample: replicas, as is any vmapped parameter."""
    V = info.batch_size
    gyd, xd, wd, bd, gd, pd, cd = in_dims[:7]
    S, B, M, d_out = sizes
    P = paths.shape[-1]
    if wd is not None or bd is not None or pd is not None or cd is not None or needs[1] \
            or needs[2]:
        rp, rc, rl = _replicated_plan(paths if pd is None else paths.movedim(pd, 0),
                                      csr if cd is None else csr.movedim(cd, 0), layout, S, M, V)
        out = grads(_stacked(grad_y, gyd, V), _stacked(x, xd, V), _stacked(weight, wd, V),
                    _stacked(bias, bd, V), _stacked(gate, gd, V), rp, rc, rl,
                    (V * S, B, V * M, d_out), needs)
        out = tuple(None if g is None else g.unflatten(0, (V, n))
                    for g, n in zip(out, (S, M, M, P)))
        return out, tuple(None if g is None else 0 for g in out)
    per_sample_gate = gate is not None and len(_logical_shape(gate, gd)) == 2
    grad_x, _, _, grad_g = grads(
        _folded(grad_y, gyd, V), _folded(x, xd, V), weight, bias,
        _folded_gate(gate, gd, V, B, per_sample=needs[3]), paths, csr, layout,
        (S, V * B, M, d_out), needs)
    if grad_x is not None:
        grad_x = grad_x.unflatten(1, (V, B))  # (S, V, B, D_in)
    if grad_g is not None:  # (P, V * B) -> (P, V, B), or (P, V) for a (P,) gate
        grad_g = grad_g.unflatten(1, (V, B))
        grad_g = grad_g if per_sample_gate else grad_g.sum(-1)
    return (grad_x, None, None, grad_g), (None if grad_x is None else 1, None, None,
                                          None if grad_g is None else 1)


def _ce_vmap(op, info, in_dims, logits, target, gate):
    """gated_cross_entropy over a vmapped dimension: V * R replicas in one call of ``op``."""
    V = info.batch_size
    R = _logical_shape(target, in_dims[1])[0]
    out = op(*(_stacked(t, d, V) for t, d in zip((logits, target, gate), in_dims)))
    return tuple(o.unflatten(0, (V, R)) for o in out), (0,) * len(out)


def _ce_grads_vmap(grads, info, in_dims, grad_loss, grad_path_loss, logits, target, gate, lse,
                   loss, path_loss, needs):
    V = info.batch_size
    R = _logical_shape(target, in_dims[3])[0]
    args = (grad_loss, grad_path_loss, logits, target, gate, lse, loss, path_loss)
    out = grads(*(_stacked(t, d, V) for t, d in zip(args, in_dims)), needs)
    out = tuple(None if g is None else g.unflatten(0, (V, R)) for g in out)
    return out, tuple(None if g is None else 0 for g in out)


# The Functions of the public functions, for every backend: ``ns`` (the last argument) names the
# namespace of the ops they run. (Lower-case class names: an autograd node is named after its
# Function, "_pathway_matmulBackward", and profiles and kernel_census attribute kernels by the
# op's name in it, as in the raw ops' "GeneratedBackwardFor_gated_ops_pathway_matmul_default".)
class _pathway_matmul(torch.autograd.Function):  # noqa: N801
    @staticmethod
    def forward(x, weight, bias, gate, paths, csr, layout, ns):
        return getattr(torch.ops, ns).pathway_matmul(x, weight, bias, gate, paths, csr, layout)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pathway_setup_context(ctx, inputs, output)
        ctx.ns = inputs[7]

    @staticmethod
    def backward(ctx, grad_y):
        return (*_pathway_backward(ctx, grad_y, ctx.ns), None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, gate, paths, csr, layout, ns):
        def op(*args):
            return _pathway_matmul.apply(*args, ns)
        return _pathway_vmap(op, info, in_dims, x, weight, bias, gate, paths, csr, layout)


class _pathway_matmul_grads(torch.autograd.Function):  # noqa: N801
    """pathway_matmul's gradients (:func:`_pathway_grads`), differentiable only to a clear
    error."""

    @staticmethod
    def forward(grad_y, x, weight, bias, gate, paths, csr, layout, sizes, needs, ns):
        return _pathway_grads(grad_y, x, weight, bias, gate, paths, csr, layout, sizes, needs,
                              ns)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise _double_backward_error("pathway_matmul")

    @staticmethod
    def vmap(info, in_dims, grad_y, x, weight, bias, gate, paths, csr, layout, sizes, needs,
             ns):
        def grads(*args):
            return _pathway_matmul_grads.apply(*args, ns)
        return _pathway_grads_vmap(grads, info, in_dims, grad_y, x, weight, bias, gate, paths,
                                   csr, layout, sizes, needs)


class _gated_cross_entropy(torch.autograd.Function):  # noqa: N801
    @staticmethod
    def forward(logits, target, gate, ns):
        return getattr(torch.ops, ns).gated_cross_entropy(logits, target, gate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ce_setup_context(ctx, inputs, output)
        ctx.ns = inputs[3]

    @staticmethod
    def backward(ctx, grad_loss, grad_path_loss, _grad_correct, _grad_lse):
        grad_logits, grad_gate = _ce_backward(ctx, grad_loss, grad_path_loss, ctx.ns)
        return grad_logits, None, grad_gate, None

    @staticmethod
    def vmap(info, in_dims, logits, target, gate, ns):
        def op(*args):
            return _gated_cross_entropy.apply(*args, ns)
        return _ce_vmap(op, info, in_dims, logits, target, gate)


class _gated_cross_entropy_grads(torch.autograd.Function):  # noqa: N801
    """gated_cross_entropy's gradients (:func:`_ce_grads`), differentiable only to a clear
    error."""

    @staticmethod
    def forward(grad_loss, grad_path_loss, logits, target, gate, lse, loss, path_loss, needs,
                ns):
        return _ce_grads(grad_loss, grad_path_loss, logits, target, gate, lse, loss, path_loss,
                         needs, ns)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise _double_backward_error("gated_cross_entropy")

    @staticmethod
    def vmap(info, in_dims, grad_loss, grad_path_loss, logits, target, gate, lse, loss,
             path_loss, needs, ns):
        def grads(*args):
            return _gated_cross_entropy_grads.apply(*args, ns)
        return _ce_grads_vmap(grads, info, in_dims, grad_loss, grad_path_loss, logits, target,
                              gate, lse, loss, path_loss, needs)


# ------------------------------------------------------------------------------------------------
# Fake (meta) kernels (output shapes only) and autograd, for a namespace holding these schemas:
# gated_ops, and gated_ops_cudaemu (the CUDA kernels emulated on the CPU: gated_ops.cuda_emu).
def register_python_parts(ns: str) -> None:
    """Registers, for the ops ``torch.ops.<ns>.*`` (the schemas of csrc/gated_ops.h), the fake
    kernels, the composite ``pathway_grad_x_gate`` for devices without a fused kernel, and the
    autograd formulas of ``pathway_matmul`` and ``gated_cross_entropy``."""
    ops = getattr(torch.ops, ns)

    def fake(name):
        return torch.library.register_fake(f"{ns}::{name}")

    @fake("pathway_matmul")
    def _(x, weight, bias, gate, paths, csr, layout):
        return x.new_empty(layout[0], x.shape[1], weight.shape[1])

    @fake("pathway_grad_z")
    def _(grad_y, gate, paths, csr, layout, num_sources, num_weights):
        return grad_y.new_empty(z_shape(layout, paths.shape[1], grad_y.shape[1],
                                        grad_y.shape[2]))

    @fake("pathway_grad_x")
    def _(grad_z, weight, paths, csr, layout, num_sources, batch):
        return grad_z.new_empty(num_sources, batch, weight.shape[2])

    @fake("pathway_grad_weight")
    def _(grad_z, x, paths, csr, layout, num_weights, d_out):
        return grad_z.new_empty(num_weights, d_out, x.shape[2])

    @fake("pathway_grad_bias")
    def _(grad_z, paths, csr, layout, num_sources, num_weights, d_out):
        return grad_z.new_empty(num_weights, d_out)

    # (fresh contiguous tensors, as the kernels return them: not empty_like, which keeps the
    # strides of a transposed (P, B) gate, the router's (B, P) output viewed as .t())
    @fake("pathway_grad_gate")
    def _(grad_y, x, weight, bias, gate, paths, csr, layout):
        return gate.new_empty(gate.shape)

    @fake("pathway_grad_x_gate")
    def _(grad_y, x, weight, bias, gate, paths, csr, layout):
        return x.new_empty(x.shape), gate.new_empty(gate.shape)

    @torch.library.impl(f"{ns}::pathway_grad_x_gate", "CompositeExplicitAutograd")
    def _(grad_y, x, weight, bias, gate, paths, csr, layout):
        """Devices without a fused kernel (CUDA): the two ops it replaces."""
        S, B = x.shape[0], x.shape[1]
        dz = ops.pathway_grad_z(grad_y, gate, paths, csr, layout, S, weight.shape[0])
        return (ops.pathway_grad_x(dz, weight, paths, csr, layout, S, B),
                ops.pathway_grad_gate(grad_y, x, weight, bias, gate, paths, csr, layout))

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

    @fake("gated_cross_entropy")
    def _(logits, target, gate):
        R, P, B = target.shape  # logits: (R, P, B, C) or (R, I, J, B, C)
        return (logits.new_empty(R), logits.new_empty(R, P), target.new_empty(R, P),
                logits.new_empty(R, P, B))

    @fake("gated_cross_entropy_backward")
    def _(grad_loss, grad_path_loss, logits, target, gate, lse):
        return ce_grad_like(logits)

    torch.library.register_autograd(f"{ns}::pathway_matmul", pathway_backward(ops),
                                    setup_context=pathway_setup_context)
    torch.library.register_autograd(f"{ns}::gated_cross_entropy", ce_backward(ops),
                                    setup_context=ce_setup_context)
    register_vmap_rules(ns)


def register_vmap_rules(ns: str) -> None:
    """torch.vmap over the raw ops ``torch.ops.<ns>.pathway_matmul`` and
    ``gated_cross_entropy``: one op call for the whole vmapped batch (the rules of the public
    functions), not PyTorch's per-sample fallback."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_vmap(f"{ns}::pathway_matmul")
    def _(info, in_dims, *args):
        return _pathway_vmap(ops.pathway_matmul, info, in_dims, *args)

    @torch.library.register_vmap(f"{ns}::gated_cross_entropy")
    def _(info, in_dims, *args):
        return _ce_vmap(ops.gated_cross_entropy, info, in_dims, *args)


register_python_parts("gated_ops")
