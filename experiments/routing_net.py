"""The routing network of the paper's worked example (docs/math.md section 5) as a GDLN on the
fused op, with the context gates of its trained pairs, and its training by full-batch SGD,
recording what :func:`gated_ops.theory.simulate_routing_network` records so that the two can be
compared step for step (tests/test_gdln_theory.py, experiments/theory_figures.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gated_ops import GDLN, theory

__all__ = ["RoutingNetwork", "routing_network", "train_routing_network"]


@dataclass(frozen=True)
class RoutingNetwork:
    """The routing network of docs/math.md section 5 as a :class:`GDLN` (built by :func:`routing_network`).

    Nodes: input ``"x"`` (D), input modules ``"a0".."a{M-1}"`` (H), shared hidden ``"h"`` (H),
    output modules ``"y0".."y{M-1}"`` (N). Edges: ``x -> a_i`` (weight ``"in{i}"``), ``a_i -> h``
    (all tied to ``"hidden"``), ``h -> y_j`` (weight ``"out{j}"``): three fused calls per
    forward. Context (i, j) turns on node gates x, a_i, h, y_j and no others, so its only
    active pathway is ``x -> a_i -> h -> y_j`` computing ``W_out_j W_hidden W_in_i x``.

    Attributes:
        net: the GDLN.
        M, K: modules and trained output modules per input module.
        pairs: the K M trained contexts (i, j), row-major (as ``theory.RoutingTask.pairs``).
        node_gates: ``(num_nodes, K M)``, column c = the gates of context ``pairs[c]``.
    """

    net: GDLN
    M: int
    K: int
    pairs: tuple[tuple[int, int], ...]
    node_gates: Tensor

    @property
    def untrained_pairs(self) -> tuple[tuple[int, int], ...]:
        trained = set(self.pairs)
        return tuple((i, j) for i in range(self.M) for j in range(self.M) if (i, j) not in trained)

    def context_gates(self, pairs: Sequence[tuple[int, int]]) -> Tensor:
        """Node gates ``(num_nodes, len(pairs))`` of the given contexts (i, j)."""
        return _routing_context_gates(self.net, self.M, pairs)

    def batch(self, X: Tensor, Y: Tensor, pairs: Sequence[tuple[int, int]] | None = None
              ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Every context times every item, context-major (sample ``c P + k``: item k in context
        ``pairs[c]``, default the trained pairs): ``(inputs, targets, node_gates (N, C P))``.
        ``X (P, D)`` items, ``Y (P, N)`` targets (the same for every context)."""
        pairs = self.pairs if pairs is None else tuple(pairs)
        P = X.shape[0]
        xs = X.repeat(len(pairs), 1)
        ys = Y.repeat(len(pairs), 1)
        gates = self.context_gates(pairs).repeat_interleave(P, dim=1)
        return {"x": xs}, {f"y{j}": ys for j in range(self.M)}, gates

    def module_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``W1 (M, H, D)`` input modules, ``W2 (H, H)`` hidden, ``W3 (M, N, H)`` output modules
        (copies; differentiable)."""
        net = self.net
        return (net.stacked_weights([f"in{i}" for i in range(self.M)]), net.weight("hidden"),
                net.stacked_weights([f"out{j}" for j in range(self.M)]))

    def load_(self, W1: Tensor, W2: Tensor, W3: Tensor) -> "RoutingNetwork":
        """Copy ``W1 (M, H, D)``, ``W2 (H, H)``, ``W3 (M, N, H)`` into the network."""
        with torch.no_grad():
            for i in range(self.M):
                self.net.weight(f"in{i}").copy_(W1[i])
                self.net.weight(f"out{i}").copy_(W3[i])
            self.net.weight("hidden").copy_(W2)
        return self


def routing_network(M: int = 7, K: int = 4, hidden: int = 64, d_in: int = 4, d_out: int = 7,
                    offsets: Sequence[int] | None = None, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> RoutingNetwork:
    """The routing network of docs/math.md section 5 as a :class:`GDLN`, with the context gates of its
    trained pairs: input module i is trained with output modules ``(i + o) mod M`` for ``o`` in
    ``offsets`` (default ``-1, 0, ..., K-2``: 28 of 49 pairs for M = 7, K = 4), as
    :func:`gated_ops.theory.routing_network_task`. No biases (the theory has none)."""
    if not 1 <= K <= M:
        raise ValueError(f"K: need 1 <= K <= M, got M={M}, K={K}")
    offsets = tuple(range(-1, K - 1)) if offsets is None else tuple(int(o) for o in offsets)
    if len({o % M for o in offsets}) != K:
        raise ValueError(f"offsets: expected {K} offsets distinct mod M={M}, got {offsets}")
    nodes = ({"x": d_in} | {f"a{i}": hidden for i in range(M)} | {"h": hidden}
             | {f"y{j}": d_out for j in range(M)})
    edges = ([("x", f"a{i}", f"in{i}") for i in range(M)]
             + [(f"a{i}", "h", "hidden") for i in range(M)]
             + [("h", f"y{j}", f"out{j}") for j in range(M)])
    net = GDLN(nodes, edges, dtype=dtype, device=device)
    pairs = tuple(sorted({(i, (i + o) % M) for i in range(M) for o in offsets}))
    return RoutingNetwork(net, M, K, pairs, _routing_context_gates(net, M, pairs))


def _routing_context_gates(net: GDLN, M: int, pairs: Sequence[tuple[int, int]]) -> Tensor:
    idx = {n: k for k, n in enumerate(net.node_names)}
    g = torch.zeros(len(net.node_names), len(pairs), dtype=net._dtype, device=net._device)
    for c, (i, j) in enumerate(pairs):
        if not (0 <= i < M and 0 <= j < M):
            raise ValueError(f"pairs: context {(i, j)} outside 0..{M - 1}")
        g[[idx["x"], idx[f"a{i}"], idx["h"], idx[f"y{j}"]], c] = 1.0
    return g


def train_routing_network(rn: RoutingNetwork, task: theory.RoutingTask,
                          init: str = "decoupled", gain: float = 0.2, lr: float = 0.02,
                          steps: int = 500, seed: int = 0, *, b0: float = 0.08,
                          track_svd: bool = True, track_untrained: bool = True
                          ) -> theory.RoutingRun:
    """Train the routing network on the fused op by full-batch SGD (docs/math.md section 5) and record
    what :func:`gated_ops.theory.simulate_routing_network` records, from the same initial
    weights (:func:`gated_ops.theory.routing_init` with ``init``, ``gain``, ``seed``, ``b0``).

    The batch is every trained context times every item (K M P samples); the loss of docs/math.md section 5,
    ``sum_{(i,j) trained} ||Y^T - out_ij||_F^2 / (P N)``, is ``2 K M / N`` times
    :meth:`GDLN.loss` on it, so SGD with ``lr`` on it is an Euler step ``dt = 2 K M lr / N`` of
    the network's own :meth:`GDLN.reduced_dynamics` (contexts at their batch frequency).
    ``track_untrained``: also evaluate the untrained pairs every step (one more forward, no
    grad); otherwise ``untrained_error`` is NaN.
    """
    th = theory
    net = rn.net
    if tuple(task.pairs) != rn.pairs or (task.M, task.K) != (rn.M, rn.K):
        raise ValueError("task: its M, K and trained pairs must be those of the routing network")
    dtype = net._dtype
    rn.load_(*th.routing_init(task, init, gain, seed, b0, dtype))
    X, Y = task.X.to(dtype), task.Y.to(dtype)
    P, N, r = task.P, task.N_out, task.rank
    inputs, targets, gates = rn.batch(X, Y)
    un = rn.untrained_pairs
    if track_untrained and un:
        inputs_u, targets_u, gates_u = rn.batch(X, Y, un)
    scale = 2.0 * len(rn.pairs) / N  # loss of docs/math.md section 5 = scale * GDLN.loss
    params = list(net.banks.values())
    loss, tr_err, un_err, sv1, sv2, sv3 = [], [], [], [], [], []
    for step in range(steps + 1):
        l_gdln = net.loss(net(inputs, gates), targets, gates)
        # GDLN.loss = (1 / (C P)) sum_pairs ||Y^T - out||^2 / 2: the mean over pairs of
        # ||Y^T - out||^2 / 2 is P times it
        loss.append(scale * l_gdln.detach())
        tr_err.append(P * l_gdln.detach())
        if track_untrained and un:
            with torch.no_grad():
                un_err.append(P * net.loss(net(inputs_u, gates_u), targets_u, gates_u))
        else:
            un_err.append(l_gdln.new_tensor(float("nan")))
        if track_svd:
            with torch.no_grad():
                W1, W2, W3 = rn.module_weights()
                sv1.append(torch.linalg.svdvals(W1)[:, :r].mean(0))
                sv2.append(torch.linalg.svdvals(W2)[:r])
                sv3.append(torch.linalg.svdvals(W3)[:, :r].mean(0))
        if step == steps:
            break
        grads = torch.autograd.grad(scale * l_gdln, params)
        with torch.no_grad():
            for w, g in zip(params, grads):  # three banks, not one update per edge
                w.sub_(lr * g)
    empty = torch.zeros(0, r, dtype=dtype)
    with torch.no_grad():
        W1, W2, W3 = rn.module_weights()
    return th.RoutingRun(torch.stack(loss), torch.stack(tr_err), torch.stack(un_err),
                         torch.stack(sv1) if sv1 else empty, torch.stack(sv2) if sv2 else empty,
                         torch.stack(sv3) if sv3 else empty, W1, W2, W3)
