"""Initialisation helpers: aligned weights in given bases, orthonormal completions, random
orthogonal and Xavier-uniform matrices.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


import torch
from torch import Tensor


def complete_basis(q: Tensor) -> Tensor:
    """Extend ``q (n, r)`` with orthonormal columns to an orthogonal ``(n, n)`` whose first r
    columns are exactly ``q`` (deterministic: QR of ``[q, I_n]``)."""
    n, r = q.shape
    if r > n:
        raise ValueError(f"q: expected at most as many columns as rows, got shape {tuple(q.shape)}")
    full, tri = torch.linalg.qr(torch.cat([q, torch.eye(n, dtype=q.dtype, device=q.device)], dim=1))
    full = full[:, :n] * torch.sign(torch.diagonal(tri)[:n])
    return torch.cat([q, full[:, r:]], dim=1)


def random_orthogonal(
    rows: int,
    cols: int,
    gain: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``gain`` times a random ``(rows, cols)`` matrix with orthonormal columns (rows >= cols) or
    rows (rows < cols), Haar-distributed (QR of a Gaussian with the sign fix), like
    ``torch.nn.init.orthogonal_``."""
    big, small = max(rows, cols), min(rows, cols)
    g = torch.randn(big, small, generator=generator, dtype=torch.float64)
    q, tri = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(tri))
    q = q if rows >= cols else q.T
    return (gain * q).to(dtype)


def xavier_uniform(
    fan_out: int,
    fan_in: int,
    gain: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(fan_out, fan_in)`` matrix ~ U(-a, a), ``a = gain sqrt(6 / (fan_in + fan_out))`` (docs/math.md section 3)."""
    a = gain * math.sqrt(6.0 / (fan_in + fan_out))
    w = torch.rand(fan_out, fan_in, generator=generator, dtype=torch.float64)
    return ((2 * w - 1) * a).to(dtype)


def aligned_init(
    bases: Sequence[Tensor],
    strengths: float | Sequence[float | Tensor],
) -> list[Tensor]:
    """Aligned ("decoupled") weights of a chain of layers (docs/math.md section 5):

        W_e = R_{e+1}[:, :r_e] diag(b_e) R_e[:, :r_e]^T,   e = 0 .. L-1

    Args:
        bases: L + 1 matrices ``R_k (n_k, m_k)`` with orthonormal columns, from the input space
            (e.g. the input singular vectors of the data) to the output space (its output
            singular vectors); ``W_e`` maps space ``k = e`` to ``k = e + 1``.
        strengths: one entry per layer, a 1-D tensor ``b_e`` (its length r_e is the number of
            modes) or a float (every one of the ``min(m_e, m_{e+1})`` modes gets it); a single
            float is used for every layer (balanced: all modes of all layers equal). For a
            balanced init of product mode strength ``a`` use ``a ** (1 / L)``.

    Returns:
        ``[W_0 (n_1, n_0), ..., W_{L-1} (n_L, n_{L-1})]``.
    """
    L = len(bases) - 1
    if L < 1:
        raise ValueError(f"bases: need at least 2 bases (one layer), got {len(bases)}")
    if isinstance(strengths, (int, float)):
        strengths = [float(strengths)] * L
    if len(strengths) != L:
        raise ValueError(f"strengths: expected {L} entries (one per layer), got {len(strengths)}")
    weights = []
    for e in range(L):
        r_in, r_out = bases[e], bases[e + 1]
        b = strengths[e]
        if isinstance(b, (int, float)):
            b = torch.full((min(r_in.shape[1], r_out.shape[1]),), float(b), dtype=r_in.dtype)
        b = torch.as_tensor(b, dtype=r_in.dtype)
        r = b.shape[0]
        if r > min(r_in.shape[1], r_out.shape[1]):
            raise ValueError(
                f"strengths[{e}]: {r} modes, but bases {e} and {e + 1} have only "
                f"{r_in.shape[1]} and {r_out.shape[1]} columns"
            )
        weights.append(r_out[:, :r] @ torch.diag(b) @ r_in[:, :r].T)
    return weights
