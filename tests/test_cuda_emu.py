"""The CPU emulation of the CUDA execution model (csrc/cuda_emu/cuda_emu.h, gated_ops.cuda_emu).

tests/test_cuda.py runs the CUDA kernels through it (its ``emu`` target); this file checks the
emulator itself (barriers, shuffles and device asserts on its own test kernels, and the misuse
it must refuse) and the explicit ``backend="cuda_emu"`` path of the public API.
"""
from __future__ import annotations

import os

import pytest
import torch

import gated_ops
from gated_ops import GatedPathwayLinear, SGDConfig
from experiments.kpath_net import KPathNet, kpath_gate
from gated_ops.testing import SHAPES, make_inputs
from helpers import autocast_kpath_step

try:
    import gated_ops.cuda_emu  # noqa: F401
except ImportError:
    if os.environ.get("GATED_OPS_REQUIRE_CUDA_EMU") == "1":
        raise
    pytest.skip("gated_ops._cuda_emu is not built (GATED_OPS_CUDA_EMU=1 pip install ...)",
                allow_module_level=True)

pytestmark = pytest.mark.cuda_emu
selftest = torch.ops.gated_ops_cudaemu._emulator_selftest


def test_barriers_and_shuffles_compute_block_sums():
    """3 blocks of 256 threads: warp shuffles, then shared memory behind __syncthreads."""
    want = torch.tensor([sum(b * 1000 + t for t in range(256)) for b in range(3)])
    assert torch.equal(selftest(0), want)


def test_a_barrier_not_reached_by_every_thread_is_a_deadlock_error():
    with pytest.raises(RuntimeError, match=r"deadlock in block \(0,0,0\): 33 threads at "
                                           r"__syncthreads, 31 at a shuffle"):
        selftest(1)


def test_a_full_mask_shuffle_with_exited_lanes_is_refused():
    with pytest.raises(RuntimeError, match="exited while its warp waits at a full-mask shuffle"):
        selftest(2)


def test_a_device_assert_names_the_condition_block_and_thread():
    with pytest.raises(RuntimeError, match=r"device-side assertion .*planted failure.* block "
                                           r"\(1,0,0\), thread \(5,0,0\)"):
        selftest(3)
    assert torch.equal(selftest(0)[:1], torch.tensor([32640]))  # the emulator still works


def test_a_bad_class_index_trips_the_cross_entropy_kernels_device_assert():
    """On a GPU this is a device-side assert that fails the next CUDA call; here it raises."""
    logits = torch.randn(1, 3, 4, 5)
    target = torch.zeros(1, 3, 4, dtype=torch.int64)
    target[0, 2, 1] = 5
    with pytest.raises(RuntimeError, match=r"device-side assertion `y >= 0 && y < C"):
        gated_ops.gated_cross_entropy(logits, target, torch.ones(1, 3), backend="cuda_emu")


