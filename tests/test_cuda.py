"""The CUDA kernels (csrc/cuda/*.cu) and the Triton backend on a GPU: the whole shape table
forward and backward in float32 / bfloat16 / float16 against the float64 reference, the cuBLAS and
skinny paths, non-contiguous inputs, opcheck, float64 gradcheck, determinism, the fused SGD
against torch.optim.SGD, a CUDA-graph capture of a k-path training step, and the routed ops (the
route table, long groups, both grouped GEMMs, no host synchronisation, a captured MoE step).

Every test runs on two targets:
  * ``cuda``: on the GPU (marked ``gpu``: skipped without a CUDA device, see conftest.py);
  * ``emu``: the same CUDA kernels compiled for the CPU with the CUDA execution model emulated
    (gated_ops.cuda_emu; gated_ops.testing.cuda_emulation swaps the registered ops at the
    dispatcher), on CPU tensors, so CI runs this file without a GPU. Tests marked ``gpu`` here
    need the GPU itself (CUDA graphs, Inductor's GPU code, CUDA autocast, Triton) and run on the
    ``cuda`` target only.
Low-precision tolerances follow gated_ops.testing: "plain" is the reference computed in that dtype
on the target's device.
"""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

import gated_ops
from gated_ops import GatedPathwayLinear, SGDConfig, make_route, routed_linear
from experiments.kpath_net import KPathNet, kpath_gate
from gated_ops.reference import (gated_cross_entropy_ref, pathway_matmul_ref,
                                 routed_pathway_matmul_ref, sgd_momentum_ref)
from gated_ops.routed import moe_plan
from gated_ops.testing import (SHAPES, Case, Table, assert_close, cuda_emulation, force_kernel,
                               kernel_census, kpath_tables, make_inputs, replicate)
from helpers import (check_ce_backward_missing_grads, check_ce_backward_rejects_bad_input,
                     check_ce_special_values, check_layer_sgd_with_bias, check_strided_ce_logits,
                     gradcheck_pathway)

# Set per test by the `target` fixture: the device, the namespace holding the CUDA kernels, and
# the layers' backend that reaches them.
DEVICE = "cuda"
OPS = torch.ops.gated_ops
BACKEND = "auto"
NAMES = ["x", "weight", "bias", "gate"]
LOW = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _emulation_built() -> bool:
    try:
        import gated_ops.cuda_emu  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True, params=[pytest.param("cuda", marks=pytest.mark.gpu),
                                      pytest.param("emu", marks=pytest.mark.cuda_emu)])
def target(request):
    global DEVICE, OPS, BACKEND
    if request.param == "cuda":
        DEVICE, OPS, BACKEND = "cuda", torch.ops.gated_ops, "auto"
        yield request.param
        return
    if request.node.get_closest_marker("gpu"):
        pytest.skip("needs the GPU itself, not only its kernels")
    if not _emulation_built():
        if os.environ.get("GATED_OPS_REQUIRE_CUDA_EMU") == "1":
            pytest.fail("gated_ops._cuda_emu is not built (GATED_OPS_CUDA_EMU=1 pip install ...)")
        pytest.skip("gated_ops._cuda_emu is not built (GATED_OPS_CUDA_EMU=1 pip install ...)")
    DEVICE, OPS, BACKEND = "cpu", torch.ops.gated_ops_cudaemu, "cuda_emu"
    try:
        with cuda_emulation() as calls:
            yield request.param
        assert sum(calls.values()) > 0, "no op ran on the emulated CUDA kernels"
    finally:
        DEVICE, OPS, BACKEND = "cuda", torch.ops.gated_ops, "auto"


def _modes_off():
    """Outside the emulation's dispatch mode (on the emulated target): torch.ops.gated_ops.* then
    reach the CPU kernels (an independent reference) and OPS.* the emulated ones, as called;
    opcheck runs its own modes."""
    return _disable_current_modes() if DEVICE == "cpu" else contextlib.nullcontext()


# Rows that force the other code paths of the CUDA kernels (thresholds in csrc/cuda/common.cuh):
# B > 32 and ns*B > 64 (cuBLAS forward, grad_x, grad_W, SGD), nm*D_out > 512 (cuBLAS grad_x),
# grouped plans with several batch tiles, D_out not a multiple of the 32-row tiles, D_in not a
# multiple of 4 (scalar loads) and a long D_in (1100: nine 128-column steps of the skinny tiles).
EXTRA = [
    Case("wide_batch_decoder", replicate(kpath_tables(4)["decoder"], 2), 40, 24, 6),
    Case("wide_fanout", kpath_tables(8)["decoder"], 8, 16, 80, gate="path"),
    Case("grouped_wide_batch", Table((0, 1, 1, 2, 0), (1, 0, 2, 2, 1), (0, 0, 1, 2, 1), 3, 3, 3),
         40, 12, 9),
    Case("skinny_hidden_tiles", kpath_tables(5)["hidden"], 12, 36, 33),
    Case("long_d_in", kpath_tables(2)["encoder"], 3, 1100, 5, gate="path"),
    Case("odd_d_in_moe", Table((0,) * 3, (0, 1, 2), (0,) * 3, 1, 3, 1), 9, 7, 70),
]
ALL = SHAPES + EXTRA
SMALL = [c for c in ALL if not c.large]


def _run(fn, case: Case, dtype: torch.dtype, noncontiguous: bool = False, layout: str = "auto"):
    """fn's output and the gradients of <output, gy> w.r.t. the inputs, on the GPU."""
    inp = make_inputs(case, dtype=dtype, device=DEVICE, noncontiguous=noncontiguous)
    plan = case.table.plan(DEVICE, layout=layout)
    y = fn(inp, plan)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [inp[n] for n in NAMES if inp[n] is not None]
    grads = (torch.autograd.grad(y, leaves, gy.to(DEVICE, dtype), allow_unused=True)
             if y.numel() else [None] * len(leaves))
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)]
    return y.detach(), dict(zip([n for n in NAMES if inp[n] is not None],
                                [g.detach() for g in grads]))


def _reference(inp, plan):
    return pathway_matmul_ref(inp["x"], inp["weight"], inp["bias"], inp["gate"], plan.src,
                              plan.wgt, plan.dst, plan.num_dst)


def _compiled(inp, plan):
    return gated_ops.pathway_matmul(inp["x"], inp["weight"], plan, inp["bias"], inp["gate"])


def _triton(inp, plan):
    import gated_ops.triton as triton_ops
    return triton_ops.pathway_matmul(inp["x"], inp["weight"], plan, inp["bias"], inp["gate"])


def _check(fn, case: Case, dtype: torch.dtype, noncontiguous: bool = False,
           layout: str = "auto") -> None:
    y64, g64 = _run(_reference, case, torch.float64, noncontiguous)
    y_plain, g_plain = _run(_reference, case, dtype, noncontiguous)
    y, g = _run(fn, case, dtype, noncontiguous, layout)
    assert y.dtype == dtype and y.device.type == torch.device(DEVICE).type
    assert_close(f"{case.name}: y", y, y64, y_plain)
    for name in g64:
        assert_close(f"{case.name}: grad {name}", g[name], g64[name], g_plain[name])


