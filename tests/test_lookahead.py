"""The lookahead: the fused SGD update that also computes the next batch's forward
(``pathway_sgd_lookahead_``, ``GatedPathwayLinear.lookahead``, ``KPathNet.lookahead``).

On the CPU kernels it must be bit for bit the update of ``pathway_sgd_`` followed by the
forward, at both vector widths, for float32 and bfloat16 (stochastic rounding too), with D in
pieces (D > 1024) and with tails; elsewhere (other dtypes, batch sizes, plans, the emulated CUDA
kernels) the same two ops in turn. A layer uses the precomputed output only when nothing
changed since the update. The captured form (``forward_lookahead`` / ``prime_lookahead``,
``KPathNet.loss(..., lookahead=)``) keeps the output in a static buffer: the same training, and
a chain primed anew (a resume) continues with the same bits.
"""
from __future__ import annotations

import pytest
import torch

import gated_ops
from gated_ops import GatedPathwayLinear, SGDConfig, make_plan
from experiments.kpath_net import KPathNet, kpath_gate
from gated_ops.testing import assert_close, force_kernel

# The storage dtypes the k-path trainings are checked in (bfloat16 both with and without
# stochastic rounding).
STORAGE = pytest.mark.parametrize("dtype,sr", [(torch.float32, False), (torch.bfloat16, True),
                                               (torch.bfloat16, False), (torch.float64, False)])


def _batched(K):
    r = list(range(K))
    return make_plan(r, r, r, num_sources=K, num_weights=K, num_dst=K)


def _state(K, B, Bn, D, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=rnd(K, B, D).to(dtype), x_next=rnd(K, Bn, D).to(dtype),
                w=(0.05 * rnd(K, H, D)).to(dtype), buf=(0.01 * rnd(K, H, D)).to(dtype),
                dz=rnd(K * B, H).to(dtype))


def _both(plan, s, lr=0.1, momentum=0.9, wd=1e-3, nesterov=False, seed=-1):
    """(w, buf, Z_next) from pathway_sgd_lookahead_, and from pathway_sgd_ + the forward."""
    out = []
    for fused in (True, False):
        w, buf = s["w"].clone(), s["buf"].clone() if momentum else None
        if fused:
            z = gated_ops.pathway_sgd_lookahead_(s["dz"], s["x"], w, buf, plan, lr, momentum, wd,
                                                 nesterov, seed, x_next=s["x_next"])
        else:
            gated_ops.pathway_sgd_(s["dz"], s["x"], w, buf, plan, lr, momentum, wd, nesterov,
                                   seed)
            z = gated_ops.pathway_matmul(s["x_next"], w, plan)
            z = z.reshape(plan.z_shape(s["x_next"].shape[1], w.shape[1]))
        out.append((w, buf, z))
    return out


# Every CPU kernel of the fused lookahead is tested: the 8-lane one, and the 16-lane one in
# both its forms (rows updated in groups and then dotted, or updated and dotted in one pass).
KERNELS = pytest.mark.parametrize("kernel", ["8", "16-grouped", "16-onepass"])


@pytest.fixture
def forced(kernel: str):
    """Forces the kernel named by a KERNELS id ("8", "16-grouped", "16-onepass") on the skinny
    path, whatever this CPU would pick (gated_ops.testing.force_kernel)."""
    lanes, _, mode = kernel.partition("-")
    with force_kernel(cpu_lanes=int(lanes), cpu_lookahead=mode or "grouped", cpu_skinny=True):
        yield kernel


@KERNELS
@pytest.mark.parametrize("D", [784, 2100, 37])
@pytest.mark.parametrize("dtype,seed", [(torch.float32, -1), (torch.bfloat16, -1),
                                        (torch.bfloat16, 7)])
def test_fused_lookahead_is_the_update_then_the_forward_bit_for_bit(D, dtype, seed, forced):
    """The skinny kernels' fused pass (8 rows per weight; D = 2100 takes the 8-lane forward's
    pieces of 512 and a tail; D = 37 a tail only; 19 weight rows: the one pass's tiles of 2
    and a last row alone)."""
    plan = _batched(5)
    s = _state(5, 8, 8, D, 19, dtype)
    (w1, b1, z1), (w2, b2, z2) = _both(plan, s, seed=seed)
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and torch.equal(z1, z2)
    assert not torch.equal(w1, s["w"])  # (it did step)


