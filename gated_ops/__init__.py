"""gated_ops: fused gated multi-pathway matmuls for PyTorch (Gated Deep Linear Networks).

    y[t] = sum_{p : dst_p = t} gate[p] * (x[src_p] @ W[wgt_p]^T + bias[wgt_p])

one registered op (``torch.ops.gated_ops.pathway_matmul``) over a plan compiled once from the
pathway table; the spec is :mod:`gated_ops.reference`.

The compiled extension ``gated_ops._C`` is built against the installed torch (``pip install
--no-build-isolation -e .`` in a checkout) and only loads into that torch release, so each build
records it (``__version__``, e.g. ``0.1.0+torch2.13.0.cpu``) and this import refuses another torch
before it loads _C, with the command that rebuilds. An unbuilt checkout that hides an installed
gated_ops says so too. Optional parts name their extras: ``gated_ops[theory]`` (scipy),
``[triton]``.
"""
from __future__ import annotations

import importlib.machinery
import json
from pathlib import Path

import torch  # loads libtorch, which _C links against

__version__ = "0.1.0"  # the release (setup.py reads it here); a build adds its torch, below

_HERE = Path(__file__).resolve().parent
_SO_NAMES = ["_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES]


def _describe(version: str, cuda: str | None, hip: str | None) -> str:
    return f"torch {version} ({f'CUDA {cuda}' if cuda else f'ROCm {hip}' if hip else 'CPU'})"


def _rebuild_command() -> str:
    if (_HERE.parent / "setup.py").is_file():
        return f"    cd {_HERE.parent} && pip install --no-build-isolation -e ."
    return "    pip install --no-build-isolation --no-deps --force-reinstall <gated_ops source>"


def _torch_build() -> dict:
    """This build's record of the torch it was compiled against (written by setup.py), checked
    against the running torch before _C loads: a library built against another torch release
    may fail to load or crash (torch's C++ ABI is not stable across releases). Empty when there
    is no record (an unbuilt checkout, a build by an older setup.py)."""
    try:
        info = json.loads((_HERE / "_build_info.json").read_text())
        build = next(info[name] for name in _SO_NAMES if name in info)
    except (OSError, ValueError, StopIteration):
        return {}
    built = (build["torch"].split("+")[0], build["torch_cuda"], build["torch_hip"])
    running = (torch.__version__.split("+")[0], torch.version.cuda, torch.version.hip)
    if built != running:
        raise ImportError(
            f"gated_ops: its extension was built against {_describe(*built)}, but this Python "
            f"runs {_describe(*running)}, and it only loads into the torch release it was "
            f"compiled against. Rebuild it against this torch:\n{_rebuild_command()}"
        )
    return build


def _installs_hidden() -> list[str]:
    """The other gated_ops installations that this one hides, when it is a source checkout
    (Python puts the directory it runs from first on sys.path): where each one is."""
    import importlib.metadata
    from urllib.parse import unquote, urlparse

    root = _HERE.parent
    if not (root / "setup.py").is_file():
        return []
    found = []
    for dist in importlib.metadata.distributions(name="gated_ops"):
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct_url.get("dir_info", {}).get("editable"):  # an editable install: its checkout
            where = Path(unquote(urlparse(direct_url["url"]).path))
        else:
            where = Path(dist.locate_file("gated_ops"))
        if where.resolve() not in (root, _HERE):
            found.append(f"gated_ops {dist.version} in {where}")
    return found


def _missing_extension(error: ImportError) -> ImportError:
    hidden = [] if any((_HERE / name).exists() for name in _SO_NAMES) else _installs_hidden()
    if hidden:
        return ImportError(
            f"gated_ops: {_HERE} is an unbuilt source checkout, and it hides the installed "
            f"{'; '.join(hidden)} (Python puts the directory it runs from first on sys.path). "
            "Either build this checkout, which the experiments and benchmarks in it need (it "
            f"replaces the installed one):\n{_rebuild_command()}\nor use the installed "
            f"gated_ops: run from outside {_HERE.parent}, and without it on PYTHONPATH."
        )
    return ImportError(
        "gated_ops: the compiled extension gated_ops._C is missing or does not load. Build it "
        f"against the installed torch:\n{_rebuild_command()}\n(original error: {error})"
    )


_build = _torch_build()
try:
    from . import _C  # noqa: F401  (loads the library: registers the ops and their kernels)
except ImportError as e:  # pragma: no cover - the message is the point
    raise _missing_extension(e) from e
__version__ = _build.get("version", __version__)  # e.g. 0.1.0+torch2.13.0.cpu

from . import reference  # noqa: E402
from .nn import MoE, GatedPathwayLinear, SGDConfig  # noqa: E402
from .gdln import GDLN  # noqa: E402
from .ops import gated_cross_entropy, pathway_matmul  # noqa: E402
from .optim import pathway_bias_sgd_, pathway_sgd_, pathway_sgd_lookahead_  # noqa: E402
from .plan import PathwayPlan, make_plan  # noqa: E402
from .routed import Route, make_route, routed_linear, routed_matmul, routed_pathway_matmul  # noqa: E402

__all__ = [
    "GDLN",
    "GatedPathwayLinear",
    "MoE",
    "SGDConfig",
    "PathwayPlan",
    "make_plan",
    "pathway_matmul",
    "routed_pathway_matmul",
    "routed_matmul",
    "routed_linear",
    "make_route",
    "Route",
    "gated_cross_entropy",
    "pathway_sgd_",
    "pathway_sgd_lookahead_",
    "pathway_bias_sgd_",
    "reference",
]
