"""Packaging: what the sdist carries, what a build records and pins, and what `pip install` and
`import gated_ops` do on the paths that used to go wrong (build isolation, another torch, an
unbuilt checkout in front of an installed wheel)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SO_NAME = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]


def load_setup():
    """setup.py as a module (its build runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("gated_ops_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# An editable install of this checkout (scripts/setup.sh makes one) adds an import hook that
# would resolve a fake tree's `from . import _C` to this checkout's build: off in the subprocesses.
NO_EDITABLE_HOOK = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
                    "getattr(f, '__module__', '').startswith('__editable__')]; ")


def run_python(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", NO_EDITABLE_HOOK + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def fake_source_tree(parent: Path, build_info: dict | None = None) -> Path:
    """A checkout with this gated_ops/__init__.py and no compiled extension."""
    (parent / "gated_ops").mkdir(parents=True)
    (parent / "setup.py").write_text("")
    shutil.copy(ROOT / "gated_ops" / "__init__.py", parent / "gated_ops" / "__init__.py")
    if build_info is not None:
        (parent / "gated_ops" / "_build_info.json").write_text(json.dumps(build_info))
    return parent


def test_sdist_carries_every_source_the_build_reads(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    (archive,) = tmp_path.glob("gated_ops-*.tar.gz")
    # the source, for any torch: the release's version, without a build's torch tag
    assert archive.name == f"gated_ops-{load_setup().release()}.tar.gz"
    with tarfile.open(archive) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
               if p.suffix in (".h", ".cpp", ".cu")}
    assert sources and sources <= names, sorted(sources - names)
    assert {"setup.py", "pyproject.toml", "requirements.txt", "gated_ops/__init__.py",
            "build_backend/gated_ops_build.py"} <= names
    assert not any(n.endswith((".so", "_build_info.json")) for n in names)


@pytest.mark.parametrize("torch_version, cuda, hip, version, requirement", [
    ("2.13.0+cpu", None, None, "0.1.0+torch2.13.0.cpu", "torch==2.13.0"),
    ("2.14.1", "13.0", None, "0.1.0+torch2.14.1.cu130", "torch==2.14.1"),  # PyPI's CUDA wheel
    ("2.14.1+cu128", "12.8", None, "0.1.0+torch2.14.1.cu128", "torch==2.14.1"),
    ("2.9.0+rocm6.4", None, "6.4.43482-0f2d60242", "0.1.0+torch2.9.0.rocm6.4", "torch==2.9.0"),
    ("2.15.0.dev20260101+cpu", None, None, "0.1.0+torch2.15.0.dev20260101.cpu",
     "torch==2.15.0.dev20260101"),
    ("2.14.0a0+git1234abc", "13.0", None, "0.1.0+torch2.14.0a0.cu130", "torch==2.14.0a0"),
])
def test_version_and_requirement_name_the_build_torch(torch_version, cuda, hip, version,
                                                      requirement):
    got_version, got_requirement = load_setup().torch_pin("0.1.0", torch_version, cuda, hip)
    assert (got_version, got_requirement) == (version, requirement)
    assert str(Version(got_version)) == got_version  # valid and normalised PEP 440
    assert Version(got_version).public == "0.1.0"
    spec = Requirement(got_requirement).specifier
    assert spec.contains(torch_version, prereleases=True)  # the build torch, its local tag too
    assert not spec.contains("2.16.0")


def test_this_build_records_the_running_torch():
    import gated_ops

    info_file = Path(gated_ops.__file__).with_name("_build_info.json")
    if not info_file.exists():
        pytest.skip("gated_ops was not built by this setup.py (no _build_info.json)")
    record = json.loads(info_file.read_text())[SO_NAME]
    assert record["torch"] == torch.__version__ and record["torch_cuda"] == torch.version.cuda
    setup_py = load_setup()
    version, _ = setup_py.torch_pin(setup_py.release(), torch.__version__, torch.version.cuda,
                                    torch.version.hip)
    assert gated_ops.__version__ == record["version"] == version


def test_cuda_arch_list_defaults_without_a_gpu(monkeypatch):
    setup_py = load_setup()

    class FakeTorch:
        class cuda:
            count = 0

            @classmethod
            def device_count(cls):
                return cls.count

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup_py.default_cuda_arch_list(FakeTorch) == "8.0;9.0+PTX"
    FakeTorch.cuda.count = 1  # a GPU to ask: torch's own detection
    assert setup_py.default_cuda_arch_list(FakeTorch) is None
    FakeTorch.cuda.count = 0
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # the user's choice
    assert setup_py.default_cuda_arch_list(FakeTorch) is None


def test_import_refuses_a_build_for_another_torch(tmp_path):
    """The record is checked before _C loads: this tree has no _C at all, so an error about the
    torch (not about a missing extension) proves the order."""
    ours = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_hip": torch.version.hip, "version": "0.1.0+test"}
    cases = {
        "release": {**ours, "torch": "2.4.0+cpu", "torch_cuda": None, "torch_hip": None},
        "variant": {**ours, "torch_cuda": None if torch.version.cuda else "13.0"},
    }
    for case, record in cases.items():
        tree = fake_source_tree(tmp_path / case, {SO_NAME: record})
        result = run_python("import gated_ops", cwd=tree)
        assert result.returncode != 0
        assert "ImportError: gated_ops: its extension was built against torch" in result.stderr
        assert "Rebuild it against this torch" in result.stderr
        assert f"cd {tree.resolve()} && pip install --no-build-isolation -e ." in result.stderr
    # the same record with this torch: on to loading _C, which is missing here (the message
    # about it depends on what else is installed: the next test)
    tree = fake_source_tree(tmp_path / "same", {SO_NAME: ours})
    result = run_python("import gated_ops", cwd=tree)
    assert result.returncode != 0 and "built against" not in result.stderr
    assert f"cd {tree.resolve()} && pip install --no-build-isolation -e ." in result.stderr


def test_unbuilt_checkout_names_the_installed_gated_ops_it_hides(tmp_path):
    """`python -m experiments.kpath` in a checkout whose gated_ops is not built, with gated_ops
    installed as a wheel: the error says which gated_ops is hidden and what to do."""
    site = tmp_path / "site"  # an installed wheel, as pip leaves it
    (site / "gated_ops").mkdir(parents=True)
    (site / "gated_ops" / "__init__.py").write_text("")
    dist_info = site / "gated_ops-0.1.0+torch2.13.0.cpu.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gated_ops\nVersion: 0.1.0+torch2.13.0.cpu\n")
    tree = fake_source_tree(tmp_path / "checkout")
    result = run_python("import gated_ops", cwd=tree, pythonpath=site)
    assert result.returncode != 0
    message = result.stderr
    assert f"{tree.resolve() / 'gated_ops'} is an unbuilt source checkout" in message
    assert f"gated_ops 0.1.0+torch2.13.0.cpu in {site / 'gated_ops'}" in message
    assert f"cd {tree.resolve()} && pip install --no-build-isolation -e ." in message
    assert f"run from outside {tree.resolve()}" in message
    # from elsewhere, the installed one is imported
    result = run_python("import gated_ops; print(gated_ops.__file__)", cwd=tmp_path,
                        pythonpath=site)
    assert result.stdout.strip() == str(site / "gated_ops" / "__init__.py"), result.stderr


def test_theory_names_its_extra_without_scipy(tmp_path):
    (tmp_path / "scipy.py").write_text("raise ImportError('no scipy here')\n")
    result = run_python("import gated_ops.theory", cwd=ROOT, pythonpath=tmp_path)
    assert "pip install 'gated_ops[theory]'" in result.stderr, result.stderr


def bundled_setuptools(dest: Path) -> Path | None:
    """A folder with a setuptools wheel from this Python's ensurepip (Python <= 3.11 bundles
    one), so that pip's isolated build environment is made offline."""
    import ensurepip

    wheels = list((Path(ensurepip.__file__).parent / "_bundled").glob("setuptools-*.whl"))
    if not wheels:
        return None
    dest.mkdir()
    shutil.copy(wheels[0], dest)
    return dest


def test_pip_install_with_build_isolation_and_no_torch_stops_at_once(tmp_path):
    """A Python without torch, `pip install .` as a user types it (build isolation on): no torch
    is downloaded into the build environment; the build stops within seconds, saying what to do.
    Measured: pip stops 2.3 s after it starts, here (and the venv takes 4 s to make)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    links = bundled_setuptools(tmp_path / "links")
    index = ["--no-index", "--find-links", str(links)] if links else []
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS")}
    start = time.monotonic()
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", *index,
                             str(ROOT)], capture_output=True, text=True, env=env, timeout=300)
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    if not links and "No matching distribution found for setuptools" in output:
        pytest.skip("no setuptools wheel bundled with this Python and no index reachable")
    assert result.returncode != 0
    assert "this Python has none it can import" in output, output
    assert "pip install --no-build-isolation ." in output
    assert "torch-" not in output  # nothing about torch was downloaded
    assert seconds < 60, seconds


def test_pip_with_build_isolation_builds_against_this_torch(tmp_path):
    """`pip install .` with build isolation in an environment that has torch: the metadata,
    prepared by the build backend in the isolated environment (--dry-run: no compile), pins this
    torch, and no torch is installed into that environment. Needs setuptools from an index.
    Measured: 9 s here."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
         "--report", str(report), "-v", str(ROOT)],
        capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "No matching distribution found" in output:
        pytest.skip("no index to install setuptools into the isolated build environment from")
    assert result.returncode == 0, output[-3000:]
    assert "build isolation hides this Python's torch; building against it" in output
    assert not re.search(r"(Collecting|Downloading) torch\b", output)
    (install,) = json.loads(report.read_text())["install"]
    setup_py = load_setup()
    version, requirement = setup_py.torch_pin(setup_py.release(), torch.__version__,
                                              torch.version.cuda, torch.version.hip)
    assert install["metadata"]["version"] == version
    assert requirement in install["metadata"]["requires_dist"]


