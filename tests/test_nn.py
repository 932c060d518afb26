"""GatedPathwayLinear: constructors, repr, state, and the fused SGD update against torch.optim.SGD."""
from __future__ import annotations

import copy

import pytest
import torch

import gated_ops
from gated_ops import GatedPathwayLinear, SGDConfig
from gated_ops.reference import round_stochastic_bf16, sgd_momentum_ref
from helpers import autocast_kpath_step, check_layer_sgd_with_bias


def test_repr_names_the_structure():
    m = GatedPathwayLinear.fanout(3, 4, 5, 6)
    r = repr(m)
    for part in ("in_features=5", "out_features=6", "sources=3", "weights=4", "destinations=12",
                 "pathways=12", "blocked(n=1, ns=3, nm=4)", "bias=True"):
        assert part in r
    assert "fused_sgd=SGDConfig(lr=0.1" in repr(m.fuse_sgd(SGDConfig(lr=0.1)))


def test_state_dict_round_trip_and_plan_buffers_are_not_saved():
    m = GatedPathwayLinear.batched(3, 4, 5)
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias"}
    m2 = GatedPathwayLinear.batched(3, 4, 5)
    m2.load_state_dict(sd)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(m(x), m2(x))


KINDS = ["batched", "fanout", "grouped", "wide", "wide_offset"]


def _sgd_module(kind: str, D: int, dtype=None) -> tuple[GatedPathwayLinear, int]:
    """A layer of each structure the fused update handles, and its batch size."""
    if kind == "batched":
        m = GatedPathwayLinear.batched(4, D, 6, dtype=dtype)
    elif kind == "fanout":
        m = GatedPathwayLinear.fanout(3, 2, D, 6, replicas=2, dtype=dtype)
    elif kind == "grouped":  # a GDLN-like table with a weight that no pathway uses
        m = GatedPathwayLinear([0, 1, 1, 2], [0, 0, 2, 3], [0, 0, 1, 2], num_sources=3,
                               num_weights=5, num_dst=3, in_features=D, out_features=6,
                               dtype=dtype)
        assert m.plan.kind == "grouped"
    elif kind == "wide":  # blocks of ns*B = 80 rows: the one-GEMM-per-block path
        m = GatedPathwayLinear.shared(8, D, 6, replicas=2, dtype=dtype)
    else:  # a wide block over weight 1 only: weights 0 and 2 get zero-gradient updates
        m = GatedPathwayLinear(list(range(8)), [1] * 8, list(range(8)), num_sources=8,
                               num_weights=3, num_dst=8, in_features=D, out_features=6,
                               dtype=dtype)
        assert m.plan.layout[1:6] == (1, 0, 8, 1, 1)
    return m, 10 if kind.startswith("wide") else 5


