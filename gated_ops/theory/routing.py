"""The routing network of the authors' verification notebooks (docs/math.md section 5): the
task, its simulation by full-batch SGD (vectorised over runs), the exact discrete map of its
reduced dynamics, and the same network as a path-form GDLN.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .closed_forms import routing_vector_field
from .dynamics import euler
from .init import aligned_init, complete_basis, random_orthogonal, xavier_uniform
from .paths import GDLNGraph, Node


@dataclass(frozen=True)
class RoutingTask:
    """Data and routing of docs/math.md section 5.

    Attributes:
        M, K: modules and trained output modules per input module.
        hidden: hidden width H.
        X: ``(P, D)`` inputs, one item per row (the notebooks: ``I_4``).
        Y: ``(P, N_out)`` targets, one item per row (the same for every pair).
        trained: ``(M, M)`` bool, ``trained[i, j]``: pair (input module i, output module j) is trained.
        s: ``(r,)`` nonzero singular values of ``Y^T X`` (13.601, 6.403, 3, 3).
        U: ``(N_out, N_out)`` orthogonal; first r columns: output-side singular vectors of ``Y^T X``.
        V: ``(D, D)`` orthogonal; first r columns: input-side singular vectors of ``Y^T X``.
    """

    M: int
    K: int
    hidden: int
    X: Tensor
    Y: Tensor
    trained: Tensor
    s: Tensor
    U: Tensor
    V: Tensor

    @property
    def P(self) -> int:
        return self.X.shape[0]

    @property
    def D(self) -> int:
        return self.X.shape[1]

    @property
    def N_out(self) -> int:
        return self.Y.shape[1]

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Trained pairs (i, j), row-major."""
        return [(int(i), int(j)) for i, j in self.trained.nonzero().tolist()]


def _notebook_targets(dtype: torch.dtype) -> Tensor:
    """Y of docs/math.md section 5: (4 items, 7 features)."""
    y = torch.zeros(4, 7, dtype=dtype)
    y[:, 0] = 6.0
    y[:2, 1] = 4.0
    y[2:, 2] = 4.0
    y[:, 3:] = 3.0 * torch.eye(4, dtype=dtype)
    return y


def routing_network_task(
    M: int = 7,
    K: int = 4,
    hidden: int = 64,
    offsets: Sequence[int] | None = None,
    X: Tensor | None = None,
    Y: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> RoutingTask:
    """The routing network task of docs/math.md section 5.

    Input module ``i`` is trained with output modules ``(i + j) mod M`` for ``j`` in ``offsets``
    (default ``-1, 0, ..., K-2``, i.e. ``{-1, 0, 1, 2}`` for K = 4: 28 of 49 pairs). ``X`` defaults
    to ``I_4`` and ``Y`` to the notebooks' 4 x 7 targets (singular values 13.601, 6.403, 3, 3).
    The reduced theory assumes whitened items, ``X^T X = I``.
    """
    if not 1 <= K <= M:
        raise ValueError(f"need 1 <= K <= M, got M={M}, K={K}")
    offsets = tuple(range(-1, K - 1)) if offsets is None else tuple(int(o) for o in offsets)
    if len({o % M for o in offsets}) != K:
        raise ValueError(f"offsets: expected {K} offsets distinct mod M={M}, got {offsets}")
    X = torch.eye(4, dtype=dtype) if X is None else X.to(dtype)
    Y = _notebook_targets(dtype) if Y is None else Y.to(dtype)
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X (P, D) and Y (P, N_out) must be matrices with the same number of rows, got "
            f"{tuple(X.shape)} and {tuple(Y.shape)}"
        )
    trained = torch.zeros(M, M, dtype=torch.bool)
    for i in range(M):
        for o in offsets:
            trained[i, (i + o) % M] = True
    u, sv, vh = torch.linalg.svd(Y.T @ X, full_matrices=False)  # (N, k), (k,), (k, D)
    r = int((sv > sv.max() * 1e-10).sum())
    u, sv, v = u[:, :r], sv[:r], vh[:r].T
    # deterministic signs: the largest-magnitude entry of each output singular vector is positive
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))[0]
    u, v = u * sign, v * sign
    if hidden < r:
        raise ValueError(f"hidden={hidden} must be at least the rank of Y^T X ({r})")
    return RoutingTask(M, K, hidden, X, Y, trained, sv, complete_basis(u), complete_basis(v))


