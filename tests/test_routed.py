"""The routed (sparse) pathway matmul: every backend x dtype x routed shape against the float64
reference (the dense op with the equivalent gate), forward and every gradient; the expert MLP's
grouped layout; opcheck, gradcheck, torch.compile; the refusals; determinism."""
from __future__ import annotations

import os

import pytest
import torch

import gated_ops
from gated_ops import make_route, routed_linear, routed_matmul, routed_pathway_matmul
from gated_ops.reference import routed_gate_ref, routed_matmul_ref, routed_pathway_matmul_ref
from gated_ops.routed import moe_plan
from gated_ops.testing import ROUTED_SHAPES, RoutedCase, assert_close, make_routed_inputs

SMALL = [c for c in ROUTED_SHAPES if not c.large]
NAMES = ("x", "weight", "bias", "gate")
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16,
          "f16": torch.float16}


def _emulation_built() -> bool:
    try:
        import gated_ops.cuda_emu  # noqa: F401
        return True
    except ImportError:
        return False


def _triton_ok() -> bool:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import gated_ops.triton  # noqa: F401
        return True
    except ImportError:
        return False


# backend -> (device, the public functions' backend=)
BACKENDS = {
    "cpu": ("cpu", "auto"),
    "reference": ("cpu", "reference"),
    "cuda_emu": ("cpu", "cuda_emu"),
    "triton": ("cuda" if torch.cuda.is_available() else "cpu", "triton"),
}
if torch.cuda.is_available():
    BACKENDS["cuda"] = ("cuda", "auto")


def _skip(backend: str):
    if backend == "cuda_emu" and not _emulation_built():
        if os.environ.get("GATED_OPS_REQUIRE_CUDA_EMU") == "1":
            pytest.fail("gated_ops._cuda_emu is not built (GATED_OPS_CUDA_EMU=1 pip install ...)")
        pytest.skip("gated_ops._cuda_emu is not built")
    if backend == "triton" and not _triton_ok():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")


BACKEND_PARAMS = [pytest.param(b, marks=[pytest.mark.triton] if b == "triton" else
                               [pytest.mark.cuda_emu] if b == "cuda_emu" else []) for b in BACKENDS]


def _run(case: RoutedCase, backend: str, dtype: torch.dtype):
    device, name = BACKENDS[backend]
    inp = make_routed_inputs(case, dtype=dtype, device=device)
    plan = case.table.plan(device)
    y = routed_pathway_matmul(inp["x"], inp["weight"], plan, inp["idx"], inp["gate"],
                              inp["bias"], backend=name)
    return inp, y


def _reference(case: RoutedCase, dtype: torch.dtype):
    """The float64 reference's and plain PyTorch's (the reference in ``dtype``) forward and
    gradients, for the tolerance rule."""
    out = []
    for dt in (torch.float64, dtype):
        inp = make_routed_inputs(case, dtype=dt)
        plan = case.table.plan()
        y = routed_pathway_matmul_ref(inp["x"], inp["weight"], inp["bias"], inp["idx"],
                                      inp["gate"], plan.src, plan.wgt, plan.dst, plan.num_dst)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
        leaves = [inp[n] for n in NAMES if inp[n] is not None]
        grads = torch.autograd.grad(y, leaves, gy.to(dt), allow_unused=True) if y.numel() \
            else [torch.zeros_like(v) for v in leaves]
        out.append((y.detach(), gy, grads))
    return out


def _check(case: RoutedCase, backend: str, dtype: torch.dtype) -> None:
    (y64, gy, g64), (y_plain, _, g_plain) = _reference(case, dtype)
    inp, y = _run(case, backend, dtype)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close(f"{case.name}: y", y.detach().cpu(), y64, y_plain)
    names = [n for n in NAMES if inp[n] is not None]
    if not y.numel():
        return
    grads = torch.autograd.grad(y, [inp[n] for n in names], gy.to(y.device, dtype),
                                allow_unused=True)
    for name, g, r, p in zip(names, grads, g64, g_plain):
        g = torch.zeros_like(r) if g is None else g.detach().cpu()
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
        p = torch.zeros_like(g) if p is None else p
        assert_close(f"{case.name}: grad {name}", g, r, p)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_routed_equals_the_reference(case, backend):
    _skip(backend)
    _check(case, backend, torch.float64 if backend != "triton" else torch.float32)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("backend", [b for b in BACKEND_PARAMS if b.values[0] != "reference"])