@pytest.mark.parametrize("cfg", [
    SGDConfig(lr=0.1),
    SGDConfig(lr=0.05, momentum=0.9),
    SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-2),
    SGDConfig(lr=0.05, momentum=0.9, nesterov=True),
], ids=["plain", "momentum", "weight_decay", "nesterov"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_sgd_equals_torch_optim_sgd(cfg, kind):
    """Three steps of the fused update equal autograd + torch.optim.SGD to float32 tolerance.
    D_in = 37: the float32 kernels' 16-wide vector loop and its scalar tail both run."""
    torch.manual_seed(0)
    D = 37
    m, B = _sgd_module(kind, D)
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    m.fuse_sgd(cfg)
    S = m.num_sources
    for step in range(3):
        x = torch.randn(S, B, D, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        gy = torch.randn(m.num_dst, B, 6)
        (m(x) * gy).sum().backward()
        opt.zero_grad()
        (ref(x_ref) * gy).sum().backward()
        opt.step()
        assert m.weight.grad is None and m.bias.grad is None
        torch.testing.assert_close(x.grad, x_ref.grad)  # computed before the update
        torch.testing.assert_close(m.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.bias, ref.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_sgd_16bit_storage_rounds_a_float_update_once(kind, dtype):
    """16-bit weight storage: each step equals the float32 update (gradient from the same 16-bit
    inputs, torch.optim.SGD's formula with momentum, weight decay and nesterov) rounded once
    to the weight's dtype, for the weight, its momentum buffer and the bias, up to one unit in
    the last place (summation order). The wide GEMM path (ns*B > 64 rows per block) takes the
    16-bit GEMM's gradient, accumulated in float32 and rounded to the weight's dtype as ATen and
    cuBLAS return it; the expected step rounds the gradient there too, and since two float32
    sums in different orders may round to neighbouring 16-bit values (seen with oneDNN's
    AVX512-BF16 GEMM on an AMD EPYC), the weight and its momentum may also differ by that one
    unit of the gradient times its share in them (lr * (1 + momentum) and 1, nesterov).
    D_in = 37: the bfloat16 vector loop and its scalar tail both run."""
    torch.manual_seed(0)
    cfg = SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    m, B = _sgd_module(kind, 37, dtype)
    m.fuse_sgd(cfg)
    ulp = torch.finfo(dtype).eps  # relative spacing of the storage dtype (one ulp at 1)
    for step in range(3):
        x = torch.randn(m.num_sources, B, 37).to(dtype)
        gy = torch.randn(m.num_dst, B, 6).to(dtype)
        # the expected step, in float32 from the current 16-bit state
        ref = copy.deepcopy(m).fuse_sgd(None).float()
        (ref(x.float()) * gy.float()).sum().backward()
        expect, slack = {}, {}
        for name in ("weight", "bias"):
            p32 = getattr(m, name).detach().float()
            buf32 = getattr(m, f"{name}_momentum").float()
            g = getattr(ref, name).grad
            if name == "weight" and kind.startswith("wide"):
                g = g.to(dtype).float()
                slack["weight"] = cfg.lr * (1 + cfg.momentum) * ulp * g.abs()
                slack["weight_momentum"] = ulp * g.abs()
            sgd_momentum_ref(p32, g, buf32, cfg.lr, cfg.momentum, cfg.weight_decay,
                             cfg.nesterov)
            expect[name], expect[f"{name}_momentum"] = p32.to(dtype), buf32.to(dtype)
        before = m.weight.detach().clone()
        (m(x) * gy).sum().backward()
        assert m.weight.dtype == dtype and m.weight.grad is None
        for name, e in expect.items():
            got, e = getattr(m, name).detach().float(), e.float()
            if name in slack:
                excess = (got - e).abs() - (ulp * e.abs() + 1e-5 + slack[name])
                assert excess.max() <= 0, f"{name}: {excess.max()} over the bound at step {step}"
            else:
                torch.testing.assert_close(got, e, rtol=ulp, atol=1e-5,
                                           msg=lambda s, name=name: f"{name}: {s}")
        # the step moved the weights by more than 20 ulps, so a kernel that left them
        # unchanged fails this test
        assert (m.weight.float() - before.float()).abs().max() > 20 * ulp * before.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_stochastic_rounding_is_bitwise_the_reference(kind):
    """bfloat16 weights with rounding_seed >= 0: every weight is the exact float32 step rounded
    by round_stochastic_bf16 (same random bits per element index), the momentum buffer rounded
    to nearest. Integer dZ and x make the float32 gradient and step exact in any summation
    order, so the comparison is bitwise, across the vector loop, its tail, the grouped and the
    wide paths."""
    m, B = _sgd_module(kind, 37, torch.bfloat16)
    plan, g = m.plan, torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (m.num_sources, B, 37), generator=g).to(torch.bfloat16)
    dz = torch.randint(-1, 2, plan.z_shape(B, 6), generator=g).to(torch.bfloat16)
    w = m.weight.detach().clone()
    buf = torch.zeros_like(w)
    gw = torch.ops.gated_ops.pathway_grad_weight(dz.float(), x.float(), plan.paths, plan.csr,
                                                 list(plan.layout), m.num_weights, 6)
    lr, seed = 2.0 ** -10, 1234
    expect = round_stochastic_bf16(w.float() - lr * gw, seed)
    gated_ops.pathway_sgd_(dz, x, w, buf, plan, lr=lr, momentum=0.5, rounding_seed=seed)
    assert torch.equal(buf, gw.to(torch.bfloat16))
    assert torch.equal(w.view(torch.int16), expect.view(torch.int16))
    # round to nearest (no seed) gives other bits
    nearest = m.weight.detach().clone()
    gated_ops.pathway_sgd_(dz, x, nearest, torch.zeros_like(w), plan, lr=lr, momentum=0.5)
    assert torch.equal(nearest, (m.weight.detach().float() - lr * gw).to(torch.bfloat16))
    assert not torch.equal(nearest, w)


def test_stochastic_rounding_keeps_updates_below_the_bfloat16_spacing():
    """A step of 2^-10 on weights equal to 1 (bfloat16 spacing below 1: 2^-8). Round to nearest
    loses it every time; stochastic rounding moves the mean weight by 2^-10 per step (8192
    weights: the sample mean's standard deviation is ~2.6e-5 of the 9.8e-4 step)."""
    D, O = 128, 64
    x, gy = torch.ones(1, 1, D, dtype=torch.bfloat16), torch.ones(1, 1, O, dtype=torch.bfloat16)
    means = {}
    for sr in (False, True):
        m = GatedPathwayLinear.batched(1, D, O, dtype=torch.bfloat16)
        with torch.no_grad():
            m.weight.fill_(1.0)
            m.bias.fill_(1.0)
        m.fuse_sgd(SGDConfig(lr=2.0 ** -10, stochastic_rounding=sr))
        for _ in range(4):
            (m(x) * gy).sum().backward()  # grad_W = grad_b = 1
        means[sr] = (m.weight.double().mean().item(), m.bias.double().mean().item())
        if sr:
            assert int(m.sgd_step) == 4 and "sgd_step" in m.state_dict()
    assert means[False] == (1.0, 1.0)
    expected, std = 1 - 4 * 2.0 ** -10, 2.0 ** -8 * 0.5 * 4 ** 0.5 / (D * O) ** 0.5
    assert abs(means[True][0] - expected) < 6 * std, means[True]
    assert abs(means[True][1] - expected) < 2.0 ** -9, means[True]  # 64 biases: coarser


def test_stochastic_rounding_resumes_bitwise_from_a_state_dict():
    cfg = SGDConfig(lr=0.05, momentum=0.9, stochastic_rounding=True)
    torch.manual_seed(0)
    a = GatedPathwayLinear.batched(3, 20, 5, dtype=torch.bfloat16).fuse_sgd(cfg)
    b = copy.deepcopy(a)
    xs = [torch.randn(3, 4, 20).to(torch.bfloat16) for _ in range(2)]
    for x in xs:
        a(x).square().sum().backward()
    b(xs[0]).square().sum().backward()
    c = GatedPathwayLinear.batched(3, 20, 5, dtype=torch.bfloat16).fuse_sgd(cfg)
    c.load_state_dict(b.state_dict())
    c(xs[1]).square().sum().backward()
    for name, t in a.state_dict().items():
        assert torch.equal(t, c.state_dict()[name]), name


def test_stochastic_rounding_rejects_other_dtypes():
    m = GatedPathwayLinear.batched(2, 4, 3)
    plan = m.plan
    with pytest.raises(RuntimeError, match="stochastic rounding .* is for bfloat16 weights"):
        gated_ops.pathway_sgd_(torch.zeros(plan.z_shape(1, 3)), torch.zeros(2, 1, 4),
                               m.weight.detach(), None, plan, lr=0.1, rounding_seed=0)
    h = GatedPathwayLinear.batched(2, 4, 3, dtype=torch.float16)
    h.fuse_sgd(SGDConfig(lr=0.1, stochastic_rounding=True))
    with pytest.raises(ValueError, match="implemented for bfloat16 weights"):
        h(torch.randn(2, 1, 4, dtype=torch.float16)).sum().backward()


def test_fused_sgd_op_equals_reference_update_float64():
    torch.manual_seed(1)
    m = GatedPathwayLinear.shared(4, 7, 3, replicas=2, dtype=torch.float64)
    plan = m.plan
    x = torch.randn(8, 5, 7, dtype=torch.float64)
    gy = torch.randn(8, 5, 3, dtype=torch.float64)
    dz = torch.ops.gated_ops.pathway_grad_z(gy, None, plan.paths, plan.csr, list(plan.layout),
                                            8, 2)
    gw = torch.ops.gated_ops.pathway_grad_weight(dz, x, plan.paths, plan.csr, list(plan.layout),
                                                 2, 3)
    w, buf = m.weight.detach().clone(), torch.randn(2, 3, 7, dtype=torch.float64)
    w_ref, buf_ref = w.clone(), buf.clone()
    gated_ops.pathway_sgd_(dz, x, w, buf, plan, lr=0.3, momentum=0.8, weight_decay=0.1)
    sgd_momentum_ref(w_ref, gw, buf_ref, lr=0.3, momentum=0.8, weight_decay=0.1)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf, buf_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [dict(lr=0.3, momentum=0.0, weight_decay=0.0, nesterov=False),
                                 dict(lr=0.3, momentum=0.8, weight_decay=0.1, nesterov=False),
                                 dict(lr=0.3, momentum=0.8, weight_decay=0.0, nesterov=True)],
                         ids=["plain", "momentum_decay", "nesterov"])
def test_bias_sgd_op_equals_reference_update_float64(kind, cfg):
    """pathway_bias_sgd_ = the bias gradient of the reference (autograd through
    pathway_matmul_ref) then torch.optim.SGD's step (sgd_momentum_ref), from a nonzero momentum
    buffer; weights no pathway uses (grouped, wide_offset) still decay."""
    from gated_ops.reference import pathway_matmul_ref

    m, B = _sgd_module(kind, 7, torch.float64)
    plan, g = m.plan, torch.Generator().manual_seed(5)
    x = torch.randn(m.num_sources, B, 7, generator=g, dtype=torch.float64)
    gy = torch.randn(m.num_dst, B, 6, generator=g, dtype=torch.float64)
    b0 = torch.randn(m.num_weights, 6, generator=g, dtype=torch.float64)
    buf0 = torch.randn(m.num_weights, 6, generator=g, dtype=torch.float64)
    bias = b0.clone().requires_grad_()
    y = pathway_matmul_ref(x, m.weight.detach(), bias, None, plan.src, plan.wgt, plan.dst,
                           plan.num_dst)
    (gb,) = torch.autograd.grad((y * gy).sum(), bias)
    b_ref, buf_ref = b0.clone(), buf0.clone()
    sgd_momentum_ref(b_ref, gb, buf_ref if cfg["momentum"] else None, **cfg)
    dz = torch.ops.gated_ops.pathway_grad_z(gy, None, plan.paths, plan.csr, list(plan.layout),
                                            m.num_sources, m.num_weights)
    b, buf = b0.clone(), buf0.clone()
    gated_ops.pathway_bias_sgd_(dz, b, buf if cfg["momentum"] else None, plan, **cfg)
    torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buf, buf_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_bias_sgd_stochastic_rounding_is_bitwise_the_reference(kind):
    """bfloat16 biases with rounding_seed >= 0: the exact float32 step (integer dZ: the gradient
    is exact in any order) rounded by round_stochastic_bf16, the buffer to nearest."""
    m, B = _sgd_module(kind, 5, torch.bfloat16)
    plan, g = m.plan, torch.Generator().manual_seed(4)
    dz = torch.randint(-3, 4, plan.z_shape(B, 6), generator=g).to(torch.bfloat16)
    gb = torch.ops.gated_ops.pathway_grad_bias(dz.float(), plan.paths, plan.csr,
                                               list(plan.layout), m.num_sources, m.num_weights, 6)
    b0 = m.bias.detach().clone()
    lr, seed = 2.0 ** -9, 77
    b, buf = b0.clone(), torch.zeros_like(b0)
    gated_ops.pathway_bias_sgd_(dz, b, buf, plan, lr=lr, momentum=0.5, rounding_seed=seed)
    assert torch.equal(buf, gb.to(torch.bfloat16))
    expect = round_stochastic_bf16(b0.float() - lr * gb, seed)
    assert torch.equal(b.view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize("kind", KINDS)
def test_rounding_step_draws_the_seed_of_that_step(kind):
    """rounding_step (the step counter as a tensor, read by the kernel) gives the bits of
    rounding_seed = reference.rounding_seed_at(seed, step), for the weight, its lookahead and the
    bias, with steps beyond 32 bits; the op reads the counter and leaves it as it was."""
    from gated_ops.reference import rounding_seed_at

    m, B = _sgd_module(kind, 37, torch.bfloat16)
    plan, g = m.plan, torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (m.num_sources, B, 37), generator=g).to(torch.bfloat16)
    xn = torch.randint(-1, 2, (m.num_sources, B, 37), generator=g).to(torch.bfloat16)
    dz = torch.randint(-1, 2, plan.z_shape(B, 6), generator=g).to(torch.bfloat16)
    w0, b0, seed = m.weight.detach().clone(), m.bias.detach().clone(), 4321
    seen = set()
    for step in (0, 1, 7, 2 ** 31 + 3, 2 ** 40 + 11):
        st = torch.tensor(step)
        out = {}
        for name, kw in (("counter", dict(rounding_seed=seed, rounding_step=st)),
                         ("seed", dict(rounding_seed=rounding_seed_at(seed, step)))):
            w, b, wl = w0.clone(), b0.clone(), w0.clone()
            gated_ops.pathway_sgd_(dz, x, w, None, plan, lr=2.0 ** -10, **kw)
            zn = gated_ops.pathway_sgd_lookahead_(dz, x, wl, None, plan, 2.0 ** -10, x_next=xn,
                                                  **kw)
            kb = dict(kw, rounding_seed=kw["rounding_seed"] + 1)
            gated_ops.pathway_bias_sgd_(dz, b, None, plan, lr=2.0 ** -10, **kb)
            out[name] = (w, b, wl, zn)
        assert int(st) == step
        for a, c, what in zip(out["counter"], out["seed"], ("weight", "bias", "wl", "zn")):
            assert torch.equal(a.view(torch.int16), c.view(torch.int16)), (what, step)
        seen.add(out["counter"][0].view(torch.int16).numpy().tobytes())
    assert len(seen) == 5  # every step drew other bits


def test_stochastic_rounding_steps_read_the_counter_without_a_host_sync(monkeypatch):
    """The layer hands its counter to the kernels and advances it in place (add_): no int() or
    .item() of it per step (on CUDA that would synchronise, and a captured graph would replay
    one seed); the counter's bits then give the seeds of reference.rounding_seed_at."""
    from gated_ops.reference import rounding_seed_at

    torch.manual_seed(0)
    m = GatedPathwayLinear.batched(2, 16, 8, dtype=torch.bfloat16)
    m.fuse_sgd(SGDConfig(lr=2.0 ** -9, stochastic_rounding=True))
    counter = m.sgd_step
    calls = []
    real = torch.ops.gated_ops.pathway_sgd_

    class Spy:
        def __call__(self, *args):
            calls.append((args[11], args[12]))
            return real(*args)

    monkeypatch.setattr(torch.ops.gated_ops, "pathway_sgd_", Spy(), raising=False)
    for name in ("item", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda t: pytest.fail("host read of a tensor"))
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    for _ in range(3):
        m(x).float().square().sum().backward()
    monkeypatch.undo()
    assert m.sgd_step is counter and int(counter) == 3
    assert [c[1] is counter for c in calls] == [True] * 3
    salt = calls[0][0]
    assert {c[0] for c in calls} == {salt} and 0 <= salt < 2 ** 31
    # the same steps from explicit seeds (weight: the stream's seed, bias: the next stream's)
    torch.manual_seed(0)
    ref = GatedPathwayLinear.batched(2, 16, 8, dtype=torch.bfloat16)
    w, b = ref.weight.detach().clone(), ref.bias.detach().clone()
    for step in range(3):
        with torch.no_grad():
            ref.weight.copy_(w)
            ref.bias.copy_(b)
        y = ref(x)  # ref has no fused SGD: this is only the forward and dL/dy
        (gy,) = torch.autograd.grad(y.float().square().sum(), y)
        dz = gy.reshape(ref.plan.z_shape(3, 8)).contiguous()
        gated_ops.pathway_sgd_(dz, x, w, None, ref.plan, lr=2.0 ** -9,
                               rounding_seed=rounding_seed_at(salt, step))
        gated_ops.pathway_bias_sgd_(dz, b, None, ref.plan, lr=2.0 ** -9,
                                    rounding_seed=rounding_seed_at(salt + 1, step))
    assert torch.equal(m.weight.view(torch.int16), w.view(torch.int16))
    assert torch.equal(m.bias.view(torch.int16), b.view(torch.int16))


def test_rounding_step_rejects_bad_input():
    m = GatedPathwayLinear.batched(2, 4, 3, dtype=torch.bfloat16)
    plan, dz, x = m.plan, torch.zeros(m.plan.z_shape(2, 3), dtype=torch.bfloat16), torch.zeros(
        2, 2, 4, dtype=torch.bfloat16)
    w, b = m.weight.detach(), m.bias.detach()
    for bad, words in ((torch.tensor(3.0), "expected an int64 tensor of one element"),
                       (torch.tensor([1, 2]), "expected an int64 tensor of one element")):
        with pytest.raises(RuntimeError, match=f"rounding_step: {words}"):
            gated_ops.pathway_sgd_(dz, x, w, None, plan, lr=0.1, rounding_seed=0,
                                   rounding_step=bad)
    with pytest.raises(RuntimeError, match="rounding_step: expected an int64 tensor"):
        gated_ops.pathway_bias_sgd_(dz, b, None, plan, lr=0.1, rounding_seed=0,
                                    rounding_step=torch.tensor(1, dtype=torch.int32))


def test_opcheck_sgd_ops_with_a_rounding_step():
    m = GatedPathwayLinear.fanout(3, 2, 5, 4, replicas=2, dtype=torch.bfloat16)
    plan, lay, st = m.plan, list(m.plan.layout), torch.tensor(5)
    g = torch.Generator().manual_seed(0)
    dz = torch.randn(plan.z_shape(3, 4), generator=g).to(torch.bfloat16)
    x = torch.randn(plan.num_sources, 3, 5, generator=g).to(torch.bfloat16)
    w = m.weight.detach().clone()
    torch.library.opcheck(torch.ops.gated_ops.pathway_sgd_,
                          (dz, x, w, torch.zeros_like(w), plan.paths, plan.csr, lay, 0.1, 0.9,
                           0.0, False, 11, st))
    torch.library.opcheck(torch.ops.gated_ops.pathway_bias_sgd_,
                          (dz, m.bias.detach().clone(), None, plan.paths, plan.csr, lay,
                           plan.num_sources, plan.num_weights, 0.1, 0.0, 0.0, False, 12, st))
    torch.library.opcheck(torch.ops.gated_ops.pathway_sgd_lookahead_.default,
                          (dz, x, w, None, plan.paths, plan.csr, lay, 0.1, 0.0, 0.0, False, 11,
                           x, st))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["f32", "bf16", "f64"])
