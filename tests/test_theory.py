"""Tests of gated_ops.theory: every check of docs/math.md section 6 and the closed forms of docs/math.md section 5.

Run: python -m pytest tests/test_theory.py -q   (about 10 s on 2 CPU cores)

Tolerance policy. A check of docs/math.md section 6 uses exactly the tolerance stated there (quoted in the
test). Everything else is an identity that holds exactly in real arithmetic, evaluated in float64:
relative error <= 1e-10 for algebra (vector fields, gradients), or the stated error of the
numerical method (RK4 truncation, quadrature) with the step size named in the test.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

F64 = torch.float64


def _load_theory():
    """``gated_ops.theory``; if the package cannot be imported (its ``__init__`` loads the
    compiled extension), load the module from its file, which depends on nothing else."""
    try:
        return importlib.import_module("gated_ops.theory")
    except Exception:  # noqa: BLE001 - any failure of the package import: fall back to the file
        path = Path(__file__).resolve().parents[1] / "gated_ops" / "theory.py"
        spec = importlib.util.spec_from_file_location("gated_ops_theory_standalone", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
        spec.loader.exec_module(module)
        return module


theory = _load_theory()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def task():
    return theory.routing_network_task()


@pytest.fixture(scope="module")
def decoupled_run(task):
    """docs/math.md section 5: decoupled init 0.08, lr 0.02, 500 steps."""
    return theory.simulate_routing_network(task, "decoupled", lr=0.02, steps=500, seed=0)


@pytest.fixture(scope="module")
def decoupled_theory(task):
    return theory.routing_theory(task, b0=0.08, lr=0.02, steps=500)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# A random small GDLN (check 1)
# ---------------------------------------------------------------------------------------------

EDGES = [
    ("x0", "h0"),
    ("x1", "h0"),
    ("x0", "h1"),
    ("h0", "h1"),
    ("h0", "y0"),
    ("h1", "y0"),
    ("h1", "y1"),
    ("x1", "y1"),  # skip connection: the only edge of pathway x1 -> y1
]
DIMS = {"x0": 3, "x1": 2, "h0": 4, "h1": 5, "y0": 3, "y1": 2}
TOPO = ["x0", "x1", "h0", "h1", "y0", "y1"]


def _random_gdln(seed: int, n: int = 40, binary: bool = True):
    gen = torch.Generator().manual_seed(seed)
    graph = theory.GDLNGraph.from_edges(EDGES)
    weights = [0.7 * torch.randn(DIMS[v], DIMS[u], generator=gen, dtype=F64) for u, v in EDGES]
    x = {v: torch.randn(n, DIMS[v], generator=gen, dtype=F64) for v in ("x0", "x1")}
    y = {v: torch.randn(n, DIMS[v], generator=gen, dtype=F64) for v in ("y0", "y1")}

    def gate(*shape):
        u = torch.rand(*shape, generator=gen, dtype=F64)
        return (u < 0.7).to(F64) if binary else u

    node_gates = {v: gate(n) for v in ("h0", "h1", "y0", "y1")}
    edge_gates = gate(len(EDGES), n)
    return graph, weights, x, y, node_gates, edge_gates


def test_graph_enumerates_all_pathways():
    graph = theory.GDLNGraph.from_edges(EDGES)
    assert graph.n_pathways == 9
    assert set(graph.sources) == {"x0", "x1"} and set(graph.targets) == {"y0", "y1"}
    assert (7,) in graph.pathways


def test_network_output_equals_node_recursion():
    """The path sum of docs/math.md section 4 equals the layer-wise model of docs/math.md section 1: h_v = g_v sum g_e W_e h_u."""
    graph, weights, x, _, node_gates, edge_gates = _random_gdln(0)
    h = dict(x)
    for v in TOPO[2:]:
        acc = 0
        for e, (u, w) in enumerate(EDGES):
            if w == v:
                acc = acc + edge_gates[e][:, None] * h[u] @ weights[e].T
        h[v] = node_gates[v][:, None] * acc
    gates = theory.pathway_gates(graph, node_gates, edge_gates)
    out = theory.network_output(graph, weights, x, gates)
    for v in ("y0", "y1"):
        assert _rel(out[v], h[v]) < 1e-12


@pytest.mark.parametrize("binary", [True, False], ids=["gates01", "real_gates"])
@pytest.mark.parametrize("seed", [0, 1])
def test_check1_path_form_gradient_equals_autograd(seed, binary):
    """theory check 1: path-form gradient = autograd's, random per-sample gates, float64, rel < 1e-5."""
    graph, weights, x, y, node_gates, edge_gates = _random_gdln(seed, binary=binary)
    gates = theory.pathway_gates(graph, node_gates, edge_gates)
    params = [w.clone().requires_grad_(True) for w in weights]
    loss = theory.gdln_loss(graph, params, x, y, gates)
    auto = torch.autograd.grad(loss, params)
    corr = theory.path_correlations(graph, x, y, gates)
    formula = theory.path_form_gradient(graph, weights, corr)
    for e, (ga, gf) in enumerate(zip(auto, formula)):
        assert _rel(gf, ga) < 1e-5, f"edge {EDGES[e]}"


