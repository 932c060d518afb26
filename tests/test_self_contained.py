"""The repository speaks only of itself: no file it ships names a path of a particular machine
or a document outside the repository."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# absolute paths of a machine's home, work or temporary directories; notes outside the repository
FORBIDDEN = re.compile(r"(?<![\w.])/(?:work|root|home|tmp)/|\.\./shared|\bGDLN\.md\b|\bSTYLE\.md\b")
TEXT = {".py", ".md", ".json", ".jsonl", ".txt", ".sh", ".toml", ".cfg", ".cpp", ".h", ".cu",
        ".cuh", ".yml", ".yaml", ".log"}


def _tracked() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / p for p in out.stdout.decode().split("\0") if p]


def test_no_machine_paths_or_outside_documents():
    this = Path(__file__).resolve()
    bad = []
    for path in _tracked():
        if path.suffix not in TEXT or path.resolve() == this or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not bad, "\n".join(bad[:20])