def test_weight_update_steps_the_layer_bias(dtype):
    """pathway_sgd_ (and the lookahead) with the layer's bias = the weight op, then
    pathway_bias_sgd_, bit for bit (the CPU kernels)."""
    check_layer_sgd_with_bias(torch.ops.gated_ops, "cpu", dtype)


def test_bias_sgd_rejects_bad_input():
    m = GatedPathwayLinear.batched(2, 4, 3)
    plan, dz = m.plan, torch.zeros(m.plan.z_shape(2, 3))
    bias = m.bias.detach()
    with pytest.raises(RuntimeError, match="bias: expected \\(M, D_out\\) with M = 2"):
        gated_ops.pathway_bias_sgd_(dz, torch.zeros(3, 3), None, plan, lr=0.1)
    with pytest.raises(RuntimeError, match="bias: the fused SGD update needs a contiguous bias"):
        gated_ops.pathway_bias_sgd_(dz, torch.zeros(3, 2).t(), None, plan, lr=0.1)
    with pytest.raises(RuntimeError, match="bias: expected dtype Float"):
        gated_ops.pathway_bias_sgd_(dz, bias.double(), None, plan, lr=0.1)
    with pytest.raises(RuntimeError, match="momentum_buffer: expected a buffer exactly when"):
        gated_ops.pathway_bias_sgd_(dz, bias, None, plan, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="momentum_buffer: expected a contiguous tensor like "
                                           "bias"):
        gated_ops.pathway_bias_sgd_(dz, bias, torch.zeros(2, 4), plan, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="stochastic rounding .* is for bfloat16 biases"):
        gated_ops.pathway_bias_sgd_(dz, bias, None, plan, lr=0.1, rounding_seed=0)
    with pytest.raises(RuntimeError, match="grad_z: expected 3 columns"):
        gated_ops.pathway_bias_sgd_(torch.zeros(4, 5), bias, None, plan, lr=0.1)