def test_pathway_gated_off_for_the_whole_batch_gets_no_gradient():
    graph, weights, x, y, node_gates, edge_gates = _random_gdln(2)
    gates = theory.pathway_gates(graph, node_gates, edge_gates)
    gates[graph.pathways.index((7,))] = 0.0
    corr = theory.path_correlations(graph, x, y, gates)
    grads = theory.path_form_gradient(graph, weights, corr)
    assert torch.count_nonzero(grads[7]) == 0
    params = [w.clone().requires_grad_(True) for w in weights]
    auto = torch.autograd.grad(theory.gdln_loss(graph, params, x, y, gates), params)
    for ga, gf in zip(auto, grads):
        assert float((ga - gf).abs().max()) <= 1e-10 * float(ga.abs().max().clamp_min(1.0))


def test_input_validation_names_the_argument():
    graph, weights, x, y, node_gates, edge_gates = _random_gdln(0)
    gates = theory.pathway_gates(graph, node_gates, edge_gates)
    with pytest.raises(ValueError, match="does not lead into"):
        theory.GDLNGraph((("a", "b"), ("c", "d")), ((0, 1),))
    with pytest.raises(ValueError, match="weights"):
        theory.network_output(graph, weights[:-1], x, gates)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        bad = list(weights)
        bad[1] = torch.zeros(DIMS["h0"] + 1, DIMS["x1"], dtype=F64)
        theory.network_output(graph, bad, x, gates)
    with pytest.raises(ValueError, match="gates"):
        theory.network_output(graph, weights, x, gates[:-1])
    with pytest.raises(ValueError, match="n_samples > 0"):
        theory.path_correlations(graph, {k: v[:0] for k, v in x.items()}, y, gates[:, :0])
    with pytest.raises(ValueError, match="init"):
        theory.simulate_routing_network(theory.routing_network_task(), "nope", steps=1)


# ---------------------------------------------------------------------------------------------
# docs/math.md section 5: closed forms, integrators and the reduction itself
# ---------------------------------------------------------------------------------------------


def test_two_layer_sigmoid_matches_rk4():
    s, a0 = 3.0, 1e-3
    traj = theory.rk4(lambda a: 2 * a * (s - a), torch.tensor(a0, dtype=F64), 1e-3, 4000)
    ref = theory.two_layer_sigmoid(torch.arange(4001, dtype=F64) * 1e-3, s, a0)
    assert _rel(traj, ref) < 1e-10  # RK4 error O(dt^4) = 1e-12


def test_balanced_ode_matches_closed_forms():
    s, b0, dt = 3.0, 0.3, 2e-3
    for n_layers in (2, 3, 4):
        traj = theory.rk4(theory.balanced_vector_field(s, n_layers), torch.tensor(b0, dtype=F64), dt, 3000)
        checked = 0
        for k in (250, 500, 750, 1500):
            b = float(traj[k])
            if b < 0.999 * s ** (1 / n_layers):
                assert theory.balanced_time(b, s, b0, n_layers) == pytest.approx(k * dt, rel=1e-7)
                checked += 1
        assert checked >= 2
        assert float(traj[-1]) ** n_layers == pytest.approx(s, rel=1e-6)
    # N = 2: a = b^2 is the sigmoid of docs/math.md section 5
    traj = theory.rk4(theory.balanced_vector_field(s, 2), torch.tensor(b0, dtype=F64), dt, 3000)
    ref = theory.two_layer_sigmoid(torch.arange(3001, dtype=F64) * dt, s, b0**2)
    assert _rel(traj**2, ref) < 1e-10


