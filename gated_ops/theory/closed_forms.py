"""Closed forms of the reduced dynamics (docs/math.md section 5): the two-layer sigmoid, balanced
N-layer networks, and the routing network's three-variable system, its conserved quantities,
fixed point and implicit solution.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .dynamics import VectorField

try:
    from scipy import integrate
except ImportError as e:  # an optional part: gated_ops itself does not need scipy
    raise ImportError(
        "gated_ops.theory needs scipy (the quadrature of the implicit solutions), an optional "
        "dependency of gated_ops: pip install 'gated_ops[theory]' (or pip install scipy)"
    ) from e


def two_layer_sigmoid(t: Tensor | float, s: float, a0: float, tau: float = 1.0) -> Tensor:
    """Two-layer single-path solution of ``tau da/dt = 2 a (s - a)`` (docs/math.md section 5).

        a(t) = s e^{2st/tau} / (e^{2st/tau} - 1 + s/a0)

    evaluated in the overflow-free form ``s / (1 + (s/a0 - 1) e^{-2st/tau})``.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    return s / (1.0 + (s / a0 - 1.0) * torch.exp(-2.0 * s * t / tau))


def balanced_vector_field(s: Tensor | float, n_layers: int, tau: float = 1.0) -> VectorField:
    """``tau db/dt = b^(N-1) (s - b^N)``: N balanced layers on one path, ``a = b^N`` (docs/math.md section 5)."""
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
    """The 3-edge routing-network system of docs/math.md section 5 on states ``b = (b1, b2, b3)``.

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
    """``b2^2 - M b1^2``, exactly conserved by the flow of docs/math.md section 5: ``(..., 3) -> (...)``."""
    return b[..., 1] ** 2 - M * b[..., 0] ** 2


def routing_fixed_point(s: Tensor | float, b0: Tensor | float, M: int) -> Tensor:
    """Hidden-layer strength at the fixed point of docs/math.md section 5, the real root of
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
    """Exact implicit solution of docs/math.md section 5 from a balanced start ``b1 = b2 = b3 = b0``:

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