def test_opcheck_bias_sgd():
    m = GatedPathwayLinear.fanout(3, 2, 5, 4, replicas=2)
    plan = m.plan
    dz = torch.randn(plan.z_shape(3, 4))
    torch.library.opcheck(torch.ops.gated_ops.pathway_bias_sgd_,
                          (dz, m.bias.detach().clone(), torch.randn(m.num_weights, 4),
                           plan.paths, plan.csr, list(plan.layout), plan.num_sources,
                           plan.num_weights, 0.1, 0.9, 0.01, False))


def test_fused_sgd_rejects_missing_buffer():
    m = GatedPathwayLinear.batched(2, 3, 4)
    plan = m.plan
    dz = torch.zeros(plan.z_shape(1, 4))
    with pytest.raises(RuntimeError, match="momentum_buffer: expected a buffer exactly when"):
        gated_ops.pathway_sgd_(dz, torch.zeros(2, 1, 3), m.weight.detach(), None, plan, lr=0.1,
                               momentum=0.9)


def test_sgd_config_validates():
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        SGDConfig(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="expected lr, momentum, weight_decay >= 0"):
        SGDConfig(lr=-1.0)


def test_fused_sgd_leaves_frozen_parameters():
    m = GatedPathwayLinear.batched(2, 4, 3).fuse_sgd(SGDConfig(lr=0.1))
    m.weight.requires_grad_(False)
    w0, b0 = m.weight.detach().clone(), m.bias.detach().clone()
    m(torch.randn(2, 5, 4)).sum().backward()
    assert torch.equal(m.weight, w0) and not torch.equal(m.bias, b0)