@pytest.mark.parametrize("case", [c for c in SMALL if c.name in
                                  ("moe_top2", "grouped_unused", "moe_duplicates")],
                         ids=lambda c: c.name)
def test_routed_dtypes(case, backend, dtype):
    _skip(backend)
    if backend == "triton" and dtype == "f64":
        pytest.skip("Triton: float32 and 16-bit (float64 calls the compiled op)")
    _check(case, backend, DTYPES[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in ROUTED_SHAPES if c.large], ids=lambda c: c.name)
def test_routed_paper_sizes(case):
    _check(case, "cpu", torch.float32)


def test_routed_reference_is_the_dense_op_with_the_equivalent_gate():
    case = next(c for c in ROUTED_SHAPES if c.name == "moe_duplicates")
    inp = make_routed_inputs(case)
    plan = case.table.plan()
    dense = routed_gate_ref(inp["idx"], inp["gate"], plan.num_paths)
    assert dense.shape == (plan.num_paths, case.batch)
    # the duplicate slots of a row add up at their pathway
    b = 0
    p = int(inp["idx"][b, 0])
    assert int(inp["idx"][b, 1]) == p
    torch.testing.assert_close(dense[p, b], inp["gate"][b, 0] + inp["gate"][b, 1])
    y = gated_ops.pathway_matmul(inp["x"], inp["weight"], plan, inp["bias"], dense)
    torch.testing.assert_close(routed_pathway_matmul(inp["x"], inp["weight"], plan, inp["idx"],
                                                     inp["gate"], inp["bias"]), y)


def test_moe_form_equals_its_reference_and_the_dense_op_at_k_equal_E():
    torch.manual_seed(0)
    T, D, E = 11, 6, 4
    x = torch.randn(T, D, dtype=torch.float64)
    w = torch.randn(E, 5, D, dtype=torch.float64)
    b = torch.randn(E, 5, dtype=torch.float64)
    probs = torch.rand(T, E, dtype=torch.float64).softmax(-1)
    topw, topi = probs.topk(2, -1)
    torch.testing.assert_close(routed_matmul(x, w, topi, topw, b),
                               routed_matmul_ref(x, w, topi, topw, b))
    topw, topi = probs.topk(E, -1)  # every expert: the dense op with the router's gates
    layer = gated_ops.GatedPathwayLinear.mixture_of_experts(E, D, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    torch.testing.assert_close(routed_matmul(x, w, topi, topw, b),
                               layer(x.unsqueeze(0), probs.t())[0])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_expert_mlp_through_the_grouped_layout(backend):
    """Two layers over one route: x -> grouped rows (per slot) -> activation -> combined output,
    equal to the per-token reference y[t] = sum_j w[t, j] W2_e gelu(W1_e x_t + b1_e) + b2_e."""
    _skip(backend)
    if backend == "reference":
        pytest.skip("the reference has no grouped layout")
    device, name = BACKENDS[backend]
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    T, D, H, E, k = 9, 6, 7, 4, 2
    x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)
    w1 = torch.randn(E, H, D, dtype=dtype, device=device, requires_grad=True)
    b1 = torch.randn(E, H, dtype=dtype, device=device, requires_grad=True)
    w2 = torch.randn(E, D, H, dtype=dtype, device=device, requires_grad=True)
    b2 = torch.randn(E, D, dtype=dtype, device=device, requires_grad=True)
    topw, topi = torch.rand(T, E, dtype=dtype, device=device).softmax(-1).topk(k, -1)
    topi[1, 1] = -1  # an unused slot
    topw = topw.detach().requires_grad_()
    plan = moe_plan(E, device)
    route = make_route(topi, plan, backend=name)
    h = routed_linear(x.unsqueeze(0), w1, b1, route, grouped_out=True, backend=name)
    assert h.shape == (T * k, H)
    y = routed_linear(torch.nn.functional.gelu(h), w2, b2, route, topw, grouped_in=True,
                      backend=name)[0]
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(topi[t, j])
            if e >= 0:
                hid = torch.nn.functional.gelu(w1[e].double() @ x[t].double() + b1[e].double())
                ref[t] += topw[t, j].double() * (w2[e].double() @ hid + b2[e].double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(y.detach().cpu().double(), ref.detach(), **tol)
    gy = torch.randn(T, D, dtype=torch.float64)
    leaves = [x, w1, b1, w2, b2, topw]
    got = torch.autograd.grad(y, leaves, gy.to(device, dtype))
    want = torch.autograd.grad(ref, leaves, gy)
    for a, r in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), r.double(), **tol)


