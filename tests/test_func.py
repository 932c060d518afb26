"""torch.func and torch.vmap over the public functions: grad, vjp, jacrev and functional_call
against the float64 reference and plain autograd; vmap (more batch, replicas, ensembles of
modules, nested with grad) against a Python loop, in one op call; the replicated plan against
make_plan; double backward as a clear error, raised only when it is taken."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, stack_module_state, vjp, vmap

import gated_ops
from gated_ops import GatedPathwayLinear
from gated_ops.plan import replicate_plan
from gated_ops.reference import gated_cross_entropy_ref, pathway_matmul_ref
from gated_ops.testing import SHAPES, Table, kpath_tables, make_inputs, replicate
from helpers import op_calls

NAMES = ("x", "weight", "bias", "gate")


def _emulation_built() -> bool:
    try:
        import gated_ops.cuda_emu  # noqa: F401
    except ImportError:
        return False
    return True


# the compiled kernels, the CUDA kernels emulated on the CPU, and the pure-PyTorch reference
BACKENDS = ["auto", pytest.param("cuda_emu", marks=[
    pytest.mark.cuda_emu,
    pytest.mark.skipif(not _emulation_built(), reason="gated_ops._cuda_emu is not built")]),
    "reference"]


def _case(name: str):
    return next(c for c in SHAPES if c.name == name)


def _close(a, b, what: str = "") -> None:
    """float64 results of two orders of the same sums."""
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _args(case, **kw):
    inp = make_inputs(case, dtype=torch.float64, requires_grad=False, **kw)
    return [inp[n] for n in NAMES]


def _loss_fn(plan, backend="auto", w_out=None):
    """sum(y * w_out): every output element weighted differently."""
    def loss(x, weight, bias, gate):
        y = gated_ops.pathway_matmul(x, weight, plan, bias, gate, backend=backend)
        return (y * w_out).sum() if w_out is not None else y.square().sum()
    return loss


def _ref_grads(case, plan, args, w_out):
    """Plain autograd through the float64 reference."""
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    y = pathway_matmul_ref(*leaves, plan.src, plan.wgt, plan.dst, plan.num_dst)
    present = [v for v in leaves if v is not None]
    g = iter(torch.autograd.grad((y * w_out).sum(), present))
    return [None if v is None else next(g) for v in leaves]


# ------------------------------------------------------------------------------------------------
# torch.func over pathway_matmul
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", ["moe", "odd_decoder", "tiny_grouped", "hidden_plain"])
def test_func_grad_and_vjp_match_the_reference(case_name, backend):
    """torch.func.grad (w.r.t. every input the case has) and vjp, on a transposed router gate
    and x cut from a wider tensor, against autograd through the float64 reference."""
    case = _case(case_name)
    plan = case.table.plan()
    args = _args(case, noncontiguous=True, transposed_gate=True)
    w_out = torch.randn(plan.num_dst, case.batch, case.d_out, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
    present = tuple(i for i, a in enumerate(args) if a is not None)
    ref = _ref_grads(case, plan, args, w_out)

    got = grad(_loss_fn(plan, backend, w_out), argnums=present)(*args)
    for i, g in zip(present, got):
        _close(g, ref[i], f"grad {NAMES[i]}")

    def f(*a):
        full = list(args)
        for i, v in zip(present, a):
            full[i] = v
        return gated_ops.pathway_matmul(full[0], full[1], plan, full[2], full[3], backend=backend)
    y, pullback = vjp(f, *(args[i] for i in present))
    _close(y, pathway_matmul_ref(*args, plan.src, plan.wgt, plan.dst, plan.num_dst), "y")
    for i, g in zip(present, pullback(w_out)):
        _close(g, ref[i], f"vjp {NAMES[i]}")


@pytest.mark.parametrize("case_name", ["moe", "odd_decoder"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_matches_the_reference(backend, case_name):
    """The full Jacobian w.r.t. x, the weight and a gate (jacrev: the gradient ops vmapped
    over the basis of cotangents), per sample (the MoE router) and per path (a decoder)."""
    case = _case(case_name)
    plan = case.table.plan()
    x, w, b, g = _args(case)

    def ours(x, w, g):
        return gated_ops.pathway_matmul(x, w, plan, b, g, backend=backend)

    def ref(x, w, g):
        return pathway_matmul_ref(x, w, b, g, plan.src, plan.wgt, plan.dst, plan.num_dst)
    want = torch.autograd.functional.jacobian(ref, (x, w, g))
    # w.r.t. all three (the basis runs as replicas), and x and the gate only (more batch)
    for argnums in ((0, 1, 2), (0, 2)):
        with op_calls() as calls:
            jac = jacrev(ours, argnums=argnums)(x, w, g)
        for a, k in zip(jac, argnums):
            _close(a, want[k], f"d y / d {('x', 'weight', 'gate')[k]}")
        if backend != "reference":  # each op once for the whole basis: no per-sample fallback
            assert max(calls.values()) == 1, calls


def test_functional_call_over_a_module_matches_its_backward():
    """torch.func.grad of a loss of functional_call(GatedPathwayLinear) w.r.t. its parameters,
    x and a router gate, against the module's own backward."""
    torch.manual_seed(0)
    layer = GatedPathwayLinear.mixture_of_experts(4, 8, 5, dtype=torch.float64)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    gate = torch.randn(6, 4, dtype=torch.float64).softmax(-1).t()
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(params, x, gate):
        return functional_call(layer, params, (x, gate)).square().sum()
    gp, gx, gg = grad(loss, argnums=(0, 1, 2))(params, x, gate)
    xr, gr = x.clone().requires_grad_(), gate.clone().requires_grad_()
    layer(xr, gr).square().sum().backward()
    _close(gp["weight"], layer.weight.grad, "weight")
    _close(gp["bias"], layer.bias.grad, "bias")
    _close(gx, xr.grad, "x")
    _close(gg, gr.grad, "gate")