@KERNELS
@pytest.mark.parametrize("kw", [dict(momentum=0.0, wd=0.0), dict(nesterov=True),
                                dict(lr=0.0)])
@pytest.mark.parametrize("rows", [1, 3])  # fewer rows per weight than 8
def test_fused_lookahead_options_and_row_counts(kw, rows, forced):
    plan = _batched(4)
    s = _state(4, rows, rows, 50, 21, torch.float32, seed=1)
    (w1, b1, z1), (w2, b2, z2) = _both(plan, s, **kw)
    assert torch.equal(w1, w2) and torch.equal(z1, z2)
    assert (b1 is None and b2 is None) or torch.equal(b1, b2)


@pytest.mark.parametrize("case", ["other_batch", "float64", "float16", "blas", "wide_block"])
def test_unfused_lookahead_equals_the_two_ops(case):
    """Where the fused pass does not apply, the op is the update and then the forward."""
    K, B, Bn, dtype = 4, 8, 8, torch.float32
    if case == "other_batch":
        Bn = 3  # the last, smaller batch of an epoch
    elif case in ("float64", "float16"):
        dtype = getattr(torch, case)
    elif case == "wide_block":
        B = Bn = 12  # 12 rows per weight: above the fused kernel's 8
    s = _state(K, B, Bn, 40, 9, dtype, seed=2)
    with force_kernel(cpu_skinny=False if case == "blas" else None):
        (w1, b1, z1), (w2, b2, z2) = _both(_batched(K), s)
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and torch.equal(z1, z2)


def test_lookahead_on_grouped_and_fanout_plans_matches_float64():
    """Z_next is every pathway's pre-gate output in Z's layout, for any plan: checked against
    x_next[src] @ W_new[wgt]^T in float64, on a grouped table (a GDLN graph) and on a blocked
    fan-out (the k-path decoders: nm > 1)."""
    g = torch.Generator().manual_seed(3)
    grouped = make_plan([0, 1, 1, 2, 0], [2, 0, 1, 1, 0], [0, 1, 0, 2, 1], num_sources=3,
                        num_weights=3, num_dst=3)
    fanout = GatedPathwayLinear.fanout(2, 3, 6, 5).plan
    for plan in (grouped, fanout):
        S, M, B, D, H = plan.num_sources, plan.num_weights, 4, 6, 5
        x, xn = torch.randn(S, B, D, generator=g), torch.randn(S, B, D, generator=g)
        w = torch.randn(M, H, D, generator=g)
        P = plan.num_paths
        dz = torch.randn(*plan.z_shape(B, H), generator=g)
        w_ref = w.clone()
        gated_ops.pathway_sgd_(dz, x, w_ref, None, plan, 0.1)
        z = gated_ops.pathway_sgd_lookahead_(dz, x, w, None, plan, 0.1, x_next=xn)
        assert torch.equal(w, w_ref)
        zrow, zcol = plan.paths[3], plan.paths[4]
        want = []
        for dt in (torch.float64, torch.float32):  # the reference, and plain PyTorch
            zp = torch.bmm(xn[plan.src].to(dt), w[plan.wgt].to(dt).transpose(1, 2))  # (P, B, H)
            want.append(torch.zeros(z.shape, dtype=dt))
            for p in range(P):
                r, c = int(zrow[p]), int(zcol[p])
                want[-1][r * B:(r + 1) * B, c * H:(c + 1) * H] = zp[p]
        assert_close(f"Z_next ({plan.kind})", z, *want)