@pytest.mark.parametrize("case", [c for c in SMALL if c.batch > 0], ids=lambda c: c.name)
def test_gradcheck(case):
    inp = make_routed_inputs(case)
    plan = case.table.plan()
    names = [n for n in NAMES if inp[n] is not None]

    def f(*leaves):
        kw = dict(zip(names, leaves))
        return routed_pathway_matmul(kw["x"], kw["weight"], plan, inp["idx"], kw.get("gate"),
                                     kw.get("bias"))
    assert torch.autograd.gradcheck(f, tuple(inp[n] for n in names))


@pytest.mark.parametrize("backend", [b for b in BACKEND_PARAMS if b.values[0] != "reference"])
@pytest.mark.parametrize("case", [c for c in SMALL if c.name in ("moe_top2", "grouped_unused")],
                         ids=lambda c: c.name)
def test_opcheck(case, backend):
    """Every routed op against its fake (shapes, strides) and its schema, via opcheck."""
    _skip(backend)
    device, name = BACKENDS[backend]
    dtype = torch.float32
    inp = make_routed_inputs(case, dtype=dtype, device=device)
    plan = case.table.plan(device)
    ns = gated_ops.backends._op_namespace(name)
    route = ns.pathway_route(inp["idx"], plan.paths, plan.num_weights)
    x, w, b, g, idx = inp["x"], inp["weight"], inp["bias"], inp["gate"], inp["idx"]
    S, M, T = plan.num_sources, plan.num_weights, plan.num_dst
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ns.pathway_route, (idx, plan.paths, M), test_utils=tests[:2])
    for grouped_in, grouped_out in ((False, False), (False, True)):
        gg = None if grouped_out else g
        torch.library.opcheck(ns.routed_matmul, (x, w, b, gg, idx, route, plan.paths, T,
                                                 grouped_in, grouped_out), test_utils=tests)
    y, z = ns.routed_matmul(x.detach(), w.detach(), b.detach(), g.detach(), idx, route,
                            plan.paths, T, False, False)
    gy = torch.randn_like(y)
    dz = ns.routed_grad_z(gy, g.detach(), idx, route, plan.paths, False)
    for op, args in ((ns.routed_grad_z, (gy, g.detach(), idx, route, plan.paths, False)),
                     (ns.routed_grad_x, (dz, w.detach(), idx, route, plan.paths, S, False)),
                     (ns.routed_grad_weight, (dz, x.detach(), idx, route, plan.paths, M, False)),
                     (ns.routed_grad_bias, (dz, route, M)),
                     (ns.routed_grad_gate, (gy, z, idx, route, plan.paths))):
        torch.library.opcheck(op, args, test_utils=tests[:2])


