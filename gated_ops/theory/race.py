"""Shared versus per-pair hidden layers: the race that shared pathways win (docs/math.md
section 6, the last theory check).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .dynamics import ReducedDynamics, VectorField, half_rise_index, rk4
from .routing import RoutingTask, routing_network_task, routing_pathways


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
    """Check 9 of docs/math.md section 6: time to half mode strength of a shared versus per-pair hidden layer.

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