def test_kpath_fused_step_on_the_emulated_cuda_kernels_matches_the_cpu_kernels():
    """backend="cuda_emu" end to end: three fused-SGD k-path steps (replicas, momentum, decay)
    on the CUDA kernels and on the CPU kernels give the same parameters to float32 rounding."""
    K, R, B, D, H, C = 4, 2, 8, 20, 12, 5

    def make(backend):
        torch.manual_seed(0)
        return KPathNet(K, D, H, C, replicas=R, backend=backend).fuse_sgd(
            SGDConfig(lr=0.05, momentum=0.9, weight_decay=1e-3))

    cpu, emu = make("auto"), make("cuda_emu")
    g = torch.Generator().manual_seed(1)
    gate = kpath_gate(K, 2).reshape(1, K * K).expand(R, -1).contiguous()
    for _ in range(3):
        x = torch.randn(R * K, B, D, generator=g)
        t = torch.randint(0, C, (R, K * K, B), generator=g)
        for net in (cpu, emu):
            loss, _, _ = net.loss(x, t, gate)
            loss.sum().backward()
    for (name, a), (_, b) in zip(cpu.state_dict().items(), emu.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def _pathway_outputs(case, dtype):
    """Forward and every gradient of one case on the emulated CUDA kernels."""
    inp = make_inputs(case, dtype=dtype)
    plan = case.table.plan()
    y = gated_ops.pathway_matmul(inp["x"], inp["weight"], plan, inp["bias"], inp["gate"],
                                 backend="cuda_emu")
    leaves = [v for k, v in inp.items() if k in ("x", "weight", "bias", "gate") and v is not None]
    if not y.numel():
        return [y]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return [y, *torch.autograd.grad(y, leaves, gy, allow_unused=True)]


def _kpath_state(dtype):
    torch.manual_seed(0)
    net = KPathNet(3, 10, 6, 4, replicas=2, backend="cuda_emu", dtype=dtype).fuse_sgd(
        SGDConfig(lr=0.1, momentum=0.9, weight_decay=1e-3))
    g = torch.Generator().manual_seed(2)
    gate = kpath_gate(3, 2).reshape(1, 9).expand(2, -1).contiguous().to(dtype)
    for _ in range(2):
        x = torch.randn(6, 8, 10, generator=g).to(dtype)
        t = torch.randint(0, 4, (2, 9, 8), generator=g)
        loss, _, _ = net.loss(x, t, gate)
        loss.sum().backward()
    return list(net.state_dict().values())


# Shapes that take every kernel and path: the small table, and the rows of tests/test_cuda.py
# that force the cuBLAS, multi-tile and scalar-load paths.
ORDER_CASES = [c for c in SHAPES if not c.large]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_the_cuda_kernels_have_no_order_dependence_between_threads(monkeypatch, dtype):
    """The race check: every op of the shape table, forward and backward, and two fused-SGD
    k-path steps (the CE and SGD kernels), give the same bits when the emulation runs the blocks
    and the threads between barriers in reverse order. A missing barrier, or a thread reading
    what another writes without one, reads a different value in one of the two orders."""
    from test_cuda import EXTRA

    def run():
        outs = [t for c in ORDER_CASES + EXTRA for t in _pathway_outputs(c, dtype)]
        return outs + _kpath_state(dtype)

    forward = run()
    monkeypatch.setenv("GATED_OPS_CUDA_EMU_ORDER", "reverse")
    reverse = run()
    assert len(forward) == len(reverse)
    for i, (a, b) in enumerate(zip(forward, reverse)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), i


@pytest.mark.parametrize("lookahead", [False, True], ids=["plain", "lookahead"])
def test_stochastic_rounding_on_the_cuda_kernels_steps_a_layer_as_the_cpu_kernels(lookahead):
    """A bfloat16 layer with stochastic rounding trains on the (emulated) CUDA kernels bit for
    bit as on the CPU kernels over 4 steps (the seed per step comes from the layer's counter;
    inputs and weights on small grids make every float32 sum exact, so only the rounding could
    differ), with and without the lookahead."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(-1, 2, (3, 4, 24), generator=g).to(torch.bfloat16) for _ in range(5)]
    w0 = (torch.randint(-32, 33, (3, 16, 24), generator=g) / 32).to(torch.bfloat16)
    out = {}
    for backend in ("auto", "cuda_emu"):
        m = GatedPathwayLinear.batched(3, 24, 16, dtype=torch.bfloat16, backend=backend)
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.fill_(0.5)
        m.fuse_sgd(SGDConfig(lr=2.0 ** -10, momentum=0.5, stochastic_rounding=True))
        y = m.prime_lookahead(xs[0]) if lookahead else None
        for i in range(4):
            h = m.forward_lookahead(xs[i], xs[i + 1], y) if lookahead else m(xs[i])
            h.sum().backward()
        out[backend] = [t.detach().clone() for t in (m.weight, m.bias, m.weight_momentum,
                                                     m.bias_momentum)]
        assert int(m.sgd_step) == 4
    for a, b, name in zip(out["auto"], out["cuda_emu"], ("weight", "bias", "w mom", "b mom")):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name
    assert not torch.equal(out["cuda_emu"][0], w0)


def test_a_fused_sgd_kpath_step_under_autocast_runs_the_cuda_kernels_in_float32():
    """A fused-SGD k-path net steps its float32 parameters in place, so under autocast it runs in
    float32: the cuBLAS paths of the CUDA kernels (hidden layer, decoders) must not be recast by
    the Autocast keys that fall through the ops. Bit for bit the step without autocast."""
    a, b, loss_a, loss_b = autocast_kpath_step(backend="cuda_emu", fused=True)
    assert torch.equal(loss_a, loss_b)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_fused_kpath_step_reads_no_tensor_on_the_host(dtype, monkeypatch):
    """The CPU-side proxy of the GPU's sync-debug test: a fused k-path step on the (emulated)
    CUDA kernels, bfloat16 with stochastic rounding included, converts no tensor to a Python
    number or bool (item, int, float, bool, tolist: each a device-to-host sync on a GPU)."""
    K, R, B, D, H, C = 4, 2, 8, 20, 12, 5
    torch.manual_seed(0)
    net = KPathNet(K, D, H, C, replicas=R, dtype=dtype, backend="cuda_emu")
    net.fuse_sgd(SGDConfig(lr=0.05, momentum=0.9, stochastic_rounding=dtype == torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    xk = torch.randn(R * K, B, D, generator=g).to(dtype)
    target = torch.randint(0, C, (R, K * K, B), generator=g)
    gate = kpath_gate(K, 2).reshape(1, K * K).expand(R, -1).contiguous().to(dtype)
    before = net.encoder.weight.detach().clone()

    def host_read(t, *args):
        pytest.fail("a tensor was read on the host during the step")

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    loss, _, _ = net.loss(xk, target, gate)
    loss.sum().backward()
    monkeypatch.undo()
    assert not torch.equal(net.encoder.weight, before)