@pytest.mark.parametrize("backend_compile", ["eager", "inductor"])
def test_compile_fullgraph(backend_compile):
    """routed_matmul compiled (one graph), forward and gradients equal to eager."""
    torch.manual_seed(0)
    T, D, E = 8, 6, 4
    x = torch.randn(T, D, requires_grad=True)
    w = torch.randn(E, 5, D, requires_grad=True)
    b = torch.randn(E, 5, requires_grad=True)
    router = torch.randn(T, E)

    def f(x, w, b, router):
        topw, topi = router.softmax(-1).topk(2, -1)
        return routed_matmul(x, w, topi, topw, b)
    compiled = torch.compile(f, backend=backend_compile, fullgraph=True)
    r = router.clone().requires_grad_()
    y1, y2 = f(x, w, b, r), compiled(x, w, b, r)
    torch.testing.assert_close(y2, y1)
    g1 = torch.autograd.grad(y1.square().sum(), [x, w, b, r])
    g2 = torch.autograd.grad(y2.square().sum(), [x, w, b, r])
    for a, c in zip(g2, g1):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_is_refused_naming_the_argument(backend):
    T, D, E = 4, 3, 3
    x, w = torch.randn(T, D), torch.randn(E, 2, D)
    good_i, good_w = torch.tensor([[0, 1]] * T), torch.rand(T, 2)
    cases = [
        (torch.tensor([[0, 3]] * T), good_w, r"idx: .*out of range|idx: pathway indices must lie"),
        (torch.tensor([[0, -2]] * T), good_w, r"idx: .*out of range|idx: pathway indices must lie"),
        (good_i.int(), good_w, r"idx: expected .*int64"),
        (good_i, torch.tensor([[0.5, float("nan")]] * T), r"gate: NaN routing weight"),
        (good_i, torch.rand(T, 3), r"gate: expected shape"),
        (good_i, good_w.double(), r"gate: expected dtype"),
    ]
    for idx, gate, match in cases:
        with pytest.raises((ValueError, RuntimeError), match=match):
            routed_matmul(x, w, idx, gate, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="x: expected"):
        routed_matmul(x.unsqueeze(0), w, good_i, good_w, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="weight: expected"):
        routed_matmul(x, torch.randn(E, 2, D + 1), good_i, good_w, backend=backend)


def test_a_route_made_for_other_sizes_is_refused():
    plan = moe_plan(3)
    idx = torch.tensor([[0, 1], [2, 2]])
    route = make_route(idx, plan)
    x, w = torch.randn(1, 2, 4), torch.randn(3, 5, 4)
    with pytest.raises(RuntimeError, match="route: expected"):
        torch.ops.gated_ops.routed_matmul(x[:, :1], w, None, None, idx[:1], route.table, plan.paths,
                                          1)
    bad = route.table.clone()
    bad[0], bad[1] = bad[1], bad[0]  # order no longer pos's inverse
    with pytest.raises(RuntimeError, match="route: corrupt table"):
        torch.ops.gated_ops.routed_matmul(x, w, None, None, idx, bad, plan.paths, 1)


def test_same_bits_for_any_thread_count():
    case = next(c for c in SMALL if c.name == "grouped_unused")
    outs = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            inp, y = _run(case, "cpu", torch.float32)
            grads = torch.autograd.grad(y.square().sum(), [inp[k] for k in NAMES])
            outs.append([y.detach(), *grads])
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_route_groups_the_slots_by_weight_stably():
    plan = gated_ops.make_plan([0, 1, 1, 0], [2, 0, 2, 1], [0, 0, 1, 1], num_sources=2,
                               num_weights=3, num_dst=2)
    idx = torch.tensor([[0, 1], [-1, 2], [3, 0]])  # weights 2, 0 | -, 2 | 1, 2
    t = make_route(idx, plan).table
    N, M = 6, 3
    order, pos, offsets = t[:N], t[N:2 * N], t[2 * N:]
    assert offsets.tolist() == [0, 1, 2, 5]
    assert order.tolist() == [1, 4, 0, 3, 5, 2]  # weight 0 | 1 | 2 (slot order) | unused
    assert torch.equal(pos[order], torch.arange(N))