@pytest.mark.slow
def test_wheel_pins_its_torch_carries_no_debug_info_and_imports_outside_a_checkout(tmp_path):
    """pip wheel --no-build-isolation --no-deps . (compiles: 104 s here on 2 cores, 7 s when
    build/ already holds the objects), then the wheel installed in a folder of its own."""
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    env.pop("GATED_OPS_DEBUG", None)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True,
                   env=env, timeout=1200)
    (wheel,) = (tmp_path / "dist").glob("gated_ops-*.whl")
    setup_py = load_setup()
    version, requirement = setup_py.torch_pin(setup_py.release(), torch.__version__,
                                              torch.version.cuda, torch.version.hip)
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"gated_ops-{version}.dist-info/METADATA").decode()
        record = json.loads(z.read("gated_ops/_build_info.json"))[SO_NAME]
        so_size = z.getinfo(f"gated_ops/{SO_NAME}").file_size
    assert f"Version: {version}\n" in metadata
    assert f"Requires-Dist: {requirement}\n" in metadata
    assert "Provides-Extra: theory\n" in metadata
    assert record["torch"] == torch.__version__ and record["version"] == version
    # a release build has no debug info: 2.6 MB on the CPU (15 MB with it)
    assert so_size < 6e6 if not record["cuda_kernels"] else so_size < 30e6, so_size

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    use = ("import torch, gated_ops; print(gated_ops.__file__, gated_ops.__version__, torch._C."
           "_dispatch_has_kernel_for_dispatch_key('gated_ops::pathway_matmul', 'CPU'))")
    result = run_python(use, cwd=tmp_path, pythonpath=site)
    assert result.stdout.split() == [str(site / "gated_ops" / "__init__.py"), version, "True"], \
        result.stderr
    tree = fake_source_tree(tmp_path / "checkout")
    result = run_python("import gated_ops", cwd=tree, pythonpath=site)
    assert f"gated_ops {version} in {site / 'gated_ops'}" in result.stderr, result.stderr
