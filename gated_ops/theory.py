"""Theory of gated deep linear networks (GDLNs): path correlations, reduced race dynamics, closed forms.

Everything here follows /work/shared/GDLN.md (sections 1 and 4; equation sections are cited as
"GDLN.md 4.x") in the paper's notation. The module is pure PyTorch (plus scipy quadrature for the
implicit solutions), float64-capable and independent of the compiled ``gated_ops`` extension, so it
can serve as the reference that simulations are checked against.

Contents, in reading order:

* 4.1 exact path-form gradient of any GDLN: :class:`GDLNGraph`, :func:`network_output`,
  :func:`gdln_loss`, :func:`path_correlations`, :func:`path_form_gradient`.
* 4.2 reduced one-dimensional race dynamics built from the pathway structure:
  :class:`ReducedDynamics`, integrators :func:`rk4` and :func:`euler`, and read-outs of learning
  curves: :func:`half_rise_index`, :func:`staircase_levels`, :func:`loss_drops`.
* Closed forms: :func:`two_layer_sigmoid`, :func:`balanced_vector_field`, :func:`balanced_time`,
  and the routing network of 4.3: :func:`routing_vector_field`, :func:`routing_conserved`,
  :func:`routing_time`, :func:`routing_fixed_point`.
* 4.4 the notebooks' routing network: :func:`routing_network_task`,
  :func:`simulate_routing_network` (full weight matrices, full-batch SGD, vectorised over runs),
  :func:`routing_theory` (the exact discrete map of the reduced dynamics), and the same network
  as a path-form GDLN: :func:`routing_pathways`, :func:`routing_gdln`.
* Check 9 of 4.5: :func:`shared_vs_unshared_race`.
* Initialisation helpers: :func:`aligned_init`, :func:`complete_basis`,
  :func:`random_orthogonal`, :func:`xavier_uniform`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    from scipy import integrate
except ImportError as e:  # an optional part: gated_ops itself does not need scipy
    raise ImportError(
        "gated_ops.theory needs scipy (the quadrature of the implicit solutions), an optional "
        "dependency of gated_ops: pip install 'gated_ops[theory]' (or pip install scipy)"
    ) from e

__all__ = [
    # 4.1 path-form gradient
    "GDLNGraph",
    "PathCorrelations",
    "pathway_gates",
    "network_output",
    "gdln_loss",
    "path_correlations",
    "path_form_gradient",
    # 4.2 reduced dynamics and integrators
    "ReducedDynamics",
    "rk4",
    "euler",
    "half_rise_index",
    "staircase_levels",
    "loss_drops",
    # closed forms
    "two_layer_sigmoid",
    "balanced_vector_field",
    "balanced_time",
    "routing_vector_field",
    "routing_conserved",
    "routing_time",
    "routing_fixed_point",
    # 4.4 routing network
    "RoutingTask",
    "routing_network_task",
    "RoutingRun",
    "simulate_routing_network",
    "RoutingTheory",
    "routing_theory",
    "routing_theory_b0",
    "routing_init",
    "routing_sgd_dt",
    "routing_pathways",
    "routing_gdln",
    # 4.5 check 9
    "RaceResult",
    "shared_vs_unshared_race",
    # initialisation
    "aligned_init",
    "complete_basis",
    "random_orthogonal",
    "xavier_uniform",
]

Node = Hashable
VectorField = Callable[[Tensor], Tensor]

# ---------------------------------------------------------------------------------------------
# 4.1  Exact path-form gradient of any GDLN
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GDLNGraph:
    """A GDLN in path form (GDLN.md 1 and 4.1).

    Attributes:
        edges: ``edges[e] = (u, v)``, the nodes of edge ``e``; its weight ``W_e`` has shape
            ``(d_v, d_u)``.
        pathways: ``pathways[p]`` is the ordered tuple of edge indices of pathway ``p`` from its
            input node ``s(p)`` to its output node ``t(p)``; consecutive edges must share a node.
    """

    edges: tuple[tuple[Node, Node], ...]
    pathways: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        edges = []
        for e, edge in enumerate(self.edges):
            if len(edge) != 2:
                raise ValueError(f"edges[{e}] must be a pair (u, v) of nodes, got {edge!r}")
            edges.append((edge[0], edge[1]))
        pathways = tuple(tuple(int(e) for e in p) for p in self.pathways)
        for p, path in enumerate(pathways):
            if not path:
                raise ValueError(f"pathways[{p}] is empty; a pathway needs at least one edge")
            for e in path:
                if not 0 <= e < len(edges):
                    raise ValueError(
                        f"pathways[{p}] uses edge index {e}, expected 0 <= e < {len(edges)}"
                    )
            if len(set(path)) != len(path):
                raise ValueError(f"pathways[{p}] = {path} visits an edge twice")
            for a, b in zip(path[:-1], path[1:]):
                if edges[a][1] != edges[b][0]:
                    raise ValueError(
                        f"pathways[{p}]: edge {a} {edges[a]} does not lead into edge {b} {edges[b]}"
                    )
        object.__setattr__(self, "edges", tuple(edges))
        object.__setattr__(self, "pathways", pathways)

    @classmethod
    def from_edges(
        cls,
        edges: Sequence[tuple[Node, Node]],
        inputs: Sequence[Node] | None = None,
        outputs: Sequence[Node] | None = None,
    ) -> GDLNGraph:
        """All directed paths from ``inputs`` to ``outputs`` of an acyclic graph.

        By default the inputs are the nodes without incoming edges and the outputs the nodes
        without outgoing edges. Pathways are listed in depth-first order.
        """
        edges = [tuple(e) for e in edges]
        heads = {v for _, v in edges}
        tails = {u for u, _ in edges}
        nodes = list(dict.fromkeys([n for e in edges for n in e]))
        inputs = [n for n in nodes if n not in heads] if inputs is None else list(inputs)
        outputs_set = set(n for n in nodes if n not in tails) if outputs is None else set(outputs)
        out_edges: dict[Node, list[int]] = {}
        for e, (u, _) in enumerate(edges):
            out_edges.setdefault(u, []).append(e)
        pathways: list[tuple[int, ...]] = []

        def walk(node: Node, path: tuple[int, ...], seen: frozenset) -> None:
            if node in outputs_set and path:
                pathways.append(path)
            for e in out_edges.get(node, []):
                v = edges[e][1]
                if v in seen:
                    raise ValueError(f"the graph has a cycle through node {v!r}; a GDLN is acyclic")
                walk(v, path + (e,), seen | {v})

        for n in inputs:
            walk(n, (), frozenset([n]))
        return cls(tuple(edges), tuple(pathways))

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def n_pathways(self) -> int:
        return len(self.pathways)

    @property
    def sources(self) -> tuple[Node, ...]:
        """``s(p)`` for every pathway."""
        return tuple(self.edges[p[0]][0] for p in self.pathways)

    @property
    def targets(self) -> tuple[Node, ...]:
        """``t(p)`` for every pathway."""
        return tuple(self.edges[p[-1]][1] for p in self.pathways)


@dataclass(frozen=True)
class PathCorrelations:
    """Gated path correlations of GDLN.md 4.1.

    Attributes:
        sxy: ``sxy[p] = Sxy(p) = < g_p y_{t(p)} x_{s(p)}^T >``, shape ``(d_{t(p)}, d_{s(p)})``.
        sxx: ``sxx[(j, p)] = Sxx(j, p) = < g_j g_p x_{s(j)} x_{s(p)}^T >``, shape
            ``(d_{s(j)}, d_{s(p)})``, for every pair of pathways with ``t(j) == t(p)``.
    """

    sxy: tuple[Tensor, ...]
    sxx: dict[tuple[int, int], Tensor]


def _check_weights(graph: GDLNGraph, weights: Sequence[Tensor]) -> dict[Node, int]:
    """Validate ``weights`` against the graph; return the width of every node."""
    if len(weights) != graph.n_edges:
        raise ValueError(f"weights: expected {graph.n_edges} matrices (one per edge), got {len(weights)}")
    dims: dict[Node, int] = {}
    for e, ((u, v), w) in enumerate(zip(graph.edges, weights)):
        if w.dim() != 2:
            raise ValueError(f"weights[{e}] for edge {(u, v)} must be a matrix, got shape {tuple(w.shape)}")
        for node, size, side in ((v, w.shape[0], "rows"), (u, w.shape[1], "columns")):
            if dims.setdefault(node, size) != size:
                raise ValueError(
                    f"weights[{e}] for edge {(u, v)} has {size} {side}, but node {node!r} has width "
                    f"{dims[node]} from another edge"
                )
    return dims


def _check_data(
    graph: GDLNGraph,
    x: Mapping[Node, Tensor],
    gates: Tensor,
    dims: dict[Node, int] | None = None,
) -> int:
    """Validate inputs and gates; return the number of samples."""
    if gates.dim() != 2 or gates.shape[0] != graph.n_pathways:
        raise ValueError(
            f"gates: expected shape (n_pathways={graph.n_pathways}, n_samples), got {tuple(gates.shape)}"
        )
    n = gates.shape[1]
    for node in set(graph.sources):
        if node not in x:
            raise ValueError(f"x: missing data for input node {node!r}")
        xs = x[node]
        if xs.dim() != 2 or xs.shape[0] != n:
            raise ValueError(f"x[{node!r}]: expected shape (n_samples={n}, d), got {tuple(xs.shape)}")
        if dims is not None and xs.shape[1] != dims[node]:
            raise ValueError(f"x[{node!r}]: expected width {dims[node]} (from the weights), got {xs.shape[1]}")
    return n


def pathway_gates(
    graph: GDLNGraph,
    node_gates: Mapping[Node, Tensor] | None = None,
    edge_gates: Tensor | None = None,
) -> Tensor:
    """Per-sample pathway gates ``g_p`` = product of the node and edge gates along ``p`` (GDLN.md 1).

    Args:
        node_gates: ``node_gates[v]`` of shape ``(n,)``: the gate ``g_v`` of node ``v`` (missing
            nodes have gate 1). The gates of the nodes a pathway enters (the heads of its edges)
            are used; input nodes hold data and are not gated.
        edge_gates: ``(n_edges, n)``, the gate ``g_e`` of every edge (``None``: all ones).

    Returns:
        ``(n_pathways, n)``.
    """
    node_gates = dict(node_gates or {})
    if edge_gates is None and not node_gates:
        raise ValueError("pathway_gates needs node_gates or edge_gates to know the number of samples")
    if edge_gates is not None:
        if edge_gates.dim() != 2 or edge_gates.shape[0] != graph.n_edges:
            raise ValueError(
                f"edge_gates: expected shape (n_edges={graph.n_edges}, n), got {tuple(edge_gates.shape)}"
            )
        ref = edge_gates
    else:
        ref = next(iter(node_gates.values()))[None]
    rows = []
    for path in graph.pathways:
        g = torch.ones(ref.shape[1], dtype=ref.dtype, device=ref.device)
        for e in path:
            if edge_gates is not None:
                g = g * edge_gates[e]
            head = graph.edges[e][1]
            if head in node_gates:
                g = g * node_gates[head]
        rows.append(g)
    return torch.stack(rows)


def _pathway_product(path: Sequence[int], weights: Sequence[Tensor]) -> Tensor:
    """``W_p = W_{e_L} ... W_{e_1}`` for ``p = (e_1, ..., e_L)``."""
    w = weights[path[0]]
    for e in path[1:]:
        w = weights[e] @ w
    return w


def network_output(
    graph: GDLNGraph,
    weights: Sequence[Tensor],
    x: Mapping[Node, Tensor],
    gates: Tensor,
) -> dict[Node, Tensor]:
    """``h_v = sum_{p: t(p) = v} g_p W_p x_{s(p)}`` for every output node (GDLN.md 1, 4.1).

    Args:
        weights: ``weights[e]`` of shape ``(d_v, d_u)`` for edge ``e = (u, v)``.
        x: ``x[v]`` of shape ``(n, d_v)`` for every input node.
        gates: ``(n_pathways, n)``, the pathway gates ``g_p`` per sample.

    Returns:
        ``{v: (n, d_v)}`` for every node that ends a pathway.
    """
    dims = _check_weights(graph, weights)
    n = _check_data(graph, x, gates, dims)
    out: dict[Node, Tensor] = {}
    for p, path in enumerate(graph.pathways):
        s, t = graph.sources[p], graph.targets[p]
        z = x[s] @ _pathway_product(path, weights).T  # (n, d_t)
        z = gates[p][:, None] * z
        out[t] = out[t] + z if t in out else z
    for t in graph.targets:
        out.setdefault(t, weights[0].new_zeros(n, dims[t]))
    return out


def gdln_loss(
    graph: GDLNGraph,
    weights: Sequence[Tensor],
    x: Mapping[Node, Tensor],
    y: Mapping[Node, Tensor],
    gates: Tensor,
) -> Tensor:
    """``L = < 1/2 sum_{v out} ||y_v - h_v||^2 >`` over samples (GDLN.md 4), a scalar.

    ``y[v]`` of shape ``(n, d_v)`` is needed for every output node ``t(p)``.
    """
    h = network_output(graph, weights, x, gates)
    n = gates.shape[1]
    if n == 0:
        raise ValueError("gates: the loss is an average over samples and needs n_samples > 0")
    total = weights[0].new_zeros(())
    for v, hv in h.items():
        if v not in y:
            raise ValueError(f"y: missing targets for output node {v!r}")
        if y[v].shape != hv.shape:
            raise ValueError(f"y[{v!r}]: expected shape {tuple(hv.shape)}, got {tuple(y[v].shape)}")
        total = total + 0.5 * ((y[v] - hv) ** 2).sum()
    return total / n


def path_correlations(
    graph: GDLNGraph,
    x: Mapping[Node, Tensor],
    y: Mapping[Node, Tensor],
    gates: Tensor,
) -> PathCorrelations:
    """Gated path correlations ``Sxy(p)`` and ``Sxx(j, p)`` of GDLN.md 4.1, averaged over samples.

    Args:
        x: ``x[v]`` of shape ``(n, d_v)`` for every input node.
        y: ``y[v]`` of shape ``(n, d_v)`` for every output node.
        gates: ``(n_pathways, n)``.
    """
    n = _check_data(graph, x, gates)
    if n == 0:
        raise ValueError("gates: correlations are averages over samples and need n_samples > 0")
    src, tgt = graph.sources, graph.targets
    sxy = []
    for p in range(graph.n_pathways):
        if tgt[p] not in y or y[tgt[p]].shape[0] != n:
            raise ValueError(f"y: expected targets of shape (n={n}, d) for output node {tgt[p]!r}")
        sxy.append((gates[p][:, None] * y[tgt[p]]).T @ x[src[p]] / n)
    sxx = {}
    for j in range(graph.n_pathways):
        for p in range(graph.n_pathways):
            if tgt[j] == tgt[p]:
                g = (gates[j] * gates[p])[:, None]
                sxx[(j, p)] = (g * x[src[j]]).T @ x[src[p]] / n
    return PathCorrelations(tuple(sxy), sxx)


def path_form_gradient(
    graph: GDLNGraph,
    weights: Sequence[Tensor],
    corr: PathCorrelations,
) -> list[Tensor]:
    """``dL/dW_e`` from the path-form formula of GDLN.md 4.1 (equal to ``-tau dW_e/dt``).

        dL/dW_e = - sum_{p through e} W_{after(p,e)}^T Err(p) W_{before(p,e)}^T
        Err(p)  = Sxy(p) - sum_{j: t(j) = t(p)} W_j Sxx(j, p)

    Returns:
        one matrix per edge, shaped like ``weights[e]``.
    """
    _check_weights(graph, weights)
    tgt = graph.targets
    w_path = [_pathway_product(path, weights) for path in graph.pathways]
    grads = [torch.zeros_like(w) for w in weights]
    for p, path in enumerate(graph.pathways):
        err = corr.sxy[p]
        for j in range(graph.n_pathways):
            if tgt[j] == tgt[p]:
                err = err - w_path[j] @ corr.sxx[(j, p)]
        # prefix[k] = W_{e_k} ... W_{e_1} (None = identity), suffix[k] = W_{e_L} ... W_{e_{k+1}}
        L = len(path)
        prefix: list[Tensor | None] = [None] * L
        suffix: list[Tensor | None] = [None] * L
        for k in range(1, L):
            prev = prefix[k - 1]
            w = weights[path[k - 1]]
            prefix[k] = w if prev is None else w @ prev
        for k in range(L - 2, -1, -1):
            nxt = suffix[k + 1]
            w = weights[path[k + 1]]
            suffix[k] = w if nxt is None else nxt @ w
        for k, e in enumerate(path):
            g = err  # (d_t, d_s)
            if suffix[k] is not None:
                g = suffix[k].T @ g
            if prefix[k] is not None:
                g = g @ prefix[k].T
            grads[e] = grads[e] - g
    return grads


# ---------------------------------------------------------------------------------------------
# 4.2  Reduced one-dimensional race dynamics
# ---------------------------------------------------------------------------------------------


class ReducedDynamics:
    """Vector field of the reduced race dynamics of GDLN.md 4.2, built from the pathway structure.

        tau db_e/dt = sum_{p through e} ( prod_{e' in p, e' != e} b_{e'} ) ( s_p - sum_j d_{j,p} a_j )
        a_p = prod_{e in p} b_e

    Args:
        pathways: each pathway as a sequence of edge names (any hashables), input to output.
        s: ``(..., P)``, the singular value ``s_p`` of the current mode of ``Sxy(p)``.
        d: ``(..., P, P)`` with ``d[j, p] = d_{j,p}``, the mode's entry of ``Sxx(j, p)``.
        targets: optional output node ``t(p)`` per pathway; if given, ``d[j, p]`` is ignored
            (treated as 0) when ``t(j) != t(p)``, as in the sum of 4.2.
        tau: time constant.

    Calling the object on ``b`` of shape ``(..., E)`` (edges ordered as :attr:`edges`, the order of
    first appearance in ``pathways``) returns ``db/dt`` of the same shape; leading dimensions
    broadcast with those of ``s`` and ``d`` (e.g. one row per mode).
    """

    def __init__(
        self,
        pathways: Sequence[Sequence[Hashable]],
        s: Tensor,
        d: Tensor,
        *,
        targets: Sequence[Node] | None = None,
        tau: float = 1.0,
    ) -> None:
        if len(pathways) == 0:
            raise ValueError("pathways: need at least one pathway")
        self.pathways = tuple(tuple(p) for p in pathways)
        edges: dict[Hashable, int] = {}
        for q, path in enumerate(self.pathways):
            if not path:
                raise ValueError(f"pathways[{q}] is empty")
            if len(set(path)) != len(path):
                raise ValueError(f"pathways[{q}] = {path} visits an edge twice")
            for name in path:
                edges.setdefault(name, len(edges))
        self.edges: tuple[Hashable, ...] = tuple(edges)
        P, E = len(self.pathways), len(self.edges)
        s = s if isinstance(s, Tensor) else torch.as_tensor(s, dtype=torch.float64)
        d = torch.as_tensor(d, dtype=s.dtype)
        if s.shape[-1:] != (P,):
            raise ValueError(f"s: expected shape (..., P={P}), got {tuple(s.shape)}")
        if d.shape[-2:] != (P, P):
            raise ValueError(f"d: expected shape (..., P={P}, P={P}), got {tuple(d.shape)}")
        if targets is not None:
            if len(targets) != P:
                raise ValueError(f"targets: expected {P} output nodes, got {len(targets)}")
            same = torch.tensor([[tj == tp for tp in targets] for tj in targets])
            d = d * same.to(d.dtype)
        self.s, self.d, self.tau = s, d, float(tau)
        # idx[p, k] = index of the k-th edge of p; shorter pathways are padded with E, which
        # points at an appended constant 1 so that products ignore the padding.
        L = max(len(p) for p in self.pathways)
        idx = torch.full((P, L), E, dtype=torch.long)
        for q, path in enumerate(self.pathways):
            idx[q, : len(path)] = torch.tensor([edges[name] for name in path])
        self.idx = idx
        self.incidence = torch.zeros(P, E, dtype=torch.bool)  # incidence[p, e]: e lies on p
        for q, path in enumerate(self.pathways):
            self.incidence[q, [edges[n] for n in path]] = True

    def index(self, edge: Hashable) -> int:
        """Position of ``edge`` in the state vector ``b``."""
        return self.edges.index(edge)

    def _gather(self, b: Tensor) -> Tensor:
        if b.shape[-1] != len(self.edges):
            raise ValueError(f"b: expected shape (..., E={len(self.edges)}), got {tuple(b.shape)}")
        ones = torch.ones(b.shape[:-1] + (1,), dtype=b.dtype, device=b.device)
        return torch.cat([b, ones], dim=-1)[..., self.idx]  # (..., P, L)

    def strengths(self, b: Tensor) -> Tensor:
        """``a_p = prod_{e in p} b_e``: ``(..., E) -> (..., P)``."""
        return self._gather(b).prod(dim=-1)

    def __call__(self, b: Tensor) -> Tensor:
        vals = self._gather(b)  # (..., P, L)
        one = torch.ones_like(vals[..., :1])
        # leave-one-out products from exclusive prefix and suffix products (no division by b_e,
        # so b_e = 0 is fine)
        pre = torch.cat([one, vals[..., :-1]], dim=-1).cumprod(dim=-1)
        suf = torch.cat([one, vals.flip(-1)[..., :-1]], dim=-1).cumprod(dim=-1).flip(-1)
        a = vals.prod(dim=-1)  # (..., P)
        s, d = self.s.to(b), self.d.to(b)
        err = s - (d * a[..., :, None]).sum(dim=-2)  # s_p - sum_j d_{j,p} a_j
        contrib = pre * suf * err[..., None]  # (..., P, L)
        batch = contrib.shape[:-2]
        contrib = contrib.reshape(batch + (-1,))
        E = len(self.edges)
        out = torch.zeros(batch + (E + 1,), dtype=b.dtype, device=b.device)
        out = out.index_add(-1, self.idx.to(b.device).reshape(-1), contrib)
        return out[..., :E] / self.tau


# Fixed-step RK4 and Euler written in torch rather than scipy.integrate.solve_ivp: the systems are
# tiny (a few dozen states), a fixed grid makes runs bit-for-bit reproducible and directly
# comparable with per-step SGD records, it adds no dependency, and the whole trajectory stays
# differentiable with autograd.
def rk4(f: VectorField, y0: Tensor, dt: float, n_steps: int) -> Tensor:
    """Classical fixed-step Runge-Kutta 4 for ``dy/dt = f(y)``.

    Returns:
        ``(n_steps + 1, *y0.shape)``, the state at times ``0, dt, ..., n_steps dt``.
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    ys = [y0]
    y = y0
    for _ in range(n_steps):
        k1 = f(y)
        k2 = f(y + 0.5 * dt * k1)
        k3 = f(y + 0.5 * dt * k2)
        k4 = f(y + dt * k3)
        y = y + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        ys.append(y)
    return torch.stack(ys)


def euler(f: VectorField, y0: Tensor, dt: float, n_steps: int) -> Tensor:
    """Explicit Euler, ``y <- y + dt f(y)``.

    With ``dt`` the gradient-flow time of one SGD step this is the exact discrete map of
    full-batch SGD restricted to the reduced modes (GDLN.md 4.4), not an approximation of it.

    Returns:
        ``(n_steps + 1, *y0.shape)``.
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    ys = [y0]
    y = y0
    for _ in range(n_steps):
        y = y + dt * f(y)
        ys.append(y)
    return torch.stack(ys)


def half_rise_index(traj: Tensor) -> Tensor:
    """First index along dim 0 where a rising trajectory passes the midpoint of its rise.

    The midpoint is ``(traj[0] + traj[-1]) / 2``; this is the "half-rise" step of GDLN.md 4.5
    check 6 (with the hidden singular values it gives the steps 76, 154, 317 quoted there).

    Args:
        traj: ``(T, ...)``.

    Returns:
        ``(...)`` long tensor.
    """
    mid = 0.5 * (traj[0] + traj[-1])
    return (traj >= mid).to(torch.int8).argmax(dim=0)


def staircase_levels(s: Tensor, scale: float = 1.0) -> Tensor:
    """Plateau levels of a loss that learns modes one by one in order of decreasing ``s``.

    ``levels[k] = scale * sum_{alpha: s_alpha < sigma_k} s_alpha^2`` plus, for ``k = 0``, all
    modes; ``sigma_k`` runs over the distinct values of ``s`` (degenerate modes are learned
    together: one drop). For the routing network use ``scale = M K / (P N_out)`` (GDLN.md 4.4).

    Returns:
        ``(n_distinct + 1,)``, from the initial plateau down to 0.
    """
    s = torch.as_tensor(s, dtype=torch.float64)
    # distinct values, descending; values within 1e-9 relative are one (degenerate) mode group
    distinct: list[float] = []
    for v in sorted(s.tolist(), reverse=True):
        if not distinct or v < distinct[-1] * (1 - 1e-9):
            distinct.append(v)
    levels = [float((s**2).sum())] + [float((s[s < sk * (1 - 1e-9)] ** 2).sum()) for sk in distinct]
    return scale * torch.tensor(levels, dtype=torch.float64)


def loss_drops(loss: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Drop steps and plateau values of a staircase loss (GDLN.md 4.5 checks 3, 7).

    Drop ``k`` is the first step at which ``loss <= (levels[k] + levels[k + 1]) / 2``; plateau
    ``k`` (between drops ``k`` and ``k + 1``) is the loss at the flattest step between them, the
    last plateau the final loss.

    Args:
        loss: ``(T,)``.
        levels: ``(n + 1,)`` descending plateau levels (:func:`staircase_levels`).

    Returns:
        ``drops (n,)`` long (``-1`` where the loss never gets there) and ``plateaus (n,)``.
    """
    mids = 0.5 * (levels[:-1] + levels[1:])
    below = loss[:, None] <= mids.to(loss)[None, :]  # (T, n)
    reached = below.any(dim=0)
    drops = torch.where(reached, below.to(torch.int8).argmax(dim=0), torch.full_like(mids, -1, dtype=torch.long))
    plateaus = []
    for k in range(len(mids)):
        a = int(drops[k])
        b = int(drops[k + 1]) if k + 1 < len(mids) else -1
        if a < 0 or b < 0 or b <= a:
            plateaus.append(loss[-1] if k + 1 == len(mids) and a >= 0 else loss.new_tensor(float("nan")))
            continue
        slope = (loss[a + 1 : b + 1] - loss[a:b]).abs()
        plateaus.append(loss[a + int(slope.argmin())])
    return drops, torch.stack(plateaus)


# ---------------------------------------------------------------------------------------------
# Closed forms (GDLN.md 4.2, 4.3)
# ---------------------------------------------------------------------------------------------


def two_layer_sigmoid(t: Tensor | float, s: float, a0: float, tau: float = 1.0) -> Tensor:
    """Two-layer single-path solution of ``tau da/dt = 2 a (s - a)`` (GDLN.md 4.2).

        a(t) = s e^{2st/tau} / (e^{2st/tau} - 1 + s/a0)

    evaluated in the overflow-free form ``s / (1 + (s/a0 - 1) e^{-2st/tau})``.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    return s / (1.0 + (s / a0 - 1.0) * torch.exp(-2.0 * s * t / tau))


def balanced_vector_field(s: Tensor | float, n_layers: int, tau: float = 1.0) -> VectorField:
    """``tau db/dt = b^(N-1) (s - b^N)``: N balanced layers on one path, ``a = b^N`` (GDLN.md 4.2)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")

    def f(b: Tensor) -> Tensor:
        return b ** (n_layers - 1) * (s - b**n_layers) / tau

    return f


def balanced_time(b: float, s: float, b0: float, n_layers: int, tau: float = 1.0) -> float:
    """Implicit solution of the balanced N-layer ODE: the time at which ``b(t)`` reaches ``b``.

        t(b) = tau * integral_{b0}^{b} dx / (x^(N-1) (s - x^N)),   0 < b0 <= b < s^(1/N)

    (for N = 2 this inverts the sigmoid of :func:`two_layer_sigmoid`).
    """
    if not 0 < b0 <= b < s ** (1.0 / n_layers):
        raise ValueError(f"need 0 < b0 <= b < s^(1/N); got b0={b0}, b={b}, s={s}, N={n_layers}")
    val, _ = integrate.quad(
        lambda x: 1.0 / (x ** (n_layers - 1) * (s - x**n_layers)), b0, b, limit=200, epsabs=0, epsrel=1e-11
    )
    return tau * val


def routing_vector_field(M: int, K: int, s: Tensor | float, tau: float = 1.0) -> VectorField:
    """The 3-edge routing-network system of GDLN.md 4.3 on states ``b = (b1, b2, b3)``.

        tau db1/dt = (K/M^2) b2 b3 (s - shat),  tau db2/dt = (K/M) b1 b3 (s - shat),
        tau db3/dt = (K/M^2) b1 b2 (s - shat),  shat = b1 b2 b3

    ``b`` has shape ``(..., 3)``; ``s`` broadcasts against ``b[..., 0]`` (e.g. one per mode).
    """

    def f(b: Tensor) -> Tensor:
        b1, b2, b3 = b.unbind(-1)
        err = torch.as_tensor(s, dtype=b.dtype, device=b.device) - b1 * b2 * b3
        return torch.stack(
            [K / M**2 * b2 * b3 * err, K / M * b1 * b3 * err, K / M**2 * b1 * b2 * err], dim=-1
        ) / tau

    return f


def routing_conserved(b: Tensor, M: int) -> Tensor:
    """``b2^2 - M b1^2``, exactly conserved by the flow of GDLN.md 4.3: ``(..., 3) -> (...)``."""
    return b[..., 1] ** 2 - M * b[..., 0] ** 2


def routing_fixed_point(s: Tensor | float, b0: Tensor | float, M: int) -> Tensor:
    """Hidden-layer strength at the fixed point of GDLN.md 4.3, the real root of
    ``b2 (b2^2 + c0) = M s`` with ``c0 = (M - 1) b0^2`` (balanced start).

    Solved with Cardano's formula (one real root since ``c0 >= 0``) in the cancellation-free form
    ``x = u - c0 / (3 u)``, ``u = cbrt(M s / 2 + sqrt((M s)^2 / 4 + c0^3 / 27))``, then one Newton
    step (relative residual ~1e-16 instead of 1e-11); differentiable, broadcasts.
    """
    s = torch.as_tensor(s, dtype=torch.float64)
    c0 = (M - 1) * torch.as_tensor(b0, dtype=s.dtype) ** 2
    ms = M * s
    u = torch.pow(ms / 2 + torch.sqrt(ms**2 / 4 + c0**3 / 27), 1.0 / 3)
    x = u - c0 / (3 * u)
    return x - (x * (x * x + c0) - ms) / (3 * x * x + c0)


def routing_time(b2: float, s: float, b0: float, M: int, K: int, tau: float = 1.0) -> float:
    """Exact implicit solution of GDLN.md 4.3 from a balanced start ``b1 = b2 = b3 = b0``:

        t(b2) = tau (M^2/K) integral_{b0}^{b2} dx / [ (x^2 + c0) (s - x (x^2 + c0) / M) ],
        c0 = (M - 1) b0^2,   b0 <= b2 < fixed point.
    """
    c0 = (M - 1) * b0**2
    b_star = float(routing_fixed_point(s, b0, M))
    if not b0 <= b2 < b_star:
        raise ValueError(f"b2 must lie in [b0, fixed point) = [{b0}, {b_star}), got {b2}")
    val, _ = integrate.quad(
        lambda x: 1.0 / ((x * x + c0) * (s - x * (x * x + c0) / M)), b0, b2, limit=200, epsabs=0, epsrel=1e-11
    )
    return tau * M**2 / K * val


# ---------------------------------------------------------------------------------------------
# 4.4  The routing network of the notebooks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingTask:
    """Data and routing of GDLN.md 4.4.

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
    """Y of GDLN.md 4.4: (4 items, 7 features)."""
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
    """The routing network task of GDLN.md 4.4.

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

    The hidden edge is ``"hidden"`` (shared, GDLN.md 4.3) or ``("hidden", i, j)`` (one per pair).
    """
    return [
        (("in", i), "hidden" if shared_hidden else ("hidden", i, j), ("out", j)) for i, j in task.pairs
    ]


def routing_gdln(
    task: RoutingTask, hidden: str = "shared"
) -> tuple[GDLNGraph, dict[Node, Tensor], dict[Node, Tensor], Tensor]:
    """The routing network of ``task`` as a GDLN on its trained contexts (GDLN.md 1, 4.3).

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
    """Gradient-flow time of one SGD step of GDLN.md 4.4: ``dt = 2 M^2 lr / (P N_out)``."""
    return 2.0 * task.M**2 * lr / (task.P * task.N_out)


def routing_theory_b0(init: str, gain: float = 0.2, b0: float = 0.08) -> float:
    """Initial balanced mode strength for the reduced theory (GDLN.md 4.4).

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
    """Discrete reduced theory of GDLN.md 4.4; arrays over steps ``0..steps``.

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
    """One Euler step of the GDLN.md 4.3 system per SGD step, ``dt = 2 M^2 lr / (P N_out)`` (4.4)."""
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
        loss: ``(steps + 1,)`` training loss of GDLN.md 4.4 before each step (the last entry is
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
    """Train the full routing network of GDLN.md 4.4 by full-batch SGD (no momentum, no biases).

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


# ---------------------------------------------------------------------------------------------
# 4.5 check 9: shared versus per-pair hidden layer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaceResult:
    """Hidden-layer mode strength with a shared hidden layer versus per-pair hidden layers.

    Attributes:
        t: ``(T,)`` time grid.
        shared, unshared: ``(T,)`` hidden-edge strength (shared layer; any one per-pair layer,
            all are equal by symmetry).
        t_half_shared, t_half_unshared: time at which each passes the midpoint between its
            initial and final value (linear interpolation between grid points).
    """

    t: Tensor
    shared: Tensor
    unshared: Tensor
    t_half_shared: float
    t_half_unshared: float


def _half_time(t: Tensor, traj: Tensor) -> float:
    k = int(half_rise_index(traj))
    if k == 0:
        return float(t[0])
    mid = 0.5 * (traj[0] + traj[-1])
    frac = (mid - traj[k - 1]) / (traj[k] - traj[k - 1])
    return float(t[k - 1] + frac * (t[k] - t[k - 1]))


def _rk4_until_still(
    f: VectorField, y0: Tensor, dt: float, t_max: float | None, tol: float, chunk: int = 500
) -> Tensor:
    """RK4 for ``t_max`` (if given) or until ``max |f(y)| < tol`` (at most 10^6 steps)."""
    if t_max is not None:
        return rk4(f, y0, dt, int(math.ceil(t_max / dt)))
    parts, y = [y0[None]], y0
    for _ in range(10**6 // chunk):
        traj = rk4(f, y, dt, chunk)
        parts.append(traj[1:])
        y = traj[-1]
        if float(f(y).abs().max()) < tol:
            return torch.cat(parts)
    raise RuntimeError(f"the race did not settle (max |db/dt| >= {tol}) within 10^6 steps of dt={dt}")


def shared_vs_unshared_race(
    task: RoutingTask | None = None,
    mode: int = 0,
    b0: float = 0.08,
    dt: float = 0.05,
    t_max: float | None = None,
    tol: float = 1e-10,
) -> RaceResult:
    """Check 9 of GDLN.md 4.5: time to half mode strength of a shared versus per-pair hidden layer.

    Both networks use the trained pairs of ``task`` (default :func:`routing_network_task`) with
    every context equally likely: ``s_p = s / M^2`` and ``d_{j,p} = delta_{jp} / M^2`` (contexts
    are never active together). The reduced dynamics are built automatically from the two pathway
    structures (:func:`routing_pathways`) and integrated with RK4 (``dt``; 0.2 is already too
    coarse: it lands on a wrong point of the fixed-point manifold) from a balanced start ``b0``,
    for ``t_max`` or, by default, until ``max |db/dt| < tol``. A shared hidden edge sums the
    gradient of all ``K M`` pathways (rate ``K/M``), a per-pair edge gets one (rate ``1/M^2``).
    """
    task = routing_network_task() if task is None else task
    s = float(task.s[mode])
    trajs = []
    for shared in (True, False):
        paths = routing_pathways(task, shared_hidden=shared)
        P = len(paths)
        f = ReducedDynamics(
            paths,
            torch.full((P,), s / task.M**2, dtype=torch.float64),
            torch.eye(P, dtype=torch.float64) / task.M**2,
        )
        hidden = f.index("hidden" if shared else paths[0][1])
        b = _rk4_until_still(f, torch.full((len(f.edges),), b0, dtype=torch.float64), dt, t_max, tol)
        trajs.append(b[:, hidden])
    n = max(len(x) for x in trajs)  # pad the settled one with its final value
    trajs = [torch.cat([x, x[-1:].expand(n - len(x))]) for x in trajs]
    t = torch.arange(n, dtype=torch.float64) * dt
    return RaceResult(t, trajs[0], trajs[1], _half_time(t, trajs[0]), _half_time(t, trajs[1]))


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


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
    """``(fan_out, fan_in)`` matrix ~ U(-a, a), ``a = gain sqrt(6 / (fan_in + fan_out))`` (GDLN.md 2)."""
    a = gain * math.sqrt(6.0 / (fan_in + fan_out))
    w = torch.rand(fan_out, fan_in, generator=generator, dtype=torch.float64)
    return ((2 * w - 1) * a).to(dtype)


def aligned_init(
    bases: Sequence[Tensor],
    strengths: float | Sequence[float | Tensor],
) -> list[Tensor]:
    """Aligned ("decoupled") weights of a chain of layers (GDLN.md 4.2):

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