# ------------------------------------------------------------------------------------------------
# vmap over pathway_matmul
def _take(args, dims, i):
    return [a if d is None else a.select(d, i) for a, d in zip(args, dims)]


def _batched(args, dims, V, seed=3):
    """The inputs with a vmapped dimension of size V inserted at dims[k] (None: shared)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for a, d in zip(args, dims):
        if a is None or d is None:
            out.append(a)
            continue
        stack = torch.stack([a + 0.1 * v * torch.randn(a.shape, generator=g, dtype=a.dtype)
                             for v in range(V)], dim=d)
        out.append(stack)
    return out


# in_dims of (x, weight, bias, gate): more batch (x and/or the gate), replicas (weight or bias)
KINDS = {"x": (0, None, None, None), "x_at_dim_2": (2, None, None, None),
         "gate": (None, None, None, 0), "x_and_gate_at_last_dim": (-1, None, None, 1),
         "weight": (None, 0, None, None), "bias": (None, None, 0, None),
         "all": (1, 0, 1, -1)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case_name", ["moe", "odd_decoder", "tiny_grouped", "hidden_plain"])
def test_vmap_is_one_call_equal_to_a_loop(case_name, kind):
    case = _case(case_name)
    plan = case.table.plan()
    args = _args(case)
    dims = tuple(d if a is not None else None for a, d in zip(args, KINDS[kind]))
    if all(d is None for d in dims):
        pytest.skip("the case has no such input")
    V = 3
    bargs = _batched(args, dims, V)

    def f(x, w, b, g):
        return gated_ops.pathway_matmul(x, w, plan, b, g)
    with op_calls() as calls:
        y = vmap(f, in_dims=dims)(*bargs)
    assert dict(calls) == {"pathway_matmul": 1}
    _close(y, torch.stack([f(*_take(bargs, dims, i)) for i in range(V)]), kind)


@pytest.mark.parametrize("wrt", ["all", "x_and_gate"])
@pytest.mark.parametrize("kind", ["x", "gate", "weight", "all"])
@pytest.mark.parametrize("case_name", ["moe", "odd_decoder", "tiny_grouped"])
def test_vmap_of_grad_gives_per_sample_gradients_in_one_call_per_op(case_name, kind, wrt):
    """vmap(grad(...)) against a loop of autograd calls, each gradient op running once:
    w.r.t. every input (per-sample weight gradients: the backward runs replicas) or only x and
    the gate (a router's per-sample gradients: with the weight shared, more batch)."""
    case = _case(case_name)
    plan = case.table.plan()
    args = _args(case)
    dims = tuple(d if a is not None else None for a, d in zip(args, KINDS[kind]))
    V = 3
    bargs = _batched(args, dims, V)
    present = tuple(i for i, a in enumerate(args)
                    if a is not None and (wrt == "all" or NAMES[i] in ("x", "gate")))
    loss = _loss_fn(plan)
    with op_calls() as calls:
        got = vmap(grad(loss, argnums=present), in_dims=dims)(*bargs)
    assert calls["pathway_matmul"] == 1 and max(calls.values()) == 1, calls
    for i in range(V):
        leaves = [None if a is None else a.clone().requires_grad_()
                  for a in _take(bargs, dims, i)]
        want = torch.autograd.grad(loss(*leaves), [leaves[k] for k in present])
        for k, g, r in zip(present, got, want):
            _close(g[i], r, f"sample {i}: grad {NAMES[k]}")


@pytest.mark.parametrize("layer", ["moe", "fanout", "shared"])
def test_vmap_over_an_ensemble_of_modules(layer):
    """torch.func.stack_module_state + vmap(functional_call): V modules as V replicas in one
    op call, outputs and per-module gradients equal to each module's own (the modules share
    their plan: a module's plan is not a buffer, so it is not stacked)."""
    torch.manual_seed(0)
    V = 3
    make = {"moe": lambda: GatedPathwayLinear.mixture_of_experts(4, 6, 5, dtype=torch.float64),
            "fanout": lambda: GatedPathwayLinear.fanout(2, 3, 6, 5, dtype=torch.float64),
            "shared": lambda: GatedPathwayLinear.shared(3, 6, 5, dtype=torch.float64)}[layer]
    models = [make() for _ in range(V)]
    base = models[0]
    params, buffers = stack_module_state(models)
    x = torch.randn(base.num_sources, 4, 6, dtype=torch.float64)
    gate = (torch.rand(base.plan.num_paths, 4, dtype=torch.float64)
            if layer == "moe" else None)

    def loss(params, buffers, x):
        return functional_call(base, (params, buffers), (x, gate)).square().sum()
    dims = (0, None, None)
    with op_calls() as calls:
        y = vmap(lambda p, b, x: functional_call(base, (p, b), (x, gate)), in_dims=dims)(
            params, buffers, x)
    assert dict(calls) == {"pathway_matmul": 1}
    with op_calls() as calls:
        grads = vmap(grad(loss), in_dims=dims)(params, buffers, x)
    assert calls["pathway_matmul"] == 1 and max(calls.values()) == 1, calls
    for i, m in enumerate(models):
        out = m(x, gate)
        _close(y[i], out, f"module {i}")
        out.square().sum().backward()
        _close(grads["weight"][i], m.weight.grad, f"module {i}: grad weight")
        _close(grads["bias"][i], m.bias.grad, f"module {i}: grad bias")


def test_raw_op_vmap_is_one_call():
    """torch.vmap over torch.ops.gated_ops.pathway_matmul itself (its registered rule), with
    autograd through it."""
    case = _case("moe")
    plan = case.table.plan()
    x, w, b, g = _args(case)
    V = 3
    xs, ws = (torch.randn(V, *t.shape, dtype=t.dtype, requires_grad=True) for t in (x, w))

    def f(x, w):
        return torch.ops.gated_ops.pathway_matmul(x, w, b, g, plan.paths, plan.csr,
                                                  list(plan.layout))
    with op_calls() as calls:
        y = vmap(f)(xs, ws)
    assert dict(calls) == {"pathway_matmul": 1}
    loop = torch.stack([f(xs[i], ws[i]) for i in range(V)])
    _close(y, loop)
    gy = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, (xs, ws), gy), torch.autograd.grad(loop, (xs, ws), gy)):
        _close(a, r)


