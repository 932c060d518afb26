"""The theory of docs/math.md sections 4-5 on the graph API: gated_ops.GDLN against gated_ops.theory.

Run: python -m pytest tests/test_gdln_theory.py -q   (about 5 s)

Tolerance policy (as in tests/test_theory.py): a check of docs/math.md section 6 uses exactly the tolerance
stated there; an identity that holds in real arithmetic is checked in float64 at relative error
<= 1e-10 (measured errors are quoted next to each assert).
"""

from __future__ import annotations

import pytest
import torch

from experiments import routing_net
from gated_ops import GDLN, gdln, theory

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def task():
    return theory.routing_network_task()


@pytest.fixture(scope="module")
def rn():
    return routing_net.routing_network(dtype=F64)


# ---------------------------------------------------------------------------------------------
# docs/math.md section 4 on gated_ops.GDLN: the path-form gradient of the fused network
# ---------------------------------------------------------------------------------------------

NODES = {"x1": 3, "x2": 4, "a": 5, "b": 5, "y1": 2, "y2": 3}
# a tied weight ("u": x2->a and x2->b) and a skip edge (x1->y2)
EDGES = [("x1", "a"), ("x2", "a", "u"), ("x2", "b", "u"), ("a", "b"), ("a", "y1"), ("b", "y1"),
         ("b", "y2"), ("x1", "y2")]


def _random_net(seed: int, binary: bool, B: int = 11):
    gen = torch.Generator().manual_seed(seed)
    net = GDLN(NODES, EDGES, dtype=F64)
    with torch.no_grad():
        for w in net.banks.values():
            w.copy_(0.7 * torch.randn(w.shape, generator=gen, dtype=F64))
    inputs = {n: torch.randn(B, NODES[n], generator=gen, dtype=F64) for n in net.inputs}
    targets = {n: torch.randn(B, NODES[n], generator=gen, dtype=F64) for n in net.outputs}

    def gate(*shape):
        u = torch.rand(*shape, generator=gen, dtype=F64)
        return (u < 0.7).to(F64) if binary else u

    return net, inputs, targets, gate(len(NODES), B), gate(len(EDGES), B)


@pytest.mark.parametrize("binary", [True, False], ids=["gates01", "real_gates"])
@pytest.mark.parametrize("seed", [0, 1])
def test_check1_path_form_gradient_equals_autograd_through_fused_op(seed, binary):
    """theory check 1 on gated_ops.GDLN: path-form gradient (theory) = autograd through the fused
    op, random per-sample node and edge gates, float64, relative error < 1e-5 (measured ~5e-16).
    The tied weight gets the sum of its two edges' path-form gradients."""
    net, inputs, targets, ng, eg = _random_net(seed, binary)
    loss = net.loss(net(inputs, ng, eg), targets, ng)
    auto = dict(zip(net.banks.keys(), torch.autograd.grad(loss, list(net.banks.values()))))
    formula = net.path_form_gradient(inputs, targets, ng, eg)
    assert list(formula) == net.weight_names
    for name, g in formula.items():
        key, row = net.weight_slot[name]
        assert _rel(g, auto[key][row]) < 1e-5, name


def test_theory_graph_is_the_network():
    """theory_graph + edge_weights + pathway_gate_table reproduce the fused forward and loss."""
    net, inputs, targets, ng, eg = _random_net(2, binary=False)
    graph = net.theory_graph()
    assert graph.edges == tuple((e.src, e.dst) for e in net.edges)
    assert graph.pathways == tuple(p.edges for p in net.pathways())
    B = ng.shape[1]
    gates = net.pathway_gate_table(ng, eg, B)
    for q, p in enumerate(net.pathways()):  # the table equals the one-pathway method
        assert torch.equal(gates[q], net.pathway_gates(p, ng, eg, B))
    weights = [w.detach() for w in net.edge_weights()]
    with torch.no_grad():
        out = net(inputs, ng, eg)
    ref = theory.network_output(graph, weights, inputs, gates)
    for v in net.outputs:
        assert _rel(out[v], ref[v]) < 1e-12  # measured 2e-16
    idx = net.node_names.index
    gated_y = {v: targets[v] * ng[idx(v)][:, None] for v in net.outputs}
    th_loss = theory.gdln_loss(graph, weights, inputs, gated_y, gates)
    assert float(net.loss(out, targets, ng)) == pytest.approx(float(th_loss), rel=1e-12)


