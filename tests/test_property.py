"""A property test over the public API: random valid and invalid pathway tables, shapes, dtypes,
strides and devices. Every call either equals the float64 reference (values and gradients, by the
house tolerance rule) or raises a ValueError / RuntimeError / TypeError whose message names the
argument at fault; nothing crashes. Seeded: a failure prints the case to reproduce it.

The default run draws a few hundred cases; ``-m slow`` runs thousands.
"""
from __future__ import annotations

import random
import re

import pytest
import torch

import gated_ops
from gated_ops import GatedPathwayLinear, PathwayPlan, gated_cross_entropy, make_plan, pathway_matmul
from gated_ops.reference import gated_cross_entropy_ref, pathway_matmul_ref
from gated_ops.testing import tolerance

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# words a refusal may name: the arguments of the public functions and the plan's parts
NAMES = re.compile(r"\b(x|weight|bias|gate|plan|paths|csr|layout|src|wgt|dst|num_sources|"
                   r"num_weights|num_dst|logits|target|in_features|out_features|backend)\b")


def _maybe(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _strided(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """t itself, or an equal tensor with other strides (cut from a wider one, or transposed
    storage)."""
    if t.dim() == 0 or not _maybe(rng, 0.4):
        return t
    if _maybe(rng, 0.5):
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        wide[..., 1:t.shape[-1] + 1].copy_(t)
        return wide[..., 1:t.shape[-1] + 1]
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def _table(rng: random.Random):
    S, M, T = rng.randint(0, 4), rng.randint(0, 4), rng.randint(0, 4)
    P = rng.randint(0, 6) if min(S, M, T) > 0 else 0
    kind = rng.choice(["random", "random", "batched", "moe"])
    if kind == "batched" and S == M == T and S > 0:
        src = wgt = dst = list(range(S))
    elif kind == "moe" and S > 0 and T > 0 and M > 0:
        src, wgt, dst = [0] * M, list(range(M)), [0] * M
    else:
        src = [rng.randrange(S) for _ in range(P)] if S else []
        wgt = [rng.randrange(M) for _ in range(P)] if M else []
        dst = [rng.randrange(T) for _ in range(P)] if T else []
    valid = True
    if _maybe(rng, 0.15):  # an invalid table
        valid = False
        which = rng.choice(["src", "wgt", "dst", "len"])
        table = {"src": src, "wgt": wgt, "dst": dst}
        if which == "len":
            table["dst"] = dst + [0]
        else:
            table[which] = table[which] + [rng.choice([-1, 99])]
            for other in {"src", "wgt", "dst"} - {which}:
                table[other] = table[other] + [0]
        src, wgt, dst = table["src"], table["wgt"], table["dst"]
    return src, wgt, dst, S, M, T, valid


def _check_refusal(e: Exception, case: str) -> None:
    msg = str(e)
    assert NAMES.search(msg), f"{case}: a refusal that names no argument: {msg!r}"
    assert "Traceback" not in msg and "INTERNAL ASSERT" not in msg, f"{case}: {msg!r}"


def _one_pathway_case(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    src, wgt, dst, S, M, T, valid = _table(rng)
    layout = rng.choice(["auto", "grouped"])
    case = f"seed {seed}: table {src, wgt, dst} S={S} M={M} T={T} layout={layout}"
    try:
        plan = make_plan(src, wgt, dst, num_sources=S, num_weights=M, num_dst=T, layout=layout)
    except ValueError as e:
        assert not valid, f"{case}: a valid table refused: {e}"
        _check_refusal(e, case)
        return
    assert valid, f"{case}: an invalid table accepted"
    P = plan.num_paths
    dtype = rng.choice(DTYPES)
    B, D_in, D_out = rng.randint(0, 3), rng.randint(1, 5), rng.randint(1, 4)
    x = torch.randn(S, B, D_in, dtype=torch.float64)
    w = torch.randn(M, D_out, D_in, dtype=torch.float64)
    b = torch.randn(M, D_out, dtype=torch.float64) if _maybe(rng, 0.5) else None
    g = rng.choice([None, "P", "PB"])
    gate = None if g is None else (torch.rand(P, dtype=torch.float64) if g == "P"
                                   else torch.rand(P, B, dtype=torch.float64))
    # one deliberate fault, sometimes
    fault = rng.choice([None] * 6 + ["x_dim", "x_S", "w_Din", "w_dtype", "b_shape", "gate_shape",
                                     "x_int", "device"])
    args = {"x": x, "weight": w, "bias": b, "gate": gate}
    if fault == "x_dim":
        args["x"] = x.reshape(S, B * D_in)
    elif fault == "x_S":
        args["x"] = torch.randn(S + 1, B, D_in, dtype=torch.float64)
    elif fault == "w_Din":
        args["weight"] = torch.randn(M, D_out, D_in + 1, dtype=torch.float64)
    elif fault == "b_shape" and b is not None:
        args["bias"] = torch.randn(M, D_out + 1, dtype=torch.float64)
    elif fault == "gate_shape" and gate is not None:
        args["gate"] = torch.rand(P + 1, dtype=torch.float64)
    elif fault == "x_int":
        args["x"] = torch.ones(S, B, D_in, dtype=torch.int64)
    elif fault not in ("w_dtype", "device"):
        fault = None
    inputs = {k: None if v is None else _strided(rng, v.to(dtype) if v.is_floating_point()
                                                  else v) for k, v in args.items()}
    if fault == "w_dtype":
        inputs["weight"] = inputs["weight"].to(torch.float64 if dtype != torch.float64
                                               else torch.float32)
    if fault == "device":
        plan = plan.to("meta")
    backend = rng.choice(["auto", "auto", "reference"])
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()
              if v is not None and v.is_floating_point()}
    call = {k: leaves.get(k, v) for k, v in inputs.items()}
    case += f" dtype={dtype} B={B} D={D_in}->{D_out} gate={g} fault={fault} backend={backend}"
    try:
        y = pathway_matmul(call["x"], call["weight"], plan, call["bias"], call["gate"],
                           backend=backend)
    except (ValueError, RuntimeError, TypeError) as e:
        assert fault is not None, f"{case}: a valid call refused: {e}"
        _check_refusal(e, case)
        return
    assert fault is None, f"{case}: a faulty call accepted"
    ref_in = {k: None if v is None else v.detach().double().requires_grad_()
              for k, v in inputs.items()}
    ref = pathway_matmul_ref(ref_in["x"], ref_in["weight"], ref_in["bias"], ref_in["gate"],
                             plan.src, plan.wgt, plan.dst, plan.num_dst)
    plain = pathway_matmul_ref(*(None if inputs[k] is None else inputs[k].detach()
                                 for k in ("x", "weight", "bias", "gate")),
                               plan.src, plan.wgt, plan.dst, plan.num_dst)
    assert y.shape == ref.shape and y.dtype == dtype, case
    err = (y.double() - ref).abs().max().item() if y.numel() else 0.0
    assert err <= tolerance(ref.detach(), plain), f"{case}: forward error {err:.3e}"
    if y.numel() and dtype == torch.float64:  # gradients, against the float64 reference
        gy = torch.randn_like(ref)
        got = torch.autograd.grad(y, list(leaves.values()), gy.to(dtype), allow_unused=True)
        want = torch.autograd.grad(ref, [ref_in[k] for k in leaves], gy, allow_unused=True)
        for k, a, r in zip(leaves, got, want):
            if r is None:
                assert a is None or not a.abs().max() > 0, f"{case}: grad {k}"
                continue
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=f"{case}: grad {k}")


def _one_ce_case(seed: int) -> None:
    rng = random.Random(10 ** 6 + seed)
    torch.manual_seed(seed)
    R, P, B, C = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 5)
    dtype = rng.choice(DTYPES)
    logits = torch.randn(R, P, B, C, dtype=torch.float64) * 3
    target = torch.randint(0, C, (R, P, B))
    gate = torch.rand(R, P, dtype=torch.float64) + 0.1
    fault = rng.choice([None] * 5 + ["target_range", "target_dtype", "gate_shape", "zero_gate",
                                     "logits_dim"])
    if fault == "target_range":
        target[0, 0, 0] = C
    elif fault == "target_dtype":
        target = target.int()
    elif fault == "gate_shape":
        gate = gate[:, :-1] if P > 1 else gate[:, :0]
    elif fault == "zero_gate":
        gate[0] = 0
    elif fault == "logits_dim":
        logits = logits[0]
    lg = _strided(rng, logits.to(dtype)).detach().requires_grad_()
    case = f"ce seed {seed}: R={R} P={P} B={B} C={C} dtype={dtype} fault={fault}"
    try:
        loss, path_loss, correct = gated_cross_entropy(lg, target, gate.to(dtype))
    except (ValueError, RuntimeError, TypeError) as e:
        assert fault is not None, f"{case}: a valid call refused: {e}"
        _check_refusal(e, case)
        return
    assert fault is None, f"{case}: a faulty call accepted"
    l64 = lg.detach().double().requires_grad_()
    ref = gated_cross_entropy_ref(l64, target, gate.to(dtype).double())
    plain = gated_cross_entropy_ref(lg.detach().float(), target, gate.to(dtype).float())
    for name, a, r, p in zip(("loss", "path_loss"), (loss, path_loss), ref[:2], plain[:2]):
        err = (a.double() - r).abs().max().item()
        assert err <= tolerance(r.detach(), p.to(dtype)), f"{case}: {name} error {err:.3e}"
    assert torch.equal(correct, ref[2]), case
    if dtype == torch.float64:
        (ga,) = torch.autograd.grad(loss.sum(), lg)
        (gr,) = torch.autograd.grad(ref[0].sum(), l64)
        torch.testing.assert_close(ga, gr, rtol=1e-9, atol=1e-9, msg=case)


