"""The source distribution builds what a checkout builds: every file under csrc/ is in it."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_carries_every_source_the_build_reads(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    (archive,) = tmp_path.glob("gated_ops-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
               if p.suffix in (".h", ".cpp", ".cu")}
    assert sources and sources <= names, sorted(sources - names)
    assert {"setup.py", "pyproject.toml", "requirements.txt", "gated_ops/__init__.py"} <= names
