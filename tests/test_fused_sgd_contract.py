"""The fused SGD's contract under every autograd pattern (GatedPathwayLinear.fuse_sgd).

Each pattern either computes exactly what a plain layer with ``torch.optim.SGD`` computes
(parameters, momentum, input and gate gradients), or raises an error that says what to do.
float64, so "exactly" means to float64 rounding of a different summation order.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gated_ops import GatedPathwayLinear, SGDConfig

TOL = dict(rtol=1e-12, atol=1e-12)
CONFIGS = [SGDConfig(lr=0.1), SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.01),
           SGDConfig(lr=0.05, momentum=0.8, nesterov=True)]


def pair(cfg: SGDConfig, kind: str = "grouped", seed: int = 0):
    """A fused layer and a plain copy with torch.optim.SGD over its parameters: 3 pathways,
    D 5 -> 4 (the grouped table sums two pathways into one destination)."""
    torch.manual_seed(seed)
    if kind == "grouped":
        layer = GatedPathwayLinear([0, 1, 1], [0, 1, 2], [0, 0, 1], num_sources=2,
                                   num_weights=3, num_dst=2, in_features=5, out_features=4,
                                   dtype=torch.float64)
    else:
        layer = GatedPathwayLinear.batched(3, 5, 4, dtype=torch.float64)
    plain = copy.deepcopy(layer)
    opt = torch.optim.SGD(plain.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return layer.fuse_sgd(cfg), plain, opt


def inputs(layer, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layer.num_sources, B, 5, generator=g, dtype=torch.float64)


def assert_same(fused, plain):
    torch.testing.assert_close(fused.weight, plain.weight, **TOL)
    torch.testing.assert_close(fused.bias, plain.bias, **TOL)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["sgd", "momentum_wd", "nesterov"])
@pytest.mark.parametrize("kind", ["grouped", "batched"])
def test_one_use_per_pass_is_torch_optim_sgd(cfg, kind):
    fused, plain, opt = pair(cfg, kind)
    for t in range(4):
        x1, x2 = inputs(fused, seed=t).requires_grad_(), inputs(fused, seed=t).requires_grad_()
        fused(x1).square().sum().backward()
        plain(x2).square().sum().backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(x1.grad, x2.grad, **TOL)
        assert fused.weight.grad is None
        assert_same(fused, plain)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["sgd", "momentum_wd", "nesterov"])
def test_the_layer_used_twice_in_one_graph_is_one_step_on_the_summed_gradient(cfg):
    """The input gradient of both uses comes from the parameters before the step, and the step
    is one SGD step on the summed gradient (momentum included), as with a plain layer."""
    fused, plain, opt = pair(cfg)
    for t in range(3):
        xs = [inputs(fused, seed=10 * t + i).requires_grad_() for i in range(2)]
        ys = [x.detach().clone().requires_grad_() for x in xs]
        (fused(xs[0]) * 2 + fused(xs[1]).sin()).sum().backward()
        (plain(ys[0]) * 2 + plain(ys[1]).sin()).sum().backward()
        opt.step()
        opt.zero_grad()
        for a, b in zip(xs, ys):
            torch.testing.assert_close(a.grad, b.grad, **TOL)
        assert_same(fused, plain)


@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=["momentum_wd", "nesterov"])
def test_a_gradient_reaching_the_weight_from_elsewhere_is_applied(cfg):
    """An L2 term on layer.weight lands in .grad; the step consumes it with the layer's own."""
    fused, plain, opt = pair(cfg)
    for t in range(3):
        x = inputs(fused, seed=t)
        (fused(x).square().sum() + 0.3 * fused.weight.square().sum()
         + fused.bias.sum()).backward()
        (plain(x).square().sum() + 0.3 * plain.weight.square().sum()
         + plain.bias.sum()).backward()
        opt.step()
        opt.zero_grad()
        assert fused.weight.grad is None and fused.bias.grad is None
        assert_same(fused, plain)


def test_a_gradient_from_elsewhere_alone_is_a_step():
    """The layer is not in the graph, only its weight: the step still happens."""
    cfg = CONFIGS[1]
    fused, plain, opt = pair(cfg)
    (fused.weight ** 3).sum().backward()
    (plain.weight ** 3).sum().backward()
    opt.step()
    assert fused.weight.grad is None
    assert_same(fused, plain)


def test_a_gated_router_trained_through_two_uses():
    cfg = CONFIGS[1]
    fused, plain, opt = pair(cfg)
    P = fused.plan.num_paths
    for t in range(2):
        x = inputs(fused, seed=t)
        g1 = torch.rand(P, 3, dtype=torch.float64, requires_grad=True)
        g2 = g1.detach().clone().requires_grad_()
        (fused(x, g1).sum() + fused(x * 2, g1).square().sum()).backward()
        (plain(x, g2).sum() + plain(x * 2, g2).square().sum()).backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(g1.grad, g2.grad, **TOL)
        assert_same(fused, plain)


def test_a_gradient_for_the_input_only_steps_nothing():
    fused, plain, _ = pair(CONFIGS[1])
    w0, b0 = fused.weight.detach().clone(), fused.bias.detach().clone()
    x = inputs(fused).requires_grad_()
    y = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(fused(x).square().sum(), x)
    (gy,) = torch.autograd.grad(plain(y).square().sum(), y)
    torch.testing.assert_close(gx, gy, **TOL)
    fused(x).square().sum().backward(inputs=[x])
    torch.testing.assert_close(x.grad, gy, **TOL)
    assert torch.equal(fused.weight, w0) and torch.equal(fused.bias, b0)
    assert fused.weight_momentum.abs().sum() == 0