def test_lookahead_opcheck():
    plan = _batched(3)
    s = _state(3, 8, 8, 20, 6, torch.float32, seed=4)
    args = (s["dz"], s["x"], s["w"].clone(), s["buf"].clone(), plan.paths, plan.csr,
            list(plan.layout), 0.1, 0.9, 0.0, False, -1, s["x_next"])
    torch.library.opcheck(torch.ops.gated_ops.pathway_sgd_lookahead_.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B,Bn,D,H", [
    (8, 8, 40, 6),     # one column tile, most lanes past D_in (inactive in the shuffles)
    (8, 8, 300, 37),   # three tiles; 37 rows: a warp with 1 of its 4 rows
    (5, 5, 301, 9),    # 5 rows per block; D_in odd: the scalar (VEC = 1) kernel
    (8, 3, 40, 6),     # another batch size: the update, then cuBLAS
    (0, 0, 40, 6),     # no rows: the update alone (decay and momentum), Z_next empty
])
def test_lookahead_cuda_kernel_on_the_emulator(dtype, B, Bn, D, H):
    """The CUDA kernel (the update kernel's lookahead epilogue and the sum of its tiles' partial
    sums), run by the CPU emulation of the CUDA kernels: the weight and momentum bit for bit
    those of the CUDA pathway_sgd_, Z_next against float64 under the house tolerance."""
    from gated_ops import cuda_emu  # noqa: F401
    ops = torch.ops.gated_ops_cudaemu
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "gated_ops_cudaemu::pathway_sgd_lookahead_", "CPU")  # the kernel, not the composite
    plan = _batched(3)
    s = _state(3, B, Bn, D, H, dtype, seed=5)
    pc = (plan.paths, plan.csr, list(plan.layout))
    w1, w2, b1, b2 = s["w"].clone(), s["w"].clone(), s["buf"].clone(), s["buf"].clone()
    z = ops.pathway_sgd_lookahead_(s["dz"], s["x"], w1, b1, *pc, 0.1, 0.9, 1e-3, False, -1,
                                   s["x_next"])
    ops.pathway_sgd_(s["dz"], s["x"], w2, b2, *pc, 0.1, 0.9, 1e-3, False, -1)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    if B > 0:
        assert not torch.equal(w1, s["w"])
    shape = plan.z_shape(Bn, H)
    assert_close("Z_next", z,
                 torch.bmm(s["x_next"].double(), w2.double().transpose(1, 2)).reshape(shape),
                 torch.bmm(s["x_next"], w2.transpose(1, 2)).reshape(shape))


def test_lookahead_cuda_kernel_on_the_emulator_grouped_plan():
    """A grouped plan on the CUDA kernels: the update, then Z gathered per pathway."""
    from gated_ops import cuda_emu  # noqa: F401
    ops = torch.ops.gated_ops_cudaemu
    plan = make_plan([0, 1, 1, 2, 0], [2, 0, 1, 1, 0], [0, 1, 0, 2, 1], num_sources=3,
                     num_weights=3, num_dst=3)
    g = torch.Generator().manual_seed(6)
    x, xn = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    w = torch.randn(3, 5, 6, generator=g)
    dz = torch.randn(*plan.z_shape(4, 5), generator=g)
    pc = (plan.paths, plan.csr, list(plan.layout))
    w1, w2 = w.clone(), w.clone()
    z = ops.pathway_sgd_lookahead_(dz, x, w1, None, *pc, 0.1, 0.0, 0.0, False, -1, xn)
    ops.pathway_sgd_(dz, x, w2, None, *pc, 0.1, 0.0, 0.0, False, -1)
    assert torch.equal(w1, w2)
    zp = torch.bmm(xn[plan.src].double(), w2[plan.wgt].double().transpose(1, 2))
    want = torch.zeros(z.shape, dtype=torch.float64)
    want.view(-1, 4, 5).index_copy_(0, plan.paths[3], zp)
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5)


def test_lookahead_rejects_bad_input():
    plan = _batched(3)
    s = _state(3, 8, 8, 20, 6, torch.float32)
    with pytest.raises(RuntimeError, match="x_next: expected"):
        gated_ops.pathway_sgd_lookahead_(s["dz"], s["x"], s["w"], s["buf"], plan, 0.1, 0.9,
                                         x_next=s["x_next"][:, :, :5])
    with pytest.raises(RuntimeError, match="x_next: expected dtype"):
        gated_ops.pathway_sgd_lookahead_(s["dz"], s["x"], s["w"], s["buf"], plan, 0.1, 0.9,
                                         x_next=s["x_next"].double())


# ----------------------------------------------------------------------------------- modules
def _batches(K, D, steps, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * K, 8, D, generator=g).to(device, dtype),
             torch.randint(0, 10, (2, K * K, 8), generator=g).to(device)) for _ in range(steps)]


def _net(K, D, H, dtype=torch.float32, backend="auto", sr=False, device="cpu"):
    torch.manual_seed(0)
    return KPathNet(K, D, H, 10, replicas=2, dtype=dtype, backend=backend, device=device
                    ).fuse_sgd(SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-3,
                                         stochastic_rounding=sr))