@pytest.mark.parametrize("kind", ["moe", "grouped"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "no_x_grad"])
def test_fused_sgd_returns_gate_and_input_grads(kind, x_grad):
    """A trained router through a fused-SGD layer: the gate (and input) gradients are those of
    the unfused layer at the weights before the step, and the step equals torch.optim.SGD's.
    MoE: per-sample gates (P, B), x and gate through the shared U GEMM when both need grads;
    grouped: a scalar gate per pathway (P,)."""
    torch.manual_seed(0)
    if kind == "moe":
        m, B = GatedPathwayLinear.mixture_of_experts(4, 9, 6), 5
        gate0 = torch.softmax(torch.randn(4, B), 0)
    else:
        m, B = _sgd_module("grouped", 9)
        gate0 = torch.rand(m.plan.num_paths) + 0.5
    cfg = SGDConfig(lr=0.1, momentum=0.9, weight_decay=1e-2)
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    m.fuse_sgd(cfg)
    for _ in range(2):
        x0 = torch.randn(m.num_sources, B, 9)
        gy = torch.randn(m.num_dst, B, 6)
        x, x_ref = x0.clone().requires_grad_(x_grad), x0.clone().requires_grad_(x_grad)
        gate, gate_ref = gate0.clone().requires_grad_(), gate0.clone().requires_grad_()
        (m(x, gate) * gy).sum().backward()
        opt.zero_grad()
        (ref(x_ref, gate_ref) * gy).sum().backward()
        opt.step()
        torch.testing.assert_close(gate.grad, gate_ref.grad)
        if x_grad:
            torch.testing.assert_close(x.grad, x_ref.grad)
        assert m.weight.grad is None and m.bias.grad is None
        torch.testing.assert_close(m.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.bias, ref.bias, rtol=1e-5, atol=1e-6)