# ------------------------------------------------------------------------------------------------
# GatedPathwayLinear: tokens first, the router's gate layout, the routed mode, the fused SGD
def _moe_layer(E=4, D=6, Do=5, seed=0):
    torch.manual_seed(seed)
    return gated_ops.GatedPathwayLinear.mixture_of_experts(E, D, Do, dtype=torch.float64)


def test_layer_takes_tokens_first_with_the_routers_gate_layout():
    layer = _moe_layer()
    x = torch.randn(7, 6, dtype=torch.float64)
    probs = torch.rand(7, 4, dtype=torch.float64).softmax(-1)  # (B, E), as a router gives it
    y = layer(x, probs)
    assert y.shape == (7, 5)
    torch.testing.assert_close(y, layer(x.unsqueeze(0), probs.t())[0])
    with pytest.raises(ValueError, match=r"gate: with tokens-first x, expected the router's "
                                         r"layout \(B, P\) = \(7, 4\)"):
        layer(x, probs.t())
    batched = gated_ops.GatedPathwayLinear.batched(3, 6, 5)
    with pytest.raises(ValueError, match="tokens-first input .* needs a layer with one source"):
        batched(torch.randn(7, 6))


def test_layer_routed_mode_equals_the_dense_gate():
    layer = _moe_layer()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(9, 4, dtype=torch.float64).softmax(-1)
    topw, topi = probs.topk(2, -1)
    dense = torch.zeros_like(probs).scatter(1, topi, topw)
    y = layer(x, topw, idx=topi)
    torch.testing.assert_close(y, layer(x, dense))
    gx = torch.autograd.grad(y.square().sum(), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(layer(x, dense).square().sum(), x)[0])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_sgd_in_routed_mode_is_torch_optim_sgd(momentum):
    """The routed layer with the fused SGD steps as a plain layer with torch.optim.SGD does,
    its router trained through the gate."""
    import copy
    fused = _moe_layer()
    plain = copy.deepcopy(fused)
    cfg = gated_ops.SGDConfig(lr=0.1, momentum=momentum, weight_decay=0.01)
    fused.fuse_sgd(cfg)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=momentum, weight_decay=0.01)
    for t in range(3):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        logits = torch.randn(8, 4, generator=g, dtype=torch.float64)
        r1, r2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        w1, i1 = r1.softmax(-1).topk(2, -1)
        w2, i2 = r2.softmax(-1).topk(2, -1)
        fused(x, w1, idx=i1).square().sum().backward()
        plain(x, w2, idx=i2).square().sum().backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(r1.grad, r2.grad)
        torch.testing.assert_close(fused.weight, plain.weight)
        torch.testing.assert_close(fused.bias, plain.bias)


# ------------------------------------------------------------------------------------------------
# The MoE block
def moe_loop_reference(moe, x):
    """The block written per token in plain PyTorch (float64): the spec of gated_ops.MoE."""
    act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu,
           "silu": torch.nn.functional.silu}[moe.activation]
    tokens = x.reshape(-1, moe.d_model)
    probs = (tokens @ moe.router.weight.t()).softmax(-1)
    topw, topi = probs.topk(moe.top_k, -1)
    if moe.normalize:
        topw = topw / topw.sum(-1, keepdim=True)
    rows = []
    for t in range(tokens.shape[0]):
        out = torch.zeros(moe.d_model, dtype=x.dtype)
        for j in range(moe.top_k):
            e = int(topi[t, j])
            h = moe.w1[e] @ tokens[t] + (moe.b1[e] if moe.b1 is not None else 0)
            if moe.glu:
                g, u = h.chunk(2)
                h = act(g) * u
            else:
                h = act(h)
            out = out + topw[t, j] * (moe.w2[e] @ h + (moe.b2[e] if moe.b2 is not None else 0))
        rows.append(out)
    E = moe.num_experts
    frac = torch.bincount(topi.reshape(-1), minlength=E).to(x.dtype) / topi.numel()
    aux = E * (frac * probs.mean(0)).sum()
    return torch.stack(rows).reshape(x.shape), aux


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("glu, activation, bias", [(False, "gelu", True), (True, "silu", True),
                                                   (False, "relu", False)],
                         ids=["gelu", "swiglu", "relu_no_bias"])