def _train(lookahead, dtype=torch.float32, backend="auto", steps=5, sr=False, K=4, D=40, H=16,
           resume_at=None):
    """KPathNet (R=2) trained for `steps` steps, lookahead None or "static" (the encoder output
    in a buffer, read by each step and written by its update for the next); returns losses,
    parameters and buffers, and the buffer. resume_at=t: before step t the state goes to a
    fresh model, as from a checkpoint, which primes its own buffer and trains on."""
    net, batches = _net(K, D, H, dtype, backend, sr), _batches(K, D, steps, dtype)
    gate = kpath_gate(K, 2).reshape(1, -1).repeat(2, 1).to(dtype)
    enc = net.prime_lookahead(batches[0][0]) if lookahead == "static" else None
    losses = []
    for t, (xk, y) in enumerate(batches):
        if t == resume_at:
            state = net.state_dict()
            net = _net(K, D, H, dtype, backend, sr)
            net.load_state_dict(state)
            enc = net.prime_lookahead(xk)
        ahead = (batches[min(t + 1, steps - 1)][0], enc) if enc is not None else None
        loss, _, _ = net.loss(xk, y, gate, lookahead=ahead)
        loss.sum().backward()
        losses.append(loss.detach())
    return torch.stack(losses), [t.clone() for t in net.state_dict().values()], enc


@pytest.mark.gpu
def test_kpath_training_with_lookahead_on_cuda():
    """On CUDA (the update kernel's lookahead epilogue): the same training to float32
    rounding."""
    def train(lookahead):
        torch.manual_seed(0)
        net = KPathNet(4, 40, 16, 10, replicas=2, device="cuda").fuse_sgd(
            SGDConfig(lr=0.05, momentum=0.9))
        gate = kpath_gate(4, 2).reshape(1, -1).repeat(2, 1).cuda()
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 8, 40, generator=g).cuda(),
                    torch.randint(0, 10, (2, 16, 8), generator=g).cuda()) for _ in range(4)]
        enc = net.prime_lookahead(batches[0][0]) if lookahead else None
        for t, (xk, y) in enumerate(batches):
            ahead = None if enc is None else (batches[min(t + 1, len(batches) - 1)][0], enc)
            net.loss(xk, y, gate, lookahead=ahead)[0].sum().backward()
        return [p.detach().cpu() for p in net.parameters()]
    for a, b in zip(train(True), train(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- the captured form (static buffer)
@STORAGE
def test_kpath_training_with_static_lookahead_is_bit_identical(dtype, sr):
    l0, s0, _ = _train(None, dtype, sr=sr)
    l1, s1, _ = _train("static", dtype, sr=sr)
    l2, s2, _ = _train("static", dtype, sr=sr, resume_at=2)
    assert torch.equal(l0, l1) and torch.equal(l0, l2)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(s0, s1, s2))


def test_kpath_training_with_static_lookahead_on_the_emulated_cuda_kernels():
    """The CUDA kernels (emulated): the same training to float32 rounding; and a chain primed
    anew mid-run (a resume) continues with exactly the bits of the uninterrupted chain, because
    priming runs the update kernel's own lookahead (dZ = 0, lr = 0), not the forward kernel."""
    l0, s0, _ = _train(None, backend="cuda_emu", D=300, H=64)
    l1, s1, enc1 = _train("static", backend="cuda_emu", D=300, H=64)
    l2, s2, enc2 = _train("static", backend="cuda_emu", D=300, H=64, resume_at=3)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(s1, s0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(s1, s0))  # (another summation order)
    assert torch.equal(l1, l2) and torch.equal(enc1, enc2)
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))


@pytest.mark.parametrize("kind", ["batched", "shared"])
def test_forward_lookahead_returns_the_buffer_and_refreshes_it(kind):
    """The output is the buffer's content, autograd-connected (x gets its gradient); after the
    backward the buffer holds forward(x_next) from the stepped weight and bias (a shared layer:
    every destination takes the one bias), bit for bit a fresh forward on the CPU kernels."""
    torch.manual_seed(0)
    make = getattr(GatedPathwayLinear, kind)
    layer = make(3, 20, 6).fuse_sgd(SGDConfig(lr=0.1, momentum=0.9))
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 8, 20, requires_grad=True)
    x_next = torch.randn(3, 8, 20)
    y = layer.prime_lookahead(x.detach())
    assert torch.equal(y, gated_ops.pathway_matmul(x.detach(), layer.weight.detach(),
                                                   layer.plan, layer.bias.detach()))
    w0 = layer.weight.detach().clone()
    out = layer.forward_lookahead(x, x_next, y)
    assert out.grad_fn is not None and out.data_ptr() == y.data_ptr()
    out.square().sum().backward()
    assert x.grad is not None and not torch.equal(layer.weight.detach(), w0)
    fresh = gated_ops.pathway_matmul(x_next, layer.weight.detach(), layer.plan,
                                     layer.bias.detach())
    assert torch.equal(y, fresh)