@pytest.mark.parametrize("dtype", list(LOW.values()), ids=list(LOW))
@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_cuda_matches_reference(case, dtype):
    _check(_compiled, case, dtype)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_cuda_float64(case):
    """float64 (for gradcheck): the tolerance rule degenerates here (plain == reference), so an
    explicit 1e-10 that still catches any indexing or accumulation error."""
    y64, g64 = _run(_reference, case, torch.float64)
    y, g = _run(_compiled, case, torch.float64)
    torch.testing.assert_close(y, y64, rtol=1e-10, atol=1e-10)
    for name in g64:
        torch.testing.assert_close(g[name], g64[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_cuda_noncontiguous_inputs(case):
    _check(_compiled, case, torch.float32, noncontiguous=True)


@pytest.mark.parametrize("case", [c for c in ALL if c.table.plan().kind == "blocked"],
                         ids=lambda c: c.name)
def test_cuda_grouped_layout_on_blocked_tables(case):
    """The general (grouped) kernels on the k-path tables, paper sizes included."""
    _check(_compiled, case, torch.float32, layout="grouped")


@pytest.mark.gpu
def test_torch_compile_inductor_parity():
    """The CUDA ops under torch.compile (Inductor, fullgraph): the layer's forward and every
    gradient, and the fused loss, equal eager mode."""
    case = next(c for c in ALL if c.name == "odd_decoder")
    inp = make_inputs(case, dtype=torch.float32, device=DEVICE)
    plan = case.table.plan(DEVICE)
    target = torch.randint(0, case.d_out, (1, plan.num_dst, case.batch), device=DEVICE)
    gate = torch.rand(1, plan.num_dst, device=DEVICE) + 0.1

    def f(x, w, b, g):
        y = gated_ops.pathway_matmul(x, w, plan, b, g)
        loss, path_loss, _ = gated_ops.gated_cross_entropy(y.unsqueeze(0), target, gate)
        return loss.sum() + path_loss.square().sum()

    args = tuple(inp[n] for n in NAMES)
    eager = f(*args)
    ge = torch.autograd.grad(eager, args)
    compiled = torch.compile(f, fullgraph=True)(*args)
    gc = torch.autograd.grad(compiled, args)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_cuda_empty_batch_and_no_pathways():
    plan = gated_ops.make_plan([0, 1, 1], [0, 0, 1], [0, 1, 1], num_sources=2, num_weights=2,
                               num_dst=2, device=DEVICE)
    x0 = torch.randn(2, 0, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 5, 4, device=DEVICE, requires_grad=True)
    y = gated_ops.pathway_matmul(x0, w, plan)
    assert y.shape == (2, 0, 5)
    y.sum().backward()
    assert x0.grad.shape == x0.shape and torch.equal(w.grad, torch.zeros_like(w))
    empty = gated_ops.make_plan([], [], [], num_sources=2, num_weights=2, num_dst=4, device=DEVICE)
    x = torch.randn(2, 3, 4, device=DEVICE, requires_grad=True)
    w.grad = None
    y = gated_ops.pathway_matmul(x, w, empty)
    assert torch.equal(y, torch.zeros(4, 3, 5, device=DEVICE))
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(x.grad, torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------
OPCHECK_CASES = [c for c in SMALL if c.batch > 0 and c.table.num_paths > 0]


def _op_args(case: Case):
    inp = make_inputs(case, dtype=torch.float32, device=DEVICE, requires_grad=False)
    plan = case.table.plan(DEVICE)
    x, w, g = inp["x"], inp["weight"], inp["gate"]
    lay = list(plan.layout)
    S, M, B, Do = x.shape[0], w.shape[0], x.shape[1], w.shape[1]
    gy = torch.randn(plan.num_dst, B, Do, device=DEVICE)
    dz = OPS.pathway_grad_z(gy, g, plan.paths, plan.csr, lay, S, M)
    return inp, plan, lay, gy, dz


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
def test_opcheck_every_op(case):
    inp, plan, lay, gy, dz = _op_args(case)
    x, w, b, g = inp["x"], inp["weight"], inp["bias"], inp["gate"]
    S, M, B, Do = x.shape[0], w.shape[0], x.shape[1], w.shape[1]
    ops, pc = OPS, (plan.paths, plan.csr, lay)
    with _modes_off():
        _opcheck_every_op(ops, pc, x, w, b, g, gy, dz, S, M, B, Do)


def _opcheck_every_op(ops, pc, x, w, b, g, gy, dz, S, M, B, Do):
    torch.library.opcheck(ops.pathway_matmul, (x.requires_grad_(), w.requires_grad_(), b, g, *pc))
    x, w = x.detach(), w.detach()
    torch.library.opcheck(ops.pathway_grad_z, (gy, g, *pc, S, M))
    torch.library.opcheck(ops.pathway_grad_x, (dz, w, *pc, S, B))
    torch.library.opcheck(ops.pathway_grad_weight, (dz, x, *pc, M, Do))
    torch.library.opcheck(ops.pathway_grad_bias, (dz, *pc, S, M, Do))
    if g is not None:
        torch.library.opcheck(ops.pathway_grad_gate, (gy, x, w, b, g, *pc))
        # CUDA runs the composite of grad_z + grad_x and grad_gate (gated_ops/ops.py)
        torch.library.opcheck(ops.pathway_grad_x_gate, (gy, x, w, b, g, *pc))
    buf = torch.randn_like(w)
    torch.library.opcheck(ops.pathway_sgd_, (dz, x, w.clone(), buf, *pc, 0.1, 0.9, 0.01, False))
    bias = torch.randn(M, Do, device=DEVICE)
    torch.library.opcheck(ops.pathway_bias_sgd_,
                          (dz, bias, torch.randn_like(bias), *pc, S, M, 0.1, 0.9, 0.01, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("C", [6, 40], ids=["thread_per_row", "warp_per_row"])
def test_strided_five_dim_logits_equal_the_copied_four_dim_ones(C, dtype):
    """The CUDA kernels read the k-path's strided (R, I, J, B, C) logits in place and write the
    gradient in their strides (check_strided_ce_logits)."""
    check_strided_ce_logits(DEVICE, dtype, C)


def test_opcheck_cross_entropy():
    logits = torch.randn(2, 5, 3, 4, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 3), device=DEVICE)
    gate = torch.ones(2, 5, device=DEVICE)
    _, _, _, lse = OPS.gated_cross_entropy(logits, target, gate)
    with _modes_off():
        torch.library.opcheck(OPS.gated_cross_entropy, (logits, target, gate))
        torch.library.opcheck(OPS.gated_cross_entropy_backward,
                              (torch.ones(2, device=DEVICE), torch.randn(2, 5, device=DEVICE),
                               logits.detach(), target, gate, lse.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
def test_cross_entropy_backward_takes_missing_gradients(dtype):
    check_ce_backward_missing_grads(OPS, DEVICE, dtype, opcheck_context=_modes_off)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_weight_update_steps_the_layer_bias_in_its_launch(dtype):
    """The bias blocks of the weight update's launch (wgrad_kernel, sgd_kernel): the bits of
    pathway_bias_sgd_'s own kernel, skinny, wide (cuBLAS gradient) and grouped plans, with the
    lookahead too."""
    check_layer_sgd_with_bias(OPS, DEVICE, dtype, opcheck_context=_modes_off)


def test_cross_entropy_backward_rejects_bad_input():
    check_ce_backward_rejects_bad_input(OPS, DEVICE)


# (R, P, B, C), or (R, I, J, B, C) for the k-path's strided view: B = 32 is the row kernel's
# largest batch (a block of 32 x 32 threads), B = 33 takes the thread kernel on both sides; path
# counts off multiples of 32 leave lanes of the last block idle.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("shape", [(2, 100, 8, 10), (1, 37, 32, 3), (3, 5, 33, 4),
                                   (2, 3, 50, 8, 10)], ids=str)
def test_cross_entropy_row_kernel_is_bitwise_the_thread_kernel(shape, dtype):
    """The few-class forward's thread-per-row kernel (the default) gives the bits of the
    thread-per-path kernel (force_kernel(cuda_ce="thread")): loss, path losses, counts and lse,
    including NaN rows."""
    g = torch.Generator().manual_seed(3)
    R, B, C = shape[0], shape[-2], shape[-1]
    P = shape[1] * (shape[2] if len(shape) == 5 else 1)
    if len(shape) == 5:  # the decoder output (R*I, B, J*C) viewed as (R, I, J, B, C)
        out = 3 * torch.randn(R * shape[1], B, shape[2] * C, generator=g)
        logits = out.to(DEVICE, dtype).view(R, shape[1], B, shape[2], C).permute(0, 1, 3, 2, 4)
    else:
        logits = (3 * torch.randn(*shape, generator=g)).to(DEVICE, dtype)
        logits[0, 1, 0, 0] = float("nan")
    target = torch.randint(0, C, (R, P, B), generator=g).to(DEVICE)
    gate = (torch.rand(R, P, generator=g) < 0.5).to(DEVICE, dtype)
    gate[:, 0] = 1
    rows = OPS.gated_cross_entropy(logits, target, gate)
    with force_kernel(cuda_ce="thread"):
        thread = OPS.gated_cross_entropy(logits, target, gate)
    if DEVICE == "cpu":  # the emulation names its launches: each side ran its kernel
        def names():
            return [n for n, _ in kernel_census(lambda: OPS.gated_cross_entropy(logits, target,
                                                                                gate))]
        with force_kernel(cuda_ce="thread"):
            assert any(n.startswith("ce_forward_thread_kernel") for n in names())
        kernel = "ce_forward_thread_kernel" if B > 32 else "ce_forward_rows_kernel"
        assert any(n.startswith(kernel) for n in names()), names()
    for name, a, b in zip(("loss", "path_loss", "correct", "lse"), rows, thread):
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a[~a.isnan()], b[~b.isnan()]), name


def test_kpath_step_kernel_census():
    """What a GPU would launch for one fused k-path training step (gated_ops.testing.
    kernel_census over the emulated kernels; counts, not times): the cross-entropy's few-class
    forward on the row kernel, no zero-filled gradient in its backward (path_loss is not
    differentiated), and no more kernels than benchmarks/NOTES.md's census (19)."""
    if DEVICE != "cpu":
        pytest.skip("the census reads the emulated kernels' launch events")
    K, B, D, H = 10, 8, 32, 16  # K * B > 64: the shared layers take cuBLAS, as at K = 100
    torch.manual_seed(0)
    net = KPathNet(K, D, H, backend=BACKEND).fuse_sgd(SGDConfig(lr=0.01, momentum=0.9))
    xk = torch.randn(K, B, D)
    target = torch.randint(0, 10, (1, K * K, B))
    gate = kpath_gate(K, 3).flatten().unsqueeze(0)

    def step():
        net.loss(xk, target, gate)[0].sum().backward()
    step()
    census = kernel_census(step)
    names = [n for n, _ in census]
    assert sum(n.startswith("ce_forward_rows_kernel") for n in names) == 1, census
    fills = [(n, where) for n, where in census
             if n in ("aten::fill_", "aten::zero_") and "cross_entropy" in where]
    assert not fills, census
    # the fused encoder update: one launch, no weight gradient in memory (no bmm inside it)
    assert sum(n.startswith("kernel in launch_wgrad") for n in names) == 1, census
    # the forward: the encoder's tiles write y (every destination one pathway: no epilogue),
    # and the hidden layer and the wide decoder are one GEMM each, into y, with their bias
    forward = [n for n, where in census if where.endswith("pathway_matmul")]
    assert len(forward) == 3 and forward[1:] == ["aten::addmm"] * 2, census
    # each layer's bias steps in its weight update's launch: no launch of its own
    assert not any(n.startswith("kernel in launch_grad_bias") for n in names), census
    assert len(census) <= 19, census


@pytest.mark.parametrize("name", ["odd_decoder", "moe", "tiny_grouped"])
def test_gradcheck_float64(name):
    assert gradcheck_pathway(next(c for c in SHAPES if c.name == name), DEVICE)


@pytest.mark.parametrize("name", ["paper_encoder", "paper_decoder", "wide_batch_decoder",
                                  "grouped_wide_batch"])
def test_deterministic_bitwise(name):
    case = next(c for c in ALL if c.name == name)
    runs = [_run(_compiled, case, torch.float32) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for n in runs[0][1]:
        assert torch.equal(runs[0][1][n], runs[1][1][n]), n
    logits = torch.randn(2, 10000, 8, 10, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 10, (2, 10000, 8), device=DEVICE)
    gate = (torch.rand(2, 10000, device=DEVICE) < 0.5).float()
    outs = []
    for _ in range(2):
        loss, path_loss, correct = gated_ops.gated_cross_entropy(logits, target, gate)
        outs.append((loss, path_loss, correct, *torch.autograd.grad(loss.sum(), logits)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
SGD_CONFIGS = [SGDConfig(lr=0.1), SGDConfig(lr=0.05, momentum=0.9),
               SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-2),
               SGDConfig(lr=0.05, momentum=0.9, nesterov=True)]


def _sgd_module(kind: str) -> GatedPathwayLinear:
    torch.manual_seed(0)
    kw = dict(device=DEVICE)
    if kind == "batched":  # skinny fused kernel (the encoders)
        return GatedPathwayLinear.batched(4, 9, 6, **kw)
    if kind == "fanout":
        return GatedPathwayLinear.fanout(3, 2, 9, 6, replicas=2, **kw)
    if kind == "fanout_cublas":  # ns * B = 15 * 5 > 64: cuBLAS gradient + elementwise SGD
        return GatedPathwayLinear.fanout(15, 3, 9, 6, **kw)
    m = GatedPathwayLinear([0, 1, 1, 2], [0, 0, 2, 3], [0, 0, 1, 2], num_sources=3,
                           num_weights=5, num_dst=3, in_features=9, out_features=6, **kw)
    assert m.plan.kind == "grouped"  # with a weight that no pathway uses
    return m


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=["plain", "momentum", "weight_decay", "nesterov"])
@pytest.mark.parametrize("kind", ["batched", "fanout", "fanout_cublas", "grouped"])
def test_fused_sgd_equals_torch_optim_sgd(cfg, kind):
    m = _sgd_module(kind)
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    m.fuse_sgd(cfg)
    for _ in range(3):
        x = torch.randn(m.num_sources, 5, 9, device=DEVICE, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        gy = torch.randn(m.num_dst, 5, 6, device=DEVICE)
        (m(x) * gy).sum().backward()
        opt.zero_grad()
        (ref(x_ref) * gy).sum().backward()
        opt.step()
        assert m.weight.grad is None
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(m.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.bias, ref.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["batched", "fanout_cublas", "grouped"])
def test_fused_sgd_op_equals_reference_update_float64(kind):
    m = _sgd_module(kind).double()
    plan = m.plan
    S, M = plan.num_sources, plan.num_weights
    x = torch.randn(S, 5, 9, dtype=torch.float64, device=DEVICE)
    gy = torch.randn(plan.num_dst, 5, 6, dtype=torch.float64, device=DEVICE)
    lay = list(plan.layout)
    dz = torch.ops.gated_ops.pathway_grad_z(gy, None, plan.paths, plan.csr, lay, S, M)
    gw = torch.ops.gated_ops.pathway_grad_weight(dz, x, plan.paths, plan.csr, lay, M, 6)
    w, buf = m.weight.detach().clone(), torch.randn_like(m.weight.detach())
    w_ref, buf_ref = w.clone(), buf.clone()
    gated_ops.pathway_sgd_(dz, x, w, buf, plan, lr=0.3, momentum=0.8, weight_decay=0.1)
    sgd_momentum_ref(w_ref, gw, buf_ref, lr=0.3, momentum=0.8, weight_decay=0.1)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf, buf_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["batched", "fanout_cublas", "grouped"])
def test_bias_sgd_op_equals_reference_update_float64(kind):
    """pathway_bias_sgd_ (grad_bias with the step in its epilogue, one kernel) = the CPU op's
    bias gradient then sgd_momentum_ref, from a nonzero momentum buffer."""
    m = _sgd_module(kind).double()
    plan = m.plan
    S, M = plan.num_sources, plan.num_weights
    gy = torch.randn(plan.num_dst, 5, 6, dtype=torch.float64, device=DEVICE)
    lay = list(plan.layout)
    dz = torch.ops.gated_ops.pathway_grad_z(gy, None, plan.paths, plan.csr, lay, S, M)
    pc = plan.to("cpu")
    with _modes_off():  # the CPU kernel's bias gradient
        gb = torch.ops.gated_ops.pathway_grad_bias(dz.cpu(), pc.paths, pc.csr, lay, S, M, 6)
    b, buf = torch.randn(M, 6, dtype=torch.float64), torch.randn(M, 6, dtype=torch.float64)
    b_ref, buf_ref = b.clone(), buf.clone()
    b, buf = b.to(DEVICE), buf.to(DEVICE)
    gated_ops.pathway_bias_sgd_(dz, b, buf, plan, lr=0.3, momentum=0.8, weight_decay=0.1,
                                nesterov=True)
    sgd_momentum_ref(b_ref, gb, buf_ref, lr=0.3, momentum=0.8, weight_decay=0.1, nesterov=True)
    torch.testing.assert_close(b.cpu(), b_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf.cpu(), buf_ref, rtol=1e-12, atol=1e-12)


def test_fused_sgd_moe_router_grads_equal_torch_optim_sgd():
    """A fused-SGD MoE layer with a trained router on CUDA: x and gate gradients as the unfused
    layer's at the weights before the step, the step as torch.optim.SGD's."""
    torch.manual_seed(0)
    m = GatedPathwayLinear.mixture_of_experts(4, 9, 6, device=DEVICE)
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    m.fuse_sgd(SGDConfig(lr=0.1, momentum=0.9))
    for _ in range(2):
        x0 = torch.randn(1, 5, 9, device=DEVICE)
        gate0 = torch.softmax(torch.randn(4, 5, device=DEVICE), 0)
        gy = torch.randn(1, 5, 6, device=DEVICE)
        x, gate = x0.clone().requires_grad_(), gate0.clone().requires_grad_()
        x_ref, gate_ref = x0.clone().requires_grad_(), gate0.clone().requires_grad_()
        (m(x, gate) * gy).sum().backward()
        opt.zero_grad()
        (ref(x_ref, gate_ref) * gy).sum().backward()
        opt.step()
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(gate.grad, gate_ref.grad)
        torch.testing.assert_close(m.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.bias, ref.bias, rtol=1e-5, atol=1e-6)


def _kpath_step(net: KPathNet, xk, target, gate) -> None:
    loss, _, _ = net.loss(xk, target, gate)
    loss.sum().backward()


@pytest.mark.gpu
def test_kpath_training_step_cuda_graph_equals_eager():
    """Forward, fused loss, backward and fused SGD captured once and replayed = the eager steps
    (bitwise: same kernels in the same order; capture also proves there is no host sync)."""
    K, R, B, D, H, C = 4, 2, 8, 20, 12, 5

    def make() -> KPathNet:
        torch.manual_seed(0)
        return KPathNet(K, D, H, C, replicas=R, device=DEVICE).fuse_sgd(
            SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-3))

    eager, graphed = make(), make()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(R * K, B, D, generator=g).to(DEVICE),
                torch.randint(0, C, (R, K * K, B), generator=g).to(DEVICE)) for _ in range(6)]
    gate = kpath_gate(K, 2).reshape(1, K * K).expand(R, -1).contiguous().to(DEVICE)
    static_x = torch.zeros(R * K, B, D, device=DEVICE)
    static_t = torch.zeros(R, K * K, B, dtype=torch.int64, device=DEVICE)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps (they train), mirrored by the eager model
        for xb, tb in batches[:3]:
            static_x.copy_(xb)
            static_t.copy_(tb)
            _kpath_step(graphed, static_x, static_t, gate)
    torch.cuda.current_stream().wait_stream(side)
    for xb, tb in batches[:3]:
        _kpath_step(eager, xb, tb, gate)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _kpath_step(graphed, static_x, static_t, gate)
    for xb, tb in batches[3:]:
        static_x.copy_(xb)
        static_t.copy_(tb)
        graph.replay()
        _kpath_step(eager, xb, tb, gate)
        torch.cuda.synchronize()
        for (name, a), (_, b) in zip(graphed.state_dict().items(), eager.state_dict().items()):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_eager_kpath_step_never_synchronises_with_the_host(dtype, backend):
    """An eager fused k-path step (forward, fused loss, backward, fused SGD; in bfloat16 with
    stochastic rounding, whose step counter the kernels read on the device) makes no
    synchronising CUDA call: under torch.cuda.set_sync_debug_mode("error") one would raise.
    So the host queues steps ahead of the GPU, as a captured graph needs too."""
    if backend == "triton":
        pytest.importorskip("gated_ops.triton")
    K, R, B, D, H, C = 4, 2, 8, 20, 12, 5
    torch.manual_seed(0)
    net = KPathNet(K, D, H, C, replicas=R, device=DEVICE, dtype=dtype, backend=backend)
    net.fuse_sgd(SGDConfig(lr=0.05, momentum=0.9,
                           stochastic_rounding=dtype == torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    xk = torch.randn(R * K, B, D, generator=g).to(DEVICE, dtype)
    target = torch.randint(0, C, (R, K * K, B), generator=g).to(DEVICE)
    gate = kpath_gate(K, 2).reshape(1, K * K).expand(R, -1).contiguous().to(DEVICE, dtype)
    _kpath_step(net, xk, target, gate)  # warm-up: compilation, workspaces, handles
    torch.cuda.synchronize()
    before = net.encoder.weight.detach().clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _kpath_step(net, xk, target, gate)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not torch.equal(net.encoder.weight, before)  # the steps trained


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(LOW.values()), ids=list(LOW))
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (3, 16, 5, 7), (2, 100, 8, 10),
                                   (1, 10000, 8, 10), (2, 3, 4, 1000)], ids=str)
