"""``GatedPathwayLinear``: a module that owns a weight bank, its bias and a compiled plan."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from torch.autograd import Variable

from .backends import _op_namespace
from .ops import autocast_dtype, pathway_matmul
from .optim import pathway_sgd_lookahead_
from .plan import PathwayPlan, make_plan
from .routed import Route, make_route, moe_plan, routed_linear, routed_pathway_matmul
from .reference import round_stochastic_bf16, rounding_seed_at, sgd_momentum_ref

__all__ = ["GatedPathwayLinear", "SGDConfig", "MoE"]


@dataclass(frozen=True)
class SGDConfig:
    """torch.optim.SGD's hyper-parameters (dampening 0) for the fused update.

    ``stochastic_rounding``: bfloat16 parameters are stored by stochastic rounding of the float32
    step (unbiased; the momentum buffers round to nearest), so updates far below bfloat16's
    spacing (2^-8 relative) still move a weight on average. With round-to-nearest they are lost:
    in bfloat16, 3 of the 4 gain-0.03 runs of the quick k-path preset never left chance
    (experiments/README.md). The random bits hash (a per-layer seed, the step count, the element
    index): deterministic and resumable (the count is the buffer ``sgd_step``), but replicas are
    then not bitwise equal to separate runs. The CPU, CUDA and Triton kernels store the same
    bits for the same float32 step. The kernels read the count on the device (the ops'
    ``rounding_step``) and the layer advances it there: the seed costs no host sync, and a
    step captured in a CUDA graph draws new bits at every replay. No effect on float32 / float64
    weights.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    stochastic_rounding: bool = False

    def __post_init__(self) -> None:
        if self.lr < 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"SGDConfig: expected lr, momentum, weight_decay >= 0, got {self}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGDConfig: nesterov needs momentum > 0")


