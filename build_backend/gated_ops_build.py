"""gated_ops' PEP 517 build backend: setuptools', building against the torch of the Python that
runs the build even under pip's build isolation.

The extension only loads into the torch it was compiled against, so that torch is what the build
needs, and it is not a build requirement (pyproject.toml): one there makes pip install the newest
torch into the isolated build environment (a CUDA build of several GB), compile against it, and
install an extension for a torch the user does not run. Isolation hides the user's own torch
instead; when the Python running the build (pip's own) has one in its site-packages, this module
appends those directories to the end of ``sys.path``, so the isolated setuptools still comes
first and ``import torch`` finds the user's. Without any torch, setup.py stops at once and says
to install torch, then build with ``pip install --no-build-isolation .``; so does any front end
that builds in an interpreter of its own (``python -m build``, uv), which hides the user's torch
beyond reach.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook, unchanged but two below)


def _reveal_torch() -> None:
    if importlib.util.find_spec("torch") is not None:  # no isolation, or torch on PYTHONPATH
        return
    sites = [*getattr(site, "getsitepackages", list)(), sysconfig.get_path("purelib"),
             sysconfig.get_path("platlib")]
    hidden = [d for d in dict.fromkeys(sites) if d not in sys.path]
    if any(importlib.machinery.PathFinder.find_spec("torch", [d]) for d in hidden):
        sys.path.extend(hidden)
        print(f"gated_ops: build isolation hides this Python's torch; building against it "
              f"(from {', '.join(hidden)})", file=sys.stderr)


def _ninja() -> list[str]:
    """torch compiles the sources in parallel with ninja when it is on the PATH."""
    return [] if shutil.which("ninja") else ["ninja"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _ninja()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _ninja()


_reveal_torch()  # on import: pip runs each hook in a fresh process that imports this module
