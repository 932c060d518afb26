"""The backends: which registered op namespace serves ``backend=``.

"auto" is ``torch.ops.gated_ops``, whose C++ CPU and CUDA kernels the dispatcher picks by the
tensors' device. The others are loaded by name on first use, so the core never imports them
(they import it): "triton" (``gated_ops.triton``: importing Triton reads TRITON_INTERPRET) and
"cuda_emu" (``gated_ops.cuda_emu``: the CUDA kernels emulated on the CPU, for tests).
"reference" is not a namespace: the public functions call the spec for it.
"""
from __future__ import annotations

import importlib

import torch

__all__ = ["BACKENDS"]

BACKENDS = ("auto", "triton", "cuda_emu", "reference")


def _op_namespace(backend: str):
    """The registered ops of a backend ("auto", "triton", "cuda_emu")."""
    if backend == "auto":
        return torch.ops.gated_ops
    ns = _LOADED.get(backend)  # (a dict lookup: torch.compile traces it)
    if ns is None:
        if backend not in _PLUGINS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        module, namespace = _PLUGINS[backend]
        importlib.import_module(module)  # registers its kernels (the backend imports this core)
        ns = _LOADED[backend] = getattr(torch.ops, namespace)
    return ns


# Backends loaded by name on first use: the core never imports them (they import it).
_PLUGINS = {"triton": ("gated_ops.triton", "gated_ops_triton"),
            "cuda_emu": ("gated_ops.cuda_emu", "gated_ops_cudaemu")}
_LOADED: dict = {}
