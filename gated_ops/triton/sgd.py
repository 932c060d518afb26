"""The fused SGD steps in Triton: ``pathway_sgd_``, ``pathway_sgd_lookahead_``,
``pathway_bias_sgd_``.

Their kernels are the gradient kernels of gemm.py with the step as epilogue: the weight
gradient's block GEMM steps each weight tile where it is formed (the gradient tile stays in
registers), the lookahead also multiplies each new weight tile by the next batch (Z_next), and
the bias's column sums step the bias. The step is torch.optim.SGD's (dampening 0), computed in
float32 and rounded once when stored, stochastically for bfloat16 given a rounding seed
(gemm._sgd_store); docs/design.md ("The fused SGD") states the contract the layers build on it.
The compiled ops take the rest, explicitly (_uses_triton_sgd): grouped plans and float64,
weights the plan does not cover (they still decay), an empty batch, non-contiguous parameters.

This module holds the checks and launchers, then the registration.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..optim import _compute_z
from .common import _uses_triton, register_kernels
from .gemm import _launch_block_gemm, _launch_grad_bias


# =================================================================================================
# Launchers
# =================================================================================================
def _check_rounding(rounding_seed: int, param: Tensor, what: str,
                    rounding_step: Optional[Tensor] = None) -> None:
    if rounding_seed >= 0 and param.dtype != torch.bfloat16:
        raise RuntimeError(f"rounding_seed: stochastic rounding (rounding_seed >= 0) is for "
                           f"bfloat16 {what}, got {param.dtype}")
    if rounding_step is not None:
        if rounding_step.dtype != torch.int64 or rounding_step.numel() != 1:
            raise RuntimeError(f"rounding_step: expected an int64 tensor of one element (the "
                               f"step count), got {rounding_step.dtype} of shape "
                               f"{tuple(rounding_step.shape)}")
        if rounding_step.device != param.device:
            raise RuntimeError(f"rounding_step: expected a tensor on the {what}' device, "
                               f"{param.device}, got {rounding_step.device}")


def _uses_triton_sgd(layout: list[int], param: Tensor, buf: Optional[Tensor], num_weights: int,
                     B: int) -> bool:
    """Whether a fused step runs here; the compiled op takes the rest: grouped plans and
    float64; weights the plan does not cover (they still decay); an empty batch; non-contiguous
    parameters or buffers (updated in place through their own strides there)."""
    _, n, _, _, _, nm, _ = layout
    return (_uses_triton(layout, param.dtype) and n * nm == num_weights and B > 0
            and param.is_contiguous() and (buf is None or buf.is_contiguous()))


def _check_layer_bias(bias, bias_buf, weight, momentum, bias_rounding_seed, rounding_step):
    """The bias a weight update also steps, checked before either is touched (the words of
    csrc/checks.h's check_layer_bias)."""
    if bias is None:
        if bias_buf is not None:
            raise RuntimeError("bias_momentum_buffer: given without a bias")
        return
    M, Do = weight.shape[0], weight.shape[1]
    if bias.dim() != 2 or tuple(bias.shape) != (M, Do):
        raise RuntimeError(f"bias: expected (M, D_out) = ({M}, {Do}) like the weight's rows, got "
                           f"shape {tuple(bias.shape)}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise RuntimeError(f"bias: expected {weight.dtype} on {weight.device} (the weight's), got "
                           f"{bias.dtype} on {bias.device}")
    if (momentum != 0) != (bias_buf is not None):
        raise RuntimeError("momentum_buffer: expected a buffer exactly when momentum != 0")
    if bias_buf is not None and (bias_buf.shape != bias.shape or bias_buf.dtype != bias.dtype
                                 or bias_buf.device != bias.device):
        raise RuntimeError(f"momentum_buffer: expected a tensor like bias {tuple(bias.shape)}, "
                           f"got {tuple(bias_buf.shape)}")
    _check_rounding(bias_rounding_seed, bias, "biases", rounding_step)


def _bias_sgd_impl(grad_z, bias, momentum_buffer, paths, csr, layout, num_sources, num_weights,
                   lr, momentum, weight_decay, nesterov, rounding_seed=-1,
                   rounding_step=None) -> None:
    _, n, _, ns, _, _, _ = layout
    _check_rounding(rounding_seed, bias, "biases", rounding_step)
    B = grad_z.shape[0] // (n * ns) if n else 0
    if bias.dim() != 2 or not _uses_triton_sgd(layout, bias, momentum_buffer, num_weights, B):
        torch.ops.gated_ops.pathway_bias_sgd_(grad_z, bias, momentum_buffer, paths, csr, layout,
                                              num_sources, num_weights, lr, momentum,
                                              weight_decay, nesterov, rounding_seed,
                                              rounding_step)
        return
    if bias.numel() == 0:
        return
    _launch_grad_bias(grad_z.contiguous(), bias, layout, B, bias.shape[1],
                      sgd=(momentum_buffer, lr, momentum, weight_decay, nesterov, rounding_seed,
                           rounding_step))


def _step_layer_bias(grad_z, x, weight, paths, csr, layout, lr, momentum, weight_decay,
                     nesterov, rounding_step, bias, bias_buf, bias_rounding_seed) -> None:
    if bias is not None:
        _bias_sgd_impl(grad_z, bias, bias_buf, paths, csr, layout, x.shape[0], weight.shape[0],
                       lr, momentum, weight_decay, nesterov, bias_rounding_seed, rounding_step)


def _sgd_impl(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum, weight_decay,
              nesterov, rounding_seed=-1, rounding_step=None, bias=None,
              bias_momentum_buffer=None, bias_rounding_seed=-1) -> None:
    T, n, s0, ns, m0, nm, _ = layout
    B, Di = x.shape[1], x.shape[2]
    Do = weight.shape[1]
    buf = momentum_buffer
    _check_rounding(rounding_seed, weight, "weights", rounding_step)
    if not _uses_triton_sgd(layout, weight, buf, weight.shape[0], B):
        torch.ops.gated_ops.pathway_sgd_(grad_z, x, weight, buf, paths, csr, layout, lr,
                                         momentum, weight_decay, nesterov, rounding_seed,
                                         rounding_step, bias, bias_momentum_buffer,
                                         bias_rounding_seed)
        return
    _check_layer_bias(bias, bias_momentum_buffer, weight, momentum, bias_rounding_seed,
                      rounding_step)
    if weight.numel() > 0:
        grad_z, x = grad_z.contiguous(), x.contiguous()
        R, Kz = ns * B, nm * Do
        # W_i (nm*Do, Di) -= lr * step(dZ_i^T (nm*Do, ns*B) @ X_i (ns*B, Di))
        _launch_block_gemm(grad_z, x, weight, n, Kz, Di, R, a=(0, R * Kz, 1, Kz),
                           b=(s0 * B * Di, R * Di, Di, 1), c=(m0 * Do * Di, Kz * Di, Di),
                           sgd=(buf, lr, momentum, weight_decay, nesterov, rounding_seed,
                                rounding_step))
    _step_layer_bias(grad_z, x, weight, paths, csr, layout, lr, momentum, weight_decay,
                     nesterov, rounding_step, bias, bias_momentum_buffer, bias_rounding_seed)


def _sgd_lookahead_impl(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum,
                        weight_decay, nesterov, rounding_seed, x_next, rounding_step=None,
                        bias=None, bias_momentum_buffer=None, bias_rounding_seed=-1) -> Tensor:
    """pathway_sgd_ and Z_next (pathway_sgd_lookahead_): for blocked plans with at most 64
    rows per block of x_next, in the update kernel (each new weight tile times the next batch,
    the column tiles' shares summed by torch.sum, a fixed order); else the two ops in turn."""
    T, n, s0, ns, m0, nm, _ = layout
    B, Di = x.shape[1], x.shape[2]
    Do = weight.shape[1]
    Bn = x_next.shape[1]
    buf = momentum_buffer
    if (x_next.dim() != 3 or x_next.shape[0] != x.shape[0] or x_next.shape[2] != Di
            or x_next.dtype != x.dtype or x_next.device != x.device):
        raise RuntimeError(f"x_next: expected (S, B_next, D_in) = ({x.shape[0]}, B_next, {Di}) "
                           f"of x's dtype {x.dtype} and device, got {tuple(x_next.shape)} "
                           f"{x_next.dtype} on {x_next.device}")
    _check_rounding(rounding_seed, weight, "weights", rounding_step)
    if (not _uses_triton_sgd(layout, weight, buf, weight.shape[0], B) or ns * Bn > 64
            or Bn == 0 or weight.numel() == 0):
        _sgd_impl(grad_z, x, weight, buf, paths, csr, layout, lr, momentum, weight_decay,
                  nesterov, rounding_seed, rounding_step, bias, bias_momentum_buffer,
                  bias_rounding_seed)
        return _compute_z(torch.ops.gated_ops_triton, x_next, weight, paths, layout)
    _check_layer_bias(bias, bias_momentum_buffer, weight, momentum, bias_rounding_seed,
                      rounding_step)
    grad_z, x, x_next = grad_z.contiguous(), x.contiguous(), x_next.contiguous()
    R, Kz = ns * B, nm * Do
    zp = _launch_block_gemm(grad_z, x, weight, n, Kz, Di, R, a=(0, R * Kz, 1, Kz),
                            b=(s0 * B * Di, R * Di, Di, 1), c=(m0 * Do * Di, Kz * Di, Di),
                            sgd=(buf, lr, momentum, weight_decay, nesterov, rounding_seed,
                                 rounding_step),
                            look=(x_next, s0 * Bn * Di, ns * Bn * Di, ns * Bn))
    _step_layer_bias(grad_z, x, weight, paths, csr, layout, lr, momentum, weight_decay,
                     nesterov, rounding_step, bias, bias_momentum_buffer, bias_rounding_seed)
    return zp.sum(0).to(weight.dtype)  # (n * ns * Bn, nm * Do): Z_next


# =================================================================================================
# Registration: the launchers as the kernels of torch.ops.gated_ops_triton.* (the steps are not
# differentiable; their fakes: gated_ops/triton/__init__.py)
# =================================================================================================
register_kernels({
    "pathway_sgd_": _sgd_impl,
    "pathway_sgd_lookahead_": _sgd_lookahead_impl,
    "pathway_bias_sgd_": _bias_sgd_impl,
})