# ------------------------------------------------------------------------------------------------
# The replicated plan
REPLICATE_TABLES = {
    "encoder": kpath_tables(3)["encoder"],  # blocked, Z is y
    "hidden": kpath_tables(3)["hidden"],  # one shared weight, Z is y
    "decoder": kpath_tables(3)["decoder"],  # fan-out
    "moe": _case("moe").table,
    "replicas_decoder": replicate(kpath_tables(2)["decoder"], 2),
    "grouped": _case("tiny_grouped").table,
    "duplicate_pairs": _case("duplicate_pairs").table,
    "orphan_destination": _case("orphan_destination").table,
    "no_pathways": _case("no_pathways").table,
    # blocked, but not over all sources / weights: its replicas are grouped (and Z is no
    # longer y)
    "blocked_from_source_1": Table((1, 2), (1, 2), (1, 0), 3, 3, 2),
    "encoder_spare_weight": Table((0, 1), (0, 1), (0, 1), 2, 3, 2),
}


@pytest.mark.parametrize("V", [1, 3])
@pytest.mark.parametrize("layout", ["auto", "grouped"])
@pytest.mark.parametrize("name", list(REPLICATE_TABLES))
def test_replicate_plan_equals_make_plan_on_the_replicated_table(name, layout, V):
    t = REPLICATE_TABLES[name]
    got = replicate_plan(t.plan(layout=layout), V)
    want = replicate(t, V).plan(layout=layout)
    assert got.layout == want.layout
    assert torch.equal(got.paths, want.paths)
    assert torch.equal(got.csr, want.csr)
    assert (got.num_sources, got.num_weights, got.num_dst) == (
        want.num_sources, want.num_weights, want.num_dst)


