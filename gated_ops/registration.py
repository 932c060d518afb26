"""What Python adds to each registered op (the schemas are declared once in the C++ library):
fake kernels, autograd (backward = the same family of registered ops, honouring
needs_input_grad), the ``torch.autograd.Function`` forms the public functions apply under
``torch.func``'s transforms, and vmap rules. ``register_python_parts(ns)`` registers them for a
namespace holding the schemas: ``gated_ops`` (here, on import) and the backends that reuse them
(the CUDA emulation, Triton).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .optim import register_sgd_parts
from .routed import register_routed_parts
from .plan import Z_IS_Y, PathwayPlan, _replicated_plan, z_shape

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
    classes are not contiguous (then a contiguous copy: csrc/plan.h logits_view)."""
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
    """Registers, for the ops ``torch.ops.<ns>.*`` (the schemas of csrc/gated_ops.h, define_schemas), the fake
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
    register_sgd_parts(ns)
    register_routed_parts(ns)


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
