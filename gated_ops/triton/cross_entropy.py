"""The gated cross-entropy in Triton: ``gated_cross_entropy`` and its backward.

Forward: per (replica, path) row group, each row's log-sum-exp, the mean NLL and the hit count
(_ce_forward_kernel), then each replica's gate-weighted mean of its paths' losses
(_ce_loss_kernel). Backward: each path's weight from the incoming gradients
(_ce_weights_kernel), then weight * (softmax - onehot) tile by tile (_ce_backward_kernel). The
logits are (R, P, B, C), or the k-path decoder's output viewed in place as (R, I, J, B, C);
their classes must be contiguous (else a copy). float64 runs the compiled op.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import ops
from .common import TRITON_DTYPES, _pow2, register_kernels


# =================================================================================================
# Kernels
# =================================================================================================
@triton.jit
def _ce_path_offset(q, P, J, sr, si, sj):
    """Element offset of path q's first logit row in (R, P, B, C) or (R, I, J, B, C) logits with
    these strides (ops.gated_cross_entropy: the k-path decoder's output viewed in place)."""
    r = q // P
    p = q % P
    return r * sr + (p // J) * si + (p % J) * sj


@triton.jit
def _row_lse(v, cmask):
    """log-sum-exp of each row of a (BLOCK_B, BLOCK_C) fp32 tile whose padding is -inf, shifted
    by the row max as log_softmax is (NaN when the row holds a NaN or an infinite max)."""
    isnan = v != v
    has_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
    mx = tl.where(has_nan, float("nan"), tl.max(tl.where(isnan, float("-inf"), v), axis=1))
    s = tl.sum(tl.where(cmask[None, :], tl.exp(v - mx[:, None]), 0.0), axis=1)
    return tl.log(s) + mx


@triton.jit
def _ce_forward_kernel(logits_ptr, target_ptr, path_loss_ptr, correct_ptr, lse_ptr, B, C,
                       P, J, sr, si, sj, sb,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (replica, path) row group: lse per row, mean NLL, hit count (argmax = the first
    maximum, NaN counting as the maximum, as torch.argmax). A target outside [0, C) gives NaN
    (no out-of-bounds read; the compiled kernels raise / assert instead)."""
    q = tl.program_id(0).to(tl.int64)
    base = _ce_path_offset(q, P, J, sr, si, sj)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    nll = tl.zeros((BLOCK_B,), dtype=tl.float32)
    hits = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        bmask = bs < B
        rows = q * B + bs
        v = tl.load(logits_ptr + base + bs[:, None] * sb + cols[None, :],
                    mask=bmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
        isnan = v != v
        has_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
        vmax = tl.max(tl.where(isnan, float("-inf"), v), axis=1)
        first_nan = tl.min(tl.where(isnan, cols[None, :], BLOCK_C), axis=1)
        first_max = tl.min(tl.where(v == vmax[:, None], cols[None, :], BLOCK_C), axis=1)
        arg = tl.where(has_nan, first_nan, first_max)
        lse = _row_lse(v, cmask)
        y = tl.load(target_ptr + rows, mask=bmask, other=0)
        y_ok = (y >= 0) & (y < C)
        ly = tl.load(logits_ptr + base + bs * sb + y, mask=bmask & y_ok,
                     other=0.0).to(tl.float32)
        ly = tl.where(y_ok, ly, float("nan"))
        tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=bmask)
        nll += tl.where(bmask, lse - ly, 0.0)
        hits += tl.where(bmask & (arg == y), 1, 0)
    tl.store(path_loss_ptr + q, (tl.sum(nll, axis=0) / B).to(path_loss_ptr.dtype.element_ty))
    tl.store(correct_ptr + q, tl.sum(hits, axis=0).to(tl.int64))


@triton.jit
def _ce_loss_kernel(gate_ptr, path_loss_ptr, loss_ptr, P, BLOCK_P: tl.constexpr):
    """loss[r] = sum_p gate * path_loss / sum_p gate; NaN when the gate row sums to zero (the
    CPU kernel raises; raising here would need a host synchronisation)."""
    r = tl.program_id(0).to(tl.int64)
    num = tl.zeros((BLOCK_P,), dtype=tl.float32)
    den = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        pm = ps < P
        g = tl.load(gate_ptr + r * P + ps, mask=pm, other=0.0).to(tl.float32)
        pl = tl.load(path_loss_ptr + r * P + ps, mask=pm, other=0.0).to(tl.float32)
        num += g * pl
        den += g
    n = tl.sum(num, axis=0)
    d = tl.sum(den, axis=0)
    out = tl.where(d == 0.0, float("nan"), n / d)
    tl.store(loss_ptr + r, out.to(loss_ptr.dtype.element_ty))


@triton.jit
def _ce_weights_kernel(grad_loss_ptr, grad_pl_ptr, gate_ptr, w_ptr, P, B, HAS_GL: tl.constexpr,
                       HAS_GP: tl.constexpr, BLOCK_P: tl.constexpr):
    """w[r, p] = (grad_loss[r] * gate[r, p] / sum_p gate[r, p] + grad_path_loss[r, p]) / B; a
    missing grad_loss / grad_path_loss (HAS_GL / HAS_GP false) counts as zeros."""
    r = tl.program_id(0).to(tl.int64)
    den = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        den += tl.load(gate_ptr + r * P + ps, mask=ps < P, other=0.0).to(tl.float32)
    d = tl.sum(den, axis=0)
    gl = 0.0
    if HAS_GL:
        gl = tl.load(grad_loss_ptr + r).to(tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        pm = ps < P
        g = tl.load(gate_ptr + r * P + ps, mask=pm, other=0.0).to(tl.float32)
        gp = tl.zeros((BLOCK_P,), dtype=tl.float32)
        if HAS_GP:
            gp = tl.load(grad_pl_ptr + r * P + ps, mask=pm, other=0.0).to(tl.float32)
        tl.store(w_ptr + r * P + ps, (gl * g / d + gp) / B, mask=pm)


@triton.jit
def _ce_backward_kernel(logits_ptr, target_ptr, lse_ptr, w_ptr, grad_ptr, B, C,
                        P, J, sr, si, sj, sb, gr, gi, gj, gbs,
                        RECOMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad = w[r, p] * (softmax(logits) - onehot(target)) for one (r, p), tile by tile.

    RECOMPUTE (16-bit logits): the row lse is recomputed in fp32, not read back rounded (a bf16
    lse near 8 is off by up to 0.03: a 3% error on every softmax value)."""
    q = tl.program_id(0).to(tl.int64)
    base = _ce_path_offset(q, P, J, sr, si, sj)
    gbase = _ce_path_offset(q, P, J, gr, gi, gj)  # the gradient in its own strides
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    wq = tl.load(w_ptr + q)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        bmask = bs < B
        rows = q * B + bs
        mask = bmask[:, None] & cmask[None, :]
        v = tl.load(logits_ptr + base + bs[:, None] * sb + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)
        if RECOMPUTE:
            lse = _row_lse(v, cmask)
        else:
            lse = tl.load(lse_ptr + rows, mask=bmask, other=0.0).to(tl.float32)
        y = tl.load(target_ptr + rows, mask=bmask, other=0)
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        g = wq * (tl.exp(v - lse[:, None]) - onehot)
        tl.store(grad_ptr + gbase + bs[:, None] * gbs + cols[None, :],
                 g.to(grad_ptr.dtype.element_ty), mask=mask)


# =================================================================================================
# Launchers
# =================================================================================================
def _ce_layout(logits: Tensor) -> tuple:
    """Sizes (R, P, B, C, J) and strides (sr, si, sj, sb) of (R, P, B, C) or (R, I, J, B, C)
    logits (path p = i * J + j), read in place; classes contiguous."""
    if logits.dim() == 5:
        R, I, J, B, C = logits.shape
        sr, si, sj, sb = logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3)
        return (R, I * J, B, C, J), (sr, si, sj, sb)
    R, P, B, C = logits.shape
    return (R, P, B, C, 1), (logits.stride(0), logits.stride(1), 0, logits.stride(2))


def _ce_logits(logits: Tensor) -> Tensor:
    """Logits the kernels read: classes contiguous (a copy otherwise)."""
    return logits.contiguous() if logits.shape[-1] > 1 and logits.stride(-1) != 1 else logits


def _ce_check(logits: Tensor, target: Tensor, gate: Tensor, forward: bool = True) -> None:
    """The logits, target and gate of the forward (which needs B > 0 and C > 0: the loss is a
    mean over B rows of C classes) or the backward."""
    if logits.dim() not in (4, 5):
        raise ValueError(f"logits: expected (R, P, B, C) or (R, I, J, B, C), got shape "
                         f"{tuple(logits.shape)}")
    (R, P, B, C, _), _ = _ce_layout(logits)
    if target.dtype != torch.int64 or tuple(target.shape) != (R, P, B):
        raise ValueError(f"target: expected int64 of shape {(R, P, B)}, got {target.dtype} "
                         f"{tuple(target.shape)}")
    if gate.dtype != logits.dtype or tuple(gate.shape) != (R, P):
        raise ValueError(f"gate: expected {logits.dtype} of shape {(R, P)}, got {gate.dtype} "
                         f"{tuple(gate.shape)}")
    _check_devices(logits, target=target, gate=gate)
    if forward and (B == 0 or C == 0):
        raise ValueError("logits: expected a batch of B > 0 samples and C > 0 classes")


def _check_devices(logits: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name}: expected device {logits.device} (the device of the "
                             f"logits), got {t.device}")


def _ce_backward_check(grad_loss: Optional[Tensor], grad_path_loss: Optional[Tensor],
                       logits: Tensor, target: Tensor, gate: Tensor, lse: Tensor) -> None:
    """The backward's arguments, as the C++ backends check them: the forward's target and gate,
    its lse (R, P, B) and the optional incoming gradients (R,) and (R, P), all in the logits'
    dtype and on their device."""
    _ce_check(logits, target, gate, forward=False)
    (R, P, B, _, _), _ = _ce_layout(logits)
    for name, t, shape in (("grad_loss", grad_loss, (R,)),
                           ("grad_path_loss", grad_path_loss, (R, P)),
                           ("lse", lse, (R, P, B))):
        if t is None:
            continue
        if t.dtype != logits.dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected {logits.dtype} of shape {shape}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    _check_devices(logits, lse=lse, grad_loss=grad_loss, grad_path_loss=grad_path_loss)


def _ce_blocks(B: int, C: int) -> tuple[int, int]:
    BC = _pow2(C, 16, 1 << 16)
    return _pow2(B, 1, max(1, 4096 // BC)), BC  # a (BLOCK_B, BLOCK_C) tile of <= 4096 values


def _ce_impl(logits, target, gate):
    if logits.dtype not in TRITON_DTYPES:
        return torch.ops.gated_ops.gated_cross_entropy(logits, target, gate)
    _ce_check(logits, target, gate)
    logits, target, gate = _ce_logits(logits), target.contiguous(), gate.contiguous()
    (R, P, B, C, J), strides = _ce_layout(logits)
    loss = logits.new_empty(R)
    path_loss = logits.new_empty(R, P)
    correct = target.new_empty(R, P)
    lse = logits.new_empty(R, P, B)
    BB, BC = _ce_blocks(B, C)
    if R * P > 0:
        _ce_forward_kernel[(R * P,)](logits, target, path_loss, correct, lse, B, C, P, J,
                                     *strides, BLOCK_B=BB, BLOCK_C=BC)
    if R > 0:
        _ce_loss_kernel[(R,)](gate, path_loss, loss, P, BLOCK_P=_pow2(P, 16, 1024))
    return loss, path_loss, correct, lse


def _ce_backward_impl(grad_loss, grad_path_loss, logits, target, gate, lse):
    if logits.dtype not in TRITON_DTYPES:
        return torch.ops.gated_ops.gated_cross_entropy_backward(grad_loss, grad_path_loss,
                                                                logits, target, gate, lse)
    _ce_backward_check(grad_loss, grad_path_loss, logits, target, gate, lse)
    logits = _ce_logits(logits)
    target, gate, lse = (t.contiguous() for t in (target, gate, lse))
    # a missing gradient (an output nobody differentiates) counts as zeros; the kernel then
    # reads the gate in its place, unused
    has_gl, has_gp = grad_loss is not None, grad_path_loss is not None
    grad_loss = grad_loss.contiguous() if has_gl else gate
    grad_path_loss = grad_path_loss.contiguous() if has_gp else gate
    (R, P, B, C, J), strides = _ce_layout(logits)
    grad = torch.empty_like(logits)  # the logits' strides (a strided view stays one)
    if grad.numel() == 0:
        return grad
    w = torch.empty(R, P, dtype=torch.float32, device=logits.device)
    _ce_weights_kernel[(R,)](grad_loss, grad_path_loss, gate, w, P, B, HAS_GL=has_gl,
                             HAS_GP=has_gp, BLOCK_P=_pow2(P, 16, 1024))
    BB, BC = _ce_blocks(B, C)
    _ce_backward_kernel[(R * P,)](logits, target, lse, w, grad, B, C, P, J, *strides,
                                  *_ce_layout(grad)[1], RECOMPUTE=logits.element_size() == 2,
                                  BLOCK_B=BB, BLOCK_C=BC)
    return grad


# =================================================================================================
# Registration: the launchers as the kernels of torch.ops.gated_ops_triton.* (fakes, autograd:
# gated_ops/triton/__init__.py)
# =================================================================================================
register_kernels({
    "gated_cross_entropy": _ce_impl,
    "gated_cross_entropy_backward": _ce_backward_impl,
})


# =================================================================================================
# Public function
# =================================================================================================
def gated_cross_entropy(logits: Tensor, target: Tensor, gate: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gated_ops.gated_cross_entropy` with ``backend="triton"`` (differentiable). A gate
    row summing to zero gives a NaN loss (no host synchronisation to raise); a target outside
    [0, C) gives NaN."""
    return ops.gated_cross_entropy(logits, target, gate, backend="triton")