def test_gated_cross_entropy_matches_reference(shape, dtype):
    w = torch.randn(shape[:2], dtype=torch.float64, device=DEVICE)
    outs = []
    for fn, dt in ((gated_cross_entropy_ref, torch.float64), (gated_cross_entropy_ref, dtype),
                   (gated_ops.gated_cross_entropy, dtype)):
        g = torch.Generator().manual_seed(0)
        logits = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE, dt)
        target = torch.randint(0, shape[3], shape[:3], generator=g).to(DEVICE)
        gate = (torch.rand(shape[:2], generator=g) < 0.5).to(DEVICE, dt)
        gate[:, 0] = 1
        logits.requires_grad_()
        gate.requires_grad_()
        loss, path_loss, correct = fn(logits, target, gate)
        grads = torch.autograd.grad(loss.sum() + (path_loss * w.to(dt)).sum(), (logits, gate))
        outs.append([t.detach() for t in (loss, path_loss, correct, *grads)])
    ref, plain, out = outs
    for i, name in enumerate(("loss", "path_loss", "correct", "grad logits", "grad gate")):
        if name == "correct":
            if dtype == torch.float32:  # 16-bit logits may round two classes into a tie
                assert torch.equal(out[i], ref[i])
            assert out[i].dtype == torch.int64
        else:
            assert_close(name, out[i], ref[i], plain[i])


