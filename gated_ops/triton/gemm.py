"""The block GEMM and the bias's column sums over a blocked plan, shared by the pathway
matmul's backward (matmul.py: grad X, grad W, grad bias) and the fused SGD (sgd.py). The fused
SGD runs the same kernels with the SGD step as their epilogue, so that the gradient tile is
stepped into the parameter where it is formed, never stored.

Reading order: the epilogue (_hash32, _sgd_store), the two kernels, their launchers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import _chunk_tiles, _dot_precision, _gemm_blocks, _pow2


# =================================================================================================
# Kernels
# =================================================================================================


@triton.jit
def _hash32(v):
    """The "lowbias32" hash of uint32 values held in int64 (reference._hash32, csrc/hash32.h)."""
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


# =================================================================================================
# Launchers
# =================================================================================================


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


def _seed_mix(seed: int) -> int:
    """hash32(uint32(seed) ^ 0x5bd1e995), as reference.round_stochastic_bf16 and the CPU
    kernels mix a rounding seed."""
    v = (seed & 0xFFFFFFFF) ^ 0x5BD1E995
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)