def test_replicate_plan_kinds():
    """(The table above covers both outcomes.)"""
    kinds = {n: (t.plan().kind, replicate_plan(t.plan(), 2).kind, replicate_plan(t.plan(), 2)
                 .z_is_y) for n, t in REPLICATE_TABLES.items()}
    assert kinds["encoder"] == ("blocked", "blocked", True)
    assert kinds["moe"] == ("blocked", "blocked", False)
    assert kinds["blocked_from_source_1"] == ("blocked", "grouped", False)
    assert REPLICATE_TABLES["encoder_spare_weight"].plan().z_is_y
    assert kinds["encoder_spare_weight"] == ("blocked", "grouped", False)
    assert kinds["grouped"][:2] == ("grouped", "grouped")


def test_replicate_plan_reads_no_value_on_the_host():
    """Built from the tables' shapes and device arithmetic only: it runs on meta tensors,
    which have no values to read (a host synchronisation on a GPU)."""
    for t in REPLICATE_TABLES.values():
        plan = t.plan()
        got = replicate_plan(plan.to("meta"), 3)
        want = replicate_plan(plan, 3)
        assert got.device.type == "meta" and got.layout == want.layout
        assert got.paths.shape == want.paths.shape and got.csr.shape == want.csr.shape


def test_replicated_plan_of_stacked_plans_gives_each_replica_its_own_table():
    """Plan tensors with a leading replica dimension (stacked module buffers): replica v's
    own table, equal to make_plan on the concatenated tables."""
    from gated_ops.plan import _replicated_plan
    from gated_ops.plan import make_plan

    g = torch.Generator().manual_seed(2)
    S, M, T, P = 3, 3, 4, 7
    tables = [[torch.randint(0, n, (P,), generator=g) for n in (S, M, T)] for _ in range(2)]
    plans = [make_plan(*tb, num_sources=S, num_weights=M, num_dst=T) for tb in tables]
    assert plans[0].layout == plans[1].layout and plans[0].kind == "grouped"
    paths, csr, layout = _replicated_plan(torch.stack([p.paths for p in plans]),
                                          torch.stack([p.csr for p in plans]),
                                          plans[0].layout, S, M, 2)
    cat = [torch.cat([tables[0][k], tables[1][k] + n]) for k, n in enumerate((S, M, T))]
    want = make_plan(*cat, num_sources=2 * S, num_weights=2 * M, num_dst=2 * T)
    assert tuple(layout) == want.layout
    assert torch.equal(paths, want.paths) and torch.equal(csr, want.csr)


