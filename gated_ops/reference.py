"""The spec: readable pure-PyTorch versions of every gated_ops op.

Every compiled backend (CPU C++, CUDA, Triton) must agree with these functions; the tests compare
them in float64. They are differentiable with plain autograd and run on any device and dtype, so
they are also the documented fallback (slow: they materialise one weight copy per pathway).

Notation (docs/math.md section 1): a pathway p reads source s_p, multiplies by weight m_p and adds its
gated output into destination t_p:

    y[t] = sum_{p : t_p = t} gate[p] * (x[s_p] @ W[m_p]^T + bias[m_p])                    (1)

A GDLN layer h_v = g_v * sum_{e=(u->v)} g_e W_e h_u is (1) with one pathway per edge and
gate[p] = g_{t_p} * g_e (node gate times edge gate).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pathway_matmul_ref", "routed_gate_ref", "routed_pathway_matmul_ref",
           "routed_matmul_ref", "gated_cross_entropy_ref", "sgd_momentum_ref",
           "round_stochastic_bf16"]


def pathway_matmul_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gate: Tensor | None,
    src: Tensor,
    wgt: Tensor,
    dst: Tensor,
    num_dst: int,
) -> Tensor:
    """Gated multi-pathway matmul, equation (1).

    Args:
        x: (S, B, D_in) sources.
        weight: (M, D_out, D_in) weight bank.
        bias: (M, D_out) or None.
        gate: None (all ones), (P,) one scalar per pathway, or (P, B) one value per sample.
        src, wgt, dst: (P,) int64 pathway table: source, weight and destination of pathway p.
        num_dst: T, the number of destinations.
    Returns:
        y: (T, B, D_out); a destination with no incoming pathway is zero.
    """
    z = torch.einsum("pbi,poi->pbo", x[src], weight[wgt])  # (P, B, D_out)
    if bias is not None:
        z = z + bias[wgt].unsqueeze(1)
    if gate is not None:
        z = z * (gate.unsqueeze(-1) if gate.dim() == 2 else gate.view(-1, 1, 1))
    y = z.new_zeros(num_dst, x.shape[1], weight.shape[1])
    return y.index_add(0, dst, z)


def routed_gate_ref(idx: Tensor, weight: Tensor, num_paths: int) -> Tensor:
    """The dense (P, B) gate of a routed call: gate[p, b] = sum_j weight[b, j] [idx[b, j] = p].

    Args:
        idx: (B, k) int64: the k active pathways of sample b; -1 marks an unused slot.
        weight: (B, k) their gates (the router's top-k weights).
        num_paths: P.
    Returns:
        (P, B): the slots' weights at their pathways (a pathway named twice in a row gets the
        sum), zero elsewhere.
    """
    B, k = idx.shape
    used = idx >= 0
    gate = weight.new_zeros(num_paths, B)
    b = torch.arange(B, device=idx.device).unsqueeze(1).expand(B, k)
    return gate.index_put((idx[used], b[used]), weight[used], accumulate=True)


def routed_pathway_matmul_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    idx: Tensor,
    gate: Tensor | None,
    src: Tensor,
    wgt: Tensor,
    dst: Tensor,
    num_dst: int,
) -> Tensor:
    """The routed (sparse) form of (1): per sample b, k active pathways idx[b, :] with gates
    gate[b, :] (None: ones). Exactly equation (1) with the dense gate
    :func:`routed_gate_ref`: pathways that no slot names contribute nothing.

    Args:
        x (S, B, D_in), weight (M, D_out, D_in), bias (M, D_out) or None, src, wgt, dst, num_dst:
            as for :func:`pathway_matmul_ref`.
        idx: (B, k) int64 pathway indices, -1 for an unused slot; gate: (B, k) or None.
    Returns:
        y: (T, B, D_out).
    """
    if gate is None:
        gate = torch.ones(idx.shape, dtype=x.dtype, device=x.device)
    dense = routed_gate_ref(idx, gate, src.numel())
    return pathway_matmul_ref(x, weight, bias, dense, src, wgt, dst, num_dst)


def routed_matmul_ref(x: Tensor, weight: Tensor, topk_idx: Tensor, topk_weight: Tensor,
                      bias: Tensor | None = None) -> Tensor:
    """The mixture-of-experts form: tokens first, as nn.Linear takes them.

        y[t] = sum_j topk_weight[t, j] * (x[t] @ weight[topk_idx[t, j]]^T + bias[topk_idx[t, j]])

    Args:
        x: (T, D_in) tokens; weight: (E, D_out, D_in) experts; bias: (E, D_out) or None;
        topk_idx: (T, k) int64 experts per token (-1: unused slot); topk_weight: (T, k).
    Returns:
        (T, D_out). The MoE plan (one source, E experts summed into one output) of
        :func:`routed_pathway_matmul_ref`.
    """
    E = weight.shape[0]
    experts = torch.arange(E, device=x.device)
    zeros = torch.zeros(E, dtype=torch.int64, device=x.device)
    return routed_pathway_matmul_ref(x.unsqueeze(0), weight, bias, topk_idx, topk_weight, zeros,
                                     experts, zeros, 1)[0]


def gated_cross_entropy_ref(
    logits: Tensor, target: Tensor, gate: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-path cross-entropy with a path gate, for R independent replicas.

    Args:
        logits: (R, P, B, C) one logit block per (replica, path).
        target: (R, P, B) int64 class indices.
        gate: (R, P) path weights (0/1 in the k-path experiments); each replica's must sum to > 0.
    Returns:
        loss: (R,) gated mean, sum_p gate[r,p] * path_loss[r,p] / sum_p gate[r,p].
        path_loss: (R, P) mean over the batch of the cross-entropy of each path.
        correct: (R, P) int64 number of samples whose argmax equals the target.
    """
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (R, P, B)
    path_loss = nll.mean(-1)
    loss = (gate * path_loss).sum(-1) / gate.sum(-1)
    correct = (logits.argmax(-1) == target).sum(-1)
    return loss, path_loss, correct