def test_path_form_gradient_validation():
    net = GDLN(NODES, EDGES, dtype=F64, bias=True)
    x = {n: torch.zeros(2, NODES[n], dtype=F64) for n in net.inputs}
    y = {n: torch.zeros(2, NODES[n], dtype=F64) for n in net.outputs}
    with pytest.raises(ValueError, match="bias"):
        net.path_form_gradient(x, y)
    net = GDLN(NODES, EDGES, dtype=F64)
    with pytest.raises(ValueError, match=r"node_gates: expected shape \(6, 2\)"):
        net.path_form_gradient(x, y, torch.ones(5, 2, dtype=F64))
    with pytest.raises(ValueError, match="targets: missing output node"):
        net.path_form_gradient(x, {"y1": y["y1"]})
    loop = GDLN({"x": 2, "a": 2, "b": 2}, [("x", "a", "w"), ("a", "b", "w")], dtype=F64)
    with pytest.raises(ValueError, match="same weight twice"):
        loop.reduced_pathways()


# ---------------------------------------------------------------------------------------------
# docs/math.md section 5: reduced dynamics built automatically from the routing-network graph
# ---------------------------------------------------------------------------------------------


def _hand_written(b_in, b_hid, b_out, s: float, pairs, M: int):
    """The routing equations per weight, written out: every trained context has probability 1/M^2."""
    d_in, d_out, d_hid = torch.zeros_like(b_in), torch.zeros_like(b_out), torch.zeros_like(b_hid)
    for i, j in pairs:
        err = s - b_in[i] * b_hid * b_out[j]
        d_in[i] += b_hid * b_out[j] * err / M**2
        d_hid += b_in[i] * b_out[j] * err / M**2
        d_out[j] += b_in[i] * b_hid * err / M**2
    return d_in, d_hid, d_out


def test_routing_graph_reduced_dynamics_equal_hand_written_43(task, rn):
    """The vector field built from the routing GDLN, its trained contexts' gates (probability
    1/M^2 each) and the data's singular values equals theory.routing_vector_field (docs/math.md section 5) at random
    symmetric points, and the per-weight routing equations at random arbitrary points."""
    M, K = task.M, task.K
    assert rn.pairs == tuple(task.pairs)
    probs = torch.full((len(rn.pairs),), 1.0 / M**2, dtype=F64)
    dyn = rn.net.reduced_dynamics(task.s, rn.node_gates, probs=probs)
    ins = [dyn.index(f"in{i}") for i in range(M)]
    outs = [dyn.index(f"out{j}") for j in range(M)]
    hid = dyn.index("hidden")
    assert len(dyn.edges) == 2 * M + 1  # one state per weight: the 7 tied hidden edges are one
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        b123 = 2 * torch.rand(task.rank, 3, generator=gen, dtype=F64)
        b = torch.empty(task.rank, len(dyn.edges), dtype=F64)
        b[:, ins], b[:, hid], b[:, outs] = b123[:, :1], b123[:, 1], b123[:, 2:]
        db = dyn(b)
        ref = theory.routing_vector_field(M, K, task.s)(b123)
        got = torch.stack([db[:, ins[0]], db[:, hid], db[:, outs[0]]], -1)
        assert _rel(got, ref) < 1e-12  # measured 1e-16
        assert _rel(db[:, ins], ref[:, :1].expand(-1, M)) < 1e-12
        assert _rel(db[:, outs], ref[:, 2:].expand(-1, M)) < 1e-12
        b = 2 * torch.rand(task.rank, len(dyn.edges), generator=gen, dtype=F64)
        db = dyn(b)
        for m in range(task.rank):
            d_in, d_hid, d_out = _hand_written(b[m, ins], b[m, hid], b[m, outs],
                                               float(task.s[m]), rn.pairs, M)
            assert _rel(db[m, ins], d_in) < 1e-12
            assert float(db[m, hid]) == pytest.approx(float(d_hid), rel=1e-12)
            assert _rel(db[m, outs], d_out) < 1e-12


