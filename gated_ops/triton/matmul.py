"""The pathway matmul in Triton: ``pathway_matmul`` and its gradient ops over a blocked plan.

Forward: Z_i = X_i @ W_i^T for each block i of the plan, a batched tile GEMM with fp32
accumulation (_ztile_kernel), with the gate, bias and pathway-sum epilogue fused: a pathway that
is the only one of its destination writes y itself; the others' Z is summed by _gather_kernel in
the destination's CSR order. Backward: dZ = gate * grad_y per pathway (_grad_z_kernel); grad X_i
= dZ_i @ W_i and grad W_i = dZ_i^T @ X_i and grad bias = the column sums of dZ (gemm.py); grad
gate = <grad_y, Z + bias> per (pathway, sample), Z recomputed (_gate_grad_kernel). Grouped plans
and float64 run the compiled ops (common._uses_triton).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import ops
from ..plan import ONE_PER_DST, PathwayPlan
from .common import (_chunk_tiles, _dot_precision, _gemm_blocks, _pow2, _uses_triton,
                     register_kernels)
from .gemm import _launch_block_gemm, _launch_grad_bias

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


# =================================================================================================
# Launchers
# =================================================================================================
def _gate_kind(gate: Optional[Tensor]) -> int:
    if gate is None:
        return _GATE_NONE
    return _GATE_SAMPLE if gate.dim() == 2 else _GATE_PATH


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


# =================================================================================================
# Registration: the launchers as the kernels of torch.ops.gated_ops_triton.* (fakes, autograd:
# gated_ops/triton/__init__.py)
# =================================================================================================
register_kernels({
    "pathway_matmul": _pathway_matmul_impl,
    "pathway_grad_z": _grad_z_impl,
    "pathway_grad_x": _grad_x_impl,
    "pathway_grad_weight": _grad_weight_impl,
    "pathway_grad_bias": _grad_bias_impl,
    "pathway_grad_gate": _grad_gate_impl,
})


# =================================================================================================
# Public function
# =================================================================================================
def pathway_matmul(x: Tensor, weight: Tensor, plan: PathwayPlan, bias: Tensor | None = None,
                   gate: Tensor | None = None) -> Tensor:
    """:func:`gated_ops.pathway_matmul` with ``backend="triton"`` (differentiable). Grouped
    plans and float64 run the compiled op (see the module docstring)."""
    return ops.pathway_matmul(x, weight, plan, bias, gate, backend="triton")