def test_gated_cross_entropy_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).to(DEVICE)
    target = torch.randint(0, 4, (2, 5, 3), generator=g).to(DEVICE)
    gate = torch.rand(2, 5, generator=g, dtype=torch.float64).to(DEVICE) + 0.1
    f = lambda lg, gt: gated_ops.gated_cross_entropy(lg, target, gt)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(f, (logits.requires_grad_(), gate.requires_grad_()))


def test_gated_cross_entropy_nan_inf_ties_and_zero_gate_sum():
    check_ce_special_values(gated_ops.gated_cross_entropy, DEVICE)


# ------------------------------------------------------------------------------------------------
# The paper's layers and the structures the small table adds (summing destinations, replicas,
# a batch over 32): each distinct shape costs Triton compilations, so not the whole table.
TRITON_CASES = [c for c in ALL if c.large or c.name in (
    "odd_decoder", "moe", "replicas_hidden", "wide_batch_decoder", "long_d_in")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(LOW.values()), ids=list(LOW))
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_triton_backend_matches_reference(case, dtype):
    pytest.importorskip("triton")
    _check(_triton, case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(LOW.values()), ids=list(LOW))
def test_triton_cross_entropy_matches_reference(dtype):
    triton_ops = pytest.importorskip("gated_ops.triton")
    shape = (2, 10000, 8, 10)
    w = torch.randn(shape[:2], dtype=torch.float64, device=DEVICE)
    outs = []
    for fn, dt in ((gated_cross_entropy_ref, torch.float64), (gated_cross_entropy_ref, dtype),
                   (triton_ops.gated_cross_entropy, dtype)):
        g = torch.Generator().manual_seed(0)
        logits = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE, dt)
        target = torch.randint(0, shape[3], shape[:3], generator=g).to(DEVICE)
        gate = torch.ones(shape[:2], device=DEVICE, dtype=dt)
        logits.requires_grad_()
        loss, path_loss, _ = fn(logits, target, gate)
        (gl,) = torch.autograd.grad(loss.sum() + (path_loss * w.to(dt)).sum(), (logits,))
        outs.append([t.detach() for t in (loss, path_loss, gl)])
    for i, name in enumerate(("loss", "path_loss", "grad logits")):
        assert_close(name, outs[2][i], outs[0][i], outs[1][i])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("lookahead", [False, True], ids=["plain", "lookahead"])
