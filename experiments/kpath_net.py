"""The paper's k-path network (docs/math.md section 3) on the fused ops, for R replicas at once.

K encoders Linear(D_in -> H) (encoder k sees input transformation k), one shared hidden
Linear(H -> H), K decoders Linear(H -> C); path (i, j) = encoder i -> hidden -> decoder j, whose
target is the label under output transformation j. Deep linear: no nonlinearity.

Replica r (r < R) is an independent run: its own weights, gate, init and data; the R runs train
in one call of each fused op because replicas are just more pathways over disjoint weights.
Replica r's loss depends only on its weights, so the summed loss gives each its own gradient.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gated_ops import GDLN, GatedPathwayLinear, SGDConfig, gated_cross_entropy, make_plan

__all__ = ["KPathNet", "kpath_gate", "transform_batch", "kpath_gdln", "load_kpath_"]


def kpath_gate(K: int, N: int, mode: str = "N_plus_mod", seed: int = 0) -> Tensor:
    """The K x K 0/1 path gate of the authors' scripts.

    ``N_plus_mod``: row i has ones at columns (i + 0..N-1) mod K. ``N_plus_mod_permute``: then
    the columns are shuffled by a random permutation (torch.Generator seeded with ``seed``).
    ``fully_connected``: all ones (N ignored).
    """
    if mode == "fully_connected":
        return torch.ones(K, K)
    if not 1 <= N <= K:
        raise ValueError(f"N: expected 1 <= N <= K = {K}, got {N}")
    cols = (torch.arange(K).view(K, 1) + torch.arange(N).view(1, N)) % K
    gate = torch.zeros(K, K).scatter_(1, cols, 1.0)
    if mode == "N_plus_mod":
        return gate
    if mode == "N_plus_mod_permute":
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
        return gate[:, perm]
    raise ValueError(f"mode: expected 'N_plus_mod', 'N_plus_mod_permute' or 'fully_connected', "
                     f"got {mode!r}")


def transform_batch(x: Tensor, y: Tensor | None, pixel_perms: Tensor | None,
                    label_maps: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inputs and targets of every path, on the data's device, without host synchronisation.

    Args:
        x: (R, B, D) one batch per replica (flattened images); or (R, K, B, D) already
            transformed per encoder (rotations), then ``pixel_perms`` is None.
        y: (R, B) int64 labels, or None (the inputs only: target None).
        pixel_perms: (K, D) int64 input permutations, or None.
        label_maps: (K, C) int64: label y becomes label_maps[j, y] on decoder j.
    Returns:
        xk (R*K, B, D): encoder k's input for every replica; target (R, K*K, B) int64 where
        path (i, j) = i*K + j has target label_maps[j, y].
    """
    K = label_maps.shape[0]
    if pixel_perms is not None:
        # one gather straight into (R, K, B, D): xk[r, k, b, d] = x[r, b, perms[k, d]], from
        # broadcast views (no index tensor materialised); 13% faster on CPU at K=100 than an
        # index_select into (R, B, K, D) and a transposing copy, and one kernel instead of two
        # (16-bit data: gathered in float32, ~5x faster on CPU, and rounded back exactly)
        R, B, D = x.shape
        wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        xk = wide.unsqueeze(1).expand(R, K, B, D).gather(
            3, pixel_perms.view(1, K, 1, D).expand(R, K, B, D)).to(x.dtype)
    else:
        xk = x
    R, _, B, D = xk.shape
    if y is None:
        return xk.reshape(R * K, B, D), None
    target = label_maps[:, y].permute(1, 0, 2)  # (R, K_j, B)
    target = target.unsqueeze(1).expand(R, K, K, B).reshape(R, K * K, B)
    return xk.reshape(R * K, B, D), target