def _one_plan_case(seed: int) -> None:
    """A hand-built PathwayPlan from random tables: refused with a ValueError naming the plan,
    or consistent (and then the op equals the reference)."""
    rng = random.Random(2 * 10 ** 6 + seed)
    src, wgt, dst, S, M, T, valid = _table(rng)
    if not valid:
        return
    p = make_plan(src, wgt, dst, num_sources=S, num_weights=M, num_dst=T)
    paths, csr = p.paths.clone(), p.csr.clone()
    for _ in range(rng.randint(0, 2)):
        t = rng.choice([paths, csr])
        if t.numel():
            t.view(-1)[rng.randrange(t.numel())] = rng.randint(-2, 8)
    case = f"plan seed {seed}: {src, wgt, dst} S={S} M={M} T={T}"
    try:
        q = PathwayPlan(S, M, T, paths, csr, p.layout)
    except ValueError as e:
        assert str(e).startswith("plan: "), f"{case}: {e}"
        return
    x, w = torch.randn(S, 2, 3, dtype=torch.float64), torch.randn(M, 2, 3, dtype=torch.float64)
    ref = pathway_matmul_ref(x, w, None, None, q.src, q.wgt, q.dst, T)
    torch.testing.assert_close(gated_ops.pathway_matmul(x, w, q), ref, msg=case)


