"""Triton kernels for the gated pathway ops, as a second backend beside the compiled CUDA one.

The math is :mod:`gated_ops.reference`; the exact semantics and the plan layout are those of the
registered ops ``torch.ops.gated_ops.*`` (csrc/, gated_ops/plan.py). One module per
op family, each read top to bottom as kernels, launchers, registration:

* :mod:`.matmul`: ``pathway_matmul`` and its gradient ops;
* :mod:`.sgd`: the fused SGD steps ``pathway_sgd_``, ``pathway_sgd_lookahead_`` and
  ``pathway_bias_sgd_``;
* :mod:`.cross_entropy`: ``gated_cross_entropy`` and its backward;
* :mod:`.routed`: the routed (sparse) ``routed_matmul`` and its gradient ops, over the route
  table of ``pathway_route`` (that counting sort is the compiled op's);
* :mod:`.gemm`: the block GEMM and column sums that the backward and the fused SGD share (the
  SGD step is their optional epilogue); :mod:`.common`: dtypes, tile sizes, the fallback rule.

Entry points:

* ``pathway_matmul(x, weight, plan, bias=None, gate=None)`` and
  ``gated_cross_entropy(logits, target, gate)``: the same signatures and semantics as
  :func:`gated_ops.pathway_matmul` / :func:`gated_ops.gated_cross_entropy`, differentiable.
* the registered ops ``torch.ops.gated_ops_triton.<name>`` for ``pathway_matmul``,
  ``pathway_grad_z``, ``pathway_grad_x``, ``pathway_grad_weight``, ``pathway_grad_bias``,
  ``pathway_grad_gate``, ``pathway_sgd_``, ``pathway_sgd_lookahead_``, ``pathway_bias_sgd_``,
  ``gated_cross_entropy``, ``gated_cross_entropy_backward``, ``pathway_route``,
  ``routed_matmul``, ``routed_grad_z``, ``routed_grad_x``, ``routed_grad_weight``,
  ``routed_grad_bias``, ``routed_grad_gate`` (``routed_pathway_matmul``, ``routed_linear`` and
  ``routed_matmul`` of gated_ops take ``backend="triton"``). ``GatedPathwayLinear(...,
  backend="triton")`` and ``KPathNet(..., backend="triton")`` run a whole model on them, the
  fused SGD included.

Registration: the schemas are those of ``gated_ops::<name>``, declared once in C++
(csrc/gated_ops.h) and given to this namespace when gated_ops._C loads
(csrc/triton_schemas.cpp). Each family module registers its launchers as the CUDA kernels of its
ops, and as CPU kernels for the interpreter; this package then adds what every namespace gets
from :func:`gated_ops.registration.register_python_parts`: the fake kernels, the autograd formulas
(whose backward calls the ``gated_ops_triton`` gradient ops), the vmap rules, and the composite
``pathway_grad_x_gate``, which has no Triton kernel.

What runs in Triton: the blocked plan layout (every k-path layer; ``plan.kind == "blocked"``) in
float32 / float16 / bfloat16, as batched tile GEMMs (``tl.dot``, fp32 accumulation, IEEE fp32 for
float32 inputs) over the plan's block views, with the gate, bias and pathway-sum epilogue fused
into the forward GEMM, and the SGD step fused into the weight-gradient GEMM (``pathway_sgd_``:
the gradient tile stays in registers; ``pathway_sgd_lookahead_`` also multiplies each new
weight tile by the next batch) and into the bias's column sums (``pathway_bias_sgd_``); the
gated cross-entropy; and the routed ops on any plan, as a grouped GEMM over the route table's
groups that gathers x's rows as it loads them, with deterministic per-sample sums after it.
Explicit fallbacks, each a documented call of the compiled op
(``torch.ops.gated_ops.<name>``), logged at DEBUG level: grouped plans (arbitrary GDLN graphs)
and float64 data; for the fused SGD steps also weights the plan does not cover, an empty batch
and non-contiguous parameters; ``pathway_route`` (the routing's counting sort) always.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slow; float32 / float16 only, but
for the routed ops, which widen bfloat16 tiles to float32 there): set
it before this package is imported (importing triton reads it). Determinism: no atomics; every
output tile is written by one program, so results are bitwise reproducible for a given GPU and
Triton version.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401  (the kernels' compiler)
except ModuleNotFoundError as e:
    if e.name != "triton":
        raise
    # (a ModuleNotFoundError naming triton, as the failed import was: pytest.importorskip skips
    # on it, where a plain ImportError would fail the test module)
    raise ModuleNotFoundError(
        'gated_ops.triton (backend="triton") needs triton, an optional dependency of gated_ops '
        "that is not installed: pip install 'gated_ops[triton]' (CUDA builds of torch already "
        "depend on it)", name="triton") from e

from ..registration import register_python_parts  # noqa: E402
from . import routed, sgd  # noqa: E402, F401  (register the routed ops' and SGD steps' kernels)
from .common import NAMESPACE, TRITON_DTYPES  # noqa: E402
from .cross_entropy import gated_cross_entropy  # noqa: E402
from .matmul import pathway_matmul  # noqa: E402

__all__ = ["pathway_matmul", "gated_cross_entropy", "TRITON_DTYPES"]

register_python_parts(NAMESPACE)  # fakes, autograd, vmap: those of the compiled ops