def test_routing_reduced_dynamics_in_sgd_time(task, rn):
    """Built from the data (data_modes: s / P, lam = 1 / P for X = I_4) with the contexts at their
    batch frequency 1/(K M), the field is docs/math.md section 5's in GDLN time; SGD on the notebooks' loss
    (2 K M / N times GDLN.loss) with lr is dt = 2 K M lr / N of it, which is
    theory.routing_sgd_dt in gradient-flow time units."""
    modes = gdln.data_modes(task.X, task.Y)
    assert modes.off_diagonal < 1e-15  # X = I_4: white inputs (measured 4e-17)
    assert _rel(modes.s, task.s / task.P) < 1e-12
    dyn = rn.net.reduced_dynamics(modes.s, rn.node_gates, lam=modes.lam)
    M, K, N = task.M, task.K, task.N_out
    gen = torch.Generator().manual_seed(1)
    b123 = 2 * torch.rand(task.rank, 3, generator=gen, dtype=F64)
    b = torch.empty(task.rank, len(dyn.edges), dtype=F64)
    for n in dyn.edges:
        b[:, dyn.index(n)] = b123[:, 0 if n.startswith("in") else 1 if n == "hidden" else 2]
    ref = theory.routing_vector_field(M, K, task.s)(b123)
    to43 = M / (K * task.P)  # 1/(K M P) per GDLN time unit vs 1/M^2 per gradient-flow time unit
    got = dyn(b)[:, [dyn.index("in0"), dyn.index("hidden"), dyn.index("out0")]]
    assert _rel(got, to43 * ref) < 1e-12
    lr = 0.02
    assert 2 * K * M * lr / N * to43 == pytest.approx(theory.routing_sgd_dt(task, lr), rel=1e-14)


def test_reduction_is_exact_on_the_fused_network(task, rn):
    """The reduction (docs/math.md section 5) on the fused op: with aligned weights (random strengths per weight and mode) the
    autograd gradient of GDLN.loss on the real batch is diagonal in the mode bases and equals
    -reduced_dynamics (data frequencies); the reduced loss equals GDLN.loss."""
    net = rn.net
    modes = gdln.data_modes(task.X, task.Y)
    dyn = net.reduced_dynamics(modes.s, rn.node_gates, lam=modes.lam)
    gen = torch.Generator().manual_seed(2)
    r, H = task.rank, task.hidden
    r_a = theory.random_orthogonal(H, r, generator=gen)
    r_h = theory.random_orthogonal(H, r, generator=gen)
    bases = {"x": modes.V, "h": r_h} | {f"a{i}": r_a for i in range(task.M)} \
        | {f"y{j}": modes.U for j in range(task.M)}
    b = 0.3 + torch.rand(r, len(dyn.edges), generator=gen, dtype=F64)
    net.set_aligned_(bases, b, dyn.edges)
    assert _rel(net.mode_strengths(bases, dyn.edges), b) < 1e-12
    inputs, targets, gates = rn.batch(task.X, task.Y)
    loss = net.loss(net(inputs, gates), targets, gates)
    assert float(loss.detach()) == pytest.approx(float(dyn.loss(b)), rel=1e-10)  # measured 1e-15
    grads = dict(zip(net.banks.keys(), torch.autograd.grad(loss, list(net.banks.values()))))
    first = {}
    for e in net.edges:
        first.setdefault(e.weight, e)
    flow = []
    for name in dyn.edges:
        e, (key, row) = first[name], net.weight_slot[name]
        proj = -(bases[e.dst].T @ grads[key][row] @ bases[e.src])  # (r, r)
        off = proj - torch.diag(torch.diagonal(proj))
        assert float(off.abs().max()) < 1e-12 * float(proj.abs().max())
        flow.append(torch.diagonal(proj))
    assert _rel(torch.stack(flow, -1), dyn(b)) < 1e-10  # measured 3e-16


