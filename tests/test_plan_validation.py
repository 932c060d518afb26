"""A PathwayPlan is valid by construction: hand-built or unpickled plans are checked table for
table, tables modified in place are refused, and modules built on meta get real tables."""
from __future__ import annotations

import io
import pickle

import pytest
import torch

from gated_ops import GDLN, GatedPathwayLinear, PathwayPlan, make_plan, pathway_matmul
from gated_ops.reference import pathway_matmul_ref

TABLES = {
    "batched": ([0, 1, 2], [0, 1, 2], [0, 1, 2], 3, 3, 3),
    "shared": ([0, 1, 2, 3], [0, 0, 1, 1], [0, 1, 2, 3], 4, 2, 4),
    "fanout": ([0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 2, 3], 2, 2, 4),
    "moe": ([0, 0, 0], [0, 1, 2], [0, 0, 0], 1, 3, 1),
    "grouped": ([0, 1, 1, 2], [2, 0, 2, 1], [1, 0, 0, 1], 3, 3, 2),
    "empty_dst": ([0, 1], [1, 0], [0, 2], 2, 2, 3),
}


def plan_of(name, layout="auto"):
    src, wgt, dst, S, M, T = TABLES[name]
    return make_plan(src, wgt, dst, num_sources=S, num_weights=M, num_dst=T, layout=layout)


CASES = [(n, l) for n in TABLES for l in ("auto", "grouped")]


@pytest.mark.parametrize("name, layout", CASES)
def test_a_copy_of_a_valid_plan_is_accepted(name, layout):
    p = plan_of(name, layout)
    q = PathwayPlan(p.num_sources, p.num_weights, p.num_dst, p.paths.clone(), p.csr.clone(),
                    list(p.layout))
    assert q.layout == p.layout and torch.equal(q.csr, p.csr)


@pytest.mark.parametrize("name, layout", CASES)
def test_every_corrupted_table_entry_is_refused_or_harmless(name, layout):
    """Each entry of paths, csr and layout in turn set to a few wrong values: the constructor
    raises ValueError naming the table, or (a table still consistent) the op equals the
    reference. Nothing crashes or reads out of bounds."""
    p = plan_of(name, layout)
    x = torch.randn(p.num_sources, 2, 3, dtype=torch.float64)
    w = torch.randn(p.num_weights, 4, 3, dtype=torch.float64)
    tables = {"paths": p.paths, "csr": p.csr}
    for table, t in tables.items():
        for i in range(t.numel()):
            for bad in (t.view(-1)[i] + 1, t.view(-1)[i] - 1, -1, 10 ** 9):
                c = {k: v.clone() for k, v in tables.items()}
                c[table].view(-1)[i] = bad
                if torch.equal(c[table], tables[table]):
                    continue
                try:
                    q = PathwayPlan(p.num_sources, p.num_weights, p.num_dst, c["paths"],
                                    c["csr"], p.layout)
                except ValueError as e:
                    assert table in str(e) or "plan" in str(e)
                    continue
                ref = pathway_matmul_ref(x, w, None, None, q.src, q.wgt, q.dst, q.num_dst)
                torch.testing.assert_close(pathway_matmul(x, w, q), ref)
    for i in range(7):
        for bad in (p.layout[i] + 1, p.layout[i] - 1):
            lay = list(p.layout)
            lay[i] = bad
            with pytest.raises(ValueError, match="plan: layout"):
                PathwayPlan(p.num_sources, p.num_weights, p.num_dst, p.paths, p.csr, lay)


def test_wrong_sizes_and_types_are_refused():
    p = plan_of("grouped")
    with pytest.raises(ValueError, match="num_sources: expected an int >= 0"):
        PathwayPlan(-1, p.num_weights, p.num_dst, p.paths, p.csr, p.layout)
    with pytest.raises(ValueError, match="paths: expected an int64 tensor"):
        PathwayPlan(p.num_sources, p.num_weights, p.num_dst, p.paths.int(), p.csr, p.layout)
    with pytest.raises(ValueError, match=r"paths: expected shape \(5, P\)"):
        PathwayPlan(p.num_sources, p.num_weights, p.num_dst, p.paths[:4], p.csr, p.layout)
    with pytest.raises(ValueError, match="csr: expected shape"):
        PathwayPlan(p.num_sources, p.num_weights, p.num_dst, p.paths, p.csr[:-1], p.layout)
    with pytest.raises(ValueError, match="layout: expected 7 ints"):
        PathwayPlan(p.num_sources, p.num_weights, p.num_dst, p.paths, p.csr, p.layout[:6])
    with pytest.raises(ValueError, match=r"plan: paths: src: indices must lie in \[0, 2\)"):
        PathwayPlan(2, p.num_weights, p.num_dst, p.paths, p.csr, p.layout)


def test_a_pickled_plan_is_validated_when_loaded():
    p = plan_of("fanout")
    q = pickle.loads(pickle.dumps(p))
    assert torch.equal(q.csr, p.csr) and q.layout == p.layout
    buf = io.BytesIO()
    torch.save(p, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).layout == p.layout
    # a file whose tables were tampered with does not load
    tampered = make_plan([0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 2, 3], num_sources=2,
                         num_weights=2, num_dst=4)
    tampered.csr[-1] = 0  # the owner table (after validation: bypasses the version check)
    with pytest.raises(ValueError, match=r"csr: owner\[3\] is 0, expected 3"):
        pickle.loads(pickle.dumps(tampered))


def test_tables_modified_in_place_are_refused():
    layer = GatedPathwayLinear.batched(3, 5, 4)
    x = torch.randn(3, 2, 5)
    layer(x)
    with torch.no_grad():
        layer.plan.paths[0, 0] = 2
    with pytest.raises(ValueError, match="modified in place"):
        layer(x)
    p = plan_of("moe")
    p.csr.add_(0)
    with pytest.raises(ValueError, match="modified in place"):
        pathway_matmul(torch.randn(1, 2, 3), torch.randn(3, 4, 3), p)


def test_a_layer_built_on_meta_gets_real_tables_from_to_empty():
    for make in (lambda d: GatedPathwayLinear.batched(3, 5, 4, device=d),
                 lambda d: GatedPathwayLinear([0, 1, 1], [0, 1, 2], [0, 0, 1], num_sources=2,
                                              num_weights=3, num_dst=2, in_features=5,
                                              out_features=4, device=d)):
        ref = make("cpu")
        layer = make("meta").to_empty(device="cpu")
        layer.load_state_dict(ref.state_dict())
        x = torch.randn(layer.num_sources, 2, 5)
        assert layer.plan.device.type == "cpu"
        torch.testing.assert_close(layer(x), ref(x))


def test_a_gdln_built_on_meta_gets_real_tables_from_to_empty():
    kw = dict(nodes={"a": 3, "b": 4, "c": 2},
              edges=[("a", "b"), ("b", "c"), ("a", "c")])
    ref = GDLN(**kw)
    net = GDLN(**kw, device="meta").to_empty(device="cpu")
    net.load_state_dict(ref.state_dict())
    x = {"a": torch.randn(5, 3)}
    torch.testing.assert_close(net(x)["c"], ref(x)["c"])


def test_a_kpath_net_built_on_meta_gets_real_tables_from_to_empty():
    from experiments.kpath_net import KPathNet
    ref = KPathNet(3, 6, 5, classes=4, replicas=2)
    net = KPathNet(3, 6, 5, classes=4, replicas=2, device="meta").to_empty(device="cpu")
    net.load_state_dict(ref.state_dict())
    xk = torch.randn(6, 2, 6)
    torch.testing.assert_close(net(xk), ref(xk))
