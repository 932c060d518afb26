"""Plain-PyTorch k-path models that gated_ops is measured and tested against.

* :class:`LoopKPath` - the paper-style model: K nn.Linear encoders, one hidden nn.Linear, K
  nn.Linear decoders, called module by module in Python loops as the authors' code does (each
  encoder's hidden output through every decoder; the "naive" provider).
* :class:`BatchedKPath` - the best plain-PyTorch formulation we know: baddbmm over encoders and
  replicas, one wide GEMM for all decoders, F.cross_entropy (the "torch" provider).

Both hold the same parameters as :class:`experiments.kpath_net.KPathNet` (``from_kpath`` copies them),
take the same inputs and return the same (loss, path_loss, correct) triple, so a test can run one
step of each from identical weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kpath_net import KPathNet

__all__ = ["LoopKPath", "BatchedKPath", "path_metrics"]


def path_metrics(logits: Tensor, target: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gated loss of docs/math.md section 3 in plain PyTorch: logits (R, P, B, C)."""
    R, P, B, C = logits.shape
    nll = F.cross_entropy(logits.reshape(-1, C), target.reshape(-1), reduction="none")
    path_loss = nll.view(R, P, B).mean(-1)
    loss = (path_loss * gate).sum(-1) / gate.sum(-1)
    correct = (logits.argmax(-1) == target).sum(-1)
    return loss, path_loss, correct


class LoopKPath(nn.Module):
    """The paper-style k-path network: per run K nn.Linear encoders, one hidden nn.Linear and K
    nn.Linear decoders. Like the authors' code it loops over modules, not pathways: encoder i
    then the hidden layer for each i (2K calls), then each decoder on all K hidden outputs at
    once (K calls), giving the logits of all K*K paths; R runs one after the other.
    ``from_kpath`` copies a KPathNet's weights; ``kpath_state`` returns them in its layout.
    """

    def __init__(self, K: int, d_in: int, hidden: int, classes: int = 10, replicas: int = 1):
        super().__init__()
        self.K, self.C, self.R = K, classes, replicas
        self.runs = nn.ModuleList()
        for _ in range(replicas):
            run = nn.Module()
            run.encoders = nn.ModuleList(nn.Linear(d_in, hidden) for _ in range(K))
            run.hidden = nn.Linear(hidden, hidden)
            run.decoders = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(K))
            self.runs.append(run)

    def _linears(self, offset: int = 0):
        """(nn.Linear, KPathNet layer name, index in that layer's weight bank)."""
        for r, run in enumerate(self.runs, start=offset):
            yield run.hidden, "hidden", r
            for k in range(self.K):
                yield run.encoders[k], "encoder", r * self.K + k
                yield run.decoders[k], "decoder", r * self.K + k

    @classmethod
    def from_kpath(cls, net: KPathNet, replica: int | None = None) -> "LoopKPath":
        """All of net's R runs, or only run ``replica``."""
        m = cls(net.K, net.encoder.in_features, net.hidden.in_features, net.C,
                net.R if replica is None else 1).to(net.encoder.weight)
        with torch.no_grad():
            for linear, layer, i in m._linears(offset=replica or 0):
                linear.weight.copy_(getattr(net, layer).weight[i])
                linear.bias.copy_(getattr(net, layer).bias[i])
        return m

    def kpath_state(self) -> dict[str, Tensor]:
        """The weights in KPathNet's layout: {"encoder.weight": (R*K, H, D), ...}."""
        banks: dict[str, dict[int, Tensor]] = {}
        for linear, layer, i in self._linears():
            banks.setdefault(f"{layer}.weight", {})[i] = linear.weight.detach()
            banks.setdefault(f"{layer}.bias", {})[i] = linear.bias.detach()
        return {k: torch.stack([v[i] for i in sorted(v)]) for k, v in banks.items()}

    def forward(self, xk: Tensor) -> Tensor:
        """xk (R*K, B, D_in) -> logits (R, K*K, B, C)."""
        K = self.K
        out = []
        for r, run in enumerate(self.runs):
            h = torch.stack([run.hidden(run.encoders[i](xk[r * K + i])) for i in range(K)])
            # decoder j on every encoder's hidden output: (K_i, B, C) each -> (K_i, K_j, B, C)
            out.append(torch.stack([run.decoders[j](h) for j in range(K)], 1))
        return torch.stack(out).view(self.R, K * K, xk.shape[1], self.C)

    def loss(self, xk: Tensor, target: Tensor, gate: Tensor):
        return path_metrics(self(xk), target, gate)


class BatchedKPath(nn.Module):
    """R k-path runs as batched plain PyTorch: baddbmm encoders, bmm hidden and decoders."""

    def __init__(self, K: int, d_in: int, hidden: int, classes: int = 10, replicas: int = 1):
        super().__init__()
        self.K, self.C, self.R = K, classes, replicas
        R, H = replicas, hidden
        # stored (D_in, H), pre-transposed: bmm then needs no transpose, and autograd's gradient
        # has the parameter's layout (with (H, D_in) storage, re-laying out the gradient was 73%
        # of the H=1024 backward: benchmarks/NOTES.md)
        self.w_enc = nn.Parameter(torch.empty(R * K, d_in, H))
        self.b_enc = nn.Parameter(torch.zeros(R * K, H))
        self.w_hid = nn.Parameter(torch.empty(R, H, H))
        self.b_hid = nn.Parameter(torch.zeros(R, H))
        self.w_dec = nn.Parameter(torch.empty(R, K * classes, H))  # all decoders stacked
        self.b_dec = nn.Parameter(torch.zeros(R, K * classes))
        for w in (self.w_hid, self.w_dec):
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)
        nn.init.normal_(self.w_enc, std=d_in ** -0.5)

    @classmethod
    def from_kpath(cls, net: KPathNet) -> "BatchedKPath":
        enc, hid, dec = net.encoder, net.hidden, net.decoder
        m = cls(net.K, enc.in_features, hid.in_features, net.C, net.R).to(enc.weight)
        with torch.no_grad():
            m.w_enc.copy_(enc.weight.transpose(1, 2))
            m.b_enc.copy_(enc.bias)
            m.w_hid.copy_(hid.weight)
            m.b_hid.copy_(hid.bias)
            m.w_dec.copy_(dec.weight.reshape(m.w_dec.shape))
            m.b_dec.copy_(dec.bias.reshape(m.b_dec.shape))
        return m

    def forward(self, xk: Tensor) -> Tensor:
        """xk (R*K, B, D_in) -> logits (R, K*K, B, C)."""
        R, K, C, B = self.R, self.K, self.C, xk.shape[1]
        h = torch.baddbmm(self.b_enc.unsqueeze(1), xk, self.w_enc)
        h = torch.baddbmm(self.b_hid.unsqueeze(1), h.reshape(R, K * B, -1),
                          self.w_hid.transpose(1, 2))
        out = torch.baddbmm(self.b_dec.unsqueeze(1), h, self.w_dec.transpose(1, 2))
        return out.view(R, K, B, K, C).transpose(2, 3).reshape(R, K * K, B, C)

    def loss(self, xk: Tensor, target: Tensor, gate: Tensor):
        return path_metrics(self(xk), target, gate)
