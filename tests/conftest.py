"""Backends and devices for the op tests. A GPU backend only adds a parameter here."""
from __future__ import annotations

import pytest
import torch

import gated_ops
from gated_ops.reference import pathway_matmul_ref

HAS_CUDA = torch.cuda.is_available()


def run_pathway(backend: str, inputs: dict, plan: gated_ops.PathwayPlan):
    """Forward of one backend on the inputs (already on the backend's device)."""
    if backend == "reference":
        return pathway_matmul_ref(inputs["x"], inputs["weight"], inputs["bias"], inputs["gate"],
                                  plan.src, plan.wgt, plan.dst, plan.num_dst)
    return gated_ops.pathway_matmul(inputs["x"], inputs["weight"], plan, inputs["bias"],
                                    inputs["gate"],
                                    backend="triton" if backend == "triton" else "auto")


# backend -> device it runs on; GPU backends join when a GPU is present.
BACKENDS = {"reference": "cpu", "cpu": "cpu"}
if HAS_CUDA:  # Triton on the CPU interpreter is too slow for the whole table: tests/test_triton.py
    BACKENDS["cuda"] = "cuda"
    BACKENDS["triton"] = "cuda"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: with 2 threads, OpenMP spin-waiting made one 500-step
    routing run take 20 s instead of 0.4 s with 1 (measured). Use with usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