def _one_layer_case(seed: int) -> None:
    """GatedPathwayLinear's constructor and forward on random arguments."""
    rng = random.Random(3 * 10 ** 6 + seed)
    src, wgt, dst, S, M, T, valid = _table(rng)
    d_in, d_out = rng.choice([0, 1, 3, -1]), rng.choice([1, 2, -2])
    case = f"layer seed {seed}: {src, wgt, dst} S={S} M={M} T={T} D={d_in}->{d_out}"
    try:
        layer = GatedPathwayLinear(src, wgt, dst, num_sources=S, num_weights=M, num_dst=T,
                                   in_features=d_in, out_features=d_out, dtype=torch.float64)
    except (ValueError, RuntimeError) as e:
        assert not valid or d_in < 0 or d_out < 0, f"{case}: refused: {e}"
        _check_refusal(e, case)
        return
    assert valid and d_in >= 0 and d_out >= 0, f"{case}: accepted"
    x = torch.randn(S, 2, d_in, dtype=torch.float64)
    ref = pathway_matmul_ref(x, layer.weight, layer.bias, None, layer.plan.src, layer.plan.wgt,
                             layer.plan.dst, T)
    torch.testing.assert_close(layer(x), ref, msg=case)


CHECKS = {"pathway_matmul": _one_pathway_case, "gated_cross_entropy": _one_ce_case,
          "plan": _one_plan_case, "layer": _one_layer_case}


@pytest.mark.parametrize("what", list(CHECKS))
def test_random_calls_equal_the_reference_or_refuse_clearly(what):
    for seed in range(150):
        CHECKS[what](seed)


@pytest.mark.slow
@pytest.mark.parametrize("what", list(CHECKS))
def test_random_calls_equal_the_reference_or_refuse_clearly_long(what):
    for seed in range(150, 3000):
        CHECKS[what](seed)
