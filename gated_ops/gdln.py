"""Gated deep linear networks as graphs, compiled to the fused pathway op (GDLN.md section 1).

    h_v = g_v * sum_{e=(u->v)} g_e W_e h_u

A :class:`GDLN` is declared as nodes (name -> width) and edges (src, dst, optional weight name:
edges naming the same weight share it, as the k-path hidden layer does). At construction the
graph is compiled once: nodes are put in topological depth order and the edges into a node of
depth d with the same (D_in, D_out) form ONE pathway-op call, with a plan whose weight indices
point into a per-shape weight bank. A forward pass is one fused call per layer; gathering a
layer's sources and gates uses index tensors built at compile time (no per-edge Python loop).

Gates are tensors: ``node_gates`` (num_nodes, B) and ``edge_gates`` (num_edges, B) in the order
of :attr:`GDLN.nodes` / :attr:`GDLN.edges` (None = all ones); :meth:`GDLN.gates` builds them
from dicts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .ops import pathway_matmul
from .plan import PathwayPlan, make_plan

__all__ = ["GDLN", "Edge", "Pathway"]


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
    """

    def __init__(self, nodes: dict[str, int], edges: list[tuple[str, ...]], *, bias: bool = False,
                 init_std: float | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
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
                             num_dst=len(dsts), device=device)
            self._layers.append(_Layer(key, plan, tuple(srcs), tuple(dsts),
                                       torch.tensor(eids, device=device),
                                       torch.tensor([node_idx[self.edges[i].dst] for i in eids],
                                                    device=device)))

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

    @property
    def num_layers(self) -> int:
        return len(self._layers)

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

    def bias(self, name: str) -> Tensor:
        """The bias of a weight (by weight name or edge name); needs bias=True."""
        if self.biases is None:
            raise ValueError("bias: this GDLN was built with bias=False")
        key, row = self._slot(name)
        return self.biases[key][row]

    def pathways(self) -> list[Pathway]:
        """Every input-to-output path, as edge index tuples (depth-first, in edge order)."""
        out: list[Pathway] = []

        def walk(node: str, start: str, path: tuple[int, ...]) -> None:
            if node in self.outputs and path:
                out.append(Pathway(path, start, node))
            for i, e in enumerate(self.edges):
                if e.src == node:
                    walk(e.dst, start, path + (i,))
        for n in self.inputs:
            walk(n, n, ())
        return out

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

    def _apply(self, fn, recurse=True):  # keep the plans on the parameters' device
        out = super()._apply(fn, recurse)
        dev = self._device
        self._layers = [_Layer(l.bank, l.plan.to(dev), l.src_nodes, l.dst_nodes,
                               l.edge_idx.to(dev), l.dst_of_path.to(dev)) for l in self._layers]
        return out

    # -- computation -------------------------------------------------------------------------
    def forward(self, inputs: dict[str, Tensor], node_gates: Tensor | None = None,
                edge_gates: Tensor | None = None) -> dict[str, Tensor]:
        """All node activations h_v (B, width) given the input activations (B, width).

        node_gates (num_nodes, B), edge_gates (num_edges, B): None means all ones. Input nodes
        are gated too (h_v = g_v x_v).
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
            y = pathway_matmul(x, self.banks[layer.bank], layer.plan, bias, gate)
            for row, v in enumerate(layer.dst_nodes):
                h[v] = h[v] + y[row] if v in h else y[row]
        return {n: h[i] for i, n in enumerate(self.node_names) if i in h}

    def loss(self, outputs: dict[str, Tensor], targets: dict[str, Tensor],
             node_gates: Tensor | None = None) -> Tensor:
        """L = < 1/2 sum_{v out} ||g_v y_v - h_v||^2 > over the batch (GDLN.md section 4)."""
        idx = {n: i for i, n in enumerate(self.node_names)}
        total = 0.0
        for n in self.outputs:
            y = targets[n]
            if node_gates is not None:
                y = y * node_gates[idx[n]].unsqueeze(-1)
            total = total + 0.5 * (y - outputs[n]).square().sum(-1).mean()
        return total