def test_z_is_y_plans_and_the_fused_backward_shortcut():
    """Plans whose Z is y's layout (blocked, one weight per block row, pathway p = destination p
    = Z row block p) are flagged; for them the fused backward takes dZ = grad_y without the
    grad_z op. An all-ones gate forces the op (dZ = 1 * grad_y): the updates are bitwise equal."""
    mp = gated_ops.make_plan
    assert mp([0, 1, 2], [0, 1, 2], [0, 1, 2], num_sources=3, num_weights=3, num_dst=3).z_is_y
    assert mp([0, 1, 2], [0, 0, 0], [0, 1, 2], num_sources=3, num_weights=1, num_dst=3).z_is_y
    assert mp([0, 1, 2], [0, 0, 0], [0, 1, 2], num_sources=3, num_weights=1, num_dst=3,
              device="cpu").to("cpu").z_is_y
    assert not mp([0, 1, 2], [0, 1, 2], [2, 0, 1], num_sources=3, num_weights=3,
                  num_dst=3).z_is_y  # destinations permuted
    assert not mp([0, 0], [0, 1], [0, 1], num_sources=1, num_weights=2, num_dst=2).z_is_y  # nm 2
    assert not mp([0, 1, 2], [0, 1, 2], [0, 1, 2], num_sources=3, num_weights=3, num_dst=3,
                  layout="grouped").z_is_y
    assert not mp([0, 1], [0, 1], [0, 0], num_sources=2, num_weights=2, num_dst=1).z_is_y  # sum
    for make in (lambda: GatedPathwayLinear.batched(3, 7, 5, replicas=2),
                 lambda: GatedPathwayLinear.shared(3, 7, 5, replicas=2)):
        torch.manual_seed(0)
        a = make().fuse_sgd(SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.01))
        b = copy.deepcopy(a)
        assert a.plan.z_is_y
        ones = torch.ones(a.plan.num_paths)
        for _ in range(3):
            x = torch.randn(6, 4, 7)
            gy = torch.randn(6, 4, 5)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ops_called = {}
            for name, layer, xi, gate in (("a", a, xa, None), ("b", b, xb, ones)):
                with torch.profiler.profile() as prof:
                    (layer(xi, gate) * gy).sum().backward()
                ops_called[name] = {e.key for e in prof.key_averages()}
            assert "gated_ops::pathway_grad_z" not in ops_called["a"]
            assert "gated_ops::pathway_grad_z" in ops_called["b"]
            assert torch.equal(xa.grad, xb.grad)
        # an expanded (stride-0) grad_y, as .sum() gives
        x = torch.randn(6, 4, 7)
        a(x).sum().backward()
        b(x, ones).sum().backward()
        for name, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[name]), name


