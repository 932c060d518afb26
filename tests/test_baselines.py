"""The k-path baselines compute the same function as the fused KPathNet (so benchmarks compare
like with like): forward metrics and gradients from the same weights."""
from __future__ import annotations

import pytest
import torch

from experiments.baselines import BatchedKPath, LoopKPath
from experiments.kpath_net import KPathNet, kpath_gate, transform_batch


def _setup(R=2, K=3, B=4, D=6, H=5, C=4, dtype=torch.float64):
    net = KPathNet(K, D, H, C, replicas=R, dtype=dtype)
    net.xavier_init_([1.0] * R, [torch.Generator().manual_seed(r) for r in range(R)])
    with torch.no_grad():  # non-zero biases so that their gradients are checked too
        for layer in net.layers:
            layer.bias.normal_()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(R, B, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (R, B), generator=g)
    perms = torch.stack([torch.randperm(D, generator=g) for _ in range(K)])
    maps = torch.stack([torch.randperm(C, generator=g) for _ in range(K)])
    xk, target = transform_batch(x, y, perms, maps)
    gate = torch.stack([kpath_gate(K, 2, seed=r).flatten() for r in range(R)]).to(dtype)
    return net, xk, target, gate


def test_batched_and_loop_baselines_equal_kpathnet():
    net, xk, target, gate = _setup()
    R, K = net.R, net.K
    fused = net.loss(xk, target, gate)
    fused[0].sum().backward()
    batched = BatchedKPath.from_kpath(net)
    out_b = batched.loss(xk, target, gate)
    out_b[0].sum().backward()
    for a, b in zip(fused, out_b):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(batched.w_enc.grad.transpose(1, 2), net.encoder.weight.grad)
    torch.testing.assert_close(batched.w_dec.grad.view_as(net.decoder.weight),
                               net.decoder.weight.grad)
    torch.testing.assert_close(batched.b_hid.grad, net.hidden.bias.grad)
    for r in range(R):
        loop = LoopKPath.from_kpath(net, replica=r)
        out_l = loop.loss(xk[r * K:(r + 1) * K], target[r:r + 1], gate[r:r + 1])
        for a, b in zip(fused, out_l):
            torch.testing.assert_close(a[r:r + 1], b)
        out_l[0].sum().backward()
        run = loop.runs[0]
        for k in range(K):
            torch.testing.assert_close(run.encoders[k].weight.grad,
                                       net.encoder.weight.grad[r * K + k])
            torch.testing.assert_close(run.decoders[k].bias.grad,
                                       net.decoder.bias.grad[r * K + k])
        torch.testing.assert_close(run.hidden.weight.grad, net.hidden.weight.grad[r])


def test_transform_batch_targets():
    net, xk, target, gate = _setup(R=1, K=3, C=4)
    assert xk.shape == (3, 4, 6) and target.shape == (1, 9, 4)
    # path (i, j) has the target of decoder j, whatever the encoder i
    assert torch.equal(target[0, 0 * 3 + 2], target[0, 1 * 3 + 2])


def test_transform_batch_targets_are_the_mapped_labels_of_every_path():
    """target[r, i*K + j, b] = label_maps[j, y[r, b]], for every replica, path and row (an
    int64 tensor, contiguous as the cross-entropy kernels read it)."""
    g = torch.Generator().manual_seed(0)
    R, K, B, C, D = 2, 3, 5, 4, 6
    y = torch.randint(0, C, (R, B), generator=g)
    maps = torch.stack([torch.randperm(C, generator=g) for _ in range(K)])
    x = torch.randn(R, B, D, generator=g)
    perms = torch.stack([torch.randperm(D, generator=g) for _ in range(K)])
    _, target = transform_batch(x, y, perms, maps)
    assert target.shape == (R, K * K, B) and target.dtype == torch.int64
    assert target.is_contiguous()
    for r in range(R):
        for i in range(K):
            for j in range(K):
                for b in range(B):
                    assert target[r, i * K + j, b] == maps[j, y[r, b]], (r, i, j, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_transform_batch_inputs_are_the_permuted_pixels(dtype):
    """xk[r*K + k, b] = x[r, b, perms[k]] (encoder k sees permutation k of replica r's batch),
    checked against a plain loop; 16-bit data exactly."""
    R, K, B, D, C = 2, 3, 4, 7, 5
    g = torch.Generator().manual_seed(2)
    x = torch.randn(R, B, D, generator=g).to(dtype)
    y = torch.randint(0, C, (R, B), generator=g)
    perms = torch.stack([torch.randperm(D, generator=g) for _ in range(K)])
    maps = torch.stack([torch.randperm(C, generator=g) for _ in range(K)])
    xk, _ = transform_batch(x, y, perms, maps)
    assert xk.shape == (R * K, B, D) and xk.dtype == dtype
    for r in range(R):
        for k in range(K):
            assert torch.equal(xk[r * K + k], x[r][:, perms[k]])
    inputs_only, no_target = transform_batch(x, None, perms, maps)  # (the lookahead's next)
    assert no_target is None and torch.equal(inputs_only, xk)


def test_kpath_gate_modes():
    g = kpath_gate(5, 2)
    assert torch.equal(g.sum(1), torch.full((5,), 2.0)) and g[4, 0] == 1 and g[4, 4] == 1
    gp = kpath_gate(5, 2, "N_plus_mod_permute", seed=3)
    assert torch.equal(gp.sum(1), torch.full((5,), 2.0)) and torch.equal(gp.sum(0), g.sum(0))
    assert torch.equal(kpath_gate(4, 1, "fully_connected"), torch.ones(4, 4))
