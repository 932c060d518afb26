"""gated_ops: fused gated multi-pathway matmuls for PyTorch (Gated Deep Linear Networks).

    y[t] = sum_{p : dst_p = t} gate[p] * (x[src_p] @ W[wgt_p]^T + bias[wgt_p])

one registered op (``torch.ops.gated_ops.pathway_matmul``) over a plan compiled once from the
pathway table; the spec is :mod:`gated_ops.reference`.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (loads the library: registers the ops and their kernels)
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "gated_ops: the compiled extension gated_ops._C is missing or does not match the "
        "installed torch. Build it in the repository root with\n"
        "    pip install --no-build-isolation -e .\n"
        f"(original error: {e})"
    ) from e

from . import reference  # noqa: E402
from .nn import GatedPathwayLinear, SGDConfig  # noqa: E402
from .gdln import GDLN  # noqa: E402
from .ops import (  # noqa: E402
    gated_cross_entropy,
    pathway_bias_sgd_,
    pathway_matmul,
    pathway_sgd_,
    pathway_sgd_lookahead_,
)
from .plan import PathwayPlan, make_plan  # noqa: E402

__all__ = [
    "GDLN",
    "GatedPathwayLinear",
    "SGDConfig",
    "PathwayPlan",
    "make_plan",
    "pathway_matmul",
    "gated_cross_entropy",
    "pathway_sgd_",
    "pathway_sgd_lookahead_",
    "pathway_bias_sgd_",
    "reference",
]
__version__ = "0.1.0"