# ------------------------------------------------------------------------------------------------
# torch.autocast: the layer in the region's dtype, as nn.Linear; the fused step in fp32.
def test_autocast_runs_the_layer_in_the_region_dtype():
    """Between autocast nn.Linear layers (bf16 activations, fp32 parameters) the layer runs in
    bf16: the same output and parameter gradients, bit for bit, as with every input cast by hand;
    outside a region, mixed dtypes are still refused."""
    torch.manual_seed(0)
    m = GatedPathwayLinear.mixture_of_experts(4, 16, 8)
    x = torch.randn(1, 5, 16).to(torch.bfloat16)
    gate = torch.softmax(torch.randn(4, 5), 0)  # float32, as a router's softmax may be
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, gate)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    ref = copy.deepcopy(m)
    ref.weight.grad = ref.bias.grad = None
    w, b = ref.weight.bfloat16(), ref.bias.bfloat16()
    y_ref = gated_ops.pathway_matmul(x, w, ref.plan, b, gate.bfloat16())
    y_ref.float().square().sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(m.weight.grad, ref.weight.grad) and m.weight.grad.dtype == torch.float32
    assert torch.equal(m.bias.grad, ref.bias.grad)
    with pytest.raises(RuntimeError, match="weight: expected dtype BFloat16"):
        m(x, gate.bfloat16())


