"""Theory of gated deep linear networks (GDLNs): path correlations, reduced race dynamics, closed forms.

The mathematics is stated in docs/math.md (sections 1, 4-6), in the paper's notation (Saxe,
Sodhani, Lewallen, ICML 2022). The package is pure PyTorch (plus scipy quadrature for the implicit
solutions: ``pip install 'gated_ops[theory]'``), float64-capable and independent of the compiled
``gated_ops`` extension, so it can serve as the reference that simulations are checked against.

Contents, one module per topic, in reading order:

* :mod:`.paths`, the exact path-form gradient of any GDLN: :class:`GDLNGraph`, :func:`network_output`,
  :func:`gdln_loss`, :func:`path_correlations`, :func:`path_form_gradient`.
* :mod:`.dynamics`, the reduced one-dimensional race dynamics built from the pathway structure:
  :class:`ReducedDynamics`, integrators :func:`rk4` and :func:`euler`, and read-outs of learning
  curves: :func:`half_rise_index`, :func:`staircase_levels`, :func:`loss_drops`.
* :mod:`.closed_forms`: :func:`two_layer_sigmoid`, :func:`balanced_vector_field`, :func:`balanced_time`,
  and the routing network's: :func:`routing_vector_field`, :func:`routing_conserved`,
  :func:`routing_time`, :func:`routing_fixed_point`.
* :mod:`.routing`, the notebooks' routing network: :func:`routing_network_task`,
  :func:`simulate_routing_network` (full weight matrices, full-batch SGD, vectorised over runs),
  :func:`routing_theory` (the exact discrete map of the reduced dynamics), and the same network
  as a path-form GDLN: :func:`routing_pathways`, :func:`routing_gdln`.
* :mod:`.race`, shared against per-pair hidden layers: :func:`shared_vs_unshared_race`.
* :mod:`.init`, initialisation helpers: :func:`aligned_init`, :func:`complete_basis`,
  :func:`random_orthogonal`, :func:`xavier_uniform`.
"""
from __future__ import annotations

from .closed_forms import (balanced_time, balanced_vector_field, routing_conserved,
                           routing_fixed_point, routing_time, routing_vector_field,
                           two_layer_sigmoid)
from .dynamics import ReducedDynamics, euler, half_rise_index, loss_drops, rk4, staircase_levels
from .init import aligned_init, complete_basis, random_orthogonal, xavier_uniform
from .paths import (GDLNGraph, PathCorrelations, gdln_loss, network_output, path_correlations,
                    path_form_gradient, pathway_gates)
from .race import RaceResult, shared_vs_unshared_race
from .routing import (RoutingRun, RoutingTask, RoutingTheory, routing_gdln, routing_init,
                      routing_network_task, routing_pathways, routing_sgd_dt, routing_theory,
                      routing_theory_b0, simulate_routing_network)

__all__ = [
    # paths
    "GDLNGraph",
    "PathCorrelations",
    "pathway_gates",
    "network_output",
    "gdln_loss",
    "path_correlations",
    "path_form_gradient",
    # dynamics
    "ReducedDynamics",
    "rk4",
    "euler",
    "half_rise_index",
    "staircase_levels",
    "loss_drops",
    # closed_forms
    "two_layer_sigmoid",
    "balanced_vector_field",
    "balanced_time",
    "routing_vector_field",
    "routing_conserved",
    "routing_time",
    "routing_fixed_point",
    # routing
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
    # race
    "RaceResult",
    "shared_vs_unshared_race",
    # init
    "aligned_init",
    "complete_basis",
    "random_orthogonal",
    "xavier_uniform",
]