def test_moe_block_equals_the_per_token_reference(glu, activation, bias, backend):
    _skip(backend)
    if backend == "reference":
        pytest.skip("the block runs on the compiled or Triton kernels")
    device, name = BACKENDS[backend]
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(0)
    moe = gated_ops.MoE(6, 5, 4, 2, activation=activation, glu=glu, bias=bias, dtype=dtype,
                        device=device, backend=name)
    x = torch.randn(2, 4, 6, dtype=dtype, device=device, requires_grad=True)
    y = moe(x)
    ref_moe = gated_ops.MoE(6, 5, 4, 2, activation=activation, glu=glu, bias=bias,
                            dtype=torch.float64)
    ref_moe.load_state_dict({k: v.double().cpu() for k, v in moe.state_dict().items()})
    xr = x.detach().double().cpu().requires_grad_()
    ref, aux = moe_loop_reference(ref_moe, xr)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y.detach().cpu().double(), ref.detach(), **tol)
    torch.testing.assert_close(moe.aux_loss.detach().cpu().double(), aux.detach(), **tol)
    gy = torch.randn(ref.shape, dtype=torch.float64)
    params = [x, *moe.parameters()]
    got = torch.autograd.grad((y * gy.to(device, dtype)).sum() + moe.aux_loss, params)
    want = torch.autograd.grad((ref * gy).sum() + aux, [xr, *ref_moe.parameters()])
    for a, r in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), r, **tol)


def test_moe_refuses_bad_configurations():
    with pytest.raises(ValueError, match="top_k: expected 1 <= top_k <= num_experts = 4"):
        gated_ops.MoE(6, 5, 4, 5)
    with pytest.raises(ValueError, match="activation: expected one of"):
        gated_ops.MoE(6, 5, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match=r"x: expected \(\.\.\., d_model\) with d_model = 6"):
        gated_ops.MoE(6, 5, 4, 2)(torch.randn(3, 5))


def test_moe_with_no_tokens():
    moe = gated_ops.MoE(6, 5, 4, 2)
    y = moe(torch.randn(0, 6))
    assert y.shape == (0, 6) and float(moe.aux_loss) == 0.0


# ------------------------------------------------------------------------------------------------
# GDLN graphs with sparse context gates
def test_slots_from_gate_is_the_dense_gate():
    from gated_ops.routed import slots_from_gate
    g = torch.tensor([[0.0, 2.0, 0.0], [1.5, 0.0, 0.0], [0.5, 3.0, 0.0], [0.0, 0.0, 0.0]])
    idx, w = slots_from_gate(g)  # (P=4, B=3): sample 0 has pathways 1, 2; 1 has 0, 2; 2 none
    assert idx.tolist() == [[1, 2], [0, 2], [-1, -1]]
    assert w.tolist() == [[1.5, 0.5], [2.0, 3.0], [0.0, 0.0]]
    torch.testing.assert_close(routed_gate_ref(idx, w, 4), g)


def test_gdln_routed_equals_dense_on_the_routing_network():
    from experiments.routing_net import routing_network
    rn = routing_network(M=5, K=2, hidden=6, d_in=4, d_out=3, dtype=torch.float64)
    X = torch.randn(3, 4, dtype=torch.float64)
    Y = torch.randn(3, 3, dtype=torch.float64)
    inputs, targets, gates = rn.batch(X, Y)
    net = rn.net
    dense = net.loss(net(inputs, gates), targets, gates)
    routed = net.loss(net(inputs, gates, routed=True), targets, gates)
    torch.testing.assert_close(routed, dense)
    params = list(net.parameters())
    for a, b in zip(torch.autograd.grad(routed, params), torch.autograd.grad(dense, params)):
        torch.testing.assert_close(a, b)