def test_autograd_grad_of_the_weight_returns_it_and_steps_nothing():
    fused, plain, _ = pair(CONFIGS[1])
    w0 = fused.weight.detach().clone()
    x = inputs(fused)
    gw, gb = torch.autograd.grad(fused(x).square().sum(), [fused.weight, fused.bias])
    pw, pb = torch.autograd.grad(plain(x).square().sum(), [plain.weight, plain.bias])
    torch.testing.assert_close(gw, pw, **TOL)
    torch.testing.assert_close(gb, pb, **TOL)
    assert torch.equal(fused.weight, w0)


def test_backward_naming_only_the_bias_steps_only_the_bias():
    cfg = CONFIGS[0]
    fused, plain, _ = pair(cfg)
    w0 = fused.weight.detach().clone()
    x = inputs(fused)
    fused(x).square().sum().backward(inputs=[fused.bias])
    plain(x).square().sum().backward(inputs=[plain.bias])
    with torch.no_grad():
        plain.bias -= cfg.lr * plain.bias.grad
    assert torch.equal(fused.weight, w0)
    torch.testing.assert_close(fused.bias, plain.bias, **TOL)


def test_a_second_backward_of_a_retained_graph_is_refused():
    cfg = CONFIGS[1]
    fused, plain, opt = pair(cfg)
    x = inputs(fused)
    loss = fused(x).square().sum()
    loss.backward(retain_graph=True)
    plain(x).square().sum().backward()
    opt.step()
    state = (fused.weight.detach().clone(), fused.weight_momentum.clone())
    with pytest.raises(RuntimeError, match="fused SGD step has changed them.*torch.optim.SGD"):
        loss.backward()
    assert torch.equal(fused.weight, state[0]) and torch.equal(fused.weight_momentum, state[1])
    assert_same(fused, plain)


def test_a_graph_built_before_a_step_is_refused():
    """Two forwards, then a backward of each: the first steps, the second would use the
    stepped weight (the version counter says so)."""
    fused, _, _ = pair(CONFIGS[0])
    v0 = fused.weight._version
    out1, out2 = fused(inputs(fused, seed=1)), fused(inputs(fused, seed=2))
    out1.sum().backward()
    assert fused.weight._version > v0  # the step is an in-place change autograd sees
    with pytest.raises(RuntimeError, match="fused SGD step has changed them"):
        out2.sum().backward()


def test_frozen_parameters_are_not_stepped():
    cfg = CONFIGS[1]
    fused, plain, opt = pair(cfg)
    fused.weight.requires_grad_(False)
    plain.weight.requires_grad_(False)
    x = inputs(fused)
    fused(x).square().sum().backward()
    plain(x).square().sum().backward()
    opt.step()
    assert_same(fused, plain)


def test_double_backward_is_refused():
    fused, _, _ = pair(CONFIGS[0])
    x = inputs(fused).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward.*fuse_sgd\\(None\\)"):
        torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)


def test_torch_func_is_refused():
    fused, _, _ = pair(CONFIGS[0])
    params = dict(fused.named_parameters())

    def f(p, x):
        return torch.func.functional_call(fused, p, (x,)).sum()
    with pytest.raises(RuntimeError, match="torch.func.*fuse_sgd\\(None\\)"):
        torch.func.grad(f)(params, inputs(fused))


def test_stochastic_rounding_counts_one_step_per_pass_on_either_path():
    """bfloat16 with stochastic rounding: the fused kernel and the summed path both advance
    the rounding counter once per pass, and the summed path rounds like the kernel."""
    torch.manual_seed(0)
    layer = GatedPathwayLinear.batched(3, 5, 4, dtype=torch.bfloat16)
    twin = copy.deepcopy(layer)
    cfg = SGDConfig(lr=0.1, momentum=0.9, stochastic_rounding=True)
    layer.fuse_sgd(cfg)
    twin.fuse_sgd(cfg)
    x = torch.randn(3, 4, 5).bfloat16()
    layer(x).float().square().sum().backward()  # one use: the fused kernel
    # the same gradient through the summed path (an extra, zero gradient from elsewhere)
    (twin(x).float().square().sum() + 0 * twin.weight.float().sum()).backward()
    assert int(layer.sgd_step) == int(twin.sgd_step) == 1
    torch.testing.assert_close(layer.weight.float(), twin.weight.float(), rtol=0, atol=2 ** -7)
    # the summed path's bits equal the kernel's for the same float32 step, up to the order of
    # the gradient's sum: (nearly) all bits agree
    same = (layer.weight.view(torch.int16) == twin.weight.view(torch.int16)).float().mean()
    assert same > 0.9


def test_copies_and_pickles_of_a_fused_layer_step_their_own_parameters():
    import io
    fused, plain, opt = pair(CONFIGS[1])
    twin = copy.deepcopy(fused)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    w0 = fused.weight.detach().clone()
    for m in (twin, loaded):  # a gradient from elsewhere alone: found by the copy's own hook
        (m.weight ** 3).sum().backward()
    (plain.weight ** 3).sum().backward()
    opt.step()
    assert torch.equal(fused.weight, w0)
    assert_same(twin, plain)
    assert_same(loaded, plain)
