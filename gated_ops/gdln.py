"""Gated deep linear networks as graphs, compiled to the fused pathway op (docs/math.md section 1).

    h_v = g_v * sum_{e=(u->v)} g_e W_e h_u

A :class:`GDLN` is declared as nodes (name -> width) and edges (src, dst, optional weight name:
edges naming the same weight share it, as the k-path hidden layer does). At construction the
graph is compiled once: nodes are put in topological depth order and the edges into a node of
depth d with the same (D_in, D_out) form ONE pathway-op call, with a plan whose weight indices
point into a per-shape weight bank. A forward pass is one fused call per layer; a layer's gates
are gathered with index tensors built at compile time, its sources are stacked and its
destinations split with Python loops over nodes (for graphs with one node per edge, as the
k-path decoders' outputs, that is a loop per edge: use KPathNet for speed there).

Gates are tensors: ``node_gates`` (num_nodes, B) and ``edge_gates`` (num_edges, B) in the order
of :attr:`GDLN.nodes` / :attr:`GDLN.edges` (None = all ones); :meth:`GDLN.gates` builds them
from dicts.

The theory of docs/math.md sections 4-5 is one call away from the graph (it lives in :mod:`gated_ops.theory`,
which is independent of the compiled op, so that simulations can be checked against it):

* :meth:`GDLN.theory_graph`, :meth:`GDLN.path_correlations`, :meth:`GDLN.path_form_gradient`:
  the exact path-form gradient of docs/math.md section 4 of this network's loss (tied weights: summed over edges).
* :meth:`GDLN.reduced_dynamics`: the one-dimensional race dynamics of docs/math.md section 5, built from the graph's
  pathways, a gating distribution (gates per context, context probabilities) and the data's
  mode strengths (:func:`data_modes`); :meth:`GDLN.set_aligned_` / :meth:`GDLN.mode_strengths`
  move between weights and mode strengths.
* The routing network of the paper's worked example as a GDLN, trained on the fused op and
  compared with :func:`gated_ops.theory.simulate_routing_network`: ``experiments/routing_net.py``.

Time units: with ``tau = 1``, one SGD step of size ``lr`` on :meth:`GDLN.loss` is one Euler step
``dt = lr`` of the reduced dynamics built with the contexts' empirical frequencies as ``probs``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .ops import pathway_matmul
from .plan import PathwayPlan, make_plan
from .routed import routed_pathway_matmul, slots_from_gate

if TYPE_CHECKING:  # the theory module imports scipy: loaded on first use, not with gated_ops
    from . import theory as _theory_t

__all__ = ["GDLN", "Edge", "Pathway", "GraphReducedDynamics", "DataModes", "data_modes"]


def _theory():
    from . import theory  # scipy costs ~1 s of import time on the shared machine (measured)
    return theory


@dataclass(frozen=True)
class Edge:
    name: str
    src: str
    dst: str
    weight: str  # edges with the same weight name share one matrix


@dataclass(frozen=True)
class Pathway:
    """An input-to-output path: its edges (indices into GDLN.edges) in order."""

    edges: tuple[int, ...]
    src: str
    dst: str


@dataclass(frozen=True)
class _Layer:
    bank: str  # key of the weight bank, "DoutxDin"
    plan: PathwayPlan
    src_nodes: tuple[int, ...]  # node index of each stacked source row
    dst_nodes: tuple[int, ...]  # node index of each destination row
    edge_idx: Tensor  # (P,) edge index of each pathway (for the edge gates)
    dst_of_path: Tensor  # (P,) node index of each pathway's destination (for the node gates)


class GDLN(nn.Module):
    """A gated deep linear network on the fused pathway op.

    Args:
        nodes: name -> width. Nodes without incoming edges are inputs, without outgoing outputs.
        edges: (src, dst) or (src, dst, weight_name) tuples; each edge is named "src->dst".
        bias: give every weight a bias (the theory assumes none).
        init_std: weights ~ N(0, init_std^2) (None: nn.Linear's default scale 1/sqrt(D_in)).
        backend: "auto" (the compiled CPU / CUDA kernels), "triton" (gated_ops.triton;
            layers whose plan is grouped run the compiled op there too) or "cuda_emu" (the CUDA
            kernels emulated on CPU tensors, for tests).
    """

    def __init__(self, nodes: dict[str, int], edges: list[tuple[str, ...]], *, bias: bool = False,
                 init_std: float | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "triton", "cuda_emu"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'cuda_emu', got {backend!r}")
        self.backend = backend
        self.node_names = list(nodes)
        self.widths = dict(nodes)
        node_idx = {n: i for i, n in enumerate(self.node_names)}
        self.edges: list[Edge] = []
        for e in edges:
            if len(e) not in (2, 3) or e[0] not in nodes or e[1] not in nodes:
                raise ValueError(f"edges: expected (src, dst[, weight]) over declared nodes, "
                                 f"got {e!r}")
            self.edges.append(Edge(f"{e[0]}->{e[1]}", e[0], e[1], e[2] if len(e) == 3
                                   else f"{e[0]}->{e[1]}"))
        if len({e.name for e in self.edges}) != len(self.edges):
            raise ValueError("edges: each (src, dst) pair may appear once")
        self.inputs = [n for n in self.node_names if not any(e.dst == n for e in self.edges)]
        self.outputs = [n for n in self.node_names if not any(e.src == n for e in self.edges)]
        self.depth = self._depths()

        # Weight banks: one parameter per (D_out, D_in); a weight name maps to a row of its bank.
        self.weight_slot: dict[str, tuple[str, int]] = {}
        bank_sizes: dict[str, tuple[int, int, int]] = {}
        for e in self.edges:
            shape = (self.widths[e.dst], self.widths[e.src])
            key = f"{shape[0]}x{shape[1]}"
            if e.weight in self.weight_slot:
                if self.weight_slot[e.weight][0] != key:
                    raise ValueError(f"edges: weight {e.weight!r} is shared by edges of "
                                     f"different shapes")
                continue
            n = bank_sizes.get(key, (0,) + shape)[0]
            self.weight_slot[e.weight] = (key, n)
            bank_sizes[key] = (n + 1,) + shape
        kw = {"dtype": dtype, "device": device}
        self.banks = nn.ParameterDict({k: nn.Parameter(torch.empty(*v, **kw))
                                       for k, v in bank_sizes.items()})
        self.biases = nn.ParameterDict({k: nn.Parameter(torch.zeros(v[0], v[1], **kw))
                                        for k, v in bank_sizes.items()}) if bias else None
        self.reset_parameters(init_std)

        # Layers: edges grouped by (depth of dst, bank), in depth order.
        groups: dict[tuple[int, str], list[int]] = {}
        for i, e in enumerate(self.edges):
            key = self.weight_slot[e.weight][0]
            groups.setdefault((self.depth[e.dst], key), []).append(i)
        self._layers: list[_Layer] = []
        for (_, key), eids in sorted(groups.items()):
            srcs = sorted({node_idx[self.edges[i].src] for i in eids})
            dsts = sorted({node_idx[self.edges[i].dst] for i in eids})
            plan = make_plan([srcs.index(node_idx[self.edges[i].src]) for i in eids],
                             [self.weight_slot[self.edges[i].weight][1] for i in eids],
                             [dsts.index(node_idx[self.edges[i].dst]) for i in eids],
                             num_sources=len(srcs), num_weights=bank_sizes[key][0],
                             num_dst=len(dsts))
            self._layers.append(_Layer(key, plan, tuple(srcs), tuple(dsts),
                                       torch.tensor(eids),
                                       torch.tensor([node_idx[self.edges[i].dst] for i in eids])))

        # Pathways, enumerated once; index tables for gathering their gates in one op each:
        # path_nodes[p] = nodes visited (source first), path_edges[p] = edges, both padded with
        # an index pointing at an appended row of ones.
        self._pathways = self._enumerate_pathways()
        L = max((len(p.edges) for p in self._pathways), default=0)
        path_nodes = torch.full((len(self._pathways), L + 1), len(self.node_names))
        path_edges = torch.full((len(self._pathways), L), len(self.edges))
        for q, p in enumerate(self._pathways):
            visited = [p.src] + [self.edges[i].dst for i in p.edges]
            path_nodes[q, : len(visited)] = torch.tensor([node_idx[n] for n in visited])
            path_edges[q, : len(p.edges)] = torch.tensor(p.edges)
        out_cols = torch.tensor([node_idx[n] for n in self.outputs for _ in range(nodes[n])],
                                dtype=torch.long)  # node of every column of the stacked outputs
        path_targets = torch.tensor([node_idx[p.dst] for p in self._pathways], dtype=torch.long)
        # The plans and index tables on the host; _apply places them on the parameters'
        # device (so a graph built on meta then to_empty() gets real tables).
        self._layers_host = self._layers
        self._index_host = {"path_nodes": path_nodes, "path_edges": path_edges,
                            "path_targets": path_targets, "out_cols": out_cols}
        self._place_tables()

    # -- structure ---------------------------------------------------------------------------
    def _depths(self) -> dict[str, int]:
        depth: dict[str, int] = {n: 0 for n in self.inputs}
        remaining = [n for n in self.node_names if n not in depth]
        while remaining:
            ready = [n for n in remaining
                     if all(e.src in depth for e in self.edges if e.dst == n)]
            if not ready:
                raise ValueError(f"edges: the graph has a cycle through {remaining}")
            for n in ready:
                depth[n] = 1 + max(depth[e.src] for e in self.edges if e.dst == n)
                remaining.remove(n)
        return depth

    def _enumerate_pathways(self) -> list[Pathway]:
        out: list[Pathway] = []
        out_edges: dict[str, list[int]] = {}
        for i, e in enumerate(self.edges):
            out_edges.setdefault(e.src, []).append(i)

        def walk(node: str, start: str, path: tuple[int, ...]) -> None:
            if node in self.outputs and path:
                out.append(Pathway(path, start, node))
            for i in out_edges.get(node, []):
                walk(self.edges[i].dst, start, path + (i,))
        for n in self.inputs:
            walk(n, n, ())
        return out

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def weight_names(self) -> list[str]:
        """Every distinct weight, in order of first use by an edge."""
        return list(self.weight_slot)

    def _slot(self, name: str) -> tuple[str, int]:
        if name not in self.weight_slot:
            name = next((e.weight for e in self.edges if e.name == name), name)
        if name not in self.weight_slot:
            raise KeyError(f"name: no weight or edge called {name!r}")
        return self.weight_slot[name]

    def weight(self, name: str) -> Tensor:
        """The matrix of a weight (by weight name or edge name), a view into its bank."""
        key, row = self._slot(name)
        return self.banks[key][row]

    def stacked_weights(self, names: Sequence[str]) -> Tensor:
        """Weights of the same shape stacked, ``(len(names), D_out, D_in)``: one gather from
        their bank (differentiable; a copy)."""
        slots = [self._slot(n) for n in names]
        if len({k for k, _ in slots}) != 1:
            raise ValueError(f"names: expected weights of one shape, got banks "
                             f"{sorted({k for k, _ in slots})}")
        return self.banks[slots[0][0]][[r for _, r in slots]]

    def bias(self, name: str) -> Tensor:
        """The bias of a weight (by weight name or edge name); needs bias=True."""
        if self.biases is None:
            raise ValueError("bias: this GDLN was built with bias=False")
        key, row = self._slot(name)
        return self.biases[key][row]

    def pathways(self) -> list[Pathway]:
        """Every input-to-output path, as edge index tuples (depth-first, in edge order)."""
        return list(self._pathways)

    def pathway_weight(self, p: Pathway) -> Tensor:
        """W_p: the product of the weights along p (last edge leftmost)."""
        w = self.weight(self.edges[p.edges[0]].weight)
        for i in p.edges[1:]:
            w = self.weight(self.edges[i].weight) @ w
        return w

    def pathway_gates(self, p: Pathway, node_gates: Tensor | None, edge_gates: Tensor | None,
                      batch: int) -> Tensor:
        """g_p (B,): the product of the gates of p's edges and of the nodes it visits."""
        idx = {n: i for i, n in enumerate(self.node_names)}
        g = torch.ones(batch, dtype=self._dtype, device=self._device)
        nodes = [p.src] + [self.edges[i].dst for i in p.edges]
        if node_gates is not None:
            g = g * node_gates[[idx[n] for n in nodes]].prod(0)
        if edge_gates is not None:
            g = g * edge_gates[list(p.edges)].prod(0)
        return g

    def pathway_gate_table(self, node_gates: Tensor | None, edge_gates: Tensor | None,
                           batch: int) -> Tensor:
        """g_p for every pathway of :meth:`pathways`, ``(P, B)``: the product of the gates of
        the nodes it visits (its input node included, as in :meth:`forward`) and of its edges.
        Two gathers, no loop over pathways."""
        self._check_gates(node_gates, edge_gates, batch)
        g = torch.ones(len(self._pathways), batch, dtype=self._dtype, device=self._device)
        if node_gates is not None:
            ext = torch.cat([node_gates, node_gates.new_ones(1, batch)])  # (N + 1, B)
            g = g * ext[self._index["path_nodes"]].prod(1)  # (P, L + 1, B) -> (P, B)
        if edge_gates is not None:
            ext = torch.cat([edge_gates, edge_gates.new_ones(1, batch)])
            g = g * ext[self._index["path_edges"]].prod(1)
        return g

    def _check_gates(self, node_gates: Tensor | None, edge_gates: Tensor | None,
                     batch: int) -> None:
        for name, g, n in (("node_gates", node_gates, len(self.node_names)),
                           ("edge_gates", edge_gates, len(self.edges))):
            if g is not None and tuple(g.shape) != (n, batch):
                raise ValueError(f"{name}: expected shape ({n}, {batch}), got {tuple(g.shape)}")

    def gates(self, batch: int, node_gates: dict[str, Tensor | float] | None = None,
              edge_gates: dict[str, Tensor | float] | None = None
              ) -> tuple[Tensor | None, Tensor | None]:
        """Gate tensors (num_nodes, B) and (num_edges, B) from dicts (missing entries = 1)."""
        def build(names: list[str], given):
            if not given:
                return None
            unknown = set(given) - set(names)
            if unknown:
                raise ValueError(f"gates: unknown names {sorted(unknown)}")
            out = torch.ones(len(names), batch, dtype=self._dtype, device=self._device)
            for i, n in enumerate(names):
                if n in given:
                    out[i] = torch.as_tensor(given[n], dtype=out.dtype, device=out.device)
            return out
        return build(self.node_names, node_gates), build([e.name for e in self.edges],
                                                          edge_gates)

    @property
    def _dtype(self) -> torch.dtype:
        return next(iter(self.banks.values())).dtype

    @property
    def _device(self) -> torch.device:
        return next(iter(self.banks.values())).device

    def reset_parameters(self, init_std: float | None = None) -> None:
        with torch.no_grad():
            for w in self.banks.values():
                w.normal_(0.0, init_std if init_std is not None else 1 / math.sqrt(w.shape[2]))

    def _place_tables(self) -> None:
        dev = self._device
        self._layers = [_Layer(l.bank, l.plan.to(dev), l.src_nodes, l.dst_nodes,
                               l.edge_idx.to(dev), l.dst_of_path.to(dev))
                        for l in self._layers_host]
        self._index = {k: v.to(dev) for k, v in self._index_host.items()}

    def _apply(self, fn, recurse=True):  # keep the plans and index tables on the parameters' device
        out = super()._apply(fn, recurse)
        self._place_tables()
        return out

    # -- computation -------------------------------------------------------------------------
    def forward(self, inputs: dict[str, Tensor], node_gates: Tensor | None = None,
                edge_gates: Tensor | None = None, *, routed: bool = False
                ) -> dict[str, Tensor]:
        """All node activations h_v (B, width) given the input activations (B, width).

        node_gates (num_nodes, B), edge_gates (num_edges, B): None means all ones. Input nodes
        are gated too (h_v = g_v x_v).

        ``routed``: each layer runs the routed (sparse) op on the pathways whose gate is
        non-zero for a sample (:func:`gated_ops.routed.slots_from_gate`), so a context-gated
        network (most gates 0, as the paper's routing network) costs what its active pathways
        cost. The same result as the dense op; one host synchronisation per layer (the number
        of active pathways per sample).
        """
        missing = set(self.inputs) - set(inputs)
        if missing:
            raise ValueError(f"inputs: missing input nodes {sorted(missing)}")
        idx = {n: i for i, n in enumerate(self.node_names)}
        h: dict[int, Tensor] = {}
        for n in self.inputs:
            x = inputs[n]
            h[idx[n]] = x * node_gates[idx[n]].unsqueeze(-1) if node_gates is not None else x
        for layer in self._layers:
            x = torch.stack([h[s] for s in layer.src_nodes])  # (S, B, D_in)
            gate = None
            if node_gates is not None:
                gate = node_gates[layer.dst_of_path]
            if edge_gates is not None:
                eg = edge_gates[layer.edge_idx]
                gate = eg if gate is None else gate * eg
            bias = self.biases[layer.bank] if self.biases is not None else None
            if routed and gate is not None:
                if gate.dim() == 1:
                    gate = gate.unsqueeze(1).expand(-1, x.shape[1])
                idx, w = slots_from_gate(gate)
                y = routed_pathway_matmul(x, self.banks[layer.bank], layer.plan, idx, w, bias,
                                          backend=self.backend)
            else:
                y = pathway_matmul(x, self.banks[layer.bank], layer.plan, bias, gate,
                                   backend=self.backend)
            # unbind, not y[row]: one backward stack instead of a zero-filled (T, B, D) per row
            # (halved the routing network's SGD step, 10 -> 5 ms, measured)
            for v, yv in zip(layer.dst_nodes, y.unbind(0)):
                h[v] = h[v] + yv if v in h else yv
        return {n: h[i] for i, n in enumerate(self.node_names) if i in h}

    def loss(self, outputs: dict[str, Tensor], targets: dict[str, Tensor],
             node_gates: Tensor | None = None) -> Tensor:
        """L = < 1/2 sum_{v out} ||g_v y_v - h_v||^2 > over the batch (docs/math.md section 4)."""
        missing = [n for n in self.outputs if n not in targets or n not in outputs]
        if missing:
            raise ValueError(f"outputs, targets: missing output nodes {missing}")
        h = torch.cat([outputs[n] for n in self.outputs], -1)  # (B, sum of output widths)
        y = torch.cat([targets[n] for n in self.outputs], -1)
        if node_gates is not None:
            y = y * node_gates[self._index["out_cols"]].T
        return 0.5 * (y - h).square().sum(-1).mean()

    # -- theory (docs/math.md sections 4-5): exact path-form gradient ------------------------------------------
    def theory_graph(self) -> "_theory_t.GDLNGraph":
        """This network as a :class:`gated_ops.theory.GDLNGraph`: edge ``e`` of the theory graph
        is ``self.edges[e]`` (as the pair of node names), pathway ``q`` is
        ``self.pathways()[q]``. The theory graph has one weight per edge: for tied weights give
        :meth:`edge_weights` (the shared matrix repeated on each of its edges), and the gradient
        of a shared weight is the sum of its edges' gradients (:meth:`path_form_gradient`)."""
        return _theory().GDLNGraph(tuple((e.src, e.dst) for e in self.edges),
                                   tuple(p.edges for p in self._pathways))

    def edge_weights(self) -> list[Tensor]:
        """The weight of every edge, in edge order (tied weights repeated): the ``weights``
        argument of the functions of :mod:`gated_ops.theory` on :meth:`theory_graph`."""
        return [self.weight(e.weight) for e in self.edges]

    def _theory_data(self, inputs: dict[str, Tensor], targets: dict[str, Tensor],
                     node_gates: Tensor | None, edge_gates: Tensor | None):
        batch = next(iter(inputs.values())).shape[0]
        gates = self.pathway_gate_table(node_gates, edge_gates, batch)
        idx = {n: i for i, n in enumerate(self.node_names)}
        y = {}
        for n in self.outputs:  # the loss compares h_v with g_v y_v
            if n not in targets:
                raise ValueError(f"targets: missing output node {n!r}")
            y[n] = targets[n] if node_gates is None else targets[n] * node_gates[idx[n]][:, None]
        # inputs stay ungated: an input node's gate is a factor of g_p (pathway_gate_table)
        return dict(inputs), y, gates

    def path_correlations(self, inputs: dict[str, Tensor], targets: dict[str, Tensor],
                          node_gates: Tensor | None = None, edge_gates: Tensor | None = None
                          ) -> "_theory_t.PathCorrelations":
        """Gated path correlations ``Sxy(p)``, ``Sxx(j, p)`` of docs/math.md section 4 for this network's
        :meth:`loss` on a batch (pathways indexed as in :meth:`pathways`). Gates as in
        :meth:`forward`; targets enter gated by their node's gate, as in :meth:`loss`."""
        x, y, gates = self._theory_data(inputs, targets, node_gates, edge_gates)
        return _theory().path_correlations(self.theory_graph(), x, y, gates)

    def path_form_gradient(self, inputs: dict[str, Tensor], targets: dict[str, Tensor],
                           node_gates: Tensor | None = None, edge_gates: Tensor | None = None
                           ) -> dict[str, Tensor]:
        """``dL/dW`` of :meth:`loss` for every weight, from the path-form formula of docs/math.md section 4
        (no autograd): ``{weight name: (D_out, D_in)}`` in :attr:`weight_names` order. A weight
        shared by several edges gets the sum of its edges' path-form gradients (chain rule).

        Needs ``bias=False``: with biases the gradient is not a sum over pathways.
        """
        if self.biases is not None:
            raise ValueError("path_form_gradient: the path form of docs/math.md section 4 is for networks "
                             "without biases; this GDLN was built with bias=True")
        th = _theory()
        x, y, gates = self._theory_data(inputs, targets, node_gates, edge_gates)
        graph = self.theory_graph()
        corr = th.path_correlations(graph, x, y, gates)
        grads = th.path_form_gradient(graph, [w.detach() for w in self.edge_weights()], corr)
        out: dict[str, Tensor] = {}
        for e, g in zip(self.edges, grads):
            out[e.weight] = out[e.weight] + g if e.weight in out else g
        return {n: out[n] for n in self.weight_names}

    # -- theory (docs/math.md section 5): reduced race dynamics ------------------------------------------
    def reduced_pathways(self) -> list[tuple[str, ...]]:
        """Every pathway as the tuple of its weight names (input to output): the pathways of
        the reduced dynamics, whose state is one mode strength per weight (tied edges share
        one)."""
        paths = [tuple(self.edges[i].weight for i in p.edges) for p in self._pathways]
        for p, names in zip(self._pathways, paths):
            if len(set(names)) != len(names):
                raise ValueError(f"reduced_pathways: the pathway {p.src} -> {p.dst} uses the "
                                 f"same weight twice ({names}); the reduced dynamics of "
                                 f"docs/math.md section 5 need each weight at most once per pathway")
        return paths

    def mode_statistics(self, s: Tensor | Sequence[float], node_gates: Tensor | None = None,
                        edge_gates: Tensor | None = None, probs: Tensor | None = None, *,
                        lam: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
        """``s_p`` and ``d_{j,p}`` of docs/math.md section 5 for every mode, from a gating distribution.

        The distribution is C contexts, column ``c`` of ``node_gates (num_nodes, C)`` /
        ``edge_gates (num_edges, C)`` holding context c's gates, with probabilities ``probs (C,)``
        (default uniform; they may sum to less than 1, the rest being contexts that gate every
        pathway off). Within context c the data have, along mode alpha, input-output
        correlation ``s[c, alpha]`` (``s`` of shape (r,) is the same in every context) and
        input variance ``lam[c, alpha]`` (default 1: whitened inputs). Then (exactly)

            s_p      = sum_c probs_c g_p(c) g_{t(p)}(c) s[c]      (Sxy(p) along the mode)
            d_{j,p}  = sum_c probs_c g_j(c) g_p(c) lam[c]         (Sxx(j, p) along the mode)

        Returns:
            ``s_p (r, P)`` and ``d (r, P, P)`` (pathways as in :meth:`pathways`; ``d[:, j, p]``
            for pathways with different outputs is computed but unused by the dynamics).
        """
        dist = self._gating_distribution(s, node_gates, edge_gates, probs, lam)
        return dist.s_p, dist.d

    def _gating_distribution(self, s, node_gates, edge_gates, probs, lam) -> "_Gating":
        C = next((g.shape[1] for g in (node_gates, edge_gates) if g is not None), 1)
        dtype, dev = torch.float64, self._device
        s = torch.as_tensor(s, dtype=dtype, device=dev)
        if s.dim() not in (1, 2) or (s.dim() == 2 and s.shape[0] != C):
            raise ValueError(f"s: expected (r,) or (C={C}, r) mode strengths, got shape "
                             f"{tuple(s.shape)}")
        s_c = s.expand(C, s.shape[-1])  # (C, r)
        lam_c = torch.as_tensor(lam, dtype=dtype, device=dev).expand(C, s.shape[-1])
        probs = (torch.full((C,), 1.0 / C, dtype=dtype, device=dev) if probs is None
                 else torch.as_tensor(probs, dtype=dtype, device=dev))
        if probs.shape != (C,) or bool((probs < 0).any()):
            raise ValueError(f"probs: expected ({C},) non-negative context probabilities, got "
                             f"{tuple(probs.shape)}")
        ng = node_gates.to(dtype) if node_gates is not None else None
        eg = edge_gates.to(dtype) if edge_gates is not None else None
        G = self.pathway_gate_table(ng, eg, C).to(dtype)  # (P, C)
        outs = [self.node_names.index(v) for v in self.outputs]
        g_out = ng[outs] if ng is not None else G.new_ones(len(outs), C)  # (V, C)
        # the target of t(p) is gated by t(p)'s node gate (see loss)
        Gt = G * ng[self._index["path_targets"]] if ng is not None else G
        s_p = torch.einsum("c,pc,ca->ap", probs, Gt, s_c)
        d = torch.einsum("c,jc,pc,ca->ajp", probs, G, G, lam_c)
        return _Gating(probs, G, g_out, s_c, lam_c, s_p, d)

    def reduced_dynamics(self, s: Tensor | Sequence[float], node_gates: Tensor | None = None,
                         edge_gates: Tensor | None = None, probs: Tensor | None = None, *,
                         lam: Tensor | float = 1.0, tau: float = 1.0) -> "GraphReducedDynamics":
        """The reduced race dynamics of docs/math.md section 5 of this graph, built automatically.

        The gating distribution and the data's mode strengths are as in
        :meth:`mode_statistics` (contexts as gate columns, ``probs``, ``s``, ``lam``; use
        :func:`data_modes` for ``s``, ``lam`` of a data set). The state is one strength per
        weight and mode, ``b (r, W)`` with the weights in the order of ``.edges`` (first use
        along :meth:`reduced_pathways`; ``.index(name)`` finds one), and

            tau db_w/dt = sum_{p through w} ( prod_{w' in p, w' != w} b_w' )
                                            ( s_p - sum_{j: t(j) = t(p)} d_{j,p} a_j )

        so a weight on many active pathways (or shared by many edges) sums their gradients.

        Assumptions under which this is the exact gradient flow of :meth:`loss` (docs/math.md section 5):

        1. shared mode bases: in every context the input-output correlation of every active
           output node v and input node u is ``U_v diag(s_c) V_u^T`` and the input correlation
           ``<x_u x_u'^T> = V_u diag(lam_c) V_u'^T``, with the same bases in all contexts (only
           the strengths depend on the context; e.g. the same items on every input node);
        2. gates depend on the context only, not on the item within it;
        3. aligned weights: ``W_w = R_dst diag(b_w) R_src^T`` with one orthonormal basis R_v
           per node (V at inputs, U at outputs), equal across the edges of a tied weight
           (:meth:`set_aligned_`). Gradient flow then keeps the bases fixed.

        Balance and small initial strengths are not needed for exactness; they are what the
        closed forms of docs/math.md section 5 assume. A random init breaks assumption 3; a small one becomes
        roughly aligned early in learning, a large one does not (lazy): that is where simulation
        and theory part. With ``tau = 1``, one SGD step of size ``lr`` on :meth:`loss` is one
        Euler step ``dt = lr`` when ``probs`` are the contexts' frequencies in the batch.
        """
        return GraphReducedDynamics(
            self, self._gating_distribution(s, node_gates, edge_gates, probs, lam), tau)

    def mode_strengths(self, bases: dict[str, Tensor], names: Sequence[str] | None = None
                       ) -> Tensor:
        """``b_w = diag(R_dst^T W_w R_src)`` for every weight (first edge's nodes), ``(r, W)``
        in the order of ``names`` (default :attr:`weight_names`); ``bases[v]`` is the
        ``(width_v, r)`` orthonormal mode basis of node v."""
        names = self.weight_names if names is None else list(names)
        first = {}
        for e in self.edges:
            first.setdefault(e.weight, e)
        cols = []
        for n in names:
            e = first[n]
            cols.append(torch.diagonal(bases[e.dst].T @ self.weight(n).detach() @ bases[e.src]))
        return torch.stack(cols, -1)

    def set_aligned_(self, bases: dict[str, Tensor], strengths: Tensor | float,
                     names: Sequence[str] | None = None) -> "GDLN":
        """Set every weight to ``R_dst diag(b_w) R_src^T`` (assumption 3 of
        :meth:`reduced_dynamics`). ``bases[v]``: ``(width_v, r)`` orthonormal columns;
        ``strengths``: a float (all weights, all modes) or ``(r, W)`` in the order of ``names``
        (default :attr:`weight_names`)."""
        names = self.weight_names if names is None else list(names)
        edges_of: dict[str, list[Edge]] = {}
        for e in self.edges:
            edges_of.setdefault(e.weight, []).append(e)
        r = next(iter(bases.values())).shape[1]
        b = torch.as_tensor(strengths, dtype=self._dtype, device=self._device)
        b = b.expand(r, len(names)) if b.dim() == 0 else b
        if b.shape != (r, len(names)):
            raise ValueError(f"strengths: expected a float or shape ({r}, {len(names)}), got "
                             f"{tuple(b.shape)}")
        with torch.no_grad():
            for k, n in enumerate(names):
                es = edges_of[n]
                for e in es[1:]:
                    if not (torch.equal(bases[e.src], bases[es[0].src])
                            and torch.equal(bases[e.dst], bases[es[0].dst])):
                        raise ValueError(f"bases: weight {n!r} is tied across edges whose nodes "
                                         f"have different bases ({es[0].name}, {e.name})")
                w = bases[es[0].dst] @ torch.diag(b[:, k]) @ bases[es[0].src].T
                self.weight(n).copy_(w)
        return self


@dataclass(frozen=True)
class _Gating:
    """A gating distribution over C contexts and the data's modes, evaluated on a graph."""

    probs: Tensor  # (C,)
    G: Tensor  # (P, C) pathway gates per context
    g_out: Tensor  # (V, C) output-node gates per context (V = GDLN.outputs)
    s_c: Tensor  # (C, r)
    lam_c: Tensor  # (C, r)
    s_p: Tensor  # (r, P)
    d: Tensor  # (r, P, P)


class GraphReducedDynamics:
    """:class:`gated_ops.theory.ReducedDynamics` built from a :class:`GDLN` and a gating
    distribution (:meth:`GDLN.reduced_dynamics`), plus the loss it predicts.

    Calling it on ``b (..., r, W)`` gives ``db/dt``; ``.edges`` (weight names), ``.index``,
    ``.strengths``, ``.s`` (= s_p), ``.d`` as in the theory class, which it wraps (``.dynamics``).
    """

    def __init__(self, net: GDLN, gating: _Gating, tau: float = 1.0):
        self.dynamics = _theory().ReducedDynamics(
            net.reduced_pathways(), gating.s_p, gating.d,
            targets=[p.dst for p in net.pathways()], tau=tau)
        self.edges, self.index, self.strengths = (self.dynamics.edges, self.dynamics.index,
                                                  self.dynamics.strengths)
        self.s, self.d, self.tau = gating.s_p, gating.d, tau
        self._gating = gating
        self._T = torch.tensor([[p.dst == v for v in net.outputs] for p in net.pathways()],
                               dtype=gating.G.dtype, device=gating.G.device)  # (P, V) t(p) = v

    def __call__(self, b: Tensor) -> Tensor:
        return self.dynamics(b)

    def loss(self, b: Tensor) -> Tensor:
        """The part of :meth:`GDLN.loss` carried by the modes, at strengths ``b (..., r, W)``:

            1/2 sum_c probs_c sum_alpha sum_{v out} (lam A_{c,v} - g_v(c) s)^2 / lam,
            A_{c,v} = sum_{p: t(p) = v} g_p(c) a_p

        (exact under the assumptions of :meth:`GDLN.reduced_dynamics`, up to the constant part
        of the targets outside the modes, which is 0 when the targets lie in the span of the
        modes, as in the routing task). Returns ``(...)``.
        """
        g = self._gating
        a = self.dynamics.strengths(b)  # (..., r, P)
        A = torch.einsum("...ap,pc,pv->...acv", a, g.G, self._T)  # (..., r, C, V)
        lam = g.lam_c.T[..., None]  # (r, C, 1)
        target = g.g_out.T[None] * g.s_c.T[..., None]  # (r, C, V)
        sq = (lam * A - target).square() / lam
        return 0.5 * torch.einsum("c,...acv->...", g.probs, sq)


@dataclass(frozen=True)
class DataModes:
    """Modes of a data set (docs/math.md section 5): ``<y x^T> = U diag(s) V^T`` and the input variance
    along each mode, ``lam = diag(V^T <x x^T> V)``; ``off_diagonal`` = max |off-diagonal entry|
    of ``V^T <x x^T> V`` (0 when the inputs share the modes, as the reduction assumes)."""

    s: Tensor  # (r,)
    lam: Tensor  # (r,)
    U: Tensor  # (N, r)
    V: Tensor  # (D, r)
    off_diagonal: float


def data_modes(x: Tensor, y: Tensor, tol: float = 1e-10) -> DataModes:
    """Modes of the samples ``x (n, D)``, ``y (n, N)`` (averages over the n rows). Modes with
    ``s < tol * max(s)`` are dropped. Signs: the largest entry of each U column is positive."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x, y: expected (n, D) and (n, N) with the same n > 0, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    u, sv, vh = torch.linalg.svd(y.T @ x / n, full_matrices=False)
    r = int((sv > sv.max() * tol).sum())
    u, sv, v = u[:, :r], sv[:r], vh[:r].T
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))[0]
    u, v = u * sign, v * sign
    cov = v.T @ (x.T @ x / n) @ v
    off = cov - torch.diag(torch.diagonal(cov))
    return DataModes(sv, torch.diagonal(cov).clone(), u, v, float(off.abs().max()) if r > 1 else 0.0)