class GatedPathwayLinear(nn.Module):
    """Many gated linear pathways as one op: y[t] = sum_{p: dst_p=t} gate[p] (x[src_p] W_{wgt_p}^T + b).

    Args:
        src, wgt, dst: the pathway table (see :func:`gated_ops.make_plan`).
        num_sources, num_weights, num_dst: S, M, T.
        in_features, out_features: D_in, D_out of every weight.
        bias: learn a bias per weight.
        backend: "auto" (the compiled CPU / CUDA kernels), "triton" (gated_ops.triton,
            forward, backward and fused SGD; CUDA, or CPU under TRITON_INTERPRET=1) or
            "cuda_emu" (the CUDA kernels emulated on CPU tensors, for tests: gated_ops.cuda_emu).
    Shapes: forward(x (S, B, D_in), gate None | (P,) | (P, B)) -> (T, B, D_out). A layer with
    one source also takes tokens first, as ``nn.Linear`` does: x (B, D_in) with the router's
    layout of the gate, (B, P), and returns (B, D_out) when it has one destination (an MoE
    layer), else (T, B, D_out). Routed (sparse) mode: ``forward(x, gate, idx=idx)`` with idx
    (B, k) the active pathways of each sample (-1: unused) and gate (B, k) their weights (or
    None): the result of the dense gate that holds them, at the cost of the k active pathways
    (:func:`gated_ops.routed_pathway_matmul`).

    Constructors for the common patterns: :meth:`batched` (one weight per source),
    :meth:`shared` (one weight for all sources), :meth:`fanout` (every source through every
    weight), :meth:`mixture_of_experts`; all take ``replicas=R`` for R independent copies.

    ``fuse_sgd(SGDConfig(...))`` switches on the fused optimizer: the backward pass applies SGD
    (with momentum) to the weight in place and ``weight.grad`` stays None (exclude the weight from
    other optimizers; a weight with requires_grad False is left alone). For skinny blocks (at
    most 64 rows of dZ per weight, e.g. the k-path encoders) the gradient is formed in registers
    and never stored; wider blocks form one block's gradient at a time.
    The bias is updated in the same backward. Gradients for x and for a gate that requires them
    (a trained router) are returned as usual, computed from the weights before the step. Eager
    mode and CUDA graphs only (not under torch.compile, which cannot trace a parameter update
    inside backward).

    In a ``torch.autocast`` region the layer runs in the region's dtype, as ``nn.Linear`` does
    (:func:`gated_ops.pathway_matmul`); with the fused SGD it runs in its parameters' dtype
    instead (the step updates them in place), its inputs cast to it.
    """

    def __init__(self, src: Sequence[int] | Tensor, wgt: Sequence[int] | Tensor,
                 dst: Sequence[int] | Tensor, *, num_sources: int, num_weights: int,
                 num_dst: int, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "triton", "cuda_emu"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'cuda_emu', got {backend!r}")
        self.backend = backend
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        plan = make_plan(src, wgt, dst, num_sources=num_sources, num_weights=num_weights,
                         num_dst=num_dst)
        self.in_features, self.out_features = in_features, out_features
        self.num_sources, self.num_dst = num_sources, num_dst
        self.layout = plan.layout
        # The plan is not a buffer: it keeps its tables on the host and is re-placed on the
        # parameters' device by _apply (to(), cuda(), to_empty() after a build on meta), so
        # nothing a module method does to buffers can leave it inconsistent.
        self._plan = plan
        # z_is_y plans (each destination one pathway's output): the weight whose bias
        # destination t takes, for the lookahead's epilogue; None where it is weight t
        # (batched layers, the k-path encoders: the bias is added as it is stored)
        bias_index = None
        if plan.z_is_y:
            bias_index = torch.empty_like(plan.wgt).index_copy_(0, plan.dst, plan.wgt)
            if torch.equal(bias_index, torch.arange(len(bias_index))):
                bias_index = None
        self._bias_index_host = bias_index
        self._bias_index = bias_index
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_weights, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_weights, out_features, **kw)) if bias else None
        self.sgd: SGDConfig | None = None
        self._pending: list[_Contribution] = []  # fused SGD: this backward's contributions
        self._pending_task = -1  # ... and the autograd graph task they belong to
        self._grad_hooks: list = []  # post-accumulate-grad hooks of the fused parameters
        self.reset_parameters()
        self._place_plan()

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def batched(cls, n: int, in_features: int, out_features: int, *, replicas: int = 1,
                **kw) -> "GatedPathwayLinear":
        """n independent linears: pathway p maps source p with weight p to destination p."""
        r = list(range(n * replicas))
        return cls(r, r, r, num_sources=n * replicas, num_weights=n * replicas,
                   num_dst=n * replicas, in_features=in_features, out_features=out_features, **kw)

    @classmethod
    def shared(cls, n: int, in_features: int, out_features: int, *, replicas: int = 1,
               **kw) -> "GatedPathwayLinear":
        """One weight applied to n sources (per replica)."""
        r = list(range(n * replicas))
        return cls(r, [i // n for i in r], r, num_sources=n * replicas, num_weights=replicas,
                   num_dst=n * replicas, in_features=in_features, out_features=out_features, **kw)

    @classmethod
    def fanout(cls, n_src: int, n_w: int, in_features: int, out_features: int, *,
               replicas: int = 1, **kw) -> "GatedPathwayLinear":
        """Every source through every weight: destination (r, i, j) = (r*n_src + i)*n_w + j."""
        src = [r * n_src + i for r in range(replicas) for i in range(n_src) for _ in range(n_w)]
        wgt = [r * n_w + j for r in range(replicas) for _ in range(n_src) for j in range(n_w)]
        return cls(src, wgt, list(range(len(src))), num_sources=n_src * replicas,
                   num_weights=n_w * replicas, num_dst=len(src), in_features=in_features,
                   out_features=out_features, **kw)

    @classmethod
    def mixture_of_experts(cls, num_experts: int, in_features: int, out_features: int, *,
                           replicas: int = 1, **kw) -> "GatedPathwayLinear":
        """One source, num_experts experts summed into one output; gate = router weights (P, B)."""
        src = [r for r in range(replicas) for _ in range(num_experts)]
        wgt = list(range(num_experts * replicas))
        return cls(src, wgt, src, num_sources=replicas, num_weights=num_experts * replicas,
                   num_dst=replicas, in_features=in_features, out_features=out_features, **kw)

    # -- state -----------------------------------------------------------------------------------
    @property
    def plan(self) -> PathwayPlan:
        """The compiled pathway table, on the parameters' device."""
        return self._plan

    def _place_plan(self) -> None:
        dev = self.weight.device
        self._plan = self._plan.to(dev)
        self._bias_index = (None if self._bias_index_host is None
                            else self._bias_index_host.to(dev))

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._place_plan()  # the plan follows the parameters (built from its host tables)
        return out

    @property
    def num_weights(self) -> int:
        return self.weight.shape[0]

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per weight matrix."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0
        with torch.no_grad():
            for w in self.weight:
                if w.numel():  # (D_in or D_out 0: nothing to draw)
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def fuse_sgd(self, config: SGDConfig | None) -> "GatedPathwayLinear":
        """Apply SGD inside backward (None switches it off). Momentum buffers start at zero.

        The contract (docs/design.md, "The fused SGD"): every backward pass that reaches this
        layer's parameters (one whose engine would accumulate their ``.grad``: ``backward()``,
        ``backward(inputs=[..., weight])``) is one SGD step of each of them, with the gradient a
        plain layer would have accumulated in that pass: the sum over every use of the layer
        in the graph and over anything else that reaches the parameter (a regulariser on
        ``layer.weight`` lands in ``.grad`` and is consumed by the step). The step runs when the
        pass ends, after every node that reads the parameters, so the input and gate gradients
        are those of the parameters before the step. With one use and nothing else reaching
        the parameter, the step is the fused kernel; otherwise the gradient is formed and
        stepped as ``torch.optim.SGD`` would (``reference.sgd_momentum_ref``). Then:

        * ``torch.autograd.grad(out, x)`` or ``backward(inputs=[x])`` (the parameters not
          asked for): no step; ``torch.autograd.grad(out, layer.weight)``: the gradient is
          returned and nothing is stepped. Frozen parameters (requires_grad False) never step.
        * The step bumps the parameters' version counters, so a graph that saved them before
          it (a second backward through a ``retain_graph`` graph, a graph built before the
          step) raises an error saying so instead of using the stepped weights; to accumulate
          gradients over several backward passes use a plain layer and ``torch.optim.SGD``.
        * Not under ``torch.func`` transforms (a functional call has no parameter to step):
          call ``fuse_sgd(None)`` there. Switching it on clears ``.grad`` of the parameters.
        """
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []
        self._pending, self._pending_task = [], -1
        self.sgd = config
        for name in ("weight_momentum", "bias_momentum", "sgd_step"):
            if hasattr(self, name):
                delattr(self, name)
        if config is not None and config.momentum:
            self.register_buffer("weight_momentum", torch.zeros_like(self.weight.detach()))
            if self.bias is not None:
                self.register_buffer("bias_momentum", torch.zeros_like(self.bias.detach()))
        if config is not None and config.stochastic_rounding:
            # steps taken (the stochastic rounding's counter; saved with the state dict)
            self.register_buffer("sgd_step", torch.zeros((), dtype=torch.int64))
        if config is not None:
            for param in (self.weight, self.bias):
                if param is not None:
                    param.grad = None
        self._register_step_hooks()
        return self

    def _register_step_hooks(self) -> None:
        """A gradient that reaches a parameter from outside the layer (the layer itself
        returns none) schedules the pass's step, which consumes it (fuse_sgd's contract)."""
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []
        if self.sgd is None:
            return
        ref = weakref.ref(self)
        for param in (self.weight, self.bias):
            if param is not None:
                self._grad_hooks.append(param.register_post_accumulate_grad_hook(
                    _StepHook(ref)))

    def __getstate__(self):
        state = self.__dict__.copy()  # (pickle, deepcopy) without hook handles or a pass
        state.update(_grad_hooks=[], _pending=[], _pending_task=-1)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register_step_hooks()

    def _rounding_seed(self) -> int:
        """The seed of this layer's stream of stochastic rounding seeds (-1: round to
        nearest). The kernels draw step s's bits from reference.rounding_seed_at(seed, s), s
        read from the device counter ``sgd_step`` as they run (the ops' rounding_step): no
        host read of it, and captured CUDA graphs draw new bits at every replay."""
        if self.sgd is None or not self.sgd.stochastic_rounding:
            return -1
        if self.weight.dtype == torch.float16:
            raise ValueError("SGDConfig.stochastic_rounding: implemented for bfloat16 weights; "
                             "this layer's are float16")
        if self.weight.dtype != torch.bfloat16:
            return -1
        # a stream per layer shape: layers of other shapes draw other bits
        M, Do, Di = self.weight.shape
        return (M * 1_000_003 + Do * 1_009 + Di) & 0x7FFFFFFF

    def forward_lookahead(self, x: Tensor, x_next: Tensor, y: Tensor) -> Tensor:
        """``forward(x)`` read from a buffer, the fused update writing the next one: the
        lookahead. Each step's update then streams the weight once for both the step and the
        next step's forward (the k-path encoders: on the CPU's skinny kernels in one pass, on
        CUDA and Triton in the update kernel's epilogue). No state crosses steps but ``y``, so
        a CUDA graph captures it and eager code uses the same calls.

        ``y`` (T, B, D_out) must hold ``forward(x)`` from the current parameters, as the
        lookahead computes it: written by :meth:`prime_lookahead` or by the previous step's
        update. Returns it as this forward's output (autograd-connected, as from
        ``forward(x)``), without reading the weight; the coming backward's fused update then
        overwrites ``y`` with ``forward(x_next)`` from the updated parameters, so the next
        step calls ``forward_lookahead(x_next, x_after, y)``. The caller keeps that chain
        (prime it whenever the last step did not know this one's input): nothing here checks
        that ``y`` is current. The training is the same as without the lookahead, bit for bit
        on the CPU kernels and to float rounding on CUDA (the update's tile sums), and a run
        primed anew from a checkpoint continues with the same bits as one never interrupted.

        Shapes: x (S, B, D_in), x_next (S, B', D_in), y (T, B, D_out) of the weight's dtype
        and device. Needs the fused SGD, a ``plan.z_is_y`` layer, a trained weight and
        autograd on; no gate.
        """
        self._check_lookahead("forward_lookahead", x_next)
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            raise ValueError("forward_lookahead: needs autograd on and a trained weight (the "
                             "fused update that refreshes y runs in backward)")
        self._check_lookahead_buffer("forward_lookahead", x, y)
        if autocast_dtype(x.device.type) is not None:  # the parameters' dtype, as forward_as
            x = x.to(self.weight.dtype)
        return _FusedSGDPathway.apply(x, self.weight, self.bias, None, self, self.plan, y,
                                      x_next.to(self.weight.dtype))

    @torch.no_grad()
    def prime_lookahead(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``forward(x)`` (T, B, D_out) from the current parameters, computed as the fused
        update's lookahead computes it (so bit for bit what a step of
        :meth:`forward_lookahead` would have left): written into ``y`` (allocated if None)
        and returned. Call it before the first step of such a chain: at the start, after a
        resume, after anything else changed the parameters, or whenever the next input was
        not known at the last step (an epoch boundary). It runs the update kernel with a zero
        gradient and a zero learning rate (the weight is rewritten with its own bits), so it
        reads and writes the weight once; outside a captured graph."""
        self._check_lookahead("prime_lookahead", x)
        if y is None:
            y = x.new_empty(self.num_dst, x.shape[1], self.out_features, dtype=self.weight.dtype)
        self._check_lookahead_buffer("prime_lookahead", x, y)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("prime_lookahead: call it outside the captured graph")
        x = x.to(self.weight.dtype)
        plan, cfg = self.plan, self.sgd
        # the step's kernel, with its momentum / nesterov variant, on scratch state: dZ = 0,
        # lr = 0 and weight decay 0 leave every weight bit as it is (w - 0 * 0)
        mom = None if getattr(self, "weight_momentum", None) is None else torch.zeros_like(
            self.weight_momentum)
        z = pathway_sgd_lookahead_(
            x.new_zeros(plan.z_shape(x.shape[1], self.out_features)), x, self.weight.detach(),
            mom, plan, 0.0, cfg.momentum if mom is not None else 0.0, 0.0,
            cfg.nesterov and mom is not None, -1, x_next=x, backend=self.backend)
        return self._lookahead_output(z, x.shape[1], out=y)

    def _check_lookahead(self, what: str, x_next: Tensor) -> None:
        if self.sgd is None:
            raise ValueError(f"{what}: needs the fused SGD update (call fuse_sgd first)")
        if not self.plan.z_is_y:
            raise ValueError(f"{what}: implemented for layers whose pathways are their "
                             "outputs (plan.z_is_y: batched, shared, k-path layers); this "
                             f"layer's plan is {self.plan.kind}")
        if (x_next.dim() != 3 or x_next.shape[0] != self.num_sources
                or x_next.shape[2] != self.in_features):
            name = "x" if what == "prime_lookahead" else "x_next"
            raise ValueError(f"{name}: expected (S, B, D_in) = ({self.num_sources}, B, "
                             f"{self.in_features}), got shape {tuple(x_next.shape)}")

    def _check_lookahead_buffer(self, what: str, x: Tensor, y: Tensor) -> None:
        expected = (self.num_dst, x.shape[1], self.out_features)
        if (tuple(y.shape) != expected or y.dtype != self.weight.dtype
                or y.device != self.weight.device or not y.is_contiguous()):
            raise ValueError(f"{what}: y: expected a contiguous {self.weight.dtype} tensor of "
                             f"shape {expected} on {self.weight.device}, got "
                             f"{y.dtype} {tuple(y.shape)} on {y.device}"
                             f"{'' if y.is_contiguous() else ' (not contiguous)'}")
        if x.dim() != 3 or x.shape[0] != self.num_sources or x.shape[2] != self.in_features:
            raise ValueError(f"x: expected (S, B, D_in) = ({self.num_sources}, B, "
                             f"{self.in_features}), got shape {tuple(x.shape)}")

    def _lookahead_output(self, z: Tensor, B: int, out: Tensor | None = None) -> Tensor:
        """The layer's output from the lookahead's Z (a z_is_y plan: Z + the bias of each
        destination's weight, as the forward's epilogue adds it), into ``out`` if given."""
        y = z.view(self.num_dst, B, self.out_features)
        if self.bias is None:
            return y if out is None else out.copy_(y)
        b = self.bias if self._bias_index is None else self.bias.index_select(0, self._bias_index)
        return torch.add(y, b.unsqueeze(1), out=y if out is None else out)

    def forward(self, x: Tensor, gate: Tensor | None = None, *,
                idx: Tensor | None = None) -> Tensor:
        tokens_first = x.dim() == 2
        if tokens_first:
            if self.num_sources != 1:
                raise ValueError(f"x: tokens-first input (B, D_in) needs a layer with one "
                                 f"source, this one has {self.num_sources}; pass (S, B, D_in)")
            x = x.unsqueeze(0)
            if gate is not None and idx is None:
                if gate.dim() != 2 or gate.shape != (x.shape[1], self.plan.num_paths):
                    raise ValueError(f"gate: with tokens-first x, expected the router's layout "
                                     f"(B, P) = ({x.shape[1]}, {self.plan.num_paths}), got shape "
                                     f"{tuple(gate.shape)}")
                gate = gate.t()
        y = self.forward_as(x, self.plan, self.weight, self.bias, gate, idx=idx)
        return y.squeeze(0) if tokens_first and self.num_dst == 1 else y

    def forward_as(self, x: Tensor, plan: PathwayPlan, weight: Tensor, bias: Tensor | None,
                   gate: Tensor | None = None, *, idx: Tensor | None = None) -> Tensor:
        """The layer run through another plan on views of its own parameters (contiguous views,
        e.g. K weights (K, C, H) as one (K*C, H)), with the fused SGD if it is on: the update
        lands in the parameters and momentum buffers through the views. KPathNet runs its
        decoders this way. ``idx``: the routed mode (see the class)."""
        if self.sgd is not None and torch.is_grad_enabled():
            if torch._C._are_functorch_transforms_active():
                raise RuntimeError("GatedPathwayLinear: the fused SGD (fuse_sgd) cannot run "
                                   "under torch.func transforms (there is no parameter to "
                                   "step); call layer.fuse_sgd(None) and use torch.func's "
                                   "gradients with an optimizer")
            for name, view, param in (("weight", weight, self.weight), ("bias", bias, self.bias)):
                if view is not None and not _views_whole(view, param):
                    raise ValueError(f"forward_as: {name}: expected a contiguous view of the "
                                     f"layer's whole {name} (the fused SGD steps the "
                                     "parameter through it)")
            if autocast_dtype(x.device.type) is not None:
                # the step updates the parameters themselves: run in their dtype (an autocast
                # region's 16-bit activations are cast to it)
                x = x.to(weight.dtype)
                gate = None if gate is None else gate.to(weight.dtype)
            plan.check_unmodified()
            route = None if idx is None else make_route(idx, plan, backend=self.backend)
            return _FusedSGDPathway.apply(x, weight, bias, gate, self, plan, None, None, route)
        if idx is not None:
            return routed_pathway_matmul(x, weight, plan, idx, gate, bias, backend=self.backend)
        return pathway_matmul(x, weight, plan, bias, gate, backend=self.backend)

    # -- the fused SGD step --------------------------------------------------------------------
    def _schedule_step(self) -> None:
        """Queue this layer's step at the end of the running backward pass (once per pass)."""
        task = torch._C._current_graph_task_id()
        if task != self._pending_task:
            # contributions of another pass (one that failed before its end) are void
            self._pending, self._pending_task = [], task
            Variable._execution_engine.queue_callback(self._step_now)

    def _step_now(self) -> None:
        """The step of this backward pass: the fused kernels for one use and nothing else
        reaching the parameters, else torch.optim.SGD's step on the summed gradient."""
        pending, self._pending, self._pending_task = self._pending, [], -1
        if self.sgd is None:
            return
        extra_w = None if self.weight.grad is None else self.weight.grad
        extra_b = None if self.bias is None or self.bias.grad is None else self.bias.grad
        if len(pending) == 1 and extra_w is None and extra_b is None and pending[0].route is None:
            pending[0].step_fused(self)
        else:
            self._step_summed(pending, extra_w, extra_b)
        for param in (self.weight, self.bias):
            if param is not None:
                torch.autograd.graph.increment_version(param)

    @torch.no_grad()
    def _step_summed(self, pending: list["_Contribution"], extra_w: Tensor | None,
                     extra_b: Tensor | None) -> None:
        """torch.optim.SGD's step (reference.sgd_momentum_ref) on the gradient a plain layer
        would accumulate: every use's share plus what reached ``.grad`` from elsewhere; in
        float32 for 16-bit parameters, rounded once as the fused kernels round."""
        cfg, ops = self.sgd, _op_namespace(self.backend)
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        gw = None if extra_w is None else extra_w.to(acc)
        gb = None if extra_b is None else extra_b.to(acc)
        for c in pending:
            p, lay = c.plan, list(c.plan.layout)
            dz, x = c.dz.to(acc), c.x.to(acc)
            if c.step_w:
                g = (ops.pathway_grad_weight(dz, x, p.paths, p.csr, lay, p.num_weights, c.d_out)
                     if c.route is None else
                     ops.routed_grad_weight(dz, x, c.route.idx, c.route.table, p.paths,
                                            p.num_weights))
                g = g.reshape(self.weight.shape)
                gw = g if gw is None else gw + g
            if c.step_b:
                g = (ops.pathway_grad_bias(dz, p.paths, p.csr, lay, p.num_sources,
                                           p.num_weights, c.d_out)
                     if c.route is None else
                     ops.routed_grad_bias(dz, c.route.table, p.num_weights))
                g = g.reshape(self.bias.shape)
                gb = g if gb is None else gb + g
        seed = self._rounding_seed()
        step = None if seed < 0 else int(self.sgd_step)  # (host read: this path is eager)
        for param, grad, buf, s in ((self.weight, gw, "weight_momentum", seed),
                                    (self.bias, gb, "bias_momentum",
                                     seed if seed < 0 else (seed + 1) & 0x7FFFFFFF)):
            if param is None or grad is None or not param.requires_grad:
                continue
            param.grad = None
            w = param.detach().to(acc)
            mom = getattr(self, buf, None)
            m32 = None if mom is None else mom.to(acc)
            sgd_momentum_ref(w, grad, m32, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
            if mom is not None:
                mom.copy_(m32)
            if s >= 0 and param.dtype == torch.bfloat16:
                param.copy_(round_stochastic_bf16(w, rounding_seed_at(s, step)))
            else:
                param.copy_(w)
        if step is not None:
            self.sgd_step.add_(1)
        for c in pending:
            if c.x_next is not None:  # the lookahead's output, from the stepped parameters
                self.prime_lookahead(c.x_next, c.static_out)

    def extra_repr(self) -> str:
        _, n, s0, ns, m0, nm, _ = self.layout
        structure = f"blocked(n={n}, ns={ns}, nm={nm})" if n else "grouped"
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"sources={self.num_sources}, weights={self.num_weights}, "
             f"destinations={self.num_dst}, pathways={self.plan.num_paths}, {structure}, "
             f"bias={self.bias is not None}")
        if self.sgd is not None:
            s += f", fused_sgd={self.sgd}"
        if self.backend != "auto":
            s += f", backend={self.backend}"
        return s


class _StepHook:
    """A fused parameter's post-accumulate-grad hook (GatedPathwayLinear._register_step_hooks)."""

    def __init__(self, ref: "weakref.ref[GatedPathwayLinear]"):
        self.ref = ref

    def __call__(self, param: Tensor) -> None:
        m = self.ref()
        if m is not None and m.sgd is not None and (param is m.weight or param is m.bias):
            m._schedule_step()


def _views_whole(view: Tensor, param: Tensor) -> bool:
    """view is a contiguous view of all of param (the same memory, element for element)."""
    return (view is param or (view.is_contiguous() and param.is_contiguous()
                              and view.numel() == param.numel()
                              and view.data_ptr() == param.data_ptr()))


def _engine_wants(param: Tensor | None) -> str:
    """What the running backward pass does with ``param``'s gradient: "step" (it would be
    accumulated into .grad: the fused SGD steps instead), "grad" (autograd.grad asks for it:
    return it, step nothing) or "none" (not reached: inputs= names other tensors)."""
    if param is None or not param.requires_grad:
        return "none"
    node = torch.autograd.graph.get_gradient_edge(param).node
    try:
        return "step" if torch._C._will_engine_execute_node(node) else "none"
    except RuntimeError as e:  # raised for a leaf that torch.autograd.grad() captures
        if "autograd.grad" in str(e):
            return "grad"
        raise


class _Contribution:
    """One use's share of a fused SGD step, kept until the backward pass ends."""

    def __init__(self, ctx, dz: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                 step_w: bool, step_b: bool, x_next: Tensor | None,
                 static_out: Tensor | None):
        self.plan, self.dz, self.x, self.weight, self.bias = ctx.plan, dz, x, weight, bias
        self.route: Route | None = ctx.route
        self.d_out = weight.shape[1]
        self.step_w, self.step_b = step_w, step_b
        self.x_next, self.static_out = x_next, static_out

    @torch.no_grad()
    def step_fused(self, m: "GatedPathwayLinear") -> None:
        """The step as one use's fused kernels: the weight's update (with the next forward
        for the lookahead) and the bias's, the bias riding on the weight's op."""
        cfg, plan, ops = m.sgd, self.plan, _op_namespace(m.backend)
        layout, S, M = list(plan.layout), plan.num_sources, plan.num_weights
        weight, bias, x_next = self.weight, self.bias, self.x_next

        def buffer(name: str, like: Tensor) -> Tensor | None:  # momentum, viewed like the param
            b = getattr(m, name, None)
            return None if b is None else b.view(like.shape)
        seed = m._rounding_seed()
        step = m.sgd_step if seed >= 0 else None  # the device counter, read by the kernels
        bias_seed = seed if seed < 0 else (seed + 1) & 0x7FFFFFFF
        # the bias's step rides on the weight's op when both step (on CUDA in the same
        # launch); alone, grad_bias and the step in one op (one kernel on CUDA)
        step_bias = self.step_b and (self.step_w or x_next is not None)
        b_args = ((bias, buffer("bias_momentum", bias), bias_seed) if step_bias
                  else (None, None, -1))
        z_next = None
        if x_next is not None:
            # the weight's step, and Z of the announced next forward from the new weight
            # (one pass over the weight where the kernels fuse it: pathway_sgd_lookahead_)
            z_next = pathway_sgd_lookahead_(
                self.dz, self.x, weight, buffer("weight_momentum", weight), plan, cfg.lr,
                cfg.momentum, cfg.weight_decay, cfg.nesterov, seed,
                x_next=x_next.to(weight.dtype), backend=m.backend, rounding_step=step,
                bias=b_args[0], bias_momentum_buffer=b_args[1], bias_rounding_seed=b_args[2])
        elif self.step_w:
            ops.pathway_sgd_(self.dz, self.x, weight, buffer("weight_momentum", weight),
                             plan.paths, plan.csr, layout, cfg.lr, cfg.momentum,
                             cfg.weight_decay, cfg.nesterov, seed, step, *b_args)
        if self.step_b and not step_bias:
            ops.pathway_bias_sgd_(self.dz, bias, buffer("bias_momentum", bias), plan.paths,
                                  plan.csr, layout, S, M, cfg.lr, cfg.momentum,
                                  cfg.weight_decay, cfg.nesterov, bias_seed, step)
        if step is not None:
            step.add_(1)  # on the counter's device, after the kernels that read it
        if z_next is not None:
            # the next forward's output, y = Z + bias (the stepped bias), as its epilogue
            # would compute it, into the caller's buffer
            m._lookahead_output(z_next, x_next.shape[1], out=self.static_out)


class _FusedSGDPathway(torch.autograd.Function):
    """pathway_matmul whose backward steps the weight (and bias) by SGD instead of returning
    their gradients (GatedPathwayLinear.fuse_sgd states the contract); the input and gate
    gradients are returned, computed from the parameters before the step. The step itself
    runs when the backward pass ends (GatedPathwayLinear._step_now)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, module, plan, precomputed=None, x_next=None,
                route=None):
        """precomputed, x_next (forward_lookahead): this forward's output, already computed by
        the last update, and the next step's input: the update writes forward(x_next) into
        precomputed. route: the routed mode (gate: the slots' weights (B, k))."""
        ctx.module, ctx.plan, ctx.route = module, plan, route
        ctx.static_next = None if x_next is None else (x_next, precomputed)
        # Only parameters that train are stepped (a frozen weight or bias stays as it is).
        ctx.step_weight = weight.requires_grad
        ctx.step_bias = bias is not None and bias.requires_grad
        ops = _op_namespace(module.backend)
        if route is not None:
            y, z = ops.routed_matmul(x, weight, bias, gate, route.idx, route.table, plan.paths,
                                     plan.num_dst, False, False)
            ctx.save_for_backward(x, weight, bias, gate, z)
            return y
        ctx.save_for_backward(x, weight, bias, gate)
        if precomputed is not None:  # this forward, computed by the last update (lookahead)
            return precomputed
        return ops.pathway_matmul(x, weight, bias, gate, plan.paths, plan.csr, list(plan.layout))

    @staticmethod
    def backward(ctx, grad_y):
        m: GatedPathwayLinear = ctx.module
        try:
            x, weight, bias, gate, *z = ctx.saved_tensors  # weight, bias: the parameters or views
        except RuntimeError as e:
            if "modified by an inplace operation" not in str(e):
                raise
            raise RuntimeError(
                "GatedPathwayLinear (fused SGD): this backward needs the layer's parameters as "
                "they were in its forward, but a fused SGD step has changed them since (each "
                "backward pass that reaches the parameters steps them once: a second backward "
                "through a retain_graph graph, or a graph built before the last step). To "
                "accumulate gradients over several backward passes, use a plain layer "
                "(fuse_sgd(None)) with torch.optim.SGD.") from None
        if torch.is_grad_enabled() and grad_y.requires_grad:
            raise RuntimeError("GatedPathwayLinear (fused SGD): double backward "
                               "(create_graph=True through the layer) is not implemented; "
                               "use a plain layer (fuse_sgd(None))")
        plan = ctx.plan
        _ops = _op_namespace(m.backend)
        layout = list(plan.layout)
        S, M = plan.num_sources, plan.num_weights
        want_w = _engine_wants(m.weight) if ctx.step_weight else "none"
        want_b = _engine_wants(m.bias) if ctx.step_bias else "none"
        need_x, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        need_dz = need_x or want_w != "none" or want_b != "none"
        dz = None
        route = ctx.route
        if route is not None:  # the routed mode: its own gradient ops, the step summed
            if need_dz:
                dz = _ops.routed_grad_z(grad_y, gate, route.idx, route.table, plan.paths, False)
            grad_x = grad_gate = grad_w = grad_b = None
            if need_x:
                grad_x = _ops.routed_grad_x(dz, weight, route.idx, route.table, plan.paths, S,
                                            False)
            if need_gate:
                grad_gate = _ops.routed_grad_gate(grad_y, z[0], route.idx, route.table,
                                                  plan.paths)
            if want_w == "grad":
                grad_w = _ops.routed_grad_weight(dz, x, route.idx, route.table, plan.paths, M,
                                                 False)
            if want_b == "grad":
                grad_b = _ops.routed_grad_bias(dz, route.table, M)
            step_w, step_b = want_w == "step", want_b == "step"
            if step_w or step_b:
                m._schedule_step()
                m._pending.append(_Contribution(ctx, dz, x, weight, bias, step_w, step_b, None,
                                                None))
            return grad_x, grad_w, grad_b, grad_gate, None, None, None, None, None
        if not need_dz:
            pass
        elif gate is None and plan.z_is_y:  # dZ_p = grad_y[p], in Z's order: grad_y itself
            # (contiguous: autograd may hand an expanded, stride-0 grad_y, e.g. from .sum())
            dz = grad_y.reshape(plan.z_shape(grad_y.shape[1], grad_y.shape[2])).contiguous()
        else:
            dz = _ops.pathway_grad_z(grad_y, gate, plan.paths, plan.csr, layout, S, M)
        grad_x = grad_gate = grad_w = grad_b = None
        # these read the parameters as they are: the step comes at the end of the pass
        if need_gate and need_x and hasattr(_ops, "pathway_grad_x_gate"):
            grad_x, grad_gate = _ops.pathway_grad_x_gate(grad_y, x, weight, bias, gate,
                                                         plan.paths, plan.csr, layout)
        elif need_gate:
            grad_gate = _ops.pathway_grad_gate(grad_y, x, weight, bias, gate, plan.paths,
                                               plan.csr, layout)
        if need_x and grad_x is None:
            grad_x = _ops.pathway_grad_x(dz, weight, plan.paths, plan.csr, layout, S, x.shape[1])
        if want_w == "grad":  # torch.autograd.grad asks for the weight: a plain gradient
            grad_w = _ops.pathway_grad_weight(dz, x, plan.paths, plan.csr, layout, M,
                                              weight.shape[1])
        if want_b == "grad":
            grad_b = _ops.pathway_grad_bias(dz, plan.paths, plan.csr, layout, S, M,
                                            weight.shape[1])
        step_w, step_b = want_w == "step", want_b == "step"
        static_out = x_next = None
        if ctx.static_next is not None:  # forward_lookahead: y_next into the caller's buffer
            x_next, static_out = ctx.static_next
            if not step_w:
                raise RuntimeError("forward_lookahead: its backward must step the layer's "
                                   "weight (the buffer would not be refreshed)")
            ctx.static_next = None
        if step_w or step_b:
            m._schedule_step()
            m._pending.append(_Contribution(ctx, dz, x, weight, bias, step_w, step_b, x_next,
                                            static_out))
        return grad_x, grad_w, grad_b, grad_gate, None, None, None, None, None


_ACTIVATIONS = {"gelu": torch.nn.functional.gelu, "relu": torch.relu,
                "silu": torch.nn.functional.silu, "identity": lambda h: h}


class MoE(nn.Module):
    """A mixture-of-experts feed-forward block on the routed op, drop-in for a transformer's MLP.

    For each token x (the last dimension of the input, d_model):

        probs = softmax(router(x)), (w, e) = top-k of probs (w renormalised over the k when
        ``normalize``), y = sum_j w_j * expert_{e_j}(x),
        expert_e(x) = W2_e act(W1_e x + b1_e) + b2_e, or with ``glu``
        W2_e (act(G_e x + bg_e) * (U_e x + bu_e)) + b2_e (``activation="silu"``: SwiGLU).

    The tokens are grouped by expert once per forward (:func:`gated_ops.make_route`) and both
    expert layers run on that grouping (:func:`gated_ops.routed_linear`: the first writes one
    row per (token, expert) pair, the second gathers them back, weighted by the router): the
    cost follows the T k active pairs. Gradients reach the experts, the router (through the
    weights w) and the input.

    ``aux_loss``: after each forward, ``self.aux_loss`` holds the Switch Transformer's
    load-balancing loss E * sum_e f_e P_e (f_e: the fraction of the T k slots routed to expert e,
    P_e: the mean router probability of e; 1 when perfectly balanced); add
    ``coef * moe.aux_loss`` to the training loss (Fedus et al. use coef = 0.01).

    Shapes: (..., d_model) -> (..., d_model).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, top_k: int = 2, *,
                 activation: str = "gelu", glu: bool = False, bias: bool = True,
                 normalize: bool = True, aux_loss: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 backend: str = "auto"):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden),
                        ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_experts = {num_experts}, "
                             f"got {top_k}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got "
                             f"{activation!r}")
        if backend not in ("auto", "triton", "cuda_emu"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'cuda_emu', got {backend!r}")
        self.d_model, self.d_hidden, self.num_experts, self.top_k = (d_model, d_hidden,
                                                                     num_experts, top_k)
        self.activation, self.glu, self.normalize = activation, glu, normalize
        self.use_aux_loss, self.backend = aux_loss, backend
        kw = {"device": device, "dtype": dtype}
        E, D, H = num_experts, d_model, d_hidden
        self.router = nn.Linear(D, E, bias=False, **kw)
        self.w1 = nn.Parameter(torch.empty(E, 2 * H if glu else H, D, **kw))
        self.b1 = nn.Parameter(torch.empty(E, 2 * H if glu else H, **kw)) if bias else None
        self.w2 = nn.Parameter(torch.empty(E, D, H, **kw))
        self.b2 = nn.Parameter(torch.empty(E, D, **kw)) if bias else None
        self.aux_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert matrix."""
        self.router.reset_parameters()
        with torch.no_grad():
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                for e in range(self.num_experts):
                    nn.init.kaiming_uniform_(w[e], a=math.sqrt(5))
                if b is not None:
                    bound = 1 / math.sqrt(w.shape[2])
                    b.uniform_(-bound, bound)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The router on tokens x (T, d_model): (probs (T, E) in float32 or float64, top-k
        weights (T, k) in x's dtype, top-k experts (T, k) int64)."""
        logits = self.router(x)
        probs = logits.float().softmax(-1) if logits.dtype in (torch.float16, torch.bfloat16) \
            else logits.softmax(-1)
        topw, topi = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            topw = topw / topw.sum(-1, keepdim=True)
        return probs, topw.to(x.dtype), topi

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (..., d_model) with d_model = {self.d_model}, got "
                             f"shape {tuple(x.shape)}")
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        probs, topw, topi = self.route(tokens)
        route = make_route(topi, moe_plan(self.num_experts, x.device), backend=self.backend)
        # (T k, H) rows, one per (token, expert) pair, grouped by expert
        h = routed_linear(tokens.unsqueeze(0), self.w1, self.b1, route, grouped_out=True,
                          backend=self.backend)
        act = _ACTIVATIONS[self.activation]
        if self.glu:
            g, u = h.chunk(2, dim=-1)
            h = act(g) * u
        else:
            h = act(h)
        y = routed_linear(h, self.w2, self.b2, route, topw, grouped_in=True,
                          backend=self.backend)[0]
        if self.use_aux_loss:
            E = self.num_experts
            counts = torch.zeros(E, dtype=probs.dtype, device=x.device).index_add_(
                0, topi.reshape(-1), torch.ones(topi.numel(), dtype=probs.dtype,
                                                device=x.device))
            frac = counts / max(topi.numel(), 1)
            self.aux_loss = E * (frac * probs.mean(0)).sum() if tokens.shape[0] else \
                probs.new_zeros(())
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"activation={self.activation}{', glu' if self.glu else ''}, "
                f"bias={self.b1 is not None}, normalize={self.normalize}")