def _routing_hand_written(b: torch.Tensor, s: float, pairs, M: int) -> torch.Tensor:
    """The routing equations per edge, written out: every context has weight 1/M^2."""
    b_in, b_hid, b_out = b[:M], b[M], b[M + 1 :]
    d_in, d_out = torch.zeros_like(b_in), torch.zeros_like(b_out)
    d_hid = torch.zeros_like(b_hid)
    for i, j in pairs:
        err = s - b_in[i] * b_hid * b_out[j]
        d_in[i] += b_hid * b_out[j] * err / M**2
        d_hid += b_in[i] * b_out[j] * err / M**2
        d_out[j] += b_in[i] * b_hid * err / M**2
    return torch.cat([d_in, d_hid[None], d_out])


def test_reduced_dynamics_from_pathways_equals_routing_equations(task):
    """The vector field built automatically from the routing pathways equals the routing equations."""
    M, K, pairs = task.M, task.K, task.pairs
    paths = theory.routing_pathways(task)
    P = len(paths)
    gen = torch.Generator().manual_seed(0)
    s = task.s[:, None].expand(-1, P) / M**2  # one row per mode
    f = theory.ReducedDynamics(paths, s, torch.eye(P, dtype=F64) / M**2)
    order = [("in", i) for i in range(M)] + ["hidden"] + [("out", j) for j in range(M)]
    perm = [f.index(name) for name in order]
    for _ in range(5):
        # symmetric points (b1, b2, b3): equal to the 3-edge system of docs/math.md section 5
        b123 = 2 * torch.rand(task.rank, 3, generator=gen, dtype=F64)
        b = torch.empty(task.rank, len(f.edges), dtype=F64)
        b[:, perm] = torch.cat([b123[:, :1].expand(-1, M), b123[:, 1:2], b123[:, 2:].expand(-1, M)], 1)
        db = f(b)[:, perm]
        ref = theory.routing_vector_field(M, K, task.s)(b123)
        assert _rel(torch.stack([db[:, 0], db[:, M], db[:, M + 1]], -1), ref) < 1e-12
        assert _rel(db[:, :M], ref[:, :1].expand(-1, M)) < 1e-12
        # arbitrary points: the per-edge equations
        b = 2 * torch.rand(task.rank, len(f.edges), generator=gen, dtype=F64)
        db = f(b)
        for m in range(task.rank):
            ref = _routing_hand_written(b[m, perm], float(task.s[m]), pairs, M)
            assert _rel(db[m, perm], ref) < 1e-12


@pytest.mark.parametrize("hidden", ["shared", "per_pair", "both"])
def test_reduction_is_exact_for_aligned_weights(task, hidden):
    """The reduction (docs/math.md section 5) on a real GDLN: with aligned weights (any per-edge, per-mode strengths) the path-form
    gradient is diagonal in the mode bases and equals the reduced vector field, with s_p and
    d_{j,p} read off the path correlations."""
    graph, x, y, gates = theory.routing_gdln(task, hidden)
    corr = theory.path_correlations(graph, x, y, gates)
    gen = torch.Generator().manual_seed(1)
    r, H = task.rank, task.hidden
    U, V = task.U[:, :r], task.V[:, :r]
    r_h = theory.random_orthogonal(H, r, generator=gen)
    r_g = theory.random_orthogonal(H, r, generator=gen)
    basis = {"h": r_h, "g": r_g}

    def bases(e):
        u, v = graph.edges[e]
        return basis.get(v, U), basis.get(u, V)  # (output side, input side)

    b = 0.3 + torch.rand(r, graph.n_edges, generator=gen, dtype=F64)
    weights = [bases(e)[0] @ torch.diag(b[:, e]) @ bases(e)[1].T for e in range(graph.n_edges)]
    grads = theory.path_form_gradient(graph, weights, corr)
    flow = torch.stack([-(bases(e)[0].T @ grads[e] @ bases(e)[1]) for e in range(graph.n_edges)])
    off_diag = flow - torch.diag_embed(torch.diagonal(flow, dim1=-2, dim2=-1))
    assert float(off_diag.abs().max()) < 1e-12
    P = graph.n_pathways
    s_p = torch.stack([torch.diagonal(U.T @ corr.sxy[p] @ V) for p in range(P)], -1)  # (r, P)
    d = torch.zeros(r, P, P, dtype=F64)
    for (j, p), sxx in corr.sxx.items():
        d[:, j, p] = torch.diagonal(V.T @ sxx @ V)
    f = theory.ReducedDynamics(graph.pathways, s_p, d, targets=graph.targets)
    order = list(f.edges)  # edge names are the graph's edge indices
    reduced = f(b[:, order])
    assert _rel(reduced, torch.diagonal(flow, dim1=-2, dim2=-1).T[:, order]) < 1e-12