def test_static_lookahead_rejects_bad_input():
    layer = GatedPathwayLinear.batched(3, 20, 6)
    x, y = torch.randn(3, 8, 20), torch.empty(3, 8, 6)
    with pytest.raises(ValueError, match="needs the fused SGD"):
        layer.forward_lookahead(x, x, y)
    with pytest.raises(ValueError, match="needs the fused SGD"):
        layer.prime_lookahead(x)
    layer.fuse_sgd(SGDConfig(lr=0.1))
    with pytest.raises(ValueError, match=r"y: expected a contiguous torch.float32 tensor of "
                                         r"shape \(3, 8, 6\)"):
        layer.forward_lookahead(x, x, torch.empty(3, 4, 6))
    with pytest.raises(ValueError, match="y: expected .* got torch.float64"):
        layer.prime_lookahead(x, torch.empty(3, 8, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        layer.prime_lookahead(x, torch.empty(3, 6, 8).transpose(1, 2))
    with pytest.raises(ValueError, match=r"x_next: expected \(S, B, D_in\) = \(3, B, 20\)"):
        layer.forward_lookahead(x, torch.randn(2, 8, 20), y)
    with pytest.raises(ValueError, match=r"x: expected \(S, B, D_in\) = \(3, B, 20\)"):
        layer.forward_lookahead(torch.randn(3, 8, 21), x, y)
    with torch.no_grad(), pytest.raises(ValueError, match="needs autograd on"):
        layer.forward_lookahead(x, x, y)
    moe = GatedPathwayLinear.mixture_of_experts(3, 20, 6).fuse_sgd(SGDConfig(lr=0.1))
    with pytest.raises(ValueError, match="z_is_y"):
        moe.prime_lookahead(torch.randn(1, 8, 20))


@pytest.mark.gpu
def test_kpath_static_lookahead_captured_equals_eager():
    """The step with the static lookahead captured in a CUDA graph and replayed = the same
    steps run eagerly, bit for bit; and the same training as without the lookahead to float32
    rounding."""
    K, D, H, steps = 4, 40, 16, 8
    batches = _batches(K, D, steps + 1, device="cuda")
    gate = kpath_gate(K, 2).reshape(1, -1).repeat(2, 1).cuda()
    nets = {k: _net(K, D, H, device="cuda") for k in ("eager", "graph", "plain")}
    for xk, y in batches[:steps]:
        nets["plain"].loss(xk, y, gate)[0].sum().backward()
    enc = nets["eager"].prime_lookahead(batches[0][0])
    for t in range(steps):
        nets["eager"].loss(*batches[t], gate, lookahead=(batches[t + 1][0], enc))[0].sum(
            ).backward()
    net = nets["graph"]
    sx, sy, sn = (torch.zeros_like(t) for t in (*batches[0], batches[0][0]))
    genc = torch.empty_like(enc)
    state = [t.clone() for t in net.state_dict().values()]
    net.prime_lookahead(sx, genc)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (it trains: the state is put back after capture)
        for _ in range(2):
            net.loss(sx, sy, gate, lookahead=(sn, genc))[0].sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        net.loss(sx, sy, gate, lookahead=(sn, genc))[0].sum().backward()
    with torch.no_grad():
        for t, v in zip(net.state_dict().values(), state):
            t.copy_(v)
    sx.copy_(batches[0][0])
    net.prime_lookahead(sx, genc)
    for t in range(steps):
        sx.copy_(batches[t][0])
        sy.copy_(batches[t][1])
        sn.copy_(batches[t + 1][0])
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(genc, enc)
    for (name, a), b, c in zip(net.state_dict().items(), nets["eager"].state_dict().values(),
                               nets["plain"].state_dict().values()):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
