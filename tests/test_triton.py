"""The Triton backend (gated_ops.triton) against the float64 reference: forward and every
gradient in float32 and float16 (bfloat16 too on a GPU), the gated cross-entropy, opcheck; the
routed ops op by op on many tiles (tests/test_routed.py runs their public functions).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1, which this module sets
(for the rest of the process) before gated_ops.triton is first imported; with a GPU they run
on it.
Shapes are the small rows of the shared table (the interpreter is slow: ~1 min for this file
on 2 cores).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and "gated_ops.triton" not in sys.modules:
    # Read when triton.jit wraps the kernels (at import) and later by triton's lazily imported
    # modules, so it stays set for the rest of the pytest process.
    os.environ["TRITON_INTERPRET"] = "1"
gated_triton = pytest.importorskip("gated_ops.triton", reason="triton is not installed")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import gated_ops  # noqa: E402
from gated_ops.reference import gated_cross_entropy_ref, pathway_matmul_ref  # noqa: E402
from gated_ops.testing import SHAPES, Case, assert_close, make_inputs  # noqa: E402
from helpers import (check_ce_backward_missing_grads,  # noqa: E402
                     check_ce_backward_rejects_bad_input, check_ce_special_values,
                     check_layer_sgd_with_bias, opcheck_ce_ops, opcheck_pathway_ops)
from gated_ops.triton import matmul as triton_matmul  # noqa: E402

if not ON_GPU and not isinstance(triton_matmul._ztile_kernel, InterpretedFunction):
    pytest.skip("gated_ops.triton was imported before TRITON_INTERPRET=1 was set and there is "
                "no GPU: run this file alone or with TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter evaluates the masked-off padding of the cross-entropy tiles too (-inf - -inf).
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.triton]

SMALL = [c for c in SHAPES if not c.large]
BLOCKED = [c for c in SMALL if c.table.plan().kind == "blocked"]
GROUPED = [c for c in SMALL if c.table.plan().kind == "grouped"]
NAMES = ["x", "weight", "bias", "gate"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
DTYPE_IDS = ["f32", "f16", "bf16"][:len(DTYPES)]


def _forward_and_grads(fn, case: Case, dtype: torch.dtype, device: str):
    """fn's output and the gradients of <output, gy> w.r.t. x, weight, bias, gate."""
    inp = make_inputs(case, dtype=dtype, device=device)
    plan = case.table.plan(device)
    y = fn(inp, plan)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [inp[n] for n in NAMES if inp[n] is not None]
    if y.numel():
        grads = torch.autograd.grad(y, leaves, gy.to(device=device, dtype=dtype),
                                    allow_unused=True)
    else:
        grads = [None] * len(leaves)
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)]
    names = [n for n in NAMES if inp[n] is not None]
    return y.detach().cpu(), dict(zip(names, [g.detach().cpu() for g in grads]))


def _reference(inp, plan):
    return pathway_matmul_ref(inp["x"], inp["weight"], inp["bias"], inp["gate"], plan.src,
                              plan.wgt, plan.dst, plan.num_dst)


def _triton(inp, plan):
    return gated_triton.pathway_matmul(inp["x"], inp["weight"], plan, inp["bias"], inp["gate"])