class KPathNet(nn.Module):
    """R replicas of the k-path network. forward(xk (R*K, B, D_in)) -> logits (R, K*K, B, C).

    The decoders are the layer ``decoder`` (weights (R*K, C, H): decoder j of replica r is
    weight r*K + j), but the step runs them as one wide weight (K*C, H) per replica on views
    of those parameters: its output (R*K, B, K*C) holds every path's logits, which the loss
    reads in place as (R, K_i, K_j, B, C), and the loss's gradient lands in that layout. So the
    (K*K, B, C) logit tensor is never gathered or scattered (2 passes of 3.2 MB fewer at K=100
    per step, each way).
    """

    def __init__(self, K: int, d_in: int, hidden: int, classes: int = 10, replicas: int = 1,
                 bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, backend: str = "auto"):
        super().__init__()
        self.K, self.R, self.C = K, replicas, classes
        self.backend = backend  # "auto" (compiled kernels) | "triton" | "cuda_emu" (layers, loss)
        kw = dict(replicas=replicas, bias=bias, device=device, dtype=dtype, backend=backend)
        self.encoder = GatedPathwayLinear.batched(K, d_in, hidden, **kw)
        self.hidden = GatedPathwayLinear.shared(K, hidden, hidden, **kw)
        self.decoder = GatedPathwayLinear.fanout(K, K, hidden, classes, **kw)
        RK = replicas * K
        wide = make_plan(range(RK), [i // K for i in range(RK)], range(RK), num_sources=RK,
                         num_weights=replicas, num_dst=RK)
        self._wide_plan = wide.to(device) if device is not None else wide

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._wide_plan = self._wide_plan.to(self.decoder.weight.device)  # from its host tables
        return out

    @property
    def layers(self) -> tuple[GatedPathwayLinear, ...]:
        return (self.encoder, self.hidden, self.decoder)

    def xavier_init_(self, gains: Tensor | list[float], generators: list[torch.Generator]
                     ) -> None:
        """Xavier-uniform init with a gain per replica, biases 0 (the authors' init).

        Each replica draws from its own generator, encoder, hidden, decoders in order, so a
        replica's weights do not depend on the other replicas.
        """
        if len(gains) != self.R or len(generators) != self.R:
            raise ValueError(f"gains, generators: expected {self.R} each (one per replica)")
        with torch.no_grad():
            for r in range(self.R):
                for layer in self.layers:
                    n = layer.num_weights // self.R
                    fan_out, fan_in = layer.weight.shape[1:]
                    bound = float(gains[r]) * math.sqrt(6.0 / (fan_in + fan_out))
                    w = torch.rand(n, fan_out, fan_in, generator=generators[r],
                                   dtype=torch.float64)
                    layer.weight[r * n:(r + 1) * n] = ((2 * w - 1) * bound).to(layer.weight)
                    if layer.bias is not None:
                        layer.bias[r * n:(r + 1) * n] = 0

    def fuse_sgd(self, config: SGDConfig | None) -> "KPathNet":
        """Fused SGD in every layer's backward (see GatedPathwayLinear.fuse_sgd)."""
        for layer in self.layers:
            layer.fuse_sgd(config)
        return self

    def prime_lookahead(self, xk: Tensor, out: Tensor | None = None) -> Tensor:
        """The encoder output (R*K, B, H) for xk as the fused update's lookahead computes it,
        into ``out`` (allocated if None): the start of a chain of steps with
        ``loss(..., lookahead=(xk_next, out))`` (GatedPathwayLinear.prime_lookahead)."""
        return self.encoder.prime_lookahead(xk, out)

    def path_logits(self, xk: Tensor, lookahead: tuple[Tensor, Tensor] | None = None
                    ) -> Tensor:
        """Logits (R, K_i, K_j, B, C): a strided view of the wide decoder's output.
        ``lookahead``: see :meth:`loss`."""
        R, K, C, B = self.R, self.K, self.C, xk.shape[1]
        if lookahead is None:
            z = self.encoder(xk)
        else:  # the encoder output is already in the buffer; the update refreshes it
            z = self.encoder.forward_lookahead(xk, *lookahead)
        h = self.hidden(z)  # (R*K, B, H)
        d = self.decoder
        plan = self._wide_plan
        weight = d.weight.view(R, K * C, d.in_features)
        bias = None if d.bias is None else d.bias.view(R, K * C)
        out = d.forward_as(h, plan, weight, bias)  # (R*K_i, B, K_j*C)
        return out.view(R, K, B, K, C).permute(0, 1, 3, 2, 4)

    def forward(self, xk: Tensor) -> Tensor:
        return self.path_logits(xk).reshape(self.R, self.K * self.K, xk.shape[1], self.C)

    def loss(self, xk: Tensor, target: Tensor, gate: Tensor,
             lookahead: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """loss (R,), path_loss (R, K*K), correct (R, K*K) for one batch; gate (R, K*K).

        ``lookahead=(xk_next, enc)``, the form a CUDA graph can capture: ``enc`` (R*K, B, H)
        holds the encoder output for xk (from :meth:`prime_lookahead`, or left by the previous
        step's call), and the backward's fused encoder update overwrites it with the output
        for xk_next, so each encoder weight is read once per step
        (GatedPathwayLinear.forward_lookahead).
        """
        return gated_cross_entropy(self.path_logits(xk, lookahead), target, gate,
                                   backend=self.backend)


# ---------------------------------------------------------------------------------------------
# The same network as a GDLN graph (checks that the graph compiler reaches KPathNet's three calls)
def kpath_gdln(K: int, d_in: int, hidden: int, classes: int = 10, *, bias: bool = True,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None
               ) -> GDLN:
    """The k-path network (docs/math.md section 3) as a graph: input nodes x{i}, encoder outputs
    e{i} (weight enc{i}), hidden outputs s{i} (one weight "hidden" tied across the K edges) and
    path outputs o{i}_{j} (weight dec{j} tied across encoders). It compiles to the same three
    fused calls as :class:`experiments.kpath_net.KPathNet` (batched, shared, fan-out)."""
    nodes = {f"x{i}": d_in for i in range(K)} | {f"e{i}": hidden for i in range(K)} \
        | {f"s{i}": hidden for i in range(K)} \
        | {f"o{i}_{j}": classes for i in range(K) for j in range(K)}
    edges = [(f"x{i}", f"e{i}", f"enc{i}") for i in range(K)] \
        + [(f"e{i}", f"s{i}", "hidden") for i in range(K)] \
        + [(f"s{i}", f"o{i}_{j}", f"dec{j}") for i in range(K) for j in range(K)]
    return GDLN(nodes, edges, bias=bias, dtype=dtype, device=device)


@torch.no_grad()
def load_kpath_(g: GDLN, net, replica: int = 0) -> GDLN:
    """Copy replica ``replica`` of a KPathNet's weights into a :func:`kpath_gdln` graph."""
    K = net.K
    layers = (("enc{}", net.encoder, K), ("dec{}", net.decoder, K), ("hidden", net.hidden, 1))
    for name, layer, n in layers:
        for k in range(n):
            g.weight(name.format(k)).copy_(layer.weight[replica * n + k])
            if g.biases is not None and layer.bias is not None:
                g.bias(name.format(k)).copy_(layer.bias[replica * n + k])
    return g