# ---------------------------------------------------------------------------------------------
# The notebooks' instance, theory check 3: the routing network trained on the fused op
# ---------------------------------------------------------------------------------------------

STEPS = 200  # covers the first two drops and the quoted values at steps 0, 100, 175


def test_check3_routing_network_on_the_fused_op(task, rn):
    """Full-batch SGD on the fused GDLN (decoupled init 0.08 from the data SVD, lr 0.02)
    reproduces theory.simulate_routing_network step for step (float64: |dloss| <= 1e-8 relative,
    measured 5e-16), and the discrete theory loss within 1e-3 (theory check 3: 243.97 at step 0,
    58.85 at 100, 17.94 at 175), both the hand-written routing map and the one built automatically
    from the graph."""
    lr, b0 = 0.02, 0.08
    run = routing_net.train_routing_network(rn, task, "decoupled", lr=lr, steps=STEPS, b0=b0)
    sim = theory.simulate_routing_network(task, "decoupled", lr=lr, steps=STEPS, b0=b0)
    assert run.loss.shape == sim.loss.shape == (STEPS + 1,)
    assert float(((run.loss - sim.loss).abs() / sim.loss.abs().clamp_min(1.0)).max()) < 1e-8
    for field in ("sv_in", "sv_hidden", "sv_out", "trained_error", "untrained_error"):
        assert float((getattr(run, field) - getattr(sim, field)).abs().max()) < 1e-8, field
    th = theory.routing_theory(task, b0, lr, STEPS)
    assert float((run.loss - th.loss).abs().max()) < 1e-3  # measured 2e-13
    for step, value in [(0, 243.97), (100, 58.85), (175, 17.94)]:
        assert float(run.loss[step]) == pytest.approx(value, abs=0.005)
    # the same theory, built automatically from the graph (GDLN time: dt = 2 K M lr / N)
    modes = gdln.data_modes(task.X, task.Y)
    dyn = rn.net.reduced_dynamics(modes.s, rn.node_gates, lam=modes.lam)
    scale = 2 * len(rn.pairs) / task.N_out
    traj = theory.euler(dyn, torch.full((task.rank, len(dyn.edges)), b0, dtype=F64), scale * lr, STEPS)
    auto = scale * dyn.loss(traj)
    assert float((auto - th.loss).abs().max()) < 1e-10  # measured 1e-13
    assert float((run.loss - auto).abs().max()) < 1e-3
    assert float((traj[:, :, dyn.index("hidden")] - th.b2).abs().max()) < 1e-12


def test_routing_network_structure(rn, task):
    """Three fused calls (blocked plans: fan-out, shared, fan-out); the context gates route."""
    assert [layer.plan.kind for layer in rn.net._layers] == ["blocked"] * 3
    assert len(rn.pairs) == 28 and len(rn.untrained_pairs) == 21
    assert len(rn.net.pathways()) == task.M**2
    gen = torch.Generator().manual_seed(3)
    W1 = torch.randn(task.M, task.hidden, task.D, generator=gen, dtype=F64)
    W2 = torch.randn(task.hidden, task.hidden, generator=gen, dtype=F64)
    W3 = torch.randn(task.M, task.N_out, task.hidden, generator=gen, dtype=F64)
    rn.load_(W1, W2, W3)
    inputs, _, gates = rn.batch(task.X, task.Y, [(2, 5), (6, 0)])
    with torch.no_grad():
        out = rn.net(inputs, gates)
    for c, (i, j) in enumerate([(2, 5), (6, 0)]):
        rows = slice(c * task.P, (c + 1) * task.P)
        assert _rel(out[f"y{j}"][rows], task.X @ (W3[j] @ W2 @ W1[i]).T) < 1e-12
        others = [f"y{k}" for k in range(task.M) if k != j]
        assert all(float(out[v][rows].abs().max()) == 0.0 for v in others)
    with pytest.raises(ValueError, match="offsets"):
        routing_net.routing_network(offsets=(0, 7, 1, 2))
