"""Triton kernels for the gated pathway ops, as a second backend beside the compiled CUDA one.

Reading order: kernels, launchers, registration, public functions (STYLE.md). The math is
:mod:`gated_ops.reference`; the exact semantics and the plan layout are those of the registered
ops ``torch.ops.gated_ops.*`` (csrc/gated_ops.cpp, gated_ops/plan.py).

Entry points:

* ``pathway_matmul(x, weight, plan, bias=None, gate=None)`` and
  ``gated_cross_entropy(logits, target, gate)``: the same signatures and semantics as
  :func:`gated_ops.pathway_matmul` / :func:`gated_ops.gated_cross_entropy`, differentiable.
* the registered ops ``torch.ops.gated_ops_triton.<name>`` for ``pathway_matmul``,
  ``pathway_grad_z``, ``pathway_grad_x``, ``pathway_grad_weight``, ``pathway_grad_bias``,
  ``pathway_grad_gate``, ``pathway_sgd_``, ``pathway_sgd_lookahead_``, ``pathway_bias_sgd_``,
  ``gated_cross_entropy``,
  ``gated_cross_entropy_backward``: the schemas of ``gated_ops::<name>``
  (``torch.library.custom_op``, with fake kernels and autograd whose backward calls the
  ``gated_ops_triton`` ops). ``GatedPathwayLinear(..., backend="triton")`` and
  ``KPathNet(..., backend="triton")`` run a whole model on them, the fused SGD included.

What runs in Triton: the blocked plan layout (every k-path layer; ``plan.kind == "blocked"``) in
float32 / float16 / bfloat16, as batched tile GEMMs (``tl.dot``, fp32 accumulation, IEEE fp32 for
float32 inputs) over the plan's block views, with the gate, bias and pathway-sum epilogue fused
into the forward GEMM, and the SGD step fused into the weight-gradient GEMM (``pathway_sgd_``:
the gradient tile stays in registers; ``pathway_sgd_lookahead_`` also multiplies each new
weight tile by the next batch) and into the bias's column sums (``pathway_bias_sgd_``);
and the gated cross-entropy. Explicit fallbacks, each a documented call of the compiled op (``torch.ops.gated_ops.<name>``), logged at DEBUG level: grouped plans (arbitrary
GDLN graphs) and float64 data; for the fused SGD steps also weights the plan does not cover,
an empty batch and non-contiguous parameters.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slow; float32 / float16 only): set
it before this module is imported. Determinism: no atomics; every output tile is written by one
program, so results are bitwise reproducible for a given GPU and Triton version.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ops
from .registration import (ce_backward, ce_grad_like, ce_setup_context, pathway_backward,
                  pathway_setup_context, register_vmap_rules)
from .plan import ONE_PER_DST, PathwayPlan, z_shape

__all__ = ["pathway_matmul", "gated_cross_entropy", "TRITON_DTYPES"]

log = logging.getLogger(__name__)

#: Data types the Triton kernels take; others fall back to the compiled ops.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Gate kinds (constexpr): none, one scalar per pathway (P,), one value per sample (P, B).
_GATE_NONE, _GATE_PATH, _GATE_SAMPLE = 0, 1, 2


# =================================================================================================
# Kernels
# =================================================================================================
@triton.jit
def _ztile_kernel(x_ptr, w_ptr, bias_ptr, gate_ptr, y_ptr, z_ptr, zinv_ptr, paths_ptr, dst_rowptr,
                  P, B, Di, Do, ns, nm, s0, m0, tiles_n, tiles,
                  HAS_BIAS: tl.constexpr, GATE: tl.constexpr, FUSED: tl.constexpr,
                  DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  CHUNK_TILES: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of Z_i = X_i @ W_i^T for block i of a blocked plan.

    X_i (ns*B, Di) are the rows of sources s0 + i*ns.., W_i (nm*Do, Di) the rows of weights
    m0 + i*nm..; Z row a*B + b, column c*Do + o belongs to pathway zinv[(i*ns + a)*nm + c].
    FUSED: a pathway that is the only one of its destination t writes y[t, b, o] =
    gate * (z + bias) directly; the others store z into Z for _gather_kernel. Else: store all Z.
    """
    pid = tl.program_id(0)  # (block i, tile): a 1-D grid, since n may exceed 65535
    i = (pid // tiles).to(tl.int64)
    pid_m = (pid % tiles) // tiles_n
    pid_n = (pid % tiles) % tiles_n
    R = ns * B
    N = nm * Do
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < R
    cmask = cols < N
    x_rows = (s0 + i * ns) * B + rows.to(tl.int64)
    w_rows = (m0 + i * nm) * Do + cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k1 in range(0, Di, BLOCK_K * CHUNK_TILES):  # two-level sum (see _chunk_tiles)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, BLOCK_K * CHUNK_TILES, BLOCK_K):
            ks = k1 + kk + tl.arange(0, BLOCK_K)
            kmask = ks < Di
            a = tl.load(x_ptr + x_rows[:, None] * Di + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptr + w_rows[None, :] * Di + ks[:, None],
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            part = tl.dot(a, b, part, input_precision=DOT_PRECISION)
        acc += part
    mask = rmask[:, None] & cmask[None, :]
    z_off = (i * R + rows)[:, None] * N + cols[None, :]
    if FUSED:
        bb = rows % B
        k = i * ns + rows // B
        c = cols // Do
        o = cols % Do
        q = tl.load(zinv_ptr + k[:, None] * nm + c[None, :], mask=mask, other=0)
        t = tl.load(paths_ptr + 2 * P + q, mask=mask, other=0)
        cnt = (tl.load(dst_rowptr + t + 1, mask=mask, other=0)
               - tl.load(dst_rowptr + t, mask=mask, other=0))
        val = acc
        if HAS_BIAS:
            bv = tl.load(bias_ptr + (m0 + i * nm + c) * Do + o, mask=cmask, other=0.0)
            val = val + bv.to(tl.float32)[None, :]
        if GATE == 1:
            val = val * tl.load(gate_ptr + q, mask=mask, other=0.0).to(tl.float32)
        if GATE == 2:
            val = val * tl.load(gate_ptr + q * B + bb[:, None], mask=mask, other=0.0).to(tl.float32)
        y_off = (t * B + bb[:, None]) * Do + o[None, :]
        tl.store(y_ptr + y_off, val.to(y_ptr.dtype.element_ty), mask=mask & (cnt == 1))
        tl.store(z_ptr + z_off, acc.to(z_ptr.dtype.element_ty), mask=mask & (cnt != 1))
    else:
        tl.store(z_ptr + z_off, acc.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_kernel(z_ptr, bias_ptr, gate_ptr, y_ptr, paths_ptr, dst_rowptr, dst_perm,
                   P, B, Do, ldz,
                   HAS_BIAS: tl.constexpr, GATE: tl.constexpr, ONLY_MULTI: tl.constexpr,
                   BLOCK_O: tl.constexpr):
    """y[t, b] = sum_{p in dst CSR(t)} gate * (Z_p[b] + bias[m_p]), in CSR order, for one (t, b).

    ONLY_MULTI: destinations with exactly one pathway were written by _ztile_kernel, which
    left their Z unwritten: they read nothing here (their program only runs the empty loop)."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // B
    b = pid % B
    k0 = tl.load(dst_rowptr + t)
    k1 = tl.load(dst_rowptr + t + 1)
    k_end = k1
    if ONLY_MULTI:
        # (reading that unwritten Z made the interpreter warn of overflows in its casts, in
        # whichever test first met garbage there)
        k_end = tl.where(k1 - k0 == 1, k0, k1)
    for o0 in range(0, Do, BLOCK_O):
        offs = o0 + tl.arange(0, BLOCK_O)
        omask = offs < Do
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for kk in range(k0, k_end):
            q = tl.load(dst_perm + kk)
            zr = tl.load(paths_ptr + 3 * P + q)
            zc = tl.load(paths_ptr + 4 * P + q)
            zv = tl.load(z_ptr + (zr * B + b) * ldz + zc * Do + offs, mask=omask,
                         other=0.0).to(tl.float32)
            if HAS_BIAS:
                m = tl.load(paths_ptr + P + q)
                zv += tl.load(bias_ptr + m * Do + offs, mask=omask, other=0.0).to(tl.float32)
            if GATE == 1:
                zv *= tl.load(gate_ptr + q).to(tl.float32)
            if GATE == 2:
                zv *= tl.load(gate_ptr + q * B + b).to(tl.float32)
            acc += zv
        write = omask
        if ONLY_MULTI:
            write = write & ((offs * 0 + (k1 - k0)) != 1)
        tl.store(y_ptr + (t * B + b) * Do + offs, acc.to(y_ptr.dtype.element_ty), mask=write)


@triton.jit
def _grad_z_kernel(gy_ptr, gate_ptr, dz_ptr, paths_ptr, P, B, Do, ldz,
                   GATE: tl.constexpr, BLOCK_O: tl.constexpr):
    """dZ_p[b] = gate[p, b] * grad_y[t_p, b] for one (p, b); every Z cell has one pathway."""
    pid = tl.program_id(0).to(tl.int64)
    q = pid // B
    b = pid % B
    t = tl.load(paths_ptr + 2 * P + q)
    zr = tl.load(paths_ptr + 3 * P + q)
    zc = tl.load(paths_ptr + 4 * P + q)
    g = 1.0
    if GATE == 1:
        g = tl.load(gate_ptr + q).to(tl.float32)
    if GATE == 2:
        g = tl.load(gate_ptr + q * B + b).to(tl.float32)
    for o0 in range(0, Do, BLOCK_O):
        offs = o0 + tl.arange(0, BLOCK_O)
        omask = offs < Do
        v = tl.load(gy_ptr + (t * B + b) * Do + offs, mask=omask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + (zr * B + b) * ldz + zc * Do + offs,
                 (g * v).to(dz_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _hash32(v):
    """The "lowbias32" hash of uint32 values held in int64 (reference._hash32, cpu_simd.h)."""
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)


@triton.jit
def _sgd_store(p_ptr, buf_ptr, off, mask, g, lr, momentum, weight_decay, mix, step_ptr,
               HAS_BUF: tl.constexpr, HAS_WD: tl.constexpr, NESTEROV: tl.constexpr,
               STOCHASTIC: tl.constexpr, HAS_STEP: tl.constexpr):
    """torch.optim.SGD's step (dampening 0) on the parameter elements p[off] (and their momentum
    buf[off]) from their float32 gradient g, computed in float32 and rounded once when stored.
    STOCHASTIC (bfloat16 parameters): rounded stochastically, bit for bit as
    reference.round_stochastic_bf16 with the seed whose hash is ``mix``, the element index being
    the flat offset ``off``. HAS_STEP: ``mix`` is the seed itself, and the seed of the rounding
    reference.rounding_seed_at(seed, step), the step read from step_ptr as the kernel runs (the
    ops' rounding_step: a captured graph draws new bits as the counter advances)."""
    w = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    d = g
    if HAS_WD:
        d = d + weight_decay * w
    if HAS_BUF:
        buf = momentum * tl.load(buf_ptr + off, mask=mask, other=0.0).to(tl.float32) + d
        tl.store(buf_ptr + off, buf.to(buf_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    w = w - lr * d
    if STOCHASTIC:
        if HAS_STEP:
            # (step * 0x9E3779B1 + seed) mod 2^31, from 31-bit factors: no int64 overflow
            st = tl.load(step_ptr) & 0x7FFFFFFF
            mix = _hash32(((st * 0x1E3779B1 + mix) & 0x7FFFFFFF) ^ 0x5BD1E995)
        r = _hash32(((off & 0xFFFFFFFF) + mix) & 0xFFFFFFFF) & 0xFFFF
        u = w.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        bits = (((u + r) & 0xFFFFFFFF) >> 16).to(tl.int32)
        bits = tl.where(w != w, 0x7FC0, bits)
        tl.store(p_ptr + off, bits.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(p_ptr + off, w.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_gemm_kernel(a_ptr, b_ptr, c_ptr, buf_ptr, M, N, K,
                       a_off, a_bs, a_sm, a_sk, b_off, b_bs, b_sk, b_sn, c_off, c_bs, c_sm,
                       tiles_n, tiles, lr, momentum, weight_decay, mix, step_ptr,
                       xn_ptr, zp_ptr, xn_off, xn_bs, NB, zp_rows,
                       DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       CHUNK_TILES: tl.constexpr, SGD: tl.constexpr, HAS_BUF: tl.constexpr,
                       HAS_WD: tl.constexpr, NESTEROV: tl.constexpr, STOCHASTIC: tl.constexpr,
                       HAS_STEP: tl.constexpr, LOOK: tl.constexpr = False,
                       BLOCK_B: tl.constexpr = 16):
    """C_i (M, N) = A_i (M, K) @ B_i (K, N) for block i of a blocked plan, one tile. Operand X's
    element (r, c) of block i is at x_off + i * x_bs + r * x_s<row> + c * x_s<col> (C's columns
    contiguous): the backward GEMMs dZ_i @ W_i and dZ_i^T @ X_i are this with other strides.

    SGD: C is a weight and the product its gradient, which never leaves registers: the tile of
    the weight (and of its momentum buffer, laid out like it) is stepped by _sgd_store, the
    element index being the flat offset into C. STOCHASTIC: the operands are widened to float32
    first (float32 products, as the compiled kernels form them).

    LOOK (with SGD; pathway_sgd_lookahead_): the new weight tile, as stored, times the next
    batch's NB rows of block i (xn at xn_off + i * xn_bs, rows of N columns) gives this column
    tile's share of Z_next^T, stored to zp[pid_n] (zp_rows rows of M values: row i * NB + b);
    the tiles' shares are then summed in a fixed order."""
    pid = tl.program_id(0)  # (block i, tile): a 1-D grid, since n may exceed 65535
    i = (pid // tiles).to(tl.int64)
    pid_m = (pid % tiles) // tiles_n
    pid_n = (pid % tiles) % tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    a_base = a_ptr + a_off + i * a_bs
    b_base = b_ptr + b_off + i * b_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k1 in range(0, K, BLOCK_K * CHUNK_TILES):  # two-level sum (see _chunk_tiles)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, BLOCK_K * CHUNK_TILES, BLOCK_K):
            ks = k1 + kk + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(a_base + rows[:, None] * a_sm + ks[None, :] * a_sk,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_base + ks[:, None] * b_sk + cols[None, :] * b_sn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            if STOCHASTIC:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(a, b, part, input_precision=DOT_PRECISION)
        acc += part
    off = c_off + i * c_bs + rows[:, None] * c_sm + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if SGD:
        _sgd_store(c_ptr, buf_ptr, off, omask, acc, lr, momentum, weight_decay, mix, step_ptr,
                   HAS_BUF, HAS_WD, NESTEROV, STOCHASTIC, HAS_STEP)
        if LOOK:
            w_new = tl.load(c_ptr + off, mask=omask, other=0.0)  # as stored (rounded)
            bs = tl.arange(0, BLOCK_B)
            xnt = tl.load(xn_ptr + xn_off + i * xn_bs + bs[None, :] * N + cols[:, None],
                          mask=cmask[:, None] & (bs[None, :] < NB), other=0.0)
            if STOCHASTIC:
                w_new = w_new.to(tl.float32)
                xnt = xnt.to(tl.float32)
            part = tl.dot(w_new, xnt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_B)
            zoff = (pid_n.to(tl.int64) * zp_rows + i * NB + bs[None, :]) * M + rows[:, None]
            tl.store(zp_ptr + zoff, part, mask=rmask[:, None] & (bs[None, :] < NB))
    else:
        tl.store(c_ptr + off, acc.to(c_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _grad_bias_kernel(dz_ptr, gb_ptr, buf_ptr, B, Do, ns, nm, m0, tiles,
                      lr, momentum, weight_decay, mix, step_ptr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SGD: tl.constexpr,
                      HAS_BUF: tl.constexpr, HAS_WD: tl.constexpr, NESTEROV: tl.constexpr,
                      STOCHASTIC: tl.constexpr, HAS_STEP: tl.constexpr):
    """grad bias of block i's weights: the column sums of dZ_i (ns*B, nm*Do), one column tile.
    SGD (pathway_bias_sgd_): gb is the bias, stepped by _sgd_store from the float32 sums."""
    i = (tl.program_id(0) // tiles).to(tl.int64)
    pid = tl.program_id(0) % tiles
    R = ns * B
    N = nm * Do
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        tile = tl.load(dz_ptr + (i * R + rs)[:, None] * N + cols[None, :],
                       mask=(rs < R)[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    off = (m0 + i * nm) * Do + cols
    if SGD:
        _sgd_store(gb_ptr, buf_ptr, off, cmask, acc, lr, momentum, weight_decay, mix, step_ptr,
                   HAS_BUF, HAS_WD, NESTEROV, STOCHASTIC, HAS_STEP)
    else:
        tl.store(gb_ptr + off, acc.to(gb_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gate_grad_kernel(gy_ptr, z_ptr, bias_ptr, gg_ptr, paths_ptr, P, B, Do, ldz,
                      HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr):
    """gg[p, b] = <grad_y[t_p, b], Z_p[b] + bias[m_p]> (fp32) for one (p, b)."""
    pid = tl.program_id(0).to(tl.int64)
    q = pid // B
    b = pid % B
    m = tl.load(paths_ptr + P + q)
    t = tl.load(paths_ptr + 2 * P + q)
    zr = tl.load(paths_ptr + 3 * P + q)
    zc = tl.load(paths_ptr + 4 * P + q)
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for o0 in range(0, Do, BLOCK_O):
        offs = o0 + tl.arange(0, BLOCK_O)
        omask = offs < Do
        zv = tl.load(z_ptr + (zr * B + b) * ldz + zc * Do + offs, mask=omask,
                     other=0.0).to(tl.float32)
        if HAS_BIAS:
            zv += tl.load(bias_ptr + m * Do + offs, mask=omask, other=0.0).to(tl.float32)
        gv = tl.load(gy_ptr + (t * B + b) * Do + offs, mask=omask, other=0.0).to(tl.float32)
        acc += gv * zv
    tl.store(gg_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _ce_path_offset(q, P, J, sr, si, sj):
    """Element offset of path q's first logit row in (R, P, B, C) or (R, I, J, B, C) logits with
    these strides (ops.gated_cross_entropy: the k-path decoder's output viewed in place)."""
    r = q // P
    p = q % P
    return r * sr + (p // J) * si + (p % J) * sj


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
def _row_lse(v, cmask):
    """log-sum-exp of each row of a (BLOCK_B, BLOCK_C) fp32 tile whose padding is -inf, shifted
    by the row max as log_softmax is (NaN when the row holds a NaN or an infinite max)."""
    isnan = v != v
    has_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
    mx = tl.where(has_nan, float("nan"), tl.max(tl.where(isnan, float("-inf"), v), axis=1))
    s = tl.sum(tl.where(cmask[None, :], tl.exp(v - mx[:, None]), 0.0), axis=1)
    return tl.log(s) + mx


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
def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _gate_kind(gate: Optional[Tensor]) -> int:
    if gate is None:
        return _GATE_NONE
    return _GATE_SAMPLE if gate.dim() == 2 else _GATE_PATH


def _uses_triton(layout: list[int], dtype: torch.dtype) -> bool:
    """Blocked plans in float32 / float16 / bfloat16; anything else uses the compiled op."""
    if layout[1] > 0 and dtype in TRITON_DTYPES:
        return True
    log.debug("gated_ops_triton: %s plan in %s -> compiled op (torch.ops.gated_ops)",
              "blocked" if layout[1] > 0 else "grouped", dtype)
    return False


def _check_data(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor],
                P: int) -> None:
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[2] != x.shape[2]:
        raise ValueError(f"x, weight: expected (S, B, D_in) and (M, D_out, D_in), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: expected {x.dtype} on {x.device} like x, got {t.dtype} on "
                             f"{t.device}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"bias: expected shape {tuple(weight.shape[:2])}, got "
                         f"{tuple(bias.shape)}")
    if gate is not None and tuple(gate.shape) not in ((P,), (P, x.shape[1])):
        raise ValueError(f"gate: expected (P,) or (P, B) = ({P},) or ({P}, {x.shape[1]}), got "
                         f"{tuple(gate.shape)}")


def _owner(csr: Tensor, layout: list[int], P: int, S: int, M: int) -> Tensor:
    """Blocked plans: the pathway of each (row block, column block) of Z, a view of the plan's
    ``owner`` table (gated_ops/plan.py: csr = dst, src, wgt CSR, then owner)."""
    start = (layout[0] + 1) + (S + 1) + (M + 1) + 3 * P
    return csr[start:start + P]


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 tiles in full IEEE precision, as plain PyTorch's default matmul (TF32 would be an
    # error of ~1e-3 against the tolerance rule); "tf32" is tl.dot's default, a no-op for 16-bit.
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_tiles(red: int, block_k: int) -> int:
    # Long reductions are summed in two levels: chunks of 4 K-tiles each into a fresh fp32
    # accumulator, then the chunks. tl.dot accumulates each output along the whole reduction, and
    # at 3072 (a CIFAR encoder) or 800 (a k-path decoder's gradient) that sequential chain was
    # measured on the H100 at 1.1-1.9x the error of cuBLAS, which the tolerance rule caps at 2x.
    # A short reduction keeps one level (a chunk's masked tail tiles would be wasted work).
    return 4 if red > 4 * block_k else 1


def _gemm_blocks(rows: int, cols: int, red: int) -> tuple[int, int, int]:
    # tl.dot needs every dimension >= 16; 64 caps registers per program.
    return _pow2(rows, 16, 64), _pow2(cols, 16, 64), _pow2(red, 16, 64)


def _launch_block_gemm(A: Tensor, Bm: Tensor, C: Tensor, n: int, M: int, N: int, K: int,
                       a: tuple, b: tuple, c: tuple, sgd: tuple | None = None,
                       look: tuple | None = None) -> Tensor | None:
    """_block_gemm_kernel over the n blocks; a, b = (offset, block stride, row stride, column
    stride), c = (offset, block stride, row stride), in elements. ``sgd`` = (momentum buffer or
    None, lr, momentum, weight_decay, nesterov, rounding_seed, rounding_step or None): step C (a
    weight) by the product instead of storing it (rounding_seed >= 0: stochastic rounding of a
    bfloat16 C).
    ``look`` = (x_next, offset, block stride, NB), with sgd: the lookahead; returns the column
    tiles' float32 shares of Z_next^T, (tiles_n, n * NB, M)."""
    BM, BN, BK = _gemm_blocks(M, N, K)
    tiles_n = triton.cdiv(N, BN)
    tiles = triton.cdiv(M, BM) * tiles_n
    buf, scalars, flags = _sgd_args(sgd, C)
    zp = None
    if look is not None:
        xn, xn_off, xn_bs, NB = look
        zp = torch.empty(tiles_n, n * NB, M, dtype=torch.float32, device=C.device)
        extra = (xn, zp, xn_off, xn_bs, NB, n * NB)
        flags = dict(flags, LOOK=True, BLOCK_B=_pow2(NB, 16, 64))
    else:
        extra = (C, C, 0, 0, 0, 0)
    _block_gemm_kernel[(tiles * n,)](
        A, Bm, C, buf, M, N, K, *a, *b, *c, tiles_n, tiles, *scalars, *extra,
        DOT_PRECISION="ieee" if flags["STOCHASTIC"] else _dot_precision(C.dtype), BLOCK_M=BM,
        BLOCK_N=BN, BLOCK_K=BK, CHUNK_TILES=_chunk_tiles(K, BK), **flags)
    return zp


def _launch_grad_bias(grad_z: Tensor, gb: Tensor, layout: list[int], B: int, Do: int,
                      sgd: tuple | None = None) -> None:
    """_grad_bias_kernel over the n blocks: the bias gradient into gb, or (``sgd`` as for
    _launch_block_gemm) the step of the bias gb."""
    _, n, _, ns, m0, nm, _ = layout
    BN = _pow2(nm * Do, 16, 128)
    tiles = triton.cdiv(nm * Do, BN)
    buf, scalars, flags = _sgd_args(sgd, gb)
    _grad_bias_kernel[(tiles * n,)](
        grad_z, gb, buf, B, Do, ns, nm, m0, tiles, *scalars, BLOCK_R=_pow2(ns * B, 16, 64),
        BLOCK_N=BN, **flags)


def _sgd_args(sgd: tuple | None, out: Tensor) -> tuple[Tensor, tuple, dict]:
    """A _sgd_store epilogue's arguments from ``sgd`` = (momentum buffer or None, lr, momentum,
    weight_decay, nesterov, rounding_seed, rounding_step or None) or None (no step): the buffer
    (``out`` in its place when there is none), the runtime arguments (lr, momentum,
    weight_decay, mix or with a step tensor the seed, the step tensor or ``out`` in its place)
    and the constexpr flags."""
    buf, lr, momentum, weight_decay, nesterov, seed, step = (
        sgd if sgd is not None else (None, 0., 0., 0., 0, -1, None))
    stochastic = seed >= 0
    has_step = stochastic and step is not None
    return (buf if buf is not None else out,
            (float(lr), float(momentum), float(weight_decay),
             seed if has_step else _seed_mix(seed) if stochastic else 0,
             step if has_step else out),
            dict(SGD=sgd is not None, HAS_BUF=buf is not None, HAS_WD=weight_decay != 0,
                 NESTEROV=bool(nesterov), STOCHASTIC=stochastic, HAS_STEP=has_step))


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


def _seed_mix(seed: int) -> int:
    """hash32(uint32(seed) ^ 0x5bd1e995), as reference.round_stochastic_bf16 and the CPU
    kernels mix a rounding seed."""
    v = (seed & 0xFFFFFFFF) ^ 0x5BD1E995
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)


def _launch_ztile(x, weight, bias, gate, paths, csr, layout, y, z, fused) -> None:
    T, n, s0, ns, m0, nm, _ = layout
    P = paths.shape[1]
    B, Di = x.shape[1], x.shape[2]
    Do = weight.shape[1]
    BM, BN, BK = _gemm_blocks(ns * B, nm * Do, Di)
    tiles_n = triton.cdiv(nm * Do, BN)
    tiles = triton.cdiv(ns * B, BM) * tiles_n
    grid = (tiles * n,)
    zinv = _owner(csr, layout, P, x.shape[0], weight.shape[0]) if fused else paths
    dummy = z
    _ztile_kernel[grid](
        x, weight, bias if bias is not None else dummy, gate if gate is not None else dummy,
        y if y is not None else dummy, z, zinv, paths, csr, P, B, Di, Do, ns, nm, s0, m0, tiles_n,
        tiles,
        HAS_BIAS=bias is not None, GATE=_gate_kind(gate), FUSED=fused,
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        CHUNK_TILES=_chunk_tiles(Di, BK))


def _pathway_matmul_impl(x, weight, bias, gate, paths, csr, layout):
    if not _uses_triton(layout, x.dtype):
        return torch.ops.gated_ops.pathway_matmul(x, weight, bias, gate, paths, csr, layout)
    P = paths.shape[1]
    _check_data(x, weight, bias, gate, P)
    T, n, s0, ns, m0, nm, _ = layout
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    gate = gate.contiguous() if gate is not None else None
    B, Do = x.shape[1], weight.shape[1]
    if P == 0 or B == 0 or Do == 0:
        return x.new_zeros(T, B, Do)
    y = x.new_empty(T, B, Do)
    z = x.new_empty(n * ns * B, nm * Do)
    _launch_ztile(x, weight, bias, gate, paths, csr, layout, y, z, fused=True)
    if layout[6] & ONE_PER_DST:
        return y  # the tiles wrote every destination
    dummy = z
    _gather_kernel[(T * B,)](
        z, bias if bias is not None else dummy, gate if gate is not None else dummy, y, paths,
        csr, csr[T + 1:], P, B, Do, nm * Do,
        HAS_BIAS=bias is not None, GATE=_gate_kind(gate), ONLY_MULTI=True,
        BLOCK_O=_pow2(Do, 16, 128))
    return y


def _grad_z_impl(grad_y, gate, paths, csr, layout, num_sources, num_weights):
    if not _uses_triton(layout, grad_y.dtype):
        return torch.ops.gated_ops.pathway_grad_z(grad_y, gate, paths, csr, layout, num_sources,
                                                  num_weights)
    T, n, s0, ns, m0, nm, _ = layout
    P = paths.shape[1]
    grad_y = grad_y.contiguous()
    gate = gate.contiguous() if gate is not None else None
    B, Do = grad_y.shape[1], grad_y.shape[2]
    dz = grad_y.new_empty(n * ns * B, nm * Do)
    if dz.numel() == 0:
        return dz
    _grad_z_kernel[(P * B,)](grad_y, gate if gate is not None else grad_y, dz, paths, P, B, Do,
                             nm * Do, GATE=_gate_kind(gate), BLOCK_O=_pow2(Do, 16, 128))
    return dz


def _grad_x_impl(grad_z, weight, paths, csr, layout, num_sources, batch):
    if not _uses_triton(layout, weight.dtype):
        return torch.ops.gated_ops.pathway_grad_x(grad_z, weight, paths, csr, layout,
                                                  num_sources, batch)
    T, n, s0, ns, m0, nm, _ = layout
    grad_z, weight = grad_z.contiguous(), weight.contiguous()
    B, Do, Di = batch, weight.shape[1], weight.shape[2]
    covers = n * ns == num_sources
    gx = (weight.new_empty if covers else weight.new_zeros)(num_sources, B, Di)
    if gx.numel() == 0:
        return gx
    R, Kz = ns * B, nm * Do
    # grad X_i (ns*B, Di) = dZ_i (ns*B, nm*Do) @ W_i (nm*Do, Di)
    _launch_block_gemm(grad_z, weight, gx, n, R, Di, Kz, a=(0, R * Kz, Kz, 1),
                       b=(m0 * Do * Di, Kz * Di, Di, 1), c=(s0 * B * Di, R * Di, Di))
    return gx


def _grad_weight_impl(grad_z, x, paths, csr, layout, num_weights, d_out):
    if not _uses_triton(layout, x.dtype):
        return torch.ops.gated_ops.pathway_grad_weight(grad_z, x, paths, csr, layout,
                                                       num_weights, d_out)
    T, n, s0, ns, m0, nm, _ = layout
    grad_z, x = grad_z.contiguous(), x.contiguous()
    B, Di, Do = x.shape[1], x.shape[2], d_out
    if B == 0:
        return x.new_zeros(num_weights, Do, Di)
    covers = n * nm == num_weights
    gw = (x.new_empty if covers else x.new_zeros)(num_weights, Do, Di)
    if gw.numel() == 0:
        return gw
    R, Kz = ns * B, nm * Do
    # grad W_i (nm*Do, Di) = dZ_i^T (nm*Do, ns*B) @ X_i (ns*B, Di)
    _launch_block_gemm(grad_z, x, gw, n, Kz, Di, R, a=(0, R * Kz, 1, Kz),
                       b=(s0 * B * Di, R * Di, Di, 1), c=(m0 * Do * Di, Kz * Di, Di))
    return gw


def _check_layer_bias(bias, bias_buf, weight, momentum, bias_rounding_seed, rounding_step):
    """The bias a weight update also steps, checked before either is touched (the words of
    csrc/gated_ops.h's check_layer_bias)."""
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


def _step_layer_bias(grad_z, x, weight, paths, csr, layout, lr, momentum, weight_decay,
                     nesterov, rounding_step, bias, bias_buf, bias_rounding_seed) -> None:
    if bias is not None:
        _bias_sgd_impl(grad_z, bias, bias_buf, paths, csr, layout, x.shape[0], weight.shape[0],
                       lr, momentum, weight_decay, nesterov, bias_rounding_seed, rounding_step)


def _sgd_impl(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum, weight_decay,
              nesterov, rounding_seed, rounding_step=None, bias=None, bias_momentum_buffer=None,
              bias_rounding_seed=-1) -> None:
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
        from .optim import _compute_z
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


def _grad_bias_impl(grad_z, paths, csr, layout, num_sources, num_weights, d_out):
    if not _uses_triton(layout, grad_z.dtype):
        return torch.ops.gated_ops.pathway_grad_bias(grad_z, paths, csr, layout, num_sources,
                                                     num_weights, d_out)
    T, n, s0, ns, m0, nm, _ = layout
    grad_z = grad_z.contiguous()
    Do = d_out
    B = grad_z.shape[0] // (n * ns)
    covers = n * nm == num_weights
    gb = (grad_z.new_empty if covers and B > 0 else grad_z.new_zeros)(num_weights, Do)
    if B == 0 or gb.numel() == 0:
        return gb
    _launch_grad_bias(grad_z, gb, layout, B, Do)
    return gb


def _bias_sgd_impl(grad_z, bias, momentum_buffer, paths, csr, layout, num_sources, num_weights,
                   lr, momentum, weight_decay, nesterov, rounding_seed,
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


def _grad_gate_impl(grad_y, x, weight, bias, gate, paths, csr, layout):
    if not _uses_triton(layout, x.dtype):
        return torch.ops.gated_ops.pathway_grad_gate(grad_y, x, weight, bias, gate, paths, csr,
                                                     layout)
    T, n, s0, ns, m0, nm, _ = layout
    P = paths.shape[1]
    _check_data(x, weight, bias, gate, P)
    x, weight, grad_y = x.contiguous(), weight.contiguous(), grad_y.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, Do = x.shape[1], weight.shape[1]
    gg = torch.zeros(P, B, dtype=torch.float32, device=x.device)
    if P > 0 and B > 0 and Do > 0:
        z = x.new_empty(n * ns * B, nm * Do)
        _launch_ztile(x, weight, None, None, paths, csr, layout, None, z, fused=False)
        _gate_grad_kernel[(P * B,)](grad_y, z, bias if bias is not None else z, gg, paths, P, B,
                                    Do, nm * Do, HAS_BIAS=bias is not None,
                                    BLOCK_O=_pow2(Do, 16, 128))
    return (gg if gate.dim() == 2 else gg.sum(1)).to(x.dtype)


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
# Registration: custom ops with fake kernels and autograd over the same family of ops
# =================================================================================================
_LIB = "gated_ops_triton"


@torch.library.custom_op(f"{_LIB}::pathway_matmul", mutates_args=())
def _pathway_matmul_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor],
                       paths: Tensor, csr: Tensor, layout: list[int]) -> Tensor:
    return _pathway_matmul_impl(x, weight, bias, gate, paths, csr, layout)


@torch.library.custom_op(f"{_LIB}::pathway_grad_z", mutates_args=())
def _grad_z_op(grad_y: Tensor, gate: Optional[Tensor], paths: Tensor, csr: Tensor,
               layout: list[int], num_sources: int, num_weights: int) -> Tensor:
    return _grad_z_impl(grad_y, gate, paths, csr, layout, num_sources, num_weights)


@torch.library.custom_op(f"{_LIB}::pathway_grad_x", mutates_args=())
def _grad_x_op(grad_z: Tensor, weight: Tensor, paths: Tensor, csr: Tensor, layout: list[int],
               num_sources: int, batch: int) -> Tensor:
    return _grad_x_impl(grad_z, weight, paths, csr, layout, num_sources, batch)


@torch.library.custom_op(f"{_LIB}::pathway_grad_weight", mutates_args=())
def _grad_weight_op(grad_z: Tensor, x: Tensor, paths: Tensor, csr: Tensor, layout: list[int],
                    num_weights: int, d_out: int) -> Tensor:
    return _grad_weight_impl(grad_z, x, paths, csr, layout, num_weights, d_out)


@torch.library.custom_op(f"{_LIB}::pathway_grad_bias", mutates_args=())
def _grad_bias_op(grad_z: Tensor, paths: Tensor, csr: Tensor, layout: list[int],
                  num_sources: int, num_weights: int, d_out: int) -> Tensor:
    return _grad_bias_impl(grad_z, paths, csr, layout, num_sources, num_weights, d_out)


@torch.library.custom_op(f"{_LIB}::pathway_grad_gate", mutates_args=())
def _grad_gate_op(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor,
                  paths: Tensor, csr: Tensor, layout: list[int]) -> Tensor:
    return _grad_gate_impl(grad_y, x, weight, bias, gate, paths, csr, layout)


_SGD_MUTATES = ("weight", "momentum_buffer", "bias", "bias_momentum_buffer")


@torch.library.custom_op(f"{_LIB}::pathway_sgd_", mutates_args=_SGD_MUTATES)
def _sgd_op(grad_z: Tensor, x: Tensor, weight: Tensor, momentum_buffer: Optional[Tensor],
            paths: Tensor, csr: Tensor, layout: list[int], lr: float, momentum: float,
            weight_decay: float, nesterov: bool, rounding_seed: int = -1,
            rounding_step: Optional[Tensor] = None, bias: Optional[Tensor] = None,
            bias_momentum_buffer: Optional[Tensor] = None, bias_rounding_seed: int = -1) -> None:
    _sgd_impl(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum,
              weight_decay, nesterov, rounding_seed, rounding_step, bias, bias_momentum_buffer,
              bias_rounding_seed)


@torch.library.custom_op(f"{_LIB}::pathway_sgd_lookahead_", mutates_args=_SGD_MUTATES)
def _sgd_lookahead_op(grad_z: Tensor, x: Tensor, weight: Tensor,
                      momentum_buffer: Optional[Tensor], paths: Tensor, csr: Tensor,
                      layout: list[int], lr: float, momentum: float, weight_decay: float,
                      nesterov: bool, rounding_seed: int, x_next: Tensor,
                      rounding_step: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      bias_momentum_buffer: Optional[Tensor] = None,
                      bias_rounding_seed: int = -1) -> Tensor:
    return _sgd_lookahead_impl(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr,
                               momentum, weight_decay, nesterov, rounding_seed, x_next,
                               rounding_step, bias, bias_momentum_buffer, bias_rounding_seed)


@_sgd_lookahead_op.register_fake
def _(grad_z, x, weight, momentum_buffer, paths, csr, layout, lr, momentum, weight_decay,
      nesterov, rounding_seed, x_next, rounding_step=None, bias=None, bias_momentum_buffer=None,
      bias_rounding_seed=-1):
    _, n, _, ns, _, nm, _ = layout
    rows = n * ns * x_next.shape[1] if n > 0 else paths.shape[1] * x_next.shape[1]
    return x_next.new_empty(rows, nm * weight.shape[1] if n > 0 else weight.shape[1])


@torch.library.custom_op(f"{_LIB}::pathway_bias_sgd_", mutates_args=("bias", "momentum_buffer"))
def _bias_sgd_op(grad_z: Tensor, bias: Tensor, momentum_buffer: Optional[Tensor], paths: Tensor,
                 csr: Tensor, layout: list[int], num_sources: int, num_weights: int, lr: float,
                 momentum: float, weight_decay: float, nesterov: bool,
                 rounding_seed: int = -1, rounding_step: Optional[Tensor] = None) -> None:
    _bias_sgd_impl(grad_z, bias, momentum_buffer, paths, csr, layout, num_sources, num_weights,
                   lr, momentum, weight_decay, nesterov, rounding_seed, rounding_step)


@torch.library.custom_op(f"{_LIB}::gated_cross_entropy", mutates_args=())
def _ce_op(logits: Tensor, target: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ce_impl(logits, target, gate)


@torch.library.custom_op(f"{_LIB}::gated_cross_entropy_backward", mutates_args=())
def _ce_backward_op(grad_loss: Optional[Tensor], grad_path_loss: Optional[Tensor],
                    logits: Tensor, target: Tensor, gate: Tensor, lse: Tensor) -> Tensor:
    return _ce_backward_impl(grad_loss, grad_path_loss, logits, target, gate, lse)


@_pathway_matmul_op.register_fake
def _(x, weight, bias, gate, paths, csr, layout):
    return x.new_empty(layout[0], x.shape[1], weight.shape[1])


@_grad_z_op.register_fake
def _(grad_y, gate, paths, csr, layout, num_sources, num_weights):
    return grad_y.new_empty(z_shape(layout, paths.shape[1], grad_y.shape[1], grad_y.shape[2]))


@_grad_x_op.register_fake
def _(grad_z, weight, paths, csr, layout, num_sources, batch):
    return grad_z.new_empty(num_sources, batch, weight.shape[2])


@_grad_weight_op.register_fake
def _(grad_z, x, paths, csr, layout, num_weights, d_out):
    return grad_z.new_empty(num_weights, d_out, x.shape[2])


@_grad_bias_op.register_fake
def _(grad_z, paths, csr, layout, num_sources, num_weights, d_out):
    return grad_z.new_empty(num_weights, d_out)


@_grad_gate_op.register_fake
def _(grad_y, x, weight, bias, gate, paths, csr, layout):
    return gate.new_empty(gate.shape)  # contiguous, as the kernel's (a transposed gate too)


@_ce_op.register_fake
def _(logits, target, gate):
    R, P, B = target.shape  # logits: (R, P, B, C) or (R, I, J, B, C)
    return (logits.new_empty(R), logits.new_empty(R, P), target.new_empty(R, P),
            logits.new_empty(R, P, B))


@_ce_backward_op.register_fake
def _(grad_loss, grad_path_loss, logits, target, gate, lse):
    return ce_grad_like(logits)


_tops = torch.ops.gated_ops_triton


# Autograd: the compiled backend's backward formulas, over this backend's ops.
_pathway_matmul_op.register_autograd(pathway_backward(_tops),
                                     setup_context=pathway_setup_context)
_ce_op.register_autograd(ce_backward(_tops), setup_context=ce_setup_context)
register_vmap_rules(_LIB)


# =================================================================================================
# Public functions
# =================================================================================================
def pathway_matmul(x: Tensor, weight: Tensor, plan: PathwayPlan, bias: Tensor | None = None,
                   gate: Tensor | None = None) -> Tensor:
    """:func:`gated_ops.pathway_matmul` with ``backend="triton"`` (differentiable). Grouped
    plans and float64 run the compiled op (see the module docstring)."""
    return ops.pathway_matmul(x, weight, plan, bias, gate, backend="triton")


def gated_cross_entropy(logits: Tensor, target: Tensor, gate: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gated_ops.gated_cross_entropy` with ``backend="triton"`` (differentiable). A gate
    row summing to zero gives a NaN loss (no host synchronisation to raise); a target outside
    [0, C) gives NaN."""
    return ops.gated_cross_entropy(logits, target, gate, backend="triton")