def sgd_momentum_ref(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> None:
    """In-place SGD step, torch.optim.SGD semantics (dampening 0), buffer initialised to zeros.

    With a zero-initialised buffer, momentum * 0 + g == g, so the first step equals torch's
    (which clones the gradient into the buffer).
    """
    d = grad if weight_decay == 0 else grad + weight_decay * param
    if momentum != 0:
        assert buf is not None
        buf.mul_(momentum).add_(d)
        d = d + momentum * buf if nesterov else buf
    param.add_(d, alpha=-lr)


_M32 = 0xFFFFFFFF


def _hash32(v: Tensor) -> Tensor:
    """The "lowbias32" integer hash on uint32 values held in int64 (csrc/hash32.h)."""
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) & _M32
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


def rounding_seed_at(seed: int, step: int) -> int:
    """The rounding seed of step ``step`` in the stream that starts at ``seed``, as the fused
    SGD ops derive it when given ``rounding_step`` (csrc/rounding.h ``seed_at``):
    (step * 0x9E3779B1 + seed) mod 2^31."""
    return (step * 0x9E3779B1 + seed) & 0x7FFFFFFF


def round_stochastic_bf16(x: Tensor, seed: int, index0: int = 0) -> Tensor:
    """float32 -> bfloat16 by stochastic rounding, bit for bit as the fused update stores a
    bfloat16 weight with ``rounding_seed=seed`` (csrc/cpu/simd.h, ``bf16_stochastic``).

    Element i (flat index index0 + i) gets 16 random bits r = hash32(uint32(index0 + i) + mix)
    mod 2^16, mix = hash32(uint32(seed) ^ 0x5bd1e995); its float32 bits u become the bfloat16
    (u + r) >> 16. So x rounds up with probability (x - lower) / (upper - lower): E[result] = x.
    NaN stays a quiet NaN.
    """
    mix = _hash32(torch.tensor((seed & _M32) ^ 0x5BD1E995, dtype=torch.int64))
    idx = (torch.arange(x.numel(), dtype=torch.int64, device=x.device) + index0) & _M32
    r = _hash32((idx + mix) & _M32) & 0xFFFF
    u = x.detach().float().contiguous().view(-1).view(torch.int32).to(torch.int64) & _M32
    bits = ((u + r) & _M32) >> 16
    bits = torch.where(x.detach().float().view(-1).isnan(), 0x7FC0, bits)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)  # as int16
    return bits.to(torch.int16).view(torch.bfloat16).view(x.shape)