def test_routing_conservation_law_under_rk4(task):
    """b2^2 - M b1^2 and b1 - b3 are conserved by the flow of docs/math.md section 5 (RK4, dt 0.01: drift < 1e-9)."""
    M, K = task.M, task.K
    gen = torch.Generator().manual_seed(3)
    b0 = 0.05 + 0.2 * torch.rand(task.rank, 3, generator=gen, dtype=F64)
    b0[:, 2] = b0[:, 0]
    traj = theory.rk4(theory.routing_vector_field(M, K, task.s), b0, 0.01, 3000)
    c = theory.routing_conserved(traj, M)
    assert float((c - c[0]).abs().max()) < 1e-9
    assert float((traj[..., 0] - traj[..., 2]).abs().max()) < 1e-12


def test_routing_fixed_point(task):
    """b2 (b2^2 + c0) = M s (Cardano), equals numpy's cubic roots and the RK4 limit; output -> s."""
    M, K, b0 = task.M, task.K, 0.08
    c0 = (M - 1) * b0**2
    b_star = theory.routing_fixed_point(task.s, b0, M)
    assert _rel(b_star * (b_star**2 + c0), M * task.s) < 1e-13
    import numpy as np

    for sk, bk in zip(task.s.tolist(), b_star.tolist()):
        roots = np.roots([1.0, 0.0, c0, -M * sk])
        assert bk == pytest.approx(roots[np.abs(roots.imag) < 1e-9].real.max(), rel=1e-12)
    traj = theory.rk4(theory.routing_vector_field(M, K, task.s), torch.full((task.rank, 3), b0, dtype=F64), 0.05, 2000)
    # RK4 at dt 0.05 drifts along the manifold of fixed points by O(dt^4): measured 1.6e-8
    assert _rel(traj[-1, :, 1], b_star) < 1e-7
    assert _rel(traj[-1].prod(-1), task.s) < 1e-12


def test_routing_time_quadrature_matches_rk4(task):
    """The implicit exact solution t(b2) of docs/math.md section 5 (quadrature) against RK4 (dt 0.005)."""
    M, K, b0, dt = task.M, task.K, 0.08, 0.005
    traj = theory.rk4(theory.routing_vector_field(M, K, task.s[:2]), torch.full((2, 3), b0, dtype=F64), dt, 3000)
    b_star = theory.routing_fixed_point(task.s[:2], b0, M)
    for mode in range(2):
        for k in (400, 1000, 2000):
            b2 = float(traj[k, mode, 1])
            if b2 < 0.999 * float(b_star[mode]):
                t = theory.routing_time(b2, float(task.s[mode]), b0, M, K)
                assert t == pytest.approx(k * dt, rel=1e-6)