# ------------------------------------------------------------------------------------------------
# gated_cross_entropy
def _ce_inputs(five_dim: bool, seed: int = 0):
    R, I, J, B, C = 2, 2, 3, 4, 5
    g = torch.Generator().manual_seed(seed)
    out = 3 * torch.randn(R * I, B, J * C, generator=g, dtype=torch.float64)
    logits = (out.view(R, I, B, J, C).permute(0, 1, 3, 2, 4) if five_dim
              else out.view(R, I * J, B, C))  # (the k-path decoder's output viewed in place)
    target = torch.randint(0, C, (R, I * J, B), generator=g)
    gate = torch.rand(R, I * J, generator=g, dtype=torch.float64) + 0.5
    w = torch.randn(R, I * J, generator=g, dtype=torch.float64)
    return logits, target, gate, w


def _ce_loss(target, w, backend):
    def loss(logits, gate):
        out = gated_ops.gated_cross_entropy(logits, target, gate, backend=backend)
        return out[0].sum() + (out[1] * w).sum()
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("five_dim", [False, True], ids=["4d", "5d_strided"])
def test_ce_func_grad_vjp_and_jacrev_match_the_reference(five_dim, backend):
    logits, target, gate, w = _ce_inputs(five_dim)
    flat = logits.reshape(logits.shape[0], -1, *logits.shape[-2:])

    def ref_loss(l4, gate):
        out = gated_cross_entropy_ref(l4, target, gate)
        return out[0].sum() + (out[1] * w).sum()
    lr, gr = flat.clone().requires_grad_(), gate.clone().requires_grad_()
    want = torch.autograd.grad(ref_loss(lr, gr), (lr, gr))
    gl, gg = grad(_ce_loss(target, w, backend), argnums=(0, 1))(logits, gate)
    _close(gl.reshape(flat.shape), want[0], "grad logits")
    _close(gg, want[1], "grad gate")

    def f(logits, gate):
        return gated_ops.gated_cross_entropy(logits, target, gate, backend=backend)[:2]
    (loss, path_loss), pullback = vjp(f, logits, gate)
    vl, vg = pullback((torch.ones_like(loss), w))
    _close(vl.reshape(flat.shape), want[0], "vjp logits")
    _close(vg, want[1], "vjp gate")

    jac = jacrev(lambda gate: f(logits, gate)[0])(gate)  # (R, R, P)
    _close(jac, torch.autograd.functional.jacobian(
        lambda gate: gated_cross_entropy_ref(flat, target, gate)[0], gate), "d loss / d gate")


@pytest.mark.parametrize("five_dim", [False, True], ids=["4d", "5d_strided"])
def test_ce_vmap_is_more_replicas_in_one_call(five_dim):
    """A vmapped dimension (of logits and target; the gate shared) is V * R replicas: one op
    call, outputs and per-sample gradients equal to a loop."""
    V = 3
    inputs = [_ce_inputs(five_dim, seed=v) for v in range(V)]
    logits = torch.stack([i[0] for i in inputs])
    target = torch.stack([i[1] for i in inputs])
    gate, w = inputs[0][2], inputs[0][3]

    def f(logits, target):
        return gated_ops.gated_cross_entropy(logits, target, gate)
    with op_calls() as calls:
        out = vmap(f)(logits, target)
    assert dict(calls) == {"gated_cross_entropy": 1}
    for i in range(V):
        for a, r in zip(out, f(logits[i], target[i])):
            _close(a[i], r)

    def loss(logits, target):
        o = f(logits, target)
        return o[0].sum() + (o[1] * w).sum()
    with op_calls() as calls:
        grads = vmap(grad(loss))(logits, target)
    assert dict(calls) == {"gated_cross_entropy": 1, "gated_cross_entropy_backward": 1}
    for i in range(V):
        li = logits[i].clone().requires_grad_()
        _close(grads[i], torch.autograd.grad(loss(li, target[i]), li)[0], f"sample {i}")