def test_autocast_fused_sgd_layer_runs_in_its_parameters_dtype():
    """A fused-SGD layer in an autocast region steps its float32 parameters in place: it runs in
    float32 on the region's bf16 activations (cast up), bit for bit the step without autocast."""
    torch.manual_seed(0)
    a = GatedPathwayLinear.batched(3, 12, 5).fuse_sgd(SGDConfig(lr=0.1, momentum=0.9))
    b = copy.deepcopy(a)
    x = torch.randn(3, 4, 12).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    b(x.float()).sum().backward()
    assert a.weight.dtype == torch.float32
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused_sgd"])
def test_autocast_kpath_step(fused):
    """A whole k-path step in a bf16 autocast region: layers in bf16, the loss in float32, close
    to the float32 step's loss, float32 gradients; with the fused SGD the layers run in their
    float32 parameters' dtype, bit for bit the step without autocast."""
    net, ref, loss, loss_ref = autocast_kpath_step(fused=fused)
    assert loss.dtype == torch.float32
    if fused:
        assert torch.equal(loss, loss_ref)
        for (name, p), (_, q) in zip(net.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(p, q), name
    else:
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0.05)
        assert net.encoder.weight.grad.dtype == torch.float32
        torch.testing.assert_close(net.encoder.weight.grad, ref.encoder.weight.grad, rtol=0.05,
                                   atol=0.02)
