"""The reduced (neural race) dynamics built from a graph's pathways (docs/math.md section 5),
fixed-step integrators, and read-outs of learning curves.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence


import torch
from torch import Tensor

from .paths import Node

VectorField = Callable[[Tensor], Tensor]


class ReducedDynamics:
    """Vector field of the reduced race dynamics of docs/math.md section 5, built from the pathway structure.

        tau db_e/dt = sum_{p through e} ( prod_{e' in p, e' != e} b_{e'} ) ( s_p - sum_j d_{j,p} a_j )
        a_p = prod_{e in p} b_e

    Args:
        pathways: each pathway as a sequence of edge names (any hashables), input to output.
        s: ``(..., P)``, the singular value ``s_p`` of the current mode of ``Sxy(p)``.
        d: ``(..., P, P)`` with ``d[j, p] = d_{j,p}``, the mode's entry of ``Sxx(j, p)``.
        targets: optional output node ``t(p)`` per pathway; if given, ``d[j, p]`` is ignored
            (treated as 0) when ``t(j) != t(p)``, as in the sum of docs/math.md section 5.
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
    full-batch SGD restricted to the reduced modes (docs/math.md section 5), not an approximation of it.

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

    The midpoint is ``(traj[0] + traj[-1]) / 2``; this is the "half-rise" step of docs/math.md section 6
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
    together: one drop). For the routing network use ``scale = M K / (P N_out)`` (docs/math.md section 5).

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
    """Drop steps and plateau values of a staircase loss (docs/math.md section 6).

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