# ------------------------------------------------------------------------------------------------
# Double backward
DOUBLE = r"gated_ops\.{}: double backward \(differentiating its gradient\) is not implemented"


@pytest.mark.parametrize("raw_op", [False, True], ids=["public", "raw_op"])
def test_pathway_double_backward_is_a_clear_error_when_taken(raw_op):
    case = _case("moe")
    plan = case.table.plan()
    x, w, b, g = (a.requires_grad_() for a in _args(case))

    def f(x, w, b, g):
        if raw_op:
            return torch.ops.gated_ops.pathway_matmul(x, w, b, g, plan.paths, plan.csr,
                                                      list(plan.layout))
        return gated_ops.pathway_matmul(x, w, plan, b, g)
    gx, gw = torch.autograd.grad(f(x, w, b, g).square().sum(), (x, w), create_graph=True)
    # first order with create_graph=True: right values
    ref = _ref_grads(case, plan, [x, w, b, g], 2 * pathway_matmul_ref(
        x, w, b, g, plan.src, plan.wgt, plan.dst, plan.num_dst).detach())
    _close(gx, ref[0], "grad x")
    _close(gw, ref[1], "grad weight")
    assert gx.requires_grad  # (differentiable up to the error)
    with pytest.raises(RuntimeError, match=DOUBLE.format("pathway_matmul")):
        torch.autograd.grad(gx.square().sum(), w)


def test_pathway_create_graph_serves_a_penalty_on_other_parameters():
    """A gradient penalty on a plain layer after the op: create_graph=True through the op's
    first derivative only, equal to the same model on the reference (twice differentiable)."""
    case = _case("moe")
    plan = case.table.plan()
    x, w, b, g = _args(case)
    v = torch.randn(case.d_out, 3, dtype=torch.float64)

    def penalised(backend):
        wl, vl = w.clone().requires_grad_(), v.clone().requires_grad_()
        h = gated_ops.pathway_matmul(x, wl, plan, b, g, backend=backend)
        out = (h @ vl).tanh().sum()
        (gv,) = torch.autograd.grad(out, vl, create_graph=True)
        return torch.autograd.grad(out + gv.square().sum(), (wl, vl))
    for a, r in zip(penalised("auto"), penalised("reference")):
        _close(a, r)


def test_pathway_double_backward_under_torch_func():
    case = _case("odd_decoder")
    plan = case.table.plan()
    x, w, b, g = _args(case)

    def f(w):
        return gated_ops.pathway_matmul(x, w, plan, b, g).pow(3).sum()
    with pytest.raises(RuntimeError, match=DOUBLE.format("pathway_matmul")):
        grad(lambda w: grad(f)(w).sum())(w)
    # the reference backend is plain PyTorch: twice differentiable
    h = grad(lambda w: grad(lambda w: pathway_matmul_ref(
        x, w, b, g, plan.src, plan.wgt, plan.dst, plan.num_dst).pow(3).sum())(w).sum())(w)
    assert torch.isfinite(h).all()


def test_ce_double_backward_is_a_clear_error_when_taken():
    logits, target, gate, w = _ce_inputs(five_dim=True)
    logits.requires_grad_()
    gate.requires_grad_()
    loss, path_loss, _ = gated_ops.gated_cross_entropy(logits, target, gate)
    gl, gg = torch.autograd.grad(loss.sum() + (path_loss * w).sum(), (logits, gate),
                                 create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE.format("gated_cross_entropy")):
        torch.autograd.grad(gl.square().sum(), logits)
    with pytest.raises(RuntimeError, match=DOUBLE.format("gated_cross_entropy")):
        grad(lambda l: grad(_ce_loss(target, w, "auto"))(l, gate.detach()).square().sum())(
            logits.detach())