def test_rk4_is_differentiable():
    """d a(t=1) / ds through 100 RK4 steps equals the derivative of the closed form."""
    s = torch.tensor(3.0, dtype=F64, requires_grad=True)
    a_end = theory.rk4(lambda a: 2 * a * (s - a), torch.tensor(1e-2, dtype=F64), 1e-2, 100)[-1]
    (grad,) = torch.autograd.grad(a_end, s)
    s_ref = torch.tensor(3.0, dtype=F64, requires_grad=True)
    (ref,) = torch.autograd.grad(s_ref / (1 + (s_ref / 1e-2 - 1) * torch.exp(-2 * s_ref)), s_ref)
    assert float(grad) == pytest.approx(float(ref), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# theory checks 2-9
# ---------------------------------------------------------------------------------------------


def test_check2_two_layer_gradient_descent_follows_sigmoid():
    """theory check 2: s = 3, a0 = 1e-3, small steps (lr 1e-3, tau = 1): a(t) within 2% of the sigmoid
    once a > 10 a0; the loss goes to 0. Full weight matrices trained with the path-form gradient."""
    gen = torch.Generator().manual_seed(0)
    D, H, N, s, a0, lr, steps = 3, 4, 2, 3.0, 1e-3, 1e-3, 4000
    u = theory.random_orthogonal(N, 1, generator=gen)
    v = theory.random_orthogonal(D, 1, generator=gen)
    r_h = theory.random_orthogonal(H, 1, generator=gen)
    graph = theory.GDLNGraph((("x", "h"), ("h", "y")), ((0, 1),))
    x = {"x": math.sqrt(D) * torch.eye(D, dtype=F64)}  # white: <x x^T> = I
    y = {"y": x["x"] @ (s * u @ v.T).T}  # Sxy = s u v^T
    gates = torch.ones(1, D, dtype=F64)
    corr = theory.path_correlations(graph, x, y, gates)
    weights = theory.aligned_init([v, r_h, u], math.sqrt(a0))
    a, loss0 = [], float(theory.gdln_loss(graph, weights, x, y, gates))
    for _ in range(steps + 1):
        a.append(float(u.T @ weights[1] @ weights[0] @ v))
        grads = theory.path_form_gradient(graph, weights, corr)
        weights = [w - lr * g for w, g in zip(weights, grads)]
    a = torch.tensor(a, dtype=F64)
    ref = theory.two_layer_sigmoid(torch.arange(steps + 1, dtype=F64) * lr, s, a0)
    rel = ((a - ref) / ref).abs()[a > 10 * a0]
    assert float(rel.max()) < 0.02  # measured 0.74%
    assert float(theory.gdln_loss(graph, weights, x, y, gates)) < 1e-10 * loss0


def test_check3_decoupled_loss_matches_discrete_theory(decoupled_run, decoupled_theory):
    """theory check 3: |simulated - theory| < 1e-3 at every step, and the quoted values."""
    assert decoupled_run.loss.shape == decoupled_theory.loss.shape == (501,)
    assert float((decoupled_run.loss - decoupled_theory.loss).abs().max()) < 1e-3  # measured 4e-13
    for step, value in [(0, 243.97), (100, 58.85), (175, 17.94), (350, 0.39)]:
        assert float(decoupled_run.loss[step]) == pytest.approx(value, abs=0.005)
    assert float(decoupled_run.loss[400]) < 1e-3


def test_check4_fixed_point(task, decoupled_run):
    """theory check 4: hidden SVs -> (4.564, 3.549, 2.754, 2.754) within 1e-2, modules ->
    sqrt((b2^2 + c0) / M)."""
    M, b0 = task.M, 0.08
    c0 = (M - 1) * b0**2
    b2 = decoupled_run.sv_hidden[-1]
    expected = torch.tensor([4.564, 3.549, 2.754, 2.754], dtype=F64)
    assert float((b2 - expected).abs().max()) < 1e-2
    assert float((b2 - theory.routing_fixed_point(task.s, b0, M)).abs().max()) < 1e-2
    module = torch.sqrt((b2**2 + c0) / M)
    assert float((decoupled_run.sv_in[-1] - module).abs().max()) < 1e-2
    assert float((decoupled_run.sv_out[-1] - module).abs().max()) < 1e-2
    # the network output of every trained pair per mode converges to s
    assert float(decoupled_run.trained_error[-1]) < 1e-10


def _conserved_deviation(run, M: int, b0: float) -> torch.Tensor:
    c = run.sv_hidden**2 - M * run.sv_in**2  # (steps + 1, r)
    return (c + (M - 1) * b0**2).abs().max()


def test_check5_conservation(task, decoupled_run):
    """theory check 5: b2^2 - M b1^2 within 0.02 of -(M-1) b0^2 at lr 0.02, within 1% at lr 0.002."""
    M, b0 = task.M, 0.08
    c0 = (M - 1) * b0**2
    assert float(_conserved_deviation(decoupled_run, M, b0)) < 0.02  # measured 0.0093
    slow = theory.simulate_routing_network(task, "decoupled", lr=0.002, steps=500, seed=0)
    assert float(_conserved_deviation(slow, M, b0)) / c0 < 0.01  # measured 0.28%
    # The drift is O(lr^2) per step, O(lr) over a run: over a whole learning run (the same
    # gradient-flow time as 500 steps at lr 0.02) it is 24% of c0 at lr 0.02 and 2.6% at lr 0.002
    # (exact discrete map), so "within 1%" holds for the first 500 steps at lr 0.002 and for a
    # whole run only at lr <= 0.0008 (0.65% measured at lr 0.0005).
    drift = {}
    for lr in (0.02, 0.002):
        th = theory.routing_theory(task, b0, lr, round(10.0 / lr))
        c = th.b2**2 - M * th.b1**2
        drift[lr] = float((c + c0).abs().max()) / c0
    assert drift[0.002] / drift[0.02] == pytest.approx(0.1, rel=0.15)  # measured 0.107


def test_check6_race_order(decoupled_run):
    """theory check 6: modes learned in order of decreasing s, half-rise at steps 76, 154, 317;
    b2 > b1 = b3 while learning."""
    half = theory.half_rise_index(decoupled_run.sv_hidden)
    assert half.tolist() == [76, 154, 317, 317]
    b1, b2, b3 = decoupled_run.sv_in, decoupled_run.sv_hidden, decoupled_run.sv_out
    assert bool((b2[1:] > b1[1:]).all())
    assert float((b1 - b3).abs().max()) < 1e-10


def test_check7_random_init_follows_theory(task):
    """theory check 7: random orthogonal init, gain 0.2, 10 seeds, theory with b0 = gain / 2.5:
    plateau losses (58.85, 17.9) within 5% and final loss ~0; first loss drop within 10% of the
    theory's (77 here; the 76 of check 6 is the hidden-SV half-rise) on average over the seeds,
    later drops within 20%."""
    gain, lr, steps = 0.2, 0.02, 500
    runs = theory.simulate_routing_network(task, "random", gain, lr, steps, seed=list(range(10)), track_svd=False)
    th = theory.routing_theory(task, theory.routing_theory_b0("random", gain), lr, steps)
    levels = theory.staircase_levels(task.s, task.M * task.K / (task.P * task.N_out))
    th_drops, _ = theory.loss_drops(th.loss, levels)
    assert th_drops.tolist() == [77, 158, 328]
    drops, plateaus = zip(*(theory.loss_drops(loss, levels) for loss in runs.loss))
    drops, plateaus = torch.stack(drops).to(F64), torch.stack(plateaus)  # (10, 3)
    assert float((plateaus[:, 0] / 58.85 - 1).abs().max()) < 0.05
    assert float((plateaus[:, 1] / 17.9 - 1).abs().max()) < 0.05
    assert float(plateaus[:, 2].max()) < 1e-2  # measured <= 4e-4
    rel = drops / th_drops.to(F64) - 1
    assert abs(float(rel[:, 0].mean())) < 0.10  # measured mean 77.3 (+0.4%)
    # per seed the first drop is within 10% for 9 of 10 seeds (seed 3: step 90, +17%)
    assert float(rel.abs().max()) < 0.20


def test_check8_init_scale_sweep(task):
    """theory check 8: gains 0.2 ... 2.5, lr = 0.006 / gain^(1/3), 700 steps: untrained-pair error < 5
    for gains 0.2 and 0.66, > 50 for 2.5; trained-pair error < 0.1 throughout."""
    gains = torch.linspace(0.2, 2.5, 6, dtype=F64).tolist()  # 0.2, 0.66, 1.12, 1.58, 2.04, 2.5
    seeds = [0, 1]
    g = [gn for _ in seeds for gn in gains]
    lrs = [0.006 / gn ** (1 / 3) for gn in g]
    runs = theory.simulate_routing_network(
        task, "random", g, lrs, 700, [sd for sd in seeds for _ in gains], track_svd=False
    )
    untrained = runs.untrained_error[:, -1].reshape(len(seeds), len(gains))
    trained = runs.trained_error[:, -1].reshape(len(seeds), len(gains))
    assert float(untrained[:, :2].max()) < 5  # measured <= 0.55
    assert float(untrained[:, -1].min()) > 50  # measured >= 82
    assert float(trained.max()) < 0.1  # measured <= 0.032


def test_check9_shared_hidden_layer_learns_faster(task):
    """theory check 9: a hidden layer shared by all trained pairs reaches half its final strength
    sooner than per-pair hidden layers; their rates at a balanced point are K/M versus 1/M^2."""
    M, K = task.M, task.K
    race = theory.shared_vs_unshared_race(task, mode=0)
    assert race.t_half_shared < race.t_half_unshared  # measured 5.08 vs 16.07
    rates = []
    for shared in (True, False):
        paths = theory.routing_pathways(task, shared_hidden=shared)
        P = len(paths)
        f = theory.ReducedDynamics(paths, torch.ones(P, dtype=F64) / M**2, torch.zeros(P, P, dtype=F64))
        db = f(torch.ones(len(f.edges), dtype=F64))  # b = 1, a = 0: rate = number of pathways / M^2
        rates.append(float(db[f.index("hidden" if shared else paths[0][1])]))
    assert rates[0] == pytest.approx(K / M, rel=1e-12)
    assert rates[1] == pytest.approx(1 / M**2, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The simulator and the initialisation helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["decoupled", "random", "xavier"])
def test_simulation_step_equals_autograd_sgd(task, init):
    """One step of the hand-written batched backprop equals SGD with autograd on the notebooks' loss."""
    lr = 0.01
    start = theory.simulate_routing_network(task, init, 0.7, lr, 0, seed=5)
    after = theory.simulate_routing_network(task, init, 0.7, lr, 1, seed=5)
    params = [w.clone().requires_grad_(True) for w in (start.W1, start.W2, start.W3)]
    W1, W2, W3 = params
    out = torch.einsum("jnh,hg,igd,pd->ijnp", W3, W2, W1, task.X)
    sq = ((task.Y.T - out) ** 2).sum((-2, -1))
    loss = (sq * task.trained).sum() / (task.P * task.N_out)
    assert float(loss.detach()) == pytest.approx(float(start.loss[0]), rel=1e-12)
    grads = torch.autograd.grad(loss, params)
    for w, g, new in zip(params, grads, (after.W1, after.W2, after.W3)):
        assert _rel(new, w.detach() - lr * g) < 1e-12


def test_batched_runs_equal_single_runs(task):
    both = theory.simulate_routing_network(task, "random", [0.2, 1.0], [0.02, 0.01], 20, [3, 4])
    for k, (gain, lr, seed) in enumerate([(0.2, 0.02, 3), (1.0, 0.01, 4)]):
        one = theory.simulate_routing_network(task, "random", gain, lr, 20, seed)
        assert _rel(both.loss[k], one.loss) < 1e-12
        assert _rel(both.sv_hidden[k], one.sv_hidden) < 1e-12


def test_routing_task_data(task):
    assert task.trained.sum() == 28 and task.trained.shape == (7, 7)
    assert all(((j - i) % 7) in (6, 0, 1, 2) for i, j in task.pairs)
    assert torch.allclose(task.s, torch.tensor([13.601, 6.403, 3.0, 3.0], dtype=F64), atol=1e-3)
    for basis in (task.U, task.V):
        assert _rel(basis.T @ basis, torch.eye(basis.shape[0], dtype=F64)) < 1e-13
    r = task.rank
    assert _rel(task.U[:, :r] @ torch.diag(task.s) @ task.V[:, :r].T, task.Y.T @ task.X) < 1e-13


def test_init_helpers():
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(64, 4), (7, 64), (64, 64)]:
        q = theory.random_orthogonal(rows, cols, 0.5, gen)
        assert q.shape == (rows, cols)
        assert torch.allclose(torch.linalg.svdvals(q), torch.full((min(rows, cols),), 0.5, dtype=F64))
    w = theory.xavier_uniform(30, 20, 2.0, gen)
    assert float(w.abs().max()) <= 2.0 * math.sqrt(6 / 50)
    q = theory.random_orthogonal(6, 2, generator=gen)
    full = theory.complete_basis(q)
    assert torch.equal(full[:, :2], q)
    assert _rel(full.T @ full, torch.eye(6, dtype=F64)) < 1e-13
    bases = [theory.random_orthogonal(n, n, generator=gen) for n in (4, 8, 8, 3)]
    strengths = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0])]
    ws = theory.aligned_init(bases, strengths)
    assert [tuple(w.shape) for w in ws] == [(8, 4), (8, 8), (3, 8)]
    prod = ws[2] @ ws[1] @ ws[0]
    assert _rel(bases[3].T @ prod @ bases[0][:, :3], torch.diag(torch.tensor([6.0, 4.0, 2.0], dtype=F64))) < 1e-13
    balanced = theory.aligned_init(bases, 0.5)
    assert torch.allclose(torch.linalg.svdvals(balanced[1]), torch.full((8,), 0.5, dtype=F64))
