"""Pathway table -> plan. Validation, sorting and grouping happen here, once.

A :class:`PathwayPlan` is valid by construction: :func:`make_plan` builds it from the table, and a
plan put together by hand (or unpickled) is checked against the plan :func:`make_plan` builds from
its own (src, wgt, dst) rows, table for table, before it exists. The GPU kernels trust a plan's
tables (reading them to check would cost a host synchronisation per call); the CPU kernels, which
the registered ops also serve without a plan, re-check the index ranges they read (O(P), cheap).
A plan's tables are read-only: ``pathway_matmul`` and the layers refuse a plan whose tables were
modified in place after it was validated (their version counters moved).

A plan turns the user's pathway table (src, wgt, dst) into the tensors the kernels read every step
without any host synchronisation:

* ``paths`` (5, P) int64: rows src, wgt, dst, zrow, zcol. ``zrow``/``zcol`` place pathway p's
  pre-gate output Z_p (B, D_out) inside the intermediate matrix Z (see below).
* ``csr`` (T+1 + P + S+1 + P + M+1 + P + P,) int64: three CSR indexes of the pathways, by
  destination (deterministic forward sum), by source (grad_x sum) and by weight (grad_W sum),
  each ``ptr`` then ``perm`` (stable, so ties keep the table order); then ``owner`` (the pathway
  of each Z block in memory order).
* ``layout`` [T, n, s0, ns, m0, nm, flags]: the GEMM structure, and what the host must know of
  the table without reading it from the device: ``ONE_PER_DST`` (every destination has exactly
  one pathway: a forward writes y without a summing pass) and ``Z_IS_Y`` (blocked, nm = 1, and
  pathway p is destination p and Z's row block p: Z is y itself, so a forward's GEMM can write
  y, and an ungated layer's dZ is grad_y). The CPU kernels check the flags against the tables;
  the GPU kernels take them on trust, as they take the tables.

Two layouts cover every table:

``blocked`` (n > 0): the table is exactly the pairs {(s0 + i*ns + a, m0 + i*nm + c)} for
i < n, a < ns, c < nm, each pair once. Then Z = bmm(X_i, W_i^T) with X_i (ns*B, D_in) the ns
sources of block i and W_i (nm*D_out, D_in) its nm weights, both plain views: no gather. Z is
(n*ns*B, nm*D_out); pathway (i, a, c) owns rows (i*ns + a)*B.. and columns c*D_out... This one
pattern is a batched linear (encoders: ns = nm = 1), a shared weight (hidden layer: nm = 1,
n = 1), a full fan-out (decoders: ns = nm = K), mixture-of-experts (ns = 1, nm = M) and R
replicas of each (n = R).

``grouped`` (n = 0): anything else (arbitrary GDLN graphs). Pathways are sorted by weight; the
sources of weight m's pathways are gathered and multiplied by W_m in one GEMM; Z is (P*B, D_out)
with pathway p at row block zrow[p] = its rank in the by-weight order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["PathwayPlan", "make_plan", "replicate_plan", "z_shape", "ONE_PER_DST", "Z_IS_Y"]

# layout[6]'s flags (csrc/plan.h: kOnePerDst, kZIsY)
ONE_PER_DST = 1
Z_IS_Y = 2


def z_shape(layout, num_paths: int, batch, d_out) -> tuple:
    """Shape of the intermediate Z (and of its gradient) for a plan layout, a batch of ``batch``
    rows and ``d_out`` outputs (ints or SymInts, for fake kernels)."""
    _, n, _, ns, _, nm, _ = layout
    return (n * ns * batch, nm * d_out) if n > 0 else (num_paths * batch, d_out)


@dataclass(frozen=True, eq=False)
class PathwayPlan:
    """A compiled pathway table. Build with :func:`make_plan`; move with :meth:`to`.

    Constructing one directly (``PathwayPlan(S, M, T, paths, csr, layout)``, or by unpickling)
    validates every table against :func:`make_plan` of its (src, wgt, dst) rows and raises
    ``ValueError`` naming the first inconsistent entry: a plan that exists never makes a kernel
    read out of bounds. The tables must not be modified afterwards (:meth:`check_unmodified`).
    """

    num_sources: int  # S
    num_weights: int  # M
    num_dst: int  # T
    paths: Tensor  # (5, P) int64: src, wgt, dst, zrow, zcol
    csr: Tensor  # int64, see module docstring
    layout: tuple[int, ...]  # (T, n, s0, ns, m0, nm, flags); n == 0 means grouped
    _validated: bool = field(default=False, repr=False, compare=False)
    # the tables on the host (the same tensors for a CPU plan): what to() copies from, so that
    # a plan on the meta device (a module built there, then to_empty()) still has its tables
    _host: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = None
        if not self._validated:
            host = _validate(self)
            object.__setattr__(self, "_validated", True)
        object.__setattr__(self, "layout", tuple(int(v) for v in self.layout))
        if self._host is None:
            if self.paths.device.type == "cpu":
                host = (self.paths, self.csr)
            object.__setattr__(self, "_host", host)
        object.__setattr__(self, "_versions", (self.paths._version, self.csr._version))
        object.__setattr__(self, "_host_versions", None if self._host is None else
                           self._host[0]._version + self._host[1]._version)

    @classmethod
    def _trusted(cls, num_sources: int, num_weights: int, num_dst: int, paths: Tensor,
                 csr: Tensor, layout: tuple[int, ...],
                 host: tuple[Tensor, Tensor] | None = None) -> "PathwayPlan":
        """A plan from tables already validated (make_plan's output, a validated plan moved)."""
        return cls(num_sources, num_weights, num_dst, paths, csr, layout, _validated=True,
                   _host=host)

    def __reduce__(self):
        # unpickling goes through the validating constructor
        return (PathwayPlan, (self.num_sources, self.num_weights, self.num_dst,
                              self.paths, self.csr, self.layout))

    def check_unmodified(self) -> None:
        """Raise if the tables were modified in place since the plan was validated (a check
        of two version counters; skipped while torch.compile traces, which guards on the
        plan's tensors itself)."""
        if torch.compiler.is_compiling():
            return
        if (self.paths._version, self.csr._version) != self._versions:
            raise ValueError("plan: its tables (paths / csr) were modified in place after the "
                             "plan was validated; build a new plan with gated_ops.make_plan")

    @property
    def one_per_dst(self) -> bool:
        """Every destination has exactly one pathway."""
        return bool(self.layout[6] & ONE_PER_DST)

    @property
    def z_is_y(self) -> bool:
        """Z is y's layout: blocked, nm = 1, pathway p is destination p and Z's row block p
        (every k-path layer). Then an ungated layer's dZ is grad_y itself (known on the host,
        not read from the device tensors: see GatedPathwayLinear's fused backward)."""
        return bool(self.layout[6] & Z_IS_Y)

    @property
    def num_paths(self) -> int:
        return self.paths.shape[1]

    @property
    def src(self) -> Tensor:
        return self.paths[0]

    @property
    def wgt(self) -> Tensor:
        return self.paths[1]

    @property
    def dst(self) -> Tensor:
        return self.paths[2]

    @property
    def kind(self) -> str:
        return "blocked" if self.layout[1] > 0 else "grouped"

    @property
    def device(self) -> torch.device:
        return self.paths.device

    def to(self, device: torch.device | str) -> "PathwayPlan":
        """The plan on ``device``, copied from its host tables (so a plan on the meta device
        moves to a real one)."""
        self.check_unmodified()
        device = torch.device(device)
        if device == self.device:
            return self
        if self._host is None:
            if self.device.type == "meta":
                raise ValueError("plan: a plan built on the meta device has no tables to move; "
                                 "build it with gated_ops.make_plan on a real device")
            return PathwayPlan._trusted(self.num_sources, self.num_weights, self.num_dst,
                                        self.paths.to(device), self.csr.to(device),
                                        self.layout)
        paths, csr = self._host
        if paths._version + csr._version != self._host_versions:
            raise ValueError("plan: its host tables were modified in place after the plan "
                             "was validated; build a new plan with gated_ops.make_plan")
        return PathwayPlan._trusted(self.num_sources, self.num_weights, self.num_dst,
                                    paths.to(device), csr.to(device), self.layout, self._host)

    def z_shape(self, batch: int, d_out: int) -> tuple[int, int]:
        """Shape of the intermediate Z (and of its gradient) for a batch of ``batch`` rows."""
        return z_shape(self.layout, self.num_paths, batch, d_out)

    def __repr__(self) -> str:
        _, n, s0, ns, m0, nm, _ = self.layout
        structure = f"blocked(n={n}, s0={s0}, ns={ns}, m0={m0}, nm={nm})" if n else "grouped"
        return (
            f"PathwayPlan(P={self.num_paths}, S={self.num_sources}, M={self.num_weights}, "
            f"T={self.num_dst}, {structure}, device={self.device})"
        )


def _as_index(name: str, t: Tensor | list[int], size: int) -> Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or (t.numel() and t.is_floating_point()):
        raise ValueError(f"{name}: expected a 1-D integer tensor, got shape {tuple(t.shape)} "
                         f"dtype {t.dtype}")
    t = t.to(device="cpu", dtype=torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise ValueError(f"{name}: indices must lie in [0, {size}), got range "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t


def _csr(keys: Tensor, size: int) -> tuple[Tensor, Tensor]:
    perm = torch.sort(keys, stable=True).indices
    ptr = torch.zeros(size + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(keys, minlength=size), 0)
    return ptr, perm


def _find_block(src: Tensor, wgt: Tensor) -> tuple[int, int, int, int, int] | None:
    """(n, s0, ns, m0, nm) if the pairs (src, wgt) are exactly one batched outer product."""
    P = src.numel()
    if P == 0:
        return None
    s0, m0 = int(src.min()), int(wgt.min())
    nm = int((src == s0).sum())
    ns = int((wgt == m0).sum())
    if P % (ns * nm):
        return None
    n = P // (ns * nm)
    i = torch.arange(n).view(n, 1, 1)
    a = torch.arange(ns).view(1, ns, 1)
    c = torch.arange(nm).view(1, 1, nm)
    want_s = (s0 + i * ns + a).expand(n, ns, nm).reshape(-1)
    want_m = (m0 + i * nm + c).expand(n, ns, nm).reshape(-1)
    key = lambda s, m: s * (int(wgt.max()) + nm * n + 1) + m  # noqa: E731
    if torch.equal(torch.sort(key(src, wgt)).values, torch.sort(key(want_s, want_m)).values):
        return n, s0, ns, m0, nm
    return None


def make_plan(
    src: Tensor | list[int],
    wgt: Tensor | list[int],
    dst: Tensor | list[int],
    *,
    num_sources: int,
    num_weights: int,
    num_dst: int,
    device: torch.device | str | None = None,
    layout: str = "auto",
) -> PathwayPlan:
    """Validate a pathway table and compile it into a :class:`PathwayPlan`.

    Args:
        src, wgt, dst: (P,) pathway table: pathway p computes x[src[p]] @ W[wgt[p]]^T and adds it
            (gated) into destination dst[p].
        num_sources, num_weights, num_dst: S, M, T.
        device: where the plan's index tensors live (the device of the data it will see).
        layout: "auto" (blocked when the table allows it), or force "grouped" (for tests).
    """
    for name, v in (("num_sources", num_sources), ("num_weights", num_weights),
                    ("num_dst", num_dst)):
        if int(v) < 0:
            raise ValueError(f"{name}: expected >= 0, got {v}")
    src = _as_index("src", src, num_sources)
    wgt = _as_index("wgt", wgt, num_weights)
    dst = _as_index("dst", dst, num_dst)
    if not (src.numel() == wgt.numel() == dst.numel()):
        raise ValueError(f"src, wgt, dst: expected the same length P, got {src.numel()}, "
                         f"{wgt.numel()}, {dst.numel()}")
    if layout not in ("auto", "grouped"):
        raise ValueError(f"layout: expected 'auto' or 'grouped', got {layout!r}")
    P = src.numel()

    dst_ptr, dst_perm = _csr(dst, num_dst)
    src_ptr, src_perm = _csr(src, num_sources)
    wgt_ptr, wgt_perm = _csr(wgt, num_weights)
    block = _find_block(src, wgt) if layout == "auto" else None
    if block is not None:
        n, s0, ns, m0, nm = block
        zrow = src - s0
        zcol = wgt - m0 - torch.div(zrow, ns, rounding_mode="floor") * nm
    else:
        n = s0 = ns = m0 = nm = 0
        zrow = torch.empty(P, dtype=torch.int64)
        zrow[wgt_perm] = torch.arange(P)
        zcol = torch.zeros(P, dtype=torch.int64)
    paths = torch.stack([src, wgt, dst, zrow, zcol]) if P else torch.zeros(5, 0, dtype=torch.int64)
    # owner: the pathway of each Z block in memory order (row block, column block)
    owner = torch.empty(P, dtype=torch.int64)
    owner[zrow * (nm if block is not None else 1) + zcol] = torch.arange(P)
    csr = torch.cat([dst_ptr, dst_perm, src_ptr, src_perm, wgt_ptr, wgt_perm, owner])
    one_per_dst = bool(P == num_dst and torch.equal(dst_ptr, torch.arange(num_dst + 1)))
    z_is_y = bool(block is not None and nm == 1 and one_per_dst and torch.equal(dst, zrow))
    flags = (ONE_PER_DST if one_per_dst else 0) | (Z_IS_Y if z_is_y else 0)
    plan = PathwayPlan._trusted(num_sources, num_weights, num_dst, paths, csr,
                                (num_dst, n, s0, ns, m0, nm, flags))
    return plan.to(device) if device is not None else plan


_CSR_PARTS = ("dst_ptr", "dst_perm", "src_ptr", "src_perm", "wgt_ptr", "wgt_perm", "owner")
_PATH_ROWS = ("src", "wgt", "dst", "zrow", "zcol")


def _validate(plan: PathwayPlan) -> tuple[Tensor, Tensor] | None:
    """Checks a hand-built plan: its tables must be exactly those make_plan builds from its
    (src, wgt, dst) rows (with the layout kind it claims). Raises ValueError naming the first
    entry that differs. O(P log P) on the host, once per plan. Returns the tables on the host
    (None on meta)."""
    sizes = {}
    for name in ("num_sources", "num_weights", "num_dst"):
        v = getattr(plan, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"plan: {name}: expected an int >= 0, got {v!r}")
        sizes[name] = v
    paths, csr, layout = plan.paths, plan.csr, plan.layout
    for name, t in (("paths", paths), ("csr", csr)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64:
            raise ValueError(f"plan: {name}: expected an int64 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
    if paths.dim() != 2 or paths.shape[0] != 5:
        raise ValueError(f"plan: paths: expected shape (5, P), got {tuple(paths.shape)}")
    if csr.device != paths.device:
        raise ValueError(f"plan: csr is on {csr.device}, paths on {paths.device}")
    try:
        layout = tuple(int(v) for v in layout)
    except (TypeError, ValueError):
        raise ValueError(f"plan: layout: expected 7 ints, got {layout!r}") from None
    if len(layout) != 7:
        raise ValueError(f"plan: layout: expected 7 ints (T, n, s0, ns, m0, nm, flags), got "
                         f"{len(layout)}")
    if paths.device.type == "meta":  # no values to check (shapes are checked below)
        want = _expected_shapes(paths.shape[1], sizes)
        if csr.shape != want or layout[0] != sizes["num_dst"]:
            raise ValueError(f"plan: csr: expected shape {tuple(want)}, got {tuple(csr.shape)}")
        return None
    host = paths.detach().cpu()
    try:
        ref = make_plan(host[0], host[1], host[2], layout="grouped" if layout[1] == 0 else "auto",
                        **sizes)
    except ValueError as e:
        raise ValueError(f"plan: paths: {e}") from None
    if layout != ref.layout:
        raise ValueError(f"plan: layout: expected {ref.layout} for this pathway table, got "
                         f"{layout}; build plans with gated_ops.make_plan")
    _first_difference("paths", host, ref.paths, _PATH_ROWS)
    want = tuple(ref.csr.shape)
    if tuple(csr.shape) != want:
        raise ValueError(f"plan: csr: expected shape {want} for T={sizes['num_dst']}, "
                         f"S={sizes['num_sources']}, M={sizes['num_weights']}, "
                         f"P={paths.shape[1]}, got {tuple(csr.shape)}")
    host_csr = csr.detach().cpu()
    _first_difference("csr", host_csr, ref.csr, _CSR_PARTS, _csr_bounds(ref))
    return host, host_csr


def _expected_shapes(P: int, sizes: dict) -> torch.Size:
    return torch.Size([sizes["num_dst"] + sizes["num_sources"] + sizes["num_weights"] + 3
                       + 4 * P])


def _csr_bounds(plan: PathwayPlan) -> list[int]:
    T, S, M, P = plan.num_dst, plan.num_sources, plan.num_weights, plan.num_paths
    lens = [T + 1, P, S + 1, P, M + 1, P, P]
    return [sum(lens[:i]) for i in range(len(lens) + 1)]


def _first_difference(name: str, got: Tensor, want: Tensor, parts: tuple[str, ...],
                      bounds: list[int] | None = None) -> None:
    """Raise a ValueError naming the first entry where got differs from want."""
    if torch.equal(got, want):
        return
    flat_got, flat_want = got.reshape(-1), want.reshape(-1)
    i = int((flat_got != flat_want).nonzero()[0])
    if bounds is None:  # (5, P) rows
        P = got.shape[1]
        part, j = parts[i // P], i % P
    else:
        k = max(b for b in range(len(parts)) if bounds[b] <= i)
        part, j = parts[k], i - bounds[k]
    raise ValueError(f"plan: {name}: {part}[{j}] is {int(flat_got[i])}, expected "
                     f"{int(flat_want[i])} for this pathway table (inconsistent tables); build "
                     "plans with gated_ops.make_plan")


def replicate_plan(plan: PathwayPlan, replicas: int) -> PathwayPlan:
    """The plan of ``replicas`` independent copies of plan's table (replica v's pathways read
    sources v*S.., weights v*M.., write destinations v*T..), computed from the plan's tensors on
    their device, without a host synchronisation (vmap over a module's weights runs the copies
    in one op call over this plan). Equal, tensor for tensor, to :func:`make_plan` on the
    replicated table (``gated_ops.testing.replicate``) built with the plan's layout mode."""
    paths, csr, layout = _replicated_plan(plan.paths, plan.csr, plan.layout, plan.num_sources,
                                          plan.num_weights, replicas)
    return PathwayPlan._trusted(replicas * plan.num_sources, replicas * plan.num_weights,
                                replicas * plan.num_dst, paths, csr, tuple(layout))


def _replicated_plan(paths: Tensor, csr: Tensor, layout, S: int, M: int, V: int
                     ) -> tuple[Tensor, Tensor, list[int]]:
    """paths (5, P), csr, layout of V replicas of a plan; paths (V, 5, P) and csr (V, L) give
    each replica its own tables (stacked module buffers), sharing the layout."""
    T, n, _, ns_, _, nm, flags = layout
    P = paths.shape[-1]
    if V == 1:  # the plan itself (a blocked one may start past source or weight 0)
        return paths.reshape(5, P), csr.reshape(-1), list(layout)
    if paths.dim() == 2:
        paths = paths.expand(V, *paths.shape)
    if csr.dim() == 1:
        csr = csr.expand(V, csr.shape[0])
    v = torch.arange(V, device=paths.device).unsqueeze(1)  # (V, 1)
    dst_ptr, dst_perm, src_ptr, src_perm, wgt_ptr, wgt_perm, owner = csr.split(
        [T + 1, P, S + 1, P, M + 1, P, P], dim=1)

    def ptr(p: Tensor) -> Tensor:  # (V, K + 1) CSR offsets -> (V * K + 1,)
        return torch.cat([(p[:, :-1] + v * P).flatten(), p.new_full((1,), V * P)])

    def perm(q: Tensor) -> Tensor:  # (V, P) pathway indices -> (V * P,)
        return (q + v * P).flatten()

    src, wgt, dst, zrow, zcol = paths.unbind(1)  # each (V, P)
    if V > 0 and n > 0 and S == n * ns_ and M == n * nm:
        # the blocks of replica v follow those of replica v - 1 (then s0 = m0 = 0): blocked
        zrow = zrow + v * (n * ns_)
        owner = perm(owner)
        layout = [V * T, V * n, 0, ns_, 0, nm, flags]
    else:
        # grouped: Z's row block of a pathway is its rank in the by-weight order, replica by
        # replica (make_plan: zrow[wgt_perm] = arange(P)); Z is y only for blocked plans
        rank = torch.empty_like(wgt_perm).scatter_(
            1, wgt_perm, torch.arange(P, device=paths.device).expand(V, P))
        zrow, zcol = rank + v * P, torch.zeros_like(zcol)
        owner = perm(wgt_perm)
        layout = [V * T, 0, 0, 0, 0, 0, flags & ~Z_IS_Y]
    paths = torch.stack([src + v * S, wgt + v * M, dst + v * T, zrow, zcol]).flatten(1)
    csr = torch.cat([ptr(dst_ptr), perm(dst_perm), ptr(src_ptr), perm(src_perm), ptr(wgt_ptr),
                     perm(wgt_perm), owner])
    return paths, csr, layout