def _check(case: Case, dtype: torch.dtype) -> None:
    y64, g64 = _forward_and_grads(_reference, case, torch.float64, "cpu")
    # "plain": the reference in the backend's dtype (on the GPU when there is one; the CPU's
    # float16 matmul is fine for these sizes)
    y_plain, g_plain = _forward_and_grads(_reference, case, dtype, DEVICE)
    y, g = _forward_and_grads(_triton, case, dtype, DEVICE)
    assert y.dtype == dtype
    assert_close(f"{case.name}: y", y, y64, y_plain)
    for name in g64:
        assert_close(f"{case.name}: grad {name}", g[name], g64[name], g_plain[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", BLOCKED, ids=lambda c: c.name)
def test_pathway_matmul_matches_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("case", GROUPED, ids=lambda c: c.name)
def test_grouped_plans_fall_back_to_the_compiled_op(case):
    """Grouped plans run torch.ops.gated_ops.* (documented fallback): identical results."""
    inp = make_inputs(case, dtype=torch.float32, device=DEVICE)
    plan = case.table.plan(DEVICE)
    y = gated_triton.pathway_matmul(inp["x"], inp["weight"], plan, inp["bias"], inp["gate"])
    want = gated_ops.pathway_matmul(inp["x"], inp["weight"], plan, inp["bias"], inp["gate"])
    assert torch.equal(y, want)
    _check(case, torch.float32)


def test_summing_epilogue_reads_only_the_z_it_sums():
    """In a plan where some destinations have one pathway (written by the fused tiles, their Z
    left unwritten) and others several, the summing kernel reads the Z of the summed ones only:
    with the single pathway's Z rows poisoned, nothing overflows (the interpreter warned of
    overflowing casts when it read them) and its destination keeps the tiles' values."""
    import warnings

    plan = gated_ops.make_plan([0, 1, 2], [0, 1, 2], [0, 1, 1], num_sources=3, num_weights=3,
                               num_dst=2, device=DEVICE)  # destination 0: one pathway
    assert plan.kind == "blocked" and not plan.one_per_dst
    T, B, Do = 2, 4, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, B, 8, generator=g).to(DEVICE, torch.float16)
    w = torch.randn(3, Do, 8, generator=g).to(DEVICE, torch.float16)
    gate = torch.full((3, B), 8.0, dtype=torch.float16, device=DEVICE)
    layout = list(plan.layout)
    z = x.new_empty(plan.z_shape(B, Do))
    triton_matmul._launch_ztile(x, w, None, gate, plan.paths, plan.csr, layout, None, z,
                                fused=False)
    z[:B] = 6e4  # pathway 0's rows: garbage in the fused forward, never summed
    y = torch.full((T, B, Do), 7.0, dtype=torch.float16, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        triton_matmul._gather_kernel[(T * B,)](
            z, z, gate, y, plan.paths, plan.csr, plan.csr[T + 1:], 3, B, Do, Do,
            HAS_BIAS=False, GATE=triton_matmul._gate_kind(gate), ONLY_MULTI=True, BLOCK_O=16)
    assert torch.equal(y[0], torch.full_like(y[0], 7.0))
    ref = (8.0 * (z[B:2 * B].float() + z[2 * B:].float())).half()
    torch.testing.assert_close(y[1], ref, rtol=2e-3, atol=1e-2)


def test_deterministic_bitwise():
    case = next(c for c in SHAPES if c.name == "replicas_decoder")
    runs = [_forward_and_grads(_triton, case, torch.float32, DEVICE) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


OPCHECK_CASES = [c for c in BLOCKED if c.batch > 0 and c.name in ("odd_decoder", "moe")]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
def test_opcheck_pathway_matmul(case):
    inp = make_inputs(case, dtype=torch.float32, device=DEVICE)
    plan = case.table.plan(DEVICE)
    torch.library.opcheck(torch.ops.gated_ops_triton.pathway_matmul,
                          (inp["x"], inp["weight"], inp["bias"], inp["gate"], plan.paths,
                           plan.csr, list(plan.layout)))


@pytest.mark.parametrize("case_name", ["moe", "odd_decoder"])
def test_fakes_match_on_strided_inputs(case_name):
    """Every op's fake against its kernel (strides included) on a transposed router gate and
    inputs cut from wider tensors (helpers.opcheck_pathway_ops)."""
    opcheck_pathway_ops(torch.ops.gated_ops_triton, next(c for c in SHAPES if c.name == case_name),
                        DEVICE)


def test_cross_entropy_fakes_match_on_every_logits_layout():
    opcheck_ce_ops(torch.ops.gated_ops_triton, DEVICE)


# ------------------------------------------------------------------------------------------------
# gated cross-entropy
def _ce_inputs(R, P, B, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(R, P, B, C, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, C, (R, P, B), generator=g)
    gate = (torch.rand(R, P, generator=g) < 0.5).to(dtype)
    gate[:, 0] = 1
    return (logits.to(DEVICE).requires_grad_(), target.to(DEVICE),
            gate.to(DEVICE).requires_grad_())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (3, 16, 5, 7), (2, 3, 9, 40)], ids=str)
def test_gated_cross_entropy_matches_reference(shape, dtype):
    w = torch.randn(shape[:2], dtype=torch.float64)
    outs = []
    for fn, dt in ((gated_cross_entropy_ref, torch.float64), (gated_cross_entropy_ref, dtype),
                   (gated_triton.gated_cross_entropy, dtype)):
        logits, target, gate = _ce_inputs(*shape, dt)
        loss, path_loss, correct = fn(logits, target, gate)
        grads = torch.autograd.grad(loss.sum() + (path_loss * w.to(DEVICE, dt)).sum(),
                                    (logits, gate))
        outs.append([t.detach().cpu() for t in (loss, path_loss, correct, *grads)])
    ref, plain, out = outs
    for i, name in enumerate(("loss", "path_loss", "correct", "grad logits", "grad gate")):
        if name == "correct":
            assert torch.equal(out[i], ref[i]) and out[i].dtype == torch.int64
        else:
            assert_close(name, out[i], ref[i], plain[i])


def test_gated_cross_entropy_nan_inf_ties_and_zero_gate():
    check_ce_special_values(gated_triton.gated_cross_entropy, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_backward_takes_missing_gradients(dtype):
    check_ce_backward_missing_grads(torch.ops.gated_ops_triton, DEVICE, dtype)


def test_weight_update_steps_the_layer_bias():
    check_layer_sgd_with_bias(torch.ops.gated_ops_triton, DEVICE, torch.float32)


def test_cross_entropy_backward_rejects_bad_input():
    check_ce_backward_rejects_bad_input(torch.ops.gated_ops_triton, DEVICE)


def test_opcheck_gated_cross_entropy():
    logits, target, gate = _ce_inputs(2, 5, 3, 4, torch.float32)
    torch.library.opcheck(torch.ops.gated_ops_triton.gated_cross_entropy, (logits, target, gate))


def test_torch_compile_fullgraph_parity():
    case = next(c for c in SHAPES if c.name == "odd_decoder")
    inp = make_inputs(case, dtype=torch.float32, device=DEVICE)
    plan = case.table.plan(DEVICE)

    def f(x, w, b, g):
        return gated_triton.pathway_matmul(x, w, plan, b, g).square().sum()

    args = (inp["x"], inp["weight"], inp["bias"], inp["gate"])
    eager = torch.autograd.grad(f(*args), args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(compiled(*args), args), eager):
        torch.testing.assert_close(a, b)


def test_torch_func_grad_vmap_and_double_backward():
    """torch.func.grad equals autograd bit for bit (the same kernels); vmap over x is one
    kernel call, equal to a loop of calls up to the tiles' float32 rounding; vmap over the
    weight (replicas) likewise; double backward is the clear error."""
    from torch.func import grad, vmap

    from helpers import op_calls

    case = next(c for c in SHAPES if c.name == "moe")
    inp = make_inputs(case, dtype=torch.float32, device=DEVICE, requires_grad=False,
                      transposed_gate=True)
    plan = case.table.plan(DEVICE)
    args = [inp[n] for n in NAMES]
    w_out = torch.randn(plan.num_dst, case.batch, case.d_out, device=DEVICE,
                        generator=torch.Generator(DEVICE).manual_seed(1))

    def loss(x, w, b, g):
        return (gated_triton.pathway_matmul(x, w, plan, b, g) * w_out).sum()
    got = grad(loss, argnums=(0, 1, 2, 3))(*args)
    leaves = [a.clone().requires_grad_() for a in args]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for dims, arg in ((0, 0), (None, 1)):  # more batch (x), replicas (weight)
        stacked = torch.stack([args[arg] * (1 + 0.1 * v) for v in range(3)])
        in_dims = tuple(0 if i == arg else None for i in range(4))
        vargs = [stacked if i == arg else a for i, a in enumerate(args)]

        def f(*a):
            return gated_triton.pathway_matmul(a[0], a[1], plan, a[2], a[3])
        with op_calls() as calls:
            y = vmap(f, in_dims=in_dims)(*vargs)
        assert dict(calls) == {"pathway_matmul": 1}
        loop = torch.stack([f(*[stacked[v] if i == arg else a for i, a in enumerate(args)])
                            for v in range(3)])
        torch.testing.assert_close(y, loop, rtol=1e-5, atol=1e-5)
    x, w = (a.detach().requires_grad_() for a in args[:2])
    (gx,) = torch.autograd.grad(loss(x, w, *args[2:]), x, create_graph=True)
    with pytest.raises(RuntimeError, match="gated_ops.pathway_matmul: double backward"):
        torch.autograd.grad(gx.square().sum(), w)


def test_cross_entropy_torch_func_grad():
    from torch.func import grad

    logits, target, gate = _ce_inputs(2, 6, 4, 5, torch.float32)
    w = torch.randn(2, 6)

    def loss(logits, gate):
        out = gated_triton.gated_cross_entropy(logits, target, gate)
        return out[0].sum() + (out[1] * w).sum()
    got = grad(loss, argnums=(0, 1))(logits.detach(), gate.detach())
    lg, gg = logits.detach().requires_grad_(), gate.detach().requires_grad_()
    for a, b in zip(got, torch.autograd.grad(loss(lg, gg), (lg, gg))):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Fused SGD (pathway_sgd_): the weight gradient's tile steps the weight in registers.
SGD_CONFIGS = [dict(lr=0.3, momentum=0.0, weight_decay=0.0, nesterov=False),
               dict(lr=0.3, momentum=0.8, weight_decay=0.1, nesterov=False),
               dict(lr=0.3, momentum=0.8, weight_decay=0.0, nesterov=True)]


@pytest.mark.parametrize("param", ["weight", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=["plain", "momentum_decay", "nesterov"])
@pytest.mark.parametrize("case", BLOCKED, ids=lambda c: c.name)
def test_fused_sgd_op_equals_reference_update(case, cfg, dtype, param):
    """pathway_sgd_ (the weight) = pathway_grad_weight, and pathway_bias_sgd_ (the bias) =
    pathway_grad_bias, then torch.optim.SGD's step (sgd_momentum_ref), from a nonzero momentum
    buffer; float64 reference, the kernel in each dtype (16-bit: computed in float32, rounded
    once), the tolerance rule against the same steps in plain PyTorch."""
    from gated_ops.reference import sgd_momentum_ref

    plan = case.table.plan(DEVICE)
    S, M, T, B = plan.num_sources, plan.num_weights, plan.num_dst, case.batch
    g = torch.Generator().manual_seed(3)
    x = torch.randn(S, B, case.d_in, generator=g, dtype=torch.float64)
    gy = torch.randn(T, B, case.d_out, generator=g, dtype=torch.float64)
    shape = (M, case.d_out, case.d_in) if param == "weight" else (M, case.d_out)
    p0 = torch.randn(shape, generator=g, dtype=torch.float64)
    buf0 = torch.randn(shape, generator=g, dtype=torch.float64)
    lay = list(plan.layout)
    plan64 = case.table.plan("cpu")
    hyper = (cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["nesterov"])

    def step(dtype, device, fused):
        xs, gys = x.to(device, dtype), gy.to(device, dtype)
        ps, bs = p0.to(device, dtype), buf0.to(device, dtype)
        p = plan if device == DEVICE else plan64
        dz = torch.ops.gated_ops.pathway_grad_z(gys, None, p.paths, p.csr, lay, S, M)
        b = bs if cfg["momentum"] else None
        tri, ops = torch.ops.gated_ops_triton, torch.ops.gated_ops
        if fused and param == "weight":
            tri.pathway_sgd_(dz, xs, ps, b, p.paths, p.csr, lay, *hyper)
        elif fused:
            tri.pathway_bias_sgd_(dz, ps, b, p.paths, p.csr, lay, S, M, *hyper)
        else:
            grad = (ops.pathway_grad_weight(dz, xs, p.paths, p.csr, lay, M, case.d_out)
                    if param == "weight"
                    else ops.pathway_grad_bias(dz, p.paths, p.csr, lay, S, M, case.d_out))
            sgd_momentum_ref(ps, grad, b, **cfg)
        return ps.cpu(), bs.cpu()

    p64, b64 = step(torch.float64, "cpu", fused=False)
    p_plain, b_plain = step(dtype, DEVICE, fused=False)
    p_tri, b_tri = step(dtype, DEVICE, fused=True)
    assert_close(f"{case.name}: {param}", p_tri, p64, p_plain)
    assert_close(f"{case.name}: momentum", b_tri, b64, b_plain)


def test_fused_sgd_falls_back_for_uncovered_weights():
    """A weight no pathway uses still decays and keeps its momentum (torch.optim.SGD with a zero
    gradient): the compiled op takes that case, with the same result as the reference."""
    from gated_ops.reference import sgd_momentum_ref

    plan = gated_ops.make_plan([0, 1], [0, 1], [0, 1], num_sources=2, num_weights=3, num_dst=2,
                               device=DEVICE)
    x = torch.randn(2, 4, 6, device=DEVICE)
    gy = torch.randn(2, 4, 5, device=DEVICE)
    w, buf = torch.randn(3, 5, 6, device=DEVICE), torch.randn(3, 5, 6, device=DEVICE)
    w_ref, buf_ref = w.clone(), buf.clone()
    lay = list(plan.layout)
    dz = torch.ops.gated_ops.pathway_grad_z(gy, None, plan.paths, plan.csr, lay, 2, 3)
    torch.ops.gated_ops_triton.pathway_sgd_(dz, x, w, buf, plan.paths, plan.csr, lay, 0.1, 0.9,
                                            0.01, False)
    gw = torch.ops.gated_ops.pathway_grad_weight(dz, x, plan.paths, plan.csr, lay, 3, 5)
    sgd_momentum_ref(w_ref, gw, buf_ref, lr=0.1, momentum=0.9, weight_decay=0.01)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(buf, buf_ref)


def test_opcheck_fused_sgd():
    case = next(c for c in BLOCKED if c.name == "odd_decoder")
    plan = case.table.plan(DEVICE)
    S, M, B = plan.num_sources, plan.num_weights, case.batch
    lay = list(plan.layout)
    x = torch.randn(S, B, case.d_in, device=DEVICE)
    dz = torch.randn(plan.z_shape(B, case.d_out), device=DEVICE)
    w = torch.randn(M, case.d_out, case.d_in, device=DEVICE)
    buf = torch.randn_like(w)
    torch.library.opcheck(torch.ops.gated_ops_triton.pathway_sgd_,
                          (dz, x, w, buf, plan.paths, plan.csr, lay, 0.1, 0.9, 0.0, False))


def _stream_for(seed: int, device) -> tuple[torch.Tensor, int]:
    """(rounding_step, rounding_seed) whose seed is ``seed`` (reference.rounding_seed_at), with
    a step beyond 32 bits: the kernels' 31-bit arithmetic against Python's integers."""
    from gated_ops.reference import rounding_seed_at

    step = 2 ** 35 + 777
    base = (seed - step * 0x9E3779B1) % 2 ** 31
    assert rounding_seed_at(base, step) == seed
    return torch.tensor(step, device=device), base


def test_bias_sgd_stochastic_rounding_is_bitwise_the_cpu_kernels():
    """bfloat16 biases with rounding_seed >= 0 (no tl.dot here, so the interpreter runs it):
    bit for bit the CPU op and reference.round_stochastic_bf16 of the exact float32 step."""
    from gated_ops import GatedPathwayLinear
    from gated_ops.reference import round_stochastic_bf16

    torch.manual_seed(0)
    m = GatedPathwayLinear.fanout(2, 3, 4, 21, replicas=2).to(DEVICE, torch.bfloat16)
    plan, lay, B = m.plan, list(m.plan.layout), 5
    g = torch.Generator().manual_seed(3)
    dz = torch.randint(-3, 4, plan.z_shape(B, 21), generator=g).to(torch.bfloat16)
    pc = plan.to("cpu")
    gb = torch.ops.gated_ops.pathway_grad_bias(dz.float(), pc.paths, pc.csr, lay, m.num_sources,
                                               m.num_weights, 21)
    b0, lr, seed = m.bias.detach().cpu().clone(), 2.0 ** -9, 99
    results = {}
    for name, ops, dev, p in (("triton", torch.ops.gated_ops_triton, DEVICE, plan),
                              ("triton_step", torch.ops.gated_ops_triton, DEVICE, plan),
                              ("cpu", torch.ops.gated_ops, "cpu", pc)):
        # triton_step: the same seed from a stream and a step counter read by the kernel
        st, s0 = _stream_for(seed, DEVICE) if name.endswith("_step") else (None, seed)
        b, buf = b0.clone().to(dev), torch.zeros_like(b0, device=dev)
        ops.pathway_bias_sgd_(dz.to(dev), b, buf, p.paths, p.csr, lay, m.num_sources,
                              m.num_weights, lr, 0.5, 0.0, False, s0, st)
        results[name] = b.cpu()
        assert torch.equal(buf.cpu(), gb.to(torch.bfloat16)), name
    expect = round_stochastic_bf16(b0.float() - lr * gb, seed)
    for name in results:
        assert torch.equal(results[name].view(torch.int16), expect.view(torch.int16)), name
    with pytest.raises(RuntimeError, match="stochastic rounding .* is for bfloat16 biases"):
        torch.ops.gated_ops_triton.pathway_bias_sgd_(
            dz.float().to(DEVICE), b0.float().to(DEVICE), None, plan.paths, plan.csr, lay,
            m.num_sources, m.num_weights, lr, 0.0, 0.0, False, seed)


def test_opcheck_bias_sgd():
    case = next(c for c in BLOCKED if c.name == "odd_decoder")
    plan = case.table.plan(DEVICE)
    S, M, B = plan.num_sources, plan.num_weights, case.batch
    dz = torch.randn(plan.z_shape(B, case.d_out), device=DEVICE)
    b = torch.randn(M, case.d_out, device=DEVICE)
    torch.library.opcheck(torch.ops.gated_ops_triton.pathway_bias_sgd_,
                          (dz, b, torch.randn_like(b), plan.paths, plan.csr, list(plan.layout),
                           S, M, 0.1, 0.9, 0.01, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_fused_kpath_step_on_triton_reads_no_tensor_on_the_host(dtype, monkeypatch):
    """A fused k-path step with backend="triton" (bfloat16: with stochastic rounding, the
    counter read by the kernels) converts no tensor to a Python number or bool (each a
    device-to-host sync on a GPU; tests/test_cuda.py checks the GPU's sync debug mode). Values
    are not compared here: the interpreter's bfloat16 dots are wrong."""
    from gated_ops import SGDConfig
    from experiments.kpath_net import KPathNet, kpath_gate

    K, R, B, D, H, C = 3, 2, 4, 16, 16, 5
    torch.manual_seed(0)
    net = KPathNet(K, D, H, C, replicas=R, device=DEVICE, dtype=dtype, backend="triton")
    net.fuse_sgd(SGDConfig(lr=0.05, momentum=0.9, stochastic_rounding=dtype == torch.bfloat16))
    gate = kpath_gate(K, 2).reshape(1, K * K).expand(R, -1).contiguous().to(DEVICE, dtype)
    g = torch.Generator().manual_seed(1)
    xk = torch.randn(R * K, B, D, generator=g).to(DEVICE, dtype)
    target = torch.randint(0, C, (R, K * K, B), generator=g).to(DEVICE)
    net.loss(xk, target, gate)[0].sum().backward()  # first call: compilation

    def host_read(t, *args):
        pytest.fail("a tensor was read on the host during the step")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    net.loss(xk, target, gate)[0].sum().backward()
    monkeypatch.undo()
    if dtype == torch.bfloat16:
        assert int(net.encoder.sgd_step) == 2


def test_kpath_fused_step_on_triton_equals_compiled_kernels():
    """A whole k-path training step (forward, fused loss, backward, fused SGD in every layer) with
    backend="triton" equals the same step on the compiled kernels, to float32 tolerance: the
    losses, and every parameter and momentum buffer after 3 steps."""
    from gated_ops import SGDConfig
    from experiments.kpath_net import KPathNet, kpath_gate

    K, R, B, D, H, C = 3, 2, 4, 16, 16, 5
    nets = {}
    for backend in ("auto", "triton"):
        torch.manual_seed(0)
        nets[backend] = KPathNet(K, D, H, C, replicas=R, device=DEVICE, backend=backend).fuse_sgd(
            SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-3))
    gate = kpath_gate(K, 2).reshape(1, K * K).expand(R, -1).contiguous().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        xk = torch.randn(R * K, B, D, generator=g).to(DEVICE)
        target = torch.randint(0, C, (R, K * K, B), generator=g).to(DEVICE)
        losses = {}
        for backend, net in nets.items():
            loss, _, _ = net.loss(xk, target, gate)
            loss.sum().backward()
            losses[backend] = loss.detach()
            assert all(p.grad is None for p in net.parameters())
        torch.testing.assert_close(losses["triton"], losses["auto"])
    state = {b: n.state_dict() for b, n in nets.items()}
    assert state["auto"].keys() == state["triton"].keys()
    for name in state["auto"]:
        torch.testing.assert_close(state["triton"][name], state["auto"][name], rtol=1e-5,
                                   atol=1e-6, msg=name)


def test_fused_sgd_moe_router_grads_on_triton_equal_compiled_kernels():
    """A fused-SGD MoE layer with a trained router on backend="triton": the x and gate gradients
    and the stepped parameters equal the compiled kernels' (float32 tolerance)."""
    from gated_ops import GatedPathwayLinear, SGDConfig

    cfg = SGDConfig(lr=0.1, momentum=0.9, weight_decay=1e-2)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 6, 16, generator=g).to(DEVICE)
    gate0 = torch.softmax(torch.randn(4, 6, generator=g), 0).to(DEVICE)
    gy = torch.randn(1, 6, 8, generator=g).to(DEVICE)
    out = {}
    for backend in ("auto", "triton"):
        torch.manual_seed(0)
        m = GatedPathwayLinear.mixture_of_experts(4, 16, 8, device=DEVICE, backend=backend)
        m.fuse_sgd(cfg)
        x, gate = x0.clone().requires_grad_(), gate0.clone().requires_grad_()
        (m(x, gate) * gy).sum().backward()
        out[backend] = (x.grad, gate.grad, m.weight.detach(), m.bias.detach())
    for a, b, name in zip(out["triton"], out["auto"], ("x.grad", "gate.grad", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["batched", "shared", "fanout"])
def test_fused_sgd_stochastic_rounding_is_bitwise_the_reference(kind):
    """bfloat16 weights with rounding_seed >= 0: every weight is the exact float32 step rounded
    by reference.round_stochastic_bf16, the momentum buffer rounded to nearest: bit for bit what
    the CPU kernels store. Integer dZ and x make the gradient and the step exact in any
    summation order, so the comparisons are bitwise."""
    from gated_ops import GatedPathwayLinear
    from gated_ops.reference import round_stochastic_bf16

    Di, Do, B = 37, 6, 5
    make = {"batched": lambda: GatedPathwayLinear.batched(3, Di, Do, replicas=2),
            "shared": lambda: GatedPathwayLinear.shared(3, Di, Do, replicas=2),
            "fanout": lambda: GatedPathwayLinear.fanout(2, 3, Di, Do, replicas=2)}[kind]
    torch.manual_seed(0)
    m = make().to(DEVICE, torch.bfloat16)
    plan, lay, g = m.plan, list(m.plan.layout), torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (m.num_sources, B, Di), generator=g).to(DEVICE, torch.bfloat16)
    dz = torch.randint(-1, 2, plan.z_shape(B, Do), generator=g).to(DEVICE, torch.bfloat16)
    lr, seed = 2.0 ** -10, 1234
    gw = torch.ops.gated_ops.pathway_grad_weight(dz.cpu().float(), x.cpu().float(),
                                                 plan.paths.cpu(), plan.csr.cpu(), lay,
                                                 m.num_weights, Do)
    w0 = m.weight.detach().clone()
    expect = round_stochastic_bf16(w0.cpu().float() - lr * gw, seed)
    results = {}
    for name, ops, dev in (("triton", torch.ops.gated_ops_triton, DEVICE),
                           ("triton_step", torch.ops.gated_ops_triton, DEVICE),
                           ("cpu", torch.ops.gated_ops, "cpu")):
        # triton_step: the same seed from a stream and a step counter read by the kernel
        st, s0 = _stream_for(seed, dev) if name.endswith("_step") else (None, seed)
        w, buf = w0.clone().to(dev), torch.zeros_like(w0, device=dev)
        p = plan if dev == DEVICE else plan.to("cpu")
        ops.pathway_sgd_(dz.to(dev), x.to(dev), w, buf, p.paths, p.csr, lay, lr, 0.5, 0.0,
                         False, s0, st)
        results[name] = w.cpu()
        assert torch.equal(buf.cpu(), gw.to(torch.bfloat16)), name
    for name in results:
        assert torch.equal(results[name].view(torch.int16), expect.view(torch.int16)), name
    # round to nearest gives other bits
    nearest = w0.clone()
    torch.ops.gated_ops_triton.pathway_sgd_(dz, x, nearest, None, plan.paths, plan.csr, lay, lr,
                                            0.0, 0.0, False, -1)
    assert not torch.equal(nearest.cpu(), results["triton"])
    with pytest.raises(RuntimeError, match="stochastic rounding .* is for bfloat16 weights"):
        w32 = w0.float()
        torch.ops.gated_ops_triton.pathway_sgd_(dz.float(), x.float(), w32, None, plan.paths,
                                                plan.csr, lay, lr, 0.0, 0.0, False, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_five_dim_logits_equal_the_copied_four_dim_ones(dtype):
    """The Triton CE kernels read the k-path's strided (R, I, J, B, C) logits in place and
    write the gradient in their strides (check_strided_ce_logits)."""
    from helpers import check_strided_ce_logits

    check_strided_ce_logits(DEVICE, dtype, backend="triton")


def test_gdln_on_triton_equals_compiled_kernels():
    """GDLN(..., backend="triton"): the same graph, weights and gates give the same activations
    and gradients as on the compiled kernels (float32 tolerance); a bad backend is refused."""
    from gated_ops import GDLN

    nodes = {"x1": 3, "x2": 4, "a": 5, "b": 5, "y1": 2, "y2": 3}
    edges = [("x1", "a"), ("x2", "a"), ("x2", "b"), ("a", "b"), ("a", "y1"), ("b", "y1"),
             ("b", "y2")]
    nets = {}
    for backend in ("auto", "triton"):
        torch.manual_seed(0)
        nets[backend] = GDLN(nodes, edges, bias=True, device=DEVICE, backend=backend)
    B = 7
    g = torch.Generator().manual_seed(1)
    inputs = {n: torch.randn(B, nodes[n], generator=g).to(DEVICE) for n in ("x1", "x2")}
    eg = torch.rand(len(edges), B, generator=g).to(DEVICE)
    outs, grads = {}, {}
    for backend, net in nets.items():
        out = net(inputs, None, eg)
        loss = sum((v ** 2).sum() for v in out.values())
        grads[backend] = torch.autograd.grad(loss, list(net.parameters()))
        outs[backend] = out
    for n in outs["auto"]:
        torch.testing.assert_close(outs["triton"][n], outs["auto"][n])
    for a, b in zip(grads["triton"], grads["auto"]):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError,
                       match="backend: expected 'auto', 'triton' or 'cuda_emu', got 'cuda'"):
        GDLN(nodes, edges, backend="cuda")


def test_kpath_static_lookahead_on_the_triton_backend():
    """The captured form of the lookahead (the encoder output in a buffer, KPathNet.loss(...,
    lookahead=)) on the Triton kernels: the same training as without it, to float32 rounding,
    and a chain primed anew mid-run (a resume) continues with the uninterrupted chain's bits."""
    from gated_ops import SGDConfig
    from experiments.kpath_net import KPathNet, kpath_gate

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 4, 16, generator=g).to(DEVICE),
                torch.randint(0, 10, (1, 4, 4), generator=g).to(DEVICE)) for _ in range(4)]
    gate = kpath_gate(2, 1).reshape(1, -1).to(DEVICE)

    def make():
        torch.manual_seed(0)
        return KPathNet(2, 16, 8, 10, device=DEVICE, backend="triton").fuse_sgd(
            SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-3))

    def train(static, resume_at=None):
        net = make()
        enc = net.prime_lookahead(batches[0][0]) if static else None
        for t, (xk, y) in enumerate(batches):
            if t == resume_at:
                state, net = net.state_dict(), make()
                net.load_state_dict(state)
                enc = net.prime_lookahead(xk)
            ahead = (batches[min(t + 1, 3)][0], enc) if static else None
            net.loss(xk, y, gate, lookahead=ahead)[0].sum().backward()
        return [t.detach().cpu() for t in net.state_dict().values()]
    plain, chain, resumed = train(False), train(True), train(True, resume_at=2)
    for a, b, c in zip(chain, plain, resumed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Bn,D,H", [(8, 8, 40, 6), (5, 3, 70, 20), (8, 8, 16, 33)])
def test_sgd_lookahead_kernel(dtype, B, Bn, D, H):
    """The Triton update kernel with the lookahead epilogue: the weight and momentum exactly
    those of the Triton pathway_sgd_, Z_next against float64 under the house tolerance (D = 70:
    two column tiles summed; Bn != B: the next batch's own row count)."""
    from gated_ops import make_plan
    ops = torch.ops.gated_ops_triton
    K = 3
    r = list(range(K))
    plan = make_plan(r, r, r, num_sources=K, num_weights=K, num_dst=K).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    x, xn, w, buf, dz = mk(K, B, D), mk(K, Bn, D), 0.1 * mk(K, H, D), 0.01 * mk(K, H, D), \
        mk(K * B, H)
    pc = (plan.paths, plan.csr, list(plan.layout))
    w1, w2, b1, b2 = w.clone(), w.clone(), buf.clone(), buf.clone()
    z = ops.pathway_sgd_lookahead_(dz, x, w1, b1, *pc, 0.1, 0.9, 1e-3, False, -1, xn)
    ops.pathway_sgd_(dz, x, w2, b2, *pc, 0.1, 0.9, 1e-3, False, -1)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert_close("Z_next", z,
                 torch.bmm(xn.double(), w2.double().transpose(1, 2)).reshape(K * Bn, H),
                 torch.bmm(xn, w2.transpose(1, 2)).reshape(K * Bn, H))
    if (B, dtype) == (8, torch.float32):
        torch.library.opcheck(ops.pathway_sgd_lookahead_,
                              (dz, x, w.clone(), buf.clone(), *pc, 0.1, 0.9, 0.0, False, -1, xn))


# ------------------------------------------------------------------------------------------------
# The routed ops (tests/test_routed.py runs the small cases through the public functions): here
# groups spanning several row tiles, reductions of several tiles, an unused weight, strided
# operands, bitwise repetition and the float64 fallback, op by op against the compiled ops.
def _routed_ops_inputs(dtype: torch.dtype, device: str = "cpu"):
    """A plan of 2 sources, 4 weights (weight 1: no slot), 3 destinations; 120 samples x 3
    slots, most on weight 0 (> 256 rows: several row tiles, and a two-level sum in grad W), some
    unused; D_in = 300 (a two-level sum in the forward), D_out = 70 (two column tiles)."""
    plan = gated_ops.make_plan([0, 1, 0, 1, 1], [0, 0, 2, 3, 0], [0, 1, 2, 2, 1], num_sources=2,
                               num_weights=4, num_dst=3, device=device)
    B, k, Di, Do = 120, 3, 300, 70
    g = torch.Generator().manual_seed(5)
    idx = torch.multinomial(torch.tensor([0.35, 0.35, 0.07, 0.05, 0.18]), B * k,
                            replacement=True, generator=g).view(B, k)
    idx[torch.rand(B, k, generator=g) < 0.1] = -1

    def make(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)
    inp = dict(x=make(2, B, Di), xg=make(B * k, Di), weight=make(4, Do, Di) * Di ** -0.5,
               bias=make(4, Do), gate=make(B, k), gy=make(3, B, Do), gyg=make(B * k, Do))
    return inp, idx.to(device), plan


def _routed_ops(ns, inp, idx, plan):
    """Every routed op of namespace ns, both layouts: {name: output}."""
    P, T, S, M = plan.paths, plan.num_dst, plan.num_sources, plan.num_weights
    x, xg, w, b, g = (inp[n] for n in ("x", "xg", "weight", "bias", "gate"))
    route = ns.pathway_route(idx, P, M)
    y, z = ns.routed_matmul(x, w, b, g, idx, route, P, T, False, False)
    dz = ns.routed_grad_z(inp["gy"], g, idx, route, P, False)
    dzg = ns.routed_grad_z(inp["gyg"], None, idx, route, P, True)
    return dict(
        y=y, z=z, z_grouped=ns.routed_matmul(xg, w, b, None, idx, route, P, T, True, True)[0],
        grad_z=dz, grad_z_grouped=dzg,
        grad_x=ns.routed_grad_x(dz, w, idx, route, P, S, False),
        grad_x_grouped=ns.routed_grad_x(dz, w, idx, route, P, S, True),
        grad_weight=ns.routed_grad_weight(dz, x, idx, route, P, M, False),
        grad_weight_grouped=ns.routed_grad_weight(dzg, xg, idx, route, P, M, True),
        grad_bias=ns.routed_grad_bias(dz, route, M),
        grad_gate=ns.routed_grad_gate(inp["gy"], z, idx, route, P))


def test_routed_ops_on_many_tiles_equal_the_compiled_ops():
    """Each routed op in float32 against the compiled ops in float64 (the tolerance rule, plain
    = the compiled ops in float32), with x and the weight strided (gathered through their
    strides, never copied); a second run is bitwise the first (no atomics)."""
    from gated_ops.testing import _wider

    inp, idx, plan = _routed_ops_inputs(torch.float64)
    offsets = torch.ops.gated_ops.pathway_route(idx, plan.paths, 4)[-5:]
    assert offsets[1] > 4 * 64 and offsets[2] == offsets[1] and offsets[4] < idx.numel()
    ref = _routed_ops(torch.ops.gated_ops, inp, idx, plan)
    plain = _routed_ops(torch.ops.gated_ops, {n: t.float() for n, t in inp.items()}, idx, plan)
    tri_inp = {n: t.float().to(DEVICE) for n, t in inp.items()}
    tri_inp["x"] = _wider(tri_inp["x"], 1)
    tri_inp["weight"] = tri_inp["weight"].transpose(1, 2).contiguous().transpose(1, 2)
    tri_plan = plan.to(DEVICE)
    runs = [_routed_ops(torch.ops.gated_ops_triton, tri_inp, idx.to(DEVICE), tri_plan)
            for _ in range(2)]
    for name, want in ref.items():
        assert_close(f"routed: {name}", runs[0][name].cpu(), want, plain[name])
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_routed_float64_falls_back_to_the_compiled_ops():
    """float64 runs torch.ops.gated_ops.* (documented fallback): identical results."""
    inp, idx, plan = _routed_ops_inputs(torch.float64, DEVICE)
    want = _routed_ops(torch.ops.gated_ops, inp, idx, plan)
    for name, got in _routed_ops(torch.ops.gated_ops_triton, inp, idx, plan).items():
        assert torch.equal(got, want[name]), name


def test_triton_ops_have_the_schemas_of_the_compiled_ops():
    """gated_ops._C declares torch.ops.gated_ops_triton.* with the schemas of
    torch.ops.gated_ops.* (declared once: csrc/gated_ops.h, csrc/triton_schemas.cpp); each op has
    a Triton kernel for CUDA and for CPU (the interpreter), but for pathway_grad_x_gate, which
    has none and runs the composite of the two ops it fuses."""
    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("gated_ops::") and not n.startswith("gated_ops::_"))
    assert not hasattr(torch.ops.gated_ops_triton, "_force_kernel")  # (the C++ kernels' hook)
    assert "pathway_matmul" in names and "pathway_grad_x_gate" in names
    assert {"pathway_route", "routed_matmul", "routed_grad_gate"} <= set(names)
    for name in names:
        ours = getattr(torch.ops.gated_ops_triton, name).default._schema
        theirs = getattr(torch.ops.gated_ops, name).default._schema
        assert str(ours) == str(theirs).replace("gated_ops::", "gated_ops_triton::", 1)
        qualname = f"gated_ops_triton::{name}"
        has = {key: torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
               for key in ("CUDA", "CPU", "CompositeExplicitAutograd")}
        if name == "pathway_grad_x_gate":
            assert has == {"CUDA": False, "CPU": False, "CompositeExplicitAutograd": True}
        else:
            assert has["CUDA"] and has["CPU"], (name, has)


def test_without_triton_the_backend_names_the_extra_that_installs_it():
    """Where triton is not installed, importing gated_ops.triton, or asking for
    backend="triton", raises a ModuleNotFoundError (an ImportError) that names the extra."""
    import subprocess

    code = "\n".join([
        "import sys",
        "sys.modules['triton'] = None  # what `import triton` meets where it is not installed",
        "import torch, gated_ops",
        "plan = gated_ops.make_plan([0], [0], [0], num_sources=1, num_weights=1, num_dst=1)",
        "try:",
        "    gated_ops.pathway_matmul(torch.ones(1, 2, 3), torch.ones(1, 4, 3), plan,",
        "                             backend='triton')",
        "except ModuleNotFoundError as e:",
        "    print(e.name, '|', e)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    name, _, message = out.stdout.strip().partition(" | ")
    assert name == "triton"
    assert "pip install 'gated_ops[triton]'" in message