def routing_pathways(task: RoutingTask, shared_hidden: bool = True) -> list[tuple[Hashable, ...]]:
    """Pathways of the trained pairs as edge names ``(("in", i), hidden, ("out", j))``.

    The hidden edge is ``"hidden"`` (shared, docs/math.md section 5) or ``("hidden", i, j)`` (one per pair).
    """
    return [
        (("in", i), "hidden" if shared_hidden else ("hidden", i, j), ("out", j)) for i, j in task.pairs
    ]


def routing_gdln(
    task: RoutingTask, hidden: str = "shared"
) -> tuple[GDLNGraph, dict[Node, Tensor], dict[Node, Tensor], Tensor]:
    """The routing network of ``task`` as a GDLN on its trained contexts (docs/math.md sections 1, 5).

    Nodes: input ``("x", i)`` per input module, hidden ``"h"`` and ``"g"``, output ``("y", j)``.
    Edges: input module i ``("x", i) -> "h"``, hidden edge(s) ``"h" -> "g"``, output module j
    ``"g" -> ("y", j)``. ``hidden`` picks the hidden edges: ``"shared"`` (one edge, index M),
    ``"per_pair"`` (one parallel edge per trained pair, selected by the context's edge gate) or
    ``"both"`` (the shared edge plus a private one per pair: two co-active pathways per context
    racing for the same output). Samples: every trained context times every item (``n = K M P``),
    the item on every input node, its target on the context's output node and 0 elsewhere.

    Returns:
        ``(graph, x, y, gates)``. Edges are ordered: the M input modules, the hidden edge(s)
        (shared first), the M output modules. Pathway ``q`` serves ``task.pairs[q]`` (through
        the shared edge, or its private edge for ``"per_pair"``); for ``"both"``, pathway
        ``K M + q`` is the private pathway of the same pair. ``gates`` is ``(n_pathways, n)``.
    """
    if hidden not in ("shared", "per_pair", "both"):
        raise ValueError(f"hidden: expected 'shared', 'per_pair' or 'both', got {hidden!r}")
    M, pairs = task.M, task.pairs
    edges: list[tuple[Node, Node]] = [(("x", i), "h") for i in range(M)]
    shared_edge = private0 = None
    if hidden in ("shared", "both"):
        shared_edge = len(edges)
        edges.append(("h", "g"))
    if hidden in ("per_pair", "both"):
        private0 = len(edges)
        edges.extend(("h", "g") for _ in pairs)
    out0 = len(edges)
    edges.extend(("g", ("y", j)) for j in range(M))
    pathways = []
    if shared_edge is not None:
        pathways += [(i, shared_edge, out0 + j) for i, j in pairs]
    if private0 is not None:
        pathways += [(i, private0 + q, out0 + j) for q, (i, j) in enumerate(pairs)]
    graph = GDLNGraph(tuple(edges), tuple(pathways))
    P, dtype = task.P, task.X.dtype
    n = len(pairs) * P
    ctx = torch.arange(len(pairs)).repeat_interleave(P)  # context of every sample
    items = torch.arange(P).repeat(len(pairs))
    x = {("x", i): task.X[items] for i in range(M)}
    out_of_ctx = torch.tensor([j for _, j in pairs])[ctx]
    y = {("y", j): task.Y[items] * (out_of_ctx == j).to(dtype)[:, None] for j in range(M)}
    onehot = (ctx[None, :] == torch.arange(len(pairs))[:, None]).to(dtype)  # (K M, n)
    gates = onehot.repeat(len(pathways) // len(pairs), 1)
    assert gates.shape == (len(pathways), n)
    return graph, x, y, gates


def routing_sgd_dt(task: RoutingTask, lr: float) -> float:
    """Gradient-flow time of one SGD step of docs/math.md section 5: ``dt = 2 M^2 lr / (P N_out)``."""
    return 2.0 * task.M**2 * lr / (task.P * task.N_out)


def routing_theory_b0(init: str, gain: float = 0.2, b0: float = 0.08) -> float:
    """Initial balanced mode strength for the reduced theory (docs/math.md section 5).

    ``"decoupled"``: the init's own strength ``b0``; ``"random"`` (orthogonal times ``gain``):
    ``gain / 2.5``, the authors' empirical factor.
    """
    if init == "decoupled":
        return b0
    if init == "random":
        return gain / 2.5
    raise ValueError(f"init: no reduced-theory b0 for {init!r}; expected 'decoupled' or 'random'")


@dataclass(frozen=True)
class RoutingTheory:
    """Discrete reduced theory of docs/math.md section 5; arrays over steps ``0..steps``.

    Attributes:
        b1, b2, b3: ``(steps + 1, r)`` input-module, hidden, output-module strength per mode.
        loss: ``(steps + 1,)``, ``(M K / (P N_out)) sum_alpha (s_alpha - b1 b2 b3)^2``.
        dt: gradient-flow time per SGD step.
    """

    b1: Tensor
    b2: Tensor
    b3: Tensor
    loss: Tensor
    dt: float


def routing_theory(
    task: RoutingTask,
    b0: float = 0.08,
    lr: float = 0.02,
    steps: int = 500,
) -> RoutingTheory:
    """One Euler step of the docs/math.md section 5 system per SGD step, ``dt = 2 M^2 lr / (P N_out)`` (docs/math.md section 5)."""
    dt = routing_sgd_dt(task, lr)
    s = task.s.to(torch.float64)
    f = routing_vector_field(task.M, task.K, s)
    traj = euler(f, torch.full((task.rank, 3), float(b0), dtype=torch.float64), dt, steps)
    b1, b2, b3 = traj.unbind(-1)  # (steps + 1, r) each
    scale = task.M * task.K / (task.P * task.N_out)
    loss = scale * ((s - b1 * b2 * b3) ** 2).sum(-1)
    return RoutingTheory(b1, b2, b3, loss, dt)


@dataclass(frozen=True)
class RoutingRun:
    """Record of :func:`simulate_routing_network`.

    With scalar ``gain``, ``lr`` and ``seed`` the arrays have the shapes below; if any of them is
    a sequence (R runs), every array gets a leading run dimension R.

    Attributes:
        loss: ``(steps + 1,)`` training loss of docs/math.md section 5 before each step (the last entry is
            after the final step).
        trained_error, untrained_error: ``(steps + 1,)``, ``||Y - out||_F^2 / 2`` averaged over
            trained / untrained pairs (NaN if there are no untrained pairs).
        sv_in, sv_hidden, sv_out: ``(steps + 1, r)`` top-r singular values of the input modules
            (averaged over modules), the hidden layer, the output modules (averaged).
        W1, W2, W3: final weights ``(M, H, D)``, ``(H, H)``, ``(M, N_out, H)``.
    """

    loss: Tensor
    trained_error: Tensor
    untrained_error: Tensor
    sv_in: Tensor
    sv_hidden: Tensor
    sv_out: Tensor
    W1: Tensor
    W2: Tensor
    W3: Tensor


def _routing_init(
    task: RoutingTask, init: str, gain: float, seed: int, b0: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Weights ``W1 (M, H, D)``, ``W2 (H, H)``, ``W3 (M, N, H)`` of one run."""
    M, H, D, N = task.M, task.hidden, task.D, task.N_out
    gen = torch.Generator().manual_seed(int(seed))
    if init == "decoupled":
        # aligned and balanced, every mode of every layer b0: W1_i = R_h B V^T, W2 = R_o B R_h^T,
        # W3_j = U B R_o^T, with the same random hidden bases R_h, R_o for all modules, so every
        # pair's map is U diag(b0^3) V^T in the data modes and the modes stay decoupled
        r_h = random_orthogonal(H, H, generator=gen, dtype=torch.float64)
        r_o = random_orthogonal(H, H, generator=gen, dtype=torch.float64)
        w1, w2, w3 = aligned_init([task.V.to(torch.float64), r_h, r_o, task.U.to(torch.float64)], b0)
        return (
            w1.expand(M, H, D).to(dtype).clone(),
            w2.to(dtype),
            w3.expand(M, N, H).to(dtype).clone(),
        )
    if init == "random":
        w1 = torch.stack([random_orthogonal(H, D, gain, gen, torch.float64) for _ in range(M)])
        w2 = random_orthogonal(H, H, gain, gen, torch.float64)
        w3 = torch.stack([random_orthogonal(N, H, gain, gen, torch.float64) for _ in range(M)])
        return w1.to(dtype), w2.to(dtype), w3.to(dtype)
    if init == "xavier":
        w1 = torch.stack([xavier_uniform(H, D, gain, gen, torch.float64) for _ in range(M)])
        w2 = xavier_uniform(H, H, gain, gen, torch.float64)
        w3 = torch.stack([xavier_uniform(N, H, gain, gen, torch.float64) for _ in range(M)])
        return w1.to(dtype), w2.to(dtype), w3.to(dtype)
    raise ValueError(f"init: expected 'decoupled', 'random' or 'xavier', got {init!r}")


def routing_init(
    task: RoutingTask,
    init: str = "decoupled",
    gain: float = 0.2,
    seed: int = 0,
    b0: float = 0.08,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """The initial weights ``W1 (M, H, D)``, ``W2 (H, H)``, ``W3 (M, N_out, H)`` that
    :func:`simulate_routing_network` uses for one run (same generator, same draws), so that
    another implementation of the network (e.g. ``gated_ops.gdln.routing_network``) can start
    from exactly the same point. Arguments as in :func:`simulate_routing_network`."""
    return _routing_init(task, init, gain, seed, b0, dtype)


def _as_list(v: float | int | Sequence[float] | Sequence[int] | Tensor) -> list:
    if isinstance(v, Tensor):
        return v.reshape(-1).tolist()
    if isinstance(v, (int, float)):
        return [v]
    return list(v)


def _top_svals(w: Tensor, r: int) -> Tensor:
    """Top-r singular values of a batch of matrices ``(..., m, n) -> (..., r)``.

    Square roots of the eigenvalues of the smaller Gram matrix: 1.5-5x faster than ``svdvals``
    on these shapes (CPU, R = 10 runs: 0.15 vs 0.85 ms for (64, 4) modules) and accurate to
    ~eps * (s_max / s)^2 relative, ample for the top modes (s >= 0.08 here).
    """
    gram = w.mT @ w if w.shape[-1] <= w.shape[-2] else w @ w.mT
    ev = torch.linalg.eigvalsh(gram).flip(-1)[..., :r]  # descending
    return ev.clamp_min(0).sqrt()


def simulate_routing_network(
    task: RoutingTask,
    init: str = "decoupled",
    gain: float | Sequence[float] = 0.2,
    lr: float | Sequence[float] = 0.02,
    steps: int = 500,
    seed: int | Sequence[int] = 0,
    *,
    b0: float = 0.08,
    dtype: torch.dtype = torch.float64,
    track_svd: bool = True,
) -> RoutingRun:
    """Train the full routing network of docs/math.md section 5 by full-batch SGD (no momentum, no biases).

    Weights: input modules ``W1_i (H, D)``, shared hidden ``W2 (H, H)``, output modules
    ``W3_j (N_out, H)``; pair (i, j) computes ``out_ij = W3_j W2 W1_i X^T`` (N_out, P). Loss:

        L = sum_{(i, j) trained} ||Y^T - out_ij||_F^2 / (P N_out)

    Args:
        init: ``"decoupled"`` (aligned, balanced, every mode ``b0``, data singular bases, random
            orthogonal hidden bases), ``"random"`` (random orthogonal times ``gain``) or
            ``"xavier"`` (Xavier-uniform with ``gain``).
        gain, lr, seed: scalars, or sequences (broadcast against each other) for R independent
            runs simulated together as one batch (``gain`` is unused by ``"decoupled"``).
        b0: mode strength of the ``"decoupled"`` init.
        dtype: of the weights and records (float64 by default; float32 works too).
        track_svd: record singular values every step (the costly part); if False the ``sv_*``
            fields are empty ``(..., 0, r)`` tensors.

    Cost (2-core CPU, 1 thread): 500 steps of one run take 0.3-0.8 s with singular values
    (depending on machine load), 10 runs batched 0.6-1.4 s without. On a busy machine use 1 thread:
    with 2 threads OpenMP spin-waiting made the same run take 13 s (measured).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    batched = not all(isinstance(v, (int, float)) for v in (gain, lr, seed))
    gains, lrs, seeds = _as_list(gain), _as_list(lr), _as_list(seed)
    R = max(len(gains), len(lrs), len(seeds))
    for name, vals in (("gain", gains), ("lr", lrs), ("seed", seeds)):
        if len(vals) not in (1, R):
            raise ValueError(f"{name}: expected a scalar or {R} values to match the other arguments, got {len(vals)}")
    gains, lrs, seeds = (v * R if len(v) == 1 else v for v in (gains, lrs, seeds))
    if any(x <= 0 for x in lrs):
        raise ValueError(f"lr must be positive, got {lrs}")

    inits = [_routing_init(task, init, g, sd, b0, dtype) for g, sd in zip(gains, seeds)]
    W1 = torch.stack([w[0] for w in inits])  # (R, M, H, D)
    W2 = torch.stack([w[1] for w in inits])  # (R, H, H)
    W3 = torch.stack([w[2] for w in inits])  # (R, M, N, H)
    lr_t = torch.tensor(lrs, dtype=dtype)
    X, Yt = task.X.to(dtype), task.Y.T.to(dtype)  # (P, D), (N, P)
    G = task.trained.to(dtype)  # (M, M)
    n_trained = G.sum()
    n_untrained = G.numel() - n_trained
    norm = 1.0 / (task.P * task.N_out)
    r = task.rank

    losses, tr_err, un_err, sv1, sv2, sv3 = [], [], [], [], [], []
    for step in range(steps + 1):
        B = torch.einsum("rihd,pd->rihp", W1, X)  # W1_i X^T: (R, M, H, P)
        A = torch.einsum("rgh,rihp->rigp", W2, B)  # W2 W1_i X^T: (R, M, H, P)
        out = torch.einsum("rjnh,rihp->rijnp", W3, A)  # (R, M, M, N, P)
        E = Yt - out
        sq = (E * E).sum(dim=(-2, -1))  # ||Y^T - out_ij||^2: (R, M, M)
        trained_sq = (sq * G).sum(dim=(1, 2))
        losses.append(norm * trained_sq)
        tr_err.append(0.5 * trained_sq / n_trained)
        un_err.append(0.5 * (sq * (1 - G)).sum(dim=(1, 2)) / n_untrained)
        if track_svd:
            sv1.append(_top_svals(W1, r).mean(dim=1))
            sv2.append(_top_svals(W2, r))
            sv3.append(_top_svals(W3, r).mean(dim=1))
        if step == steps:
            break
        dout = (-2.0 * norm) * G[:, :, None, None] * E  # dL/dout_ij: (R, M, M, N, P)
        dW3 = torch.einsum("rijnp,rihp->rjnh", dout, A)
        dA = torch.einsum("rjnh,rijnp->rihp", W3, dout)  # dL/dA_i: (R, M, H, P)
        dW2 = torch.einsum("rihp,rikp->rhk", dA, B)
        dB = torch.einsum("rgh,rigp->rihp", W2, dA)
        dW1 = torch.einsum("rihp,pd->rihd", dB, X)
        W1 = W1 - lr_t[:, None, None, None] * dW1
        W2 = W2 - lr_t[:, None, None] * dW2
        W3 = W3 - lr_t[:, None, None, None] * dW3

    def stack(xs: list[Tensor], tail: tuple[int, ...] = ()) -> Tensor:
        if not xs:
            return torch.zeros((R, 0) + tail, dtype=dtype)
        return torch.stack(xs, dim=1)  # (R, steps + 1, ...)

    fields = [
        stack(losses),
        stack(tr_err),
        stack(un_err),
        stack(sv1, (r,)),
        stack(sv2, (r,)),
        stack(sv3, (r,)),
        W1,
        W2,
        W3,
    ]
    if not batched:
        fields = [f[0] for f in fields]
    return RoutingRun(*fields)