def test_stochastic_rounding_step_captured_in_a_cuda_graph_equals_eager(backend, lookahead):
    """A bfloat16 layer with stochastic rounding, its step (forward, backward, fused SGD with
    the bias's, and with the lookahead's forward) captured once and replayed: bit for bit the
    eager steps. The kernels read the step counter on the device (rounding_step) and the layer
    advances it there, so each replay draws the bits of its own step; a graph that replayed one
    seed would leave other weights than the eager steps after the second replay."""
    if backend == "triton":
        pytest.importorskip("gated_ops.triton")

    def make() -> GatedPathwayLinear:
        torch.manual_seed(0)
        m = GatedPathwayLinear.batched(3, 40, 24, device=DEVICE, dtype=torch.bfloat16,
                                       backend=backend)
        return m.fuse_sgd(SGDConfig(lr=2.0 ** -9, momentum=0.9, stochastic_rounding=True))

    def step(m, x, x_next, y) -> None:
        if lookahead:
            m.forward_lookahead(x, x_next, y).float().square().sum().backward()
        else:
            m(x).float().square().sum().backward()

    eager, graphed = make(), make()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 8, 40, generator=g).to(DEVICE, torch.bfloat16) for _ in range(7)]
    static_x, static_n = torch.zeros_like(xs[0]), torch.zeros_like(xs[0])
    static_y = torch.empty(3, 8, 24, device=DEVICE, dtype=torch.bfloat16)
    y_eager = torch.empty_like(static_y)
    if lookahead:
        graphed.prime_lookahead(xs[0], static_y)
        eager.prime_lookahead(xs[0], y_eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a warm-up step (it trains), mirrored by the eager model
        static_x.copy_(xs[0])
        static_n.copy_(xs[1])
        step(graphed, static_x, static_n, static_y)
    torch.cuda.current_stream().wait_stream(side)
    step(eager, xs[0], xs[1], y_eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, static_x, static_n, static_y)
    for i in range(1, 5):
        static_x.copy_(xs[i])
        static_n.copy_(xs[i + 1])
        graph.replay()
        step(eager, xs[i], xs[i + 1], y_eager)
        torch.cuda.synchronize()
        for (name, a), (_, b) in zip(graphed.state_dict().items(), eager.state_dict().items()):
            assert torch.equal(a, b), f"{name} after replay {i}"
    assert int(graphed.sgd_step) == int(eager.sgd_step) == 5


def _sr_plan(kind: str):
    """(plan, B) for the stochastic-rounding tests: each kind takes another path of the update."""
    mk = gated_ops.make_plan
    if kind == "skinny":  # encoders: 5 rows per weight, the fused kernel with one chunk
        return mk(range(3), range(3), range(3), num_sources=3, num_weights=3, num_dst=3), 5
    if kind == "chunked":  # fan-out, 2 sources x 3 weights: 10 rows per weight, chunked sums
        return mk([0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2], range(6), num_sources=2,
                  num_weights=3, num_dst=6), 5
    if kind == "grouped":
        return mk([0, 0, 1], [0, 1, 1], [0, 1, 0], num_sources=2, num_weights=2, num_dst=2), 5
    # wide: one weight shared by 12 sources of 8 rows (96 > 64: cuBLAS, then the update kernel)
    return mk(range(12), [0] * 12, range(12), num_sources=12, num_weights=1, num_dst=12), 8


@pytest.mark.parametrize("kind", ["skinny", "chunked", "grouped", "wide"])
def test_stochastic_rounding_is_bitwise_the_cpu_kernels(kind):
    """bfloat16 weights and biases with rounding_seed >= 0: the CUDA kernels (the fused
    skinny update, one chunk or chunked, grouped, the cuBLAS gradient then the update kernel of
    wide blocks, the bias sum's step, the lookahead's update) store bit for bit the CPU kernels'
    bits: the exact float32 step rounded by reference.round_stochastic_bf16, the momentum
    rounded to nearest. Integer dZ and x and weights on a 2^-6 grid make the gradient and the
    step exact in any summation order, so every comparison of parameters is bitwise."""
    from gated_ops.reference import round_stochastic_bf16, rounding_seed_at

    plan, B = _sr_plan(kind)
    S, M, Di, Do = plan.num_sources, plan.num_weights, 37, 6
    lay, g = list(plan.layout), torch.Generator().manual_seed(3)
    bf = torch.bfloat16
    x = torch.randint(-1, 2, (S, B, Di), generator=g).to(bf)
    xn = torch.randint(-1, 2, (S, B, Di), generator=g).to(bf)
    dz = torch.randint(-1, 2, plan.z_shape(B, Do), generator=g).to(bf)
    w0 = (torch.randint(-64, 65, (M, Do, Di), generator=g) / 64).to(bf)
    b0 = (torch.randint(-64, 65, (M, Do), generator=g) / 64).to(bf)
    lr, mom, seed = 2.0 ** -10, 0.5, 1234
    with _modes_off():
        gw = torch.ops.gated_ops.pathway_grad_weight(dz.float(), x.float(), plan.paths,
                                                     plan.csr, lay, M, Do)
        gb = torch.ops.gated_ops.pathway_grad_bias(dz.float(), plan.paths, plan.csr, lay, S, M,
                                                   Do)
    expect_w = round_stochastic_bf16(w0.float() - lr * gw, seed)
    expect_b = round_stochastic_bf16(b0.float() - lr * gb, seed + 1)
    assert not torch.equal(expect_w, (w0.float() - lr * gw).to(bf))  # rounding matters here
    dev = plan.to(DEVICE)
    results = {}
    ops = torch.ops.gated_ops  # the target's kernels inside the emulation's mode, else the CPU's
    # The same seeds from a stream and a step counter (rounding_step, read where the kernel
    # runs): rounding_seed_at(base, step) = seed, with a step beyond 32 bits.
    step_value = 2 ** 33 + 12345
    base = (seed - step_value * 0x9E3779B1) % 2 ** 31
    assert rounding_seed_at(base, step_value) == seed
    assert rounding_seed_at(base + 1, step_value) == seed + 1
    for name, mode, d, p in (("target", contextlib.nullcontext, DEVICE, dev),
                             ("target_step", contextlib.nullcontext, DEVICE, dev),
                             ("cpu", _modes_off, "cpu", plan),
                             ("cpu_step", _modes_off, "cpu", plan)):
        with mode():
            st = torch.tensor(step_value, device=d) if name.endswith("_step") else None
            s0 = seed if st is None else base
            w, wbuf = w0.clone().to(d), torch.zeros(M, Do, Di, dtype=bf, device=d)
            b, bbuf = b0.clone().to(d), torch.zeros(M, Do, dtype=bf, device=d)
            ops.pathway_sgd_(dz.to(d), x.to(d), w, wbuf, p.paths, p.csr, lay, lr, mom, 0.0,
                             False, s0, st)
            ops.pathway_bias_sgd_(dz.to(d), b, bbuf, p.paths, p.csr, lay, S, M, lr, mom, 0.0,
                                  False, s0 + 1, st)
            wl, wlbuf = w0.clone().to(d), torch.zeros(M, Do, Di, dtype=bf, device=d)
            zn = ops.pathway_sgd_lookahead_(dz.to(d), x.to(d), wl, wlbuf, p.paths, p.csr, lay,
                                            lr, mom, 0.0, False, s0, xn.to(d), st)
            assert st is None or int(st) == step_value  # read, not advanced
        results[name] = [t.cpu() for t in (w, wbuf, b, bbuf, wl, wlbuf, zn)]
        assert torch.equal(results[name][0].view(torch.int16), expect_w.view(torch.int16)), name
        assert torch.equal(results[name][2].view(torch.int16), expect_b.view(torch.int16)), name
        assert torch.equal(results[name][1], gw.to(bf)) and torch.equal(results[name][3],
                                                                       gb.to(bf)), name
        assert torch.equal(results[name][4].view(torch.int16), expect_w.view(torch.int16)), name
        assert torch.equal(results[name][5], gw.to(bf)), name
    # The lookahead's Z is the forward of the stored (stochastically rounded) weights. Those are
    # multiples of 2^-10 below 2 and x is in {-1, 0, 1}, so Z's float32 sums are exact in any
    # order and rounded once: bitwise comparisons again.
    z_ref = pathway_matmul_ref(xn.double(), expect_w.double(), None, None, plan.src, plan.wgt,
                               plan.dst, plan.num_dst).to(bf)
    if plan.z_is_y:  # Z is y without the bias
        assert torch.equal(results["target"][6].view_as(z_ref), z_ref)
    assert torch.equal(results["target"][6], results["cpu"][6])
    for name in ("target", "cpu"):
        for i, (a, b) in enumerate(zip(results[name], results[name + "_step"])):
            assert torch.equal(a, b), (name, i)


def test_stochastic_rounding_is_for_bfloat16_parameters_on_cuda():
    """rounding_seed >= 0 on float32 / float16 parameters is refused with the CPU op's words,
    and on the GPU a rounding_step on another device than the parameter."""
    plan, B = _sr_plan("skinny")
    dev = plan.to(DEVICE)
    lay = list(plan.layout)
    for dt in (torch.float32, torch.float16):
        x = torch.zeros(3, B, 8, device=DEVICE, dtype=dt)
        dz = torch.zeros(plan.z_shape(B, 4), device=DEVICE, dtype=dt)
        w, b = torch.zeros(3, 4, 8, device=DEVICE, dtype=dt), torch.zeros(3, 4, device=DEVICE,
                                                                         dtype=dt)
        with pytest.raises(RuntimeError, match="stochastic rounding .* is for bfloat16 weights"):
            torch.ops.gated_ops.pathway_sgd_(dz, x, w, None, dev.paths, dev.csr, lay, 0.1, 0.0,
                                             0.0, False, 0)
        with pytest.raises(RuntimeError, match="stochastic rounding .* is for bfloat16 biases"):
            torch.ops.gated_ops.pathway_bias_sgd_(dz, b, None, dev.paths, dev.csr, lay, 3, 3, 0.1,
                                                  0.0, 0.0, False, 0)
    if DEVICE == "cuda":  # (the emulation's tensors are all on the CPU)
        x, dz = (t.to(torch.bfloat16) for t in (x, dz))
        w, b = w.to(torch.bfloat16), b.to(torch.bfloat16)
        with pytest.raises(RuntimeError, match="rounding_step: expected a tensor on the "
                                               "weights' device"):
            torch.ops.gated_ops.pathway_sgd_(dz, x, w, None, dev.paths, dev.csr, lay, 0.1, 0.0,
                                             0.0, False, 0, torch.tensor(1))
        with pytest.raises(RuntimeError, match="rounding_step: expected a tensor on the "
                                               "biases' device"):
            torch.ops.gated_ops.pathway_bias_sgd_(dz, b, None, dev.paths, dev.csr, lay, 3, 3, 0.1,
                                                  0.0, 0.0, False, 0, torch.tensor(1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_autocast_cuda_runs_the_layer_and_loss_like_torch(dtype):
    """In a CUDA autocast region the layer runs in the region's dtype (bit for bit the inputs
    cast by hand) and the loss in float32."""
    torch.manual_seed(0)
    m = GatedPathwayLinear.mixture_of_experts(4, 16, 8, device=DEVICE)
    x = torch.randn(1, 5, 16, device=DEVICE)
    gate = torch.softmax(torch.randn(4, 5, device=DEVICE), 0)
    with torch.autocast("cuda", dtype=dtype):
        y = m(x, gate)
    y_ref = gated_ops.pathway_matmul(x.to(dtype), m.weight.detach().to(dtype), m.plan,
                                     m.bias.detach().to(dtype), gate.to(dtype))
    assert y.dtype == dtype and torch.equal(y, y_ref)
    logits = torch.randn(1, 6, 4, 5, device=DEVICE).to(dtype)
    target = torch.randint(0, 5, (1, 6, 4), device=DEVICE)
    g = torch.ones(1, 6, device=DEVICE)
    with torch.autocast("cuda", dtype=dtype):
        loss, _, _ = gated_ops.gated_cross_entropy(logits, target, g)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, gated_ops.gated_cross_entropy(logits.float(), target, g)[0])


# ------------------------------------------------------------------------------------------------
# The routed (sparse) ops (csrc/cuda/routed.cu). tests/test_routed.py runs the routed shape table
# on every backend; here: the route table bit for bit the CPU's, groups and dimensions longer
# than one 32 x 32 tile, the two grouped-GEMM paths, and no host synchronisation.
def _route_plan():
    """7 pathways on 5 weights (weight 4 never used; weights 0 and 2 shared by several
    pathways), 2 sources, 3 destinations."""
    return gated_ops.make_plan([0, 1, 0, 1, 0, 1, 1], [2, 0, 2, 1, 3, 0, 2], [0, 1, 2, 0, 1, 2, 2],
                               num_sources=2, num_weights=5, num_dst=3, device=DEVICE)


def _route_idx(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    B, k, P = 300, 3, 7  # 900 slots: several blocks of every flat kernel
    if kind == "random":  # duplicates and unused slots included
        idx = torch.randint(-1, P, (B, k), generator=g)
    elif kind == "one_weight":  # pathways 0, 2 and 6 all use weight 2
        idx = torch.tensor([0, 2, 6])[torch.randint(0, 3, (B, k), generator=g)]
    elif kind == "unused":
        idx = torch.full((B, k), -1)
    elif kind == "empty":
        idx = torch.zeros(0, k, dtype=torch.int64)
    else:  # "no_slots": k = 0
        idx = torch.zeros(B, 0, dtype=torch.int64)
    return idx


@pytest.mark.parametrize("kind", ["random", "one_weight", "unused", "empty", "no_slots"])
def test_route_table_is_the_cpu_table_bit_for_bit(kind):
    """pathway_route on the device (a sort of unique keys, no atomics) writes exactly the CPU's
    counting sort: order stable by slot within a weight, unused slots last, pos its inverse,
    offsets[M] the number of used slots; non-contiguous idx read as its values."""
    plan = _route_plan()
    idx = _route_idx(kind)
    with _modes_off():
        want = torch.ops.gated_ops.pathway_route(idx, plan.paths.cpu(), plan.num_weights)
    got = OPS.pathway_route(idx.to(DEVICE), plan.paths, plan.num_weights)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)
    if idx.numel():  # a strided view of the same values
        wide = torch.stack([idx, idx], 2).to(DEVICE)[..., 0]
        assert not wide.is_contiguous()
        assert torch.equal(OPS.pathway_route(wide, plan.paths, plan.num_weights).cpu(), want)


def test_routed_bad_index_is_a_device_side_assert():
    """Without a host synchronisation the CUDA kernels cannot raise on a bad pathway index as
    the CPU does: it fails a device-side assert (on a GPU the next CUDA call fails, and the
    context is lost: emulation only)."""
    if DEVICE != "cpu":
        pytest.skip("a device-side assert leaves the CUDA context unusable")
    plan = _route_plan()
    good = OPS.pathway_route(torch.tensor([[0, 6]]), plan.paths, plan.num_weights)
    for idx in (torch.tensor([[0, 7]]), torch.tensor([[-2, 1]])):
        with pytest.raises(RuntimeError, match="device-side assertion .*idx: pathway index"):
            OPS.pathway_route(idx, plan.paths, plan.num_weights)
    x, w = torch.randn(2, 1, 4), torch.randn(5, 3, 4)
    with pytest.raises(RuntimeError, match="device-side assertion .*idx: pathway index"):
        OPS.routed_matmul(x, w, None, None, torch.tensor([[0, 9]]), good, plan.paths, 3)


def _routed_outputs(x, w, b, idx, gate, plan, backend):
    """y and the gradients of <y, gy> w.r.t. x, w, b and the gate (gy fixed per shape)."""
    leaves = [x, w, b, gate]
    if backend == "reference":
        y = routed_pathway_matmul_ref(x, w, b, idx, gate, plan.src, plan.wgt, plan.dst,
                                      plan.num_dst)
    else:
        y = gated_ops.routed_pathway_matmul(x, w, plan, idx, gate, b, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, gy.to(y.device, y.dtype))
    return [t.detach() for t in (y, *grads)]


def _routed_check(x64, w64, b64, idx, g64, table: Table, dtype, **force) -> None:
    """The routed op on the CUDA kernels in ``dtype`` against the float64 reference, under the
    tolerance rule (plain: the reference in ``dtype`` on the CPU; float64: within 1e-10)."""
    names = ("y", "grad x", "grad weight", "grad bias", "grad gate")

    def run(device, dt, backend):
        x, w, b, g = (t.detach().to(device, dt).requires_grad_() for t in (x64, w64, b64, g64))
        return _routed_outputs(x, w, b, idx.to(device), g, table.plan(device), backend)
    ref, plain = run("cpu", torch.float64, "reference"), run("cpu", dtype, "reference")
    with force_kernel(**force):
        got = run(DEVICE, dtype, BACKEND)
    for name, a, r, p in zip(names, got, ref, plain):
        assert a.dtype == dtype
        if dtype == torch.float64:  # (the rule degenerates: plain is the reference; as above)
            torch.testing.assert_close(a.cpu(), r, rtol=1e-10, atol=1e-10, msg=name)
        else:
            assert_close(name, a.cpu(), r, p)


def _routed_case(T: int, k: int, d_in: int, d_out: int, seed: int = 0):
    """A mixture of 4 experts over T tokens and a pathway table with summing destinations, some
    slots unused, every expert's group longer than one 32-row tile (T k / 4 > 32)."""
    g = torch.Generator().manual_seed(seed)
    table = Table((0, 1, 0, 1, 0), (0, 1, 2, 3, 1), (0, 0, 1, 1, 1), 2, 4, 2)
    P = table.num_paths
    idx = torch.stack([torch.randperm(P, generator=g)[:k] for _ in range(T)])
    idx[torch.rand(T, k, generator=g) < 0.15] = -1
    x = torch.randn(table.num_sources, T, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(table.num_weights, d_out, d_in, generator=g, dtype=torch.float64) * d_in ** -0.5
    b = torch.randn(table.num_weights, d_out, generator=g, dtype=torch.float64)
    gate = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, idx, gate, table


@pytest.mark.parametrize("dtype", [torch.float64, *LOW.values()], ids=["f64", *LOW])
def test_routed_groups_longer_than_a_tile(dtype):
    """Groups of ~90 rows (3 row tiles, the last one partial), D_in = 70 (three K steps, the
    last partial) and D_out = 45 (two column tiles): forward and every gradient against the
    float64 reference; the tiled grouped GEMM (the only one for float32 / float64 / float16)."""
    _routed_check(*_routed_case(T=150, k=3, d_in=70, d_out=45), dtype)


@pytest.mark.parametrize("path", ["tiled", "grouped_mm"])
def test_routed_bfloat16_on_both_grouped_gemms(path):
    """bfloat16, dimensions multiples of 8: our tiled GEMM, and at::_grouped_mm (torch's CUTLASS
    grouped GEMM on sm90 / sm100, the automatic choice there; on the emulation torch's CPU
    grouped GEMM) with the gather, bias and zero-row kernels around it: both within the
    tolerance rule, for a combined output and for the expert MLP's grouped rows."""
    x, w, b, idx, gate, table = _routed_case(T=120, k=2, d_in=64, d_out=40, seed=1)
    _routed_check(x, w, b, idx, gate, table, torch.bfloat16, cuda_routed_gemm=path)
    if DEVICE == "cpu":  # which GEMM ran (the census reads the emulated launches)
        plan = table.plan(DEVICE)
        xb, wb, gb = (t.to(torch.bfloat16) for t in (x, w, gate))
        with force_kernel(cuda_routed_gemm=path):
            names = [n for n, _ in kernel_census(lambda: gated_ops.routed_pathway_matmul(
                xb, wb, plan, idx, gb, backend=BACKEND))]
        ours = any(n.startswith("gemm_kernel in routed_gemm") for n in names)
        torchs = any(n.startswith("routed_rows_fixup_kernel") for n in names)  # (after it)
        assert (torchs, ours) == (path == "grouped_mm", path == "tiled"), names
    # the expert MLP: x -> grouped rows -> gelu -> combined output, over one route
    T, E, D, H, k = 96, 4, 32, 48, 2
    g = torch.Generator().manual_seed(2)
    mk = [torch.randn(*s, generator=g, dtype=torch.float64) * c
          for s, c in (((T, D), 1.0), ((E, H, D), D ** -0.5), ((E, H), 1.0), ((E, D, H), H ** -0.5),
                       ((E, D), 1.0))]
    topw, topi = torch.rand(T, E, generator=g, dtype=torch.float64).softmax(-1).topk(k, -1)
    topi[::7, 1] = -1

    def mlp_ref(x, w1, b1, w2, b2, tw):
        e = topi.clamp_min(0)
        h = torch.einsum("td,tkhd->tkh", x, w1[e]) + b1[e]
        o = torch.einsum("tkh,tkdh->tkd", torch.nn.functional.gelu(h), w2[e]) + b2[e]
        return (o * (tw * (topi >= 0)).unsqueeze(-1)).sum(1)

    def mlp(x, w1, b1, w2, b2, tw):
        route = make_route(topi.to(DEVICE), moe_plan(E, DEVICE), backend=BACKEND)
        h = routed_linear(x.unsqueeze(0), w1, b1, route, grouped_out=True, backend=BACKEND)
        return routed_linear(torch.nn.functional.gelu(h), w2, b2, route, tw, grouped_in=True,
                             backend=BACKEND)[0]

    outs = []
    for fn, device, dt in ((mlp_ref, "cpu", torch.float64), (mlp_ref, "cpu", torch.bfloat16),
                           (mlp, DEVICE, torch.bfloat16)):
        leaves = [t.to(device, dt).requires_grad_() for t in (*mk, topw)]
        with force_kernel(cuda_routed_gemm=path):
            y = fn(*leaves)
            gy = torch.randn(T, D, generator=torch.Generator().manual_seed(3),
                             dtype=torch.float64)
            grads = torch.autograd.grad(y, leaves, gy.to(device, dt))
        outs.append([t.detach().cpu() for t in (y, *grads)])
    for i, (a, r, p) in enumerate(zip(outs[2], outs[0], outs[1])):
        assert_close(f"expert MLP output {i}", a, r, p)


_HOST_READS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero",
               "aten::equal", "aten::bincount", "aten::masked_select", "aten::unique",
               "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave")


def test_routed_moe_step_kernel_census():
    """What a GPU would launch for a routed MoE layer's forward and backward (the router
    trained through the gates), read from the emulated kernels: one route (keys, a sort, the
    table), two grouped GEMMs (z, grad_x) each after its tile-start scan, two per-sample
    epilogues, one kernel per other gradient; inside the routed ops no ATen work besides the
    route's sort (no fill, no copy); and no operation that reads a device value on the host
    (item, nonzero, ...: each a synchronisation on a GPU)."""
    if DEVICE != "cpu":
        pytest.skip("the census reads the emulated kernels' launch events")
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    T, D, H, E, k = 40, 24, 16, 4, 2
    x = torch.randn(T, D, requires_grad=True)
    w = torch.randn(E, H, D, requires_grad=True)
    b = torch.randn(E, H, requires_grad=True)
    router = torch.randn(T, E, requires_grad=True)

    def step():
        topw, topi = router.softmax(-1).topk(k, -1)
        gated_ops.routed_matmul(x, w, topi, topw, b).square().sum().backward()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    reads = sorted({e.name for e in prof.events() if e.name in _HOST_READS})
    assert not reads, reads
    census = kernel_census(step)
    names = [n for n, _ in census]
    for kernel, count in (("route_keys_kernel in", 1), ("route_table_kernel in", 1),
                          ("route_tile_starts_kernel in", 2), ("gemm_kernel in routed_gemm", 2),
                          ("combine_kernel in launch_combine", 2), ("routed_grad_z_kernel", 1),
                          ("wgrad_kernel in routed_grad_weight_cuda", 1),
                          ("routed_grad_bias_kernel", 1),
                          ("routed_grad_gate_kernel", 1)):
        assert sum(kernel in n for n in names) == count, (kernel, census)
    aten = [(n, where) for n, where in census
            if n.startswith("aten::") and "::routed_" in where]
    assert not aten, aten


def _routed_moe_step(x, w, b, topi, topw):
    y = gated_ops.routed_matmul(x, w, topi, topw, b)
    return (y, *torch.autograd.grad(y.square().sum(), [x, w, b, topw]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_routed_moe_step_never_synchronises_with_the_host(dtype):
    """A routed MoE forward and backward (route, grouped GEMMs: at::_grouped_mm for bfloat16 on
    sm90 / sm100, epilogues, gradients) makes no synchronising CUDA call."""
    torch.manual_seed(0)
    T, D, H, E, k = 64, 32, 24, 8, 2
    x = torch.randn(T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(E, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.randn(E, H, device=DEVICE, dtype=dtype, requires_grad=True)
    topw, topi = torch.rand(T, E, device=DEVICE, dtype=dtype).softmax(-1).topk(k, -1)
    topw = topw.detach().requires_grad_()
    _routed_moe_step(x, w, b, topi, topw)  # warm-up: workspaces, handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _routed_moe_step(x, w, b, topi, topw)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_routed_moe_step_cuda_graph_equals_eager():
    """A routed MoE forward and backward captured once and replayed on new tokens and new
    routing: bit for bit the eager step (the groups' sizes change between replays and live on
    the device only)."""
    torch.manual_seed(0)
    T, D, H, E, k = 64, 32, 24, 8, 2
    w = torch.randn(E, H, D, device=DEVICE, requires_grad=True)
    b = torch.randn(E, H, device=DEVICE, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        topw, topi = torch.rand(T, E, generator=g).softmax(-1).topk(k, -1)
        topi[torch.rand(T, k, generator=g) < 0.1] = -1
        batches.append((torch.randn(T, D, generator=g).to(DEVICE), topi.to(DEVICE),
                        topw.to(DEVICE)))
    static_x = torch.zeros(T, D, device=DEVICE, requires_grad=True)
    static_i = torch.zeros(T, k, dtype=torch.int64, device=DEVICE)
    static_w = torch.zeros(T, k, device=DEVICE, requires_grad=True)

    def load(xb, ib, wb):
        with torch.no_grad():
            static_x.copy_(xb)
            static_i.copy_(ib)
            static_w.copy_(wb)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        load(*batches[0])
        _routed_moe_step(static_x, w, b, static_i, static_w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _routed_moe_step(static_x, w, b, static_i, static_w)
    for xb, ib, wb in batches[1:]:
        load(xb, ib, wb)
        graph.replay()
        xe, we = xb.clone().requires_grad_(), wb.clone().requires_grad_()
        eager = _routed_moe_step(xe, w, b, ib, we)
        torch.cuda.synchronize()
        for name, a, c in zip(("y", "grad x", "grad weight", "grad bias", "grad gate"), outs,
                              eager):
            assert torch.equal(a, c), name
