"""The exact path-form gradient of any GDLN (docs/math.md section 4): the graph, its pathways'
gates, the network output and loss, path correlations and the gradient written per pathway.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Node = Hashable  # a graph's node name


@dataclass(frozen=True)
class GDLNGraph:
    """A GDLN in path form (docs/math.md sections 1, 4).

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
    """Gated path correlations of docs/math.md section 4.

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
    """Per-sample pathway gates ``g_p`` = product of the node and edge gates along ``p`` (docs/math.md section 1).

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
    """``h_v = sum_{p: t(p) = v} g_p W_p x_{s(p)}`` for every output node (docs/math.md sections 1, 4).

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
    """``L = < 1/2 sum_{v out} ||y_v - h_v||^2 >`` over samples (docs/math.md sections 4-5), a scalar.

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
    """Gated path correlations ``Sxy(p)`` and ``Sxx(j, p)`` of docs/math.md section 4, averaged over samples.

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
    """``dL/dW_e`` from the path-form formula of docs/math.md section 4 (equal to ``-tau dW_e/dt``).

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
