"""The routed (sparse) pathway matmul in Triton: ``routed_matmul`` and its gradient ops.

The route table (csrc/routed.h) sorts the N = B k slots by weight: ``order`` (the slot at each
sorted position), ``pos`` (its inverse) and ``offsets`` (where weight m's rows start; offsets[M]
= the used slots). Every kernel reads it on the device; the host never does, so no call
synchronises with the GPU.

Forward: z[q] = x_q @ W[m]^T + bias[m] for the rows q of each weight m's group, one grouped
GEMM (_grouped_gemm_kernel) whose programs map to (a group's row tile, a column tile) through
the offsets, the A tile's rows gathered from x by each slot's source and sample as they are
loaded (no gather pass), or read in place when x is already grouped; the rows past offsets[M]
(unused slots) are written as zeros by the same launch. Then y[t, b] = the gated sum of z over
sample b's slots that end in t, in slot order (_combine_kernel; zero where no slot reaches).
Backward: dz = gate * grad_y at each used row (_grad_z_kernel); grad x = dz_q @ W[m] (the
grouped GEMM again), summed per sample by source (_combine_kernel); grad W[m] = dz_m^T x_m over
the group's rows (_grad_weight_kernel); grad bias = the column sums of each group
(_grad_bias_kernel); grad gate = <grad_y, z> per slot (_grad_gate_kernel).

Determinism: every output element is written by one program and every sum runs in a fixed
order (no atomics): bitwise reproducible for a given GPU and Triton version. float64 (and any
other dtype) runs the compiled ops; ``pathway_route``, a counting sort, is the compiled op.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (TRITON_DTYPES, _chunk_tiles, _dot_precision, _gemm_blocks, _pow2, log,
                     register_kernels)


# =================================================================================================
# Kernels
# =================================================================================================
@triton.jit
def _group_rows(offsets_ptr, t, N, M, BLOCK_M: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """The group g in [0, M] whose row tiles hold tile t, and the rows [r0, r1) of that tile
    (r0 >= r1: a spare tile, no work). Group M holds the unused slots' rows, offsets[M]..N.

    Group g's tiles are numbered from offsets[g] // BLOCK_M + g: that start never decreases with
    g and leaves room for the group's cdiv(n_g, BLOCK_M) tiles before the next group's start, so
    N // BLOCK_M + M + 1 tiles cover every group, and the tile's group is a binary search over
    the offsets (read on the device: the host never learns the groups' sizes)."""
    lo = t * 0
    hi = lo + M
    for _ in tl.static_range(SEARCH_STEPS):  # invariant: start(lo) <= t, the group in [lo, hi]
        mid = (lo + hi + 1) // 2
        ok = tl.load(offsets_ptr + mid) // BLOCK_M + mid <= t
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    first = tl.load(offsets_ptr + lo)
    r0 = first + (t - (first // BLOCK_M + lo)) * BLOCK_M
    r1 = tl.load(offsets_ptr + lo + 1, mask=lo < M, other=N)
    return lo, r0, tl.minimum(r1, r0 + BLOCK_M)


@triton.jit
def _slot_rows(order_ptr, idx_ptr, src_ptr, q, qmask, k, s_s, s_b):
    """Element offsets of the x rows (S, B, D_in) that sorted rows q read: x[src[p], b] for the
    slot order[q] = b k + j on pathway p = idx[slot]."""
    slot = tl.load(order_ptr + q, mask=qmask, other=0)
    p = tl.load(idx_ptr + slot, mask=qmask, other=0)
    s = tl.load(src_ptr + p, mask=qmask, other=0)
    return s * s_s + (slot // k) * s_b


@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, order_ptr, offsets_ptr, idx_ptr, src_ptr,
                         N, M, K, D, k, a_s0, a_s1, a_sk, w_sg, w_sk, w_sn, tiles_n,
                         GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                         SEARCH_STEPS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         CHUNK_TILES: tl.constexpr):
    """C[q] (N, D) = A_q (K) @ W_g (K, D) (+ bias[g]) for the rows q of group g, one tile; the
    unused slots' rows (group M) are zeros.

    A_q: the grouped row q of A (N, K) at a_ptr + q * a_s0, or (GATHER) row (src, b) of x
    (S, B, K) as _slot_rows finds it (strides a_s0, a_s1). W_g's element (r, c) lies at
    g * w_sg + r * w_sk + c * w_sn: W[g]^T for the forward, W[g] for grad x."""
    pid = tl.program_id(0)  # (row tile, column tile): a 1-D grid, the row tiles may exceed 65535
    t = (pid // tiles_n).to(tl.int64)
    pid_n = pid % tiles_n
    g, r0, r1 = _group_rows(offsets_ptr, t, N, M, BLOCK_M, SEARCH_STEPS)
    if r0 >= r1:
        return
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < r1
    cmask = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if g < M:
        if GATHER:
            a_rows = _slot_rows(order_ptr, idx_ptr, src_ptr, rows, rmask, k, a_s0, a_s1)
        else:
            a_rows = rows * a_s0
        w_base = w_ptr + g * w_sg
        for k1 in range(0, K, BLOCK_K * CHUNK_TILES):  # two-level sum (common._chunk_tiles)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kk in range(0, BLOCK_K * CHUNK_TILES, BLOCK_K):
                ks = k1 + kk + tl.arange(0, BLOCK_K)
                kmask = ks < K
                a = tl.load(a_ptr + a_rows[:, None] + ks[None, :] * a_sk,
                            mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_base + ks[:, None] * w_sk + cols[None, :] * w_sn,
                            mask=kmask[:, None] & cmask[None, :], other=0.0)
                if WIDEN:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                part = tl.dot(a, b, part, input_precision=DOT_PRECISION)
            acc += part
        if HAS_BIAS:
            acc += tl.load(bias_ptr + g * D + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * D + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _combine_kernel(z_ptr, gate_ptr, out_ptr, pos_ptr, idx_ptr, key_ptr, B, k, D,
                    HAS_GATE: tl.constexpr, BLOCK_O: tl.constexpr):
    """out[t, b] = sum_j gate[b, j] z[pos[b k + j]] over sample b's slots whose pathway's key
    (its destination: y; its source: grad x) is t, in slot order, summed in fp32; zero where
    no slot reaches (t, b). One program per (t, b) and column tile: no row has two writers."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // B
    b = pid % B
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for j in range(0, k):
        slot = b * k + j
        p = tl.load(idx_ptr + slot)
        hit = tl.load(key_ptr + p, mask=p >= 0, other=-1) == t
        q = tl.load(pos_ptr + slot)
        # (a scalar condition folded into the bound: a scalar & a block mask is not a mask to
        # Triton's interpreter)
        v = tl.load(z_ptr + q * D + cols, mask=cols < tl.where(hit, D, 0),
                    other=0.0).to(tl.float32)
        if HAS_GATE:
            v = v * tl.load(gate_ptr + slot).to(tl.float32)
        # (the other slots leave acc as it is: a NaN gate of theirs is not this row's)
        acc = tl.where(hit, acc + v, acc)
    tl.store(out_ptr + pid * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def _grad_z_kernel(gy_ptr, gate_ptr, dz_ptr, order_ptr, offsets_ptr, idx_ptr, dst_ptr, M, B, k,
                   D, GROUPED: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_O: tl.constexpr):
    """dz[q] = gate[slot] grad_y[dst[p], b] for the used sorted row q (slot = order[q] = b k + j
    on pathway p); with a grouped output dz[q] = grad_y[q]; zero for the unused rows."""
    q = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    used = q < tl.load(offsets_ptr + M)
    slot = tl.load(order_ptr + q, mask=used, other=0)
    if GROUPED:
        row = q
    else:
        p = tl.load(idx_ptr + slot, mask=used, other=0)
        row = tl.load(dst_ptr + p, mask=used, other=0) * B + slot // k
    v = tl.load(gy_ptr + row * D + cols, mask=cols < tl.where(used, D, 0),
                other=0.0).to(tl.float32)
    if HAS_GATE:
        v = v * tl.load(gate_ptr + slot, mask=used, other=0.0).to(tl.float32)
    tl.store(dz_ptr + q * D + cols, v.to(dz_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def _grad_weight_kernel(dz_ptr, x_ptr, gw_ptr, order_ptr, offsets_ptr, idx_ptr, src_ptr, Do, Di,
                        k, x_s0, x_s1, x_sd, tiles_n, tiles,
                        GATHER: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, CHUNK_TILES: tl.constexpr):
    """grad W[m] (Do, Di) = dz_m^T x_m over weight m's rows q in [offsets[m], offsets[m + 1])
    (x_q gathered as _grouped_gemm_kernel's A rows), one tile; zero for a weight no slot used.
    The reduction's length is the group's, known only on the device: chunks of CHUNK_TILES
    K-tiles each summed apart, then the chunks (common._chunk_tiles)."""
    pid = tl.program_id(0)  # (weight m, tile): a 1-D grid, since M * tiles may exceed 65535
    m = (pid // tiles).to(tl.int64)
    pid_m = (pid % tiles) // tiles_n
    pid_n = (pid % tiles) % tiles_n
    q0 = tl.load(offsets_ptr + m)
    q1 = tl.load(offsets_ptr + m + 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # of Do
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # of Di
    rmask = rows < Do
    cmask = cols < Di
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k1 in range(q0, q1, BLOCK_K * CHUNK_TILES):
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k1, tl.minimum(k1 + BLOCK_K * CHUNK_TILES, q1), BLOCK_K):
            qs = kk + tl.arange(0, BLOCK_K)
            qmask = qs < q1
            if GATHER:
                x_rows = _slot_rows(order_ptr, idx_ptr, src_ptr, qs, qmask, k, x_s0, x_s1)
            else:
                x_rows = qs * x_s0
            a = tl.load(dz_ptr + qs[None, :] * Do + rows[:, None],
                        mask=rmask[:, None] & qmask[None, :], other=0.0)
            b = tl.load(x_ptr + x_rows[:, None] + cols[None, :] * x_sd,
                        mask=qmask[:, None] & cmask[None, :], other=0.0)
            if WIDEN:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(a, b, part, input_precision=DOT_PRECISION)
        acc += part
    tl.store(gw_ptr + (m * Do + rows[:, None]) * Di + cols[None, :],
             acc.to(gw_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _grad_bias_kernel(dz_ptr, gb_ptr, offsets_ptr, D, tiles,
                      BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """grad bias[m] = the column sums of dz over weight m's rows (fp32), one column tile."""
    m = (tl.program_id(0) // tiles).to(tl.int64)
    cols = (tl.program_id(0) % tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    cmask = cols < D
    q1 = tl.load(offsets_ptr + m + 1)
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for r0 in range(tl.load(offsets_ptr + m), q1, BLOCK_R):
        qs = r0 + tl.arange(0, BLOCK_R)
        tile = tl.load(dz_ptr + qs[:, None] * D + cols[None, :],
                       mask=(qs < q1)[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    tl.store(gb_ptr + m * D + cols, acc.to(gb_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _grad_gate_kernel(gy_ptr, z_ptr, gg_ptr, pos_ptr, idx_ptr, dst_ptr, B, k, D,
                      BLOCK_O: tl.constexpr):
    """grad gate[b, j] = <grad_y[dst[p], b], z[pos[slot]]> (fp32) for slot b k + j on pathway
    p; zero for an unused slot."""
    slot = tl.program_id(0).to(tl.int64)
    p = tl.load(idx_ptr + slot)
    used = p >= 0
    row = tl.load(dst_ptr + p, mask=used, other=0) * B + slot // k
    q = tl.load(pos_ptr + slot)
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for o0 in range(0, D, BLOCK_O):
        offs = o0 + tl.arange(0, BLOCK_O)
        omask = offs < tl.where(used, D, 0)
        gv = tl.load(gy_ptr + row * D + offs, mask=omask, other=0.0).to(tl.float32)
        zv = tl.load(z_ptr + q * D + offs, mask=omask, other=0.0).to(tl.float32)
        acc += gv * zv
    tl.store(gg_ptr + slot, tl.sum(acc, axis=0).to(gg_ptr.dtype.element_ty))


# =================================================================================================
# Launchers
# =================================================================================================
def _uses_triton(op: str, dtype: torch.dtype) -> bool:
    """float32 / float16 / bfloat16; anything else uses the compiled op."""
    if dtype in TRITON_DTYPES:
        return True
    log.debug("gated_ops_triton: %s in %s -> compiled op (torch.ops.gated_ops)", op, dtype)
    return False


def _dot_args(t: Tensor) -> dict:
    """The tiles' dot precision, and whether to widen the operands to float32 first: bfloat16
    on the CPU, where Triton's interpreter runs the kernels and its tl.dot misreads bfloat16
    operands (a 16 x 16 product of unit-scale values came out 2e10 off). Widened, the products
    are exact in float32 as on a GPU's bfloat16 tensor cores, and so is the fp32 accumulation;
    on a GPU the operands stay bfloat16."""
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        return dict(DOT_PRECISION="ieee", WIDEN=True)
    return dict(DOT_PRECISION=_dot_precision(t.dtype), WIDEN=False)


def _check_route(route: Tensor, idx: Tensor, paths: Tensor, M: int, ref: Tensor) -> None:
    """The checks of routed.h that the shapes allow (the tables' contents would need the host to
    read them: out-of-range entries are not caught on a GPU, as the routed module says)."""
    if idx.dim() != 2 or idx.dtype != torch.int64:
        raise ValueError(f"idx: expected (B, k) int64 pathway indices, got {idx.dtype} of shape "
                         f"{tuple(idx.shape)}")
    if paths.dtype != torch.int64 or paths.dim() != 2 or paths.shape[0] != 5:
        raise ValueError(f"paths: expected the plan's (5, P) int64 table, got {paths.dtype} of "
                         f"shape {tuple(paths.shape)}")
    N = idx.numel()
    if route.dtype != torch.int64 or route.dim() != 1 or not route.is_contiguous():
        raise ValueError(f"route: expected a contiguous 1-D int64 route table "
                         f"(gated_ops.make_route), got {route.dtype} of shape "
                         f"{tuple(route.shape)}")
    if route.numel() != 2 * N + M + 1:
        raise ValueError(f"route: expected {2 * N + M + 1} entries for N = {N} slots and M = {M} "
                         f"weights (a table made for other sizes?), got {route.numel()}")
    for name, t in (("idx", idx), ("route", route), ("paths (plan)", paths)):
        if t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device}, got {t.device}")


def _check_like(name: str, t: Optional[Tensor], ref: Tensor, shape: Optional[tuple] = None,
                ref_name: str = "x") -> None:
    """t (if given) in ref's dtype on its device, of ``shape`` if given."""
    if t is None:
        return
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name}: expected dtype {ref.dtype} on {ref.device} (those of "
                         f"{ref_name}), got {t.dtype} on {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _tables(route: Tensor, idx: Tensor, paths: Tensor):
    """(order, pos, offsets) views of the route table, idx contiguous, the paths' rows."""
    N = idx.numel()
    return route[:N], route[N:2 * N], route[2 * N:], idx.contiguous(), paths.contiguous()


def _launch_grouped_gemm(a: Tensor, w: Tensor, w_strides: tuple, bias: Optional[Tensor],
                         c: Tensor, order: Tensor, offsets: Tensor, idx: Tensor, paths: Tensor,
                         gather: bool) -> None:
    """c (N, D) = each group's rows of a times its weight (w_strides: the (group, reduction,
    column) strides of the operand W_g), zero rows for the unused slots; a is x (S, B, K) with
    ``gather``, else grouped rows (N, K)."""
    N, D = c.shape
    K = a.shape[-1]
    M = offsets.numel() - 1
    k = idx.shape[1]
    # a group's rows: about N / M, unknown to the host (tiles past a group's end do no work)
    BM, BN, BK = _gemm_blocks(triton.cdiv(N, max(M, 1)), D, K)
    tiles_n = triton.cdiv(D, BN)
    a_strides = (a.stride(0), a.stride(1), a.stride(2)) if gather else (a.stride(0), 0,
                                                                        a.stride(1))
    _grouped_gemm_kernel[((N // BM + M + 1) * tiles_n,)](
        a, w, bias if bias is not None else c, c, order, offsets, idx, paths[0], N, M, K, D, k,
        *a_strides, *w_strides, tiles_n,
        GATHER=gather, HAS_BIAS=bias is not None, **_dot_args(c), SEARCH_STEPS=M.bit_length(),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, CHUNK_TILES=_chunk_tiles(K, BK))


def _launch_combine(z: Tensor, gate: Optional[Tensor], out: Tensor, pos: Tensor, idx: Tensor,
                    key: Tensor) -> None:
    """out (T, B, D) = the (gated) sum of z's rows per sample by the slots' key (a row of
    paths: destinations or sources)."""
    T, B, D = out.shape
    BO = _pow2(D, 16, 128)
    _combine_kernel[(T * B, triton.cdiv(D, BO))](
        z, gate if gate is not None else z, out, pos, idx, key, B, idx.shape[1], D,
        HAS_GATE=gate is not None, BLOCK_O=BO)


def _routed_matmul_impl(x, weight, bias, gate, idx, route, paths, num_dst, grouped_in=False,
                        grouped_out=False):
    if not _uses_triton("routed_matmul", x.dtype):
        return torch.ops.gated_ops.routed_matmul(x, weight, bias, gate, idx, route, paths,
                                                 num_dst, grouped_in, grouped_out)
    B, k = idx.shape if idx.dim() == 2 else (0, 0)
    N = B * k
    if grouped_in and (x.dim() != 2 or x.shape[0] != N):
        raise ValueError(f"x: expected grouped rows (N, D_in) with N = B * k = {N} (idx's "
                         f"slots), got shape {tuple(x.shape)}")
    if not grouped_in and (x.dim() != 3 or x.shape[1] != B):
        raise ValueError(f"x: expected (S, B, D_in) with B = {B} (idx.size(0)), got shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 3 or weight.shape[2] != x.shape[-1]:
        raise ValueError(f"weight: expected (M, D_out, D_in) with D_in = {x.shape[-1]} (x's "
                         f"last dimension), got shape {tuple(weight.shape)}")
    M, Do, Di = weight.shape
    _check_route(route, idx, paths, M, x)
    _check_like("weight", weight, x)
    _check_like("bias", bias, x, (M, Do))
    if gate is not None and grouped_out:
        raise ValueError("gate: a grouped output takes no gate (the gate scales the combined "
                         "output; pass it to the layer that combines)")
    _check_like("gate", gate, x, (B, k))
    if num_dst < 0:
        raise ValueError(f"num_dst: expected >= 0, got {num_dst}")
    order, pos, offsets, idx, paths = _tables(route, idx, paths)
    # z (N, D_out): the grouped rows, bias included, zero for the unused slots
    z = x.new_empty(N, Do)
    if z.numel():
        bias = bias.contiguous() if bias is not None else None
        # operand W[m]^T (D_in, D_out): element (i, o) at m * s0 + i * s2 + o * s1
        _launch_grouped_gemm(x, weight, (weight.stride(0), weight.stride(2), weight.stride(1)),
                             bias, z, order, offsets, idx, paths, gather=not grouped_in)
    if grouped_out:
        return z, x.new_empty(0)
    y = x.new_empty(num_dst, B, Do)
    if y.numel():
        _launch_combine(z, gate.contiguous() if gate is not None else None, y, pos, idx,
                        paths[2])
    return y, z


def _routed_grad_z_impl(grad_y, gate, idx, route, paths, grouped_out=False):
    if not _uses_triton("routed_grad_z", grad_y.dtype):
        return torch.ops.gated_ops.routed_grad_z(grad_y, gate, idx, route, paths, grouped_out)
    B, k = idx.shape if idx.dim() == 2 else (0, 0)
    N = B * k
    M = route.numel() - 2 * N - 1
    _check_route(route, idx, paths, M, grad_y)
    if grouped_out:
        if gate is not None:
            raise ValueError("gate: a grouped output takes no gate")
        if grad_y.dim() != 2 or grad_y.shape[0] != N:
            raise ValueError(f"grad_y: expected grouped rows (N, D_out) with N = {N}, got shape "
                             f"{tuple(grad_y.shape)}")
    elif grad_y.dim() != 3 or grad_y.shape[1] != B:
        raise ValueError(f"grad_y: expected (T, B, D_out) with B = {B}, got shape "
                         f"{tuple(grad_y.shape)}")
    _check_like("gate", gate, grad_y, (B, k), "grad_y")
    order, pos, offsets, idx, paths = _tables(route, idx, paths)
    D = grad_y.shape[-1]
    dz = grad_y.new_empty(N, D)
    if dz.numel():
        BO = _pow2(D, 16, 128)
        _grad_z_kernel[(N, triton.cdiv(D, BO))](
            grad_y.contiguous(), gate.contiguous() if gate is not None else dz, dz, order,
            offsets, idx, paths[2], M, B, k, D,
            GROUPED=grouped_out, HAS_GATE=gate is not None, BLOCK_O=BO)
    return dz


def _check_grad_z(grad_z: Tensor, idx: Tensor, d_out: Optional[int] = None) -> None:
    N = idx.numel() if idx.dim() == 2 else -1
    if grad_z.dim() != 2 or grad_z.shape[0] != N or (d_out is not None and
                                                     grad_z.shape[1] != d_out):
        want = f"(N, D_out) = ({N}, {d_out})" if d_out is not None else f"(N, D_out), N = {N}"
        raise ValueError(f"grad_z: expected {want}, got shape {tuple(grad_z.shape)}")


def _routed_grad_x_impl(grad_z, weight, idx, route, paths, num_sources, grouped_in=False):
    if not _uses_triton("routed_grad_x", grad_z.dtype):
        return torch.ops.gated_ops.routed_grad_x(grad_z, weight, idx, route, paths, num_sources,
                                                 grouped_in)
    if weight.dim() != 3:
        raise ValueError(f"weight: expected (M, D_out, D_in), got shape {tuple(weight.shape)}")
    M, Do, Di = weight.shape
    _check_grad_z(grad_z, idx, Do)
    _check_route(route, idx, paths, M, grad_z)
    _check_like("weight", weight, grad_z, ref_name="grad_z")
    if not grouped_in and num_sources < 0:
        raise ValueError(f"num_sources: expected >= 0, got {num_sources}")
    order, pos, offsets, idx, paths = _tables(route, idx, paths)
    N = idx.numel()
    # gx (N, D_in): each used row dz_q @ W[m], zero for the unused slots
    gx = grad_z.new_empty(N, Di)
    if gx.numel():
        _launch_grouped_gemm(grad_z, weight, (weight.stride(0), weight.stride(1),
                                              weight.stride(2)), None, gx, order, offsets, idx,
                             paths, gather=False)
    if grouped_in:
        return gx
    grad_x = grad_z.new_empty(num_sources, idx.shape[0], Di)
    if grad_x.numel():
        _launch_combine(gx, None, grad_x, pos, idx, paths[0])
    return grad_x


def _routed_grad_weight_impl(grad_z, x, idx, route, paths, num_weights, grouped_in=False):
    if not _uses_triton("routed_grad_weight", grad_z.dtype):
        return torch.ops.gated_ops.routed_grad_weight(grad_z, x, idx, route, paths, num_weights,
                                                      grouped_in)
    _check_grad_z(grad_z, idx)
    N, Do = grad_z.shape
    B = idx.shape[0]
    if grouped_in and (x.dim() != 2 or x.shape[0] != N) or \
            not grouped_in and (x.dim() != 3 or x.shape[1] != B):
        raise ValueError(f"x: expected {'grouped rows (N, D_in)' if grouped_in else '(S, B, D_in)'}"
                         f" for this route, got shape {tuple(x.shape)}")
    if num_weights < 0:
        raise ValueError(f"num_weights: expected >= 0, got {num_weights}")
    _check_route(route, idx, paths, num_weights, grad_z)
    _check_like("x", x, grad_z, ref_name="grad_z")
    order, pos, offsets, idx, paths = _tables(route, idx, paths)
    Di = x.shape[-1]
    gw = grad_z.new_empty(num_weights, Do, Di)
    if gw.numel():
        # rows per group ~ N / M: the reduction's tile
        BM, BN, BK = _gemm_blocks(Do, Di, triton.cdiv(N, max(num_weights, 1)))
        tiles_n = triton.cdiv(Di, BN)
        tiles = triton.cdiv(Do, BM) * tiles_n
        xs = (x.stride(0), x.stride(1), x.stride(2)) if not grouped_in else (x.stride(0), 0,
                                                                            x.stride(1))
        _grad_weight_kernel[(num_weights * tiles,)](
            grad_z.contiguous(), x, gw, order, offsets, idx, paths[0], Do, Di, idx.shape[1],
            *xs, tiles_n, tiles,
            GATHER=not grouped_in, **_dot_args(gw), BLOCK_M=BM,
            BLOCK_N=BN, BLOCK_K=BK, CHUNK_TILES=_chunk_tiles(N, BK))
    return gw


def _routed_grad_bias_impl(grad_z, route, num_weights):
    if not _uses_triton("routed_grad_bias", grad_z.dtype):
        return torch.ops.gated_ops.routed_grad_bias(grad_z, route, num_weights)
    if grad_z.dim() != 2:
        raise ValueError(f"grad_z: expected (N, D_out), got shape {tuple(grad_z.shape)}")
    if num_weights < 0:
        raise ValueError(f"num_weights: expected >= 0, got {num_weights}")
    N, D = grad_z.shape
    if route.dtype != torch.int64 or route.dim() != 1 or route.numel() != 2 * N + num_weights + 1:
        raise ValueError(f"route: expected {2 * N + num_weights + 1} int64 entries for N = {N} "
                         f"slots and M = {num_weights} weights, got {route.dtype} of shape "
                         f"{tuple(route.shape)}")
    gb = grad_z.new_empty(num_weights, D)
    if gb.numel():
        BO = _pow2(D, 16, 128)
        tiles = triton.cdiv(D, BO)
        _grad_bias_kernel[(num_weights * tiles,)](
            grad_z.contiguous(), gb, route[2 * N:], D, tiles,
            BLOCK_R=_pow2(triton.cdiv(N, max(num_weights, 1)), 16, 64), BLOCK_O=BO)
    return gb


def _routed_grad_gate_impl(grad_y, z, idx, route, paths):
    if not _uses_triton("routed_grad_gate", grad_y.dtype):
        return torch.ops.gated_ops.routed_grad_gate(grad_y, z, idx, route, paths)
    B, k = idx.shape if idx.dim() == 2 else (0, 0)
    N = B * k
    if grad_y.dim() != 3 or grad_y.shape[1] != B:
        raise ValueError(f"grad_y: expected (T, B, D_out) with B = {B}, got shape "
                         f"{tuple(grad_y.shape)}")
    D = grad_y.shape[2]
    if z.dim() != 2 or tuple(z.shape) != (N, D) or z.dtype != grad_y.dtype:
        raise ValueError(f"z: expected {grad_y.dtype} of shape (N, D_out) = ({N}, {D}), got "
                         f"{z.dtype} of shape {tuple(z.shape)}")
    _check_route(route, idx, paths, route.numel() - 2 * N - 1, grad_y)
    order, pos, offsets, idx, paths = _tables(route, idx, paths)
    gg = grad_y.new_empty(B, k)
    if gg.numel():
        _grad_gate_kernel[(N,)](grad_y.contiguous(), z.contiguous(), gg, pos, idx, paths[2], B,
                                k, D, BLOCK_O=_pow2(D, 16, 128))
    return gg


def _pathway_route_impl(idx, paths, num_weights):
    # A stable counting sort of the slots by weight: ATen / C++ work (the compiled op), that
    # validates idx where it can
    return torch.ops.gated_ops.pathway_route(idx, paths, num_weights)


# =================================================================================================
# Registration: the launchers as the kernels of torch.ops.gated_ops_triton.* (fakes, autograd:
# gated_ops/routed.py, register_routed_parts, through gated_ops/triton/__init__.py)
# =================================================================================================
register_kernels({
    "pathway_route": _pathway_route_impl,
    "routed_matmul": _routed_matmul_impl,
    "routed_grad_z": _routed_grad_z_impl,
    "routed_grad_x": _routed_grad_x_impl,
    "routed_grad_weight": _routed_grad_weight_impl,
    "routed_grad_bias": _routed_grad_bias_impl,
    "routed_grad_gate": _routed_grad_gate_impl,
})
