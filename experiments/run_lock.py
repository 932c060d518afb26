"""One writer per output directory: an exclusive ``flock`` on ``OUT/.lock``.

A run holds the lock for as long as it may write into its directory; a second run given the
same directory finds it taken and stops before writing anything. The kernel releases an
``flock`` when the last descriptor of its open file is closed, which includes the death of the
process however it dies (``kill -9``, a crash), so a killed run never leaves the directory
locked: the lock file may stay behind, but it is not the lock. The holder writes its pid and
host into the file, for the message the next run prints.

Not a lock across machines: on a network file system ``flock`` may be local to each client.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import platform
from pathlib import Path
from typing import Iterator

__all__ = ["LOCK_NAME", "OutDirBusy", "hold_out_dir"]

LOCK_NAME = ".lock"


class OutDirBusy(RuntimeError):
    """Another live process holds the output directory, or the directory cannot be used."""


@contextlib.contextmanager
def hold_out_dir(out: str | os.PathLike[str], flag: str = "--out") -> Iterator[Path]:
    """Create ``out`` if missing and hold its lock until the block ends; OutDirBusy at once
    (never waiting) if another process holds it. ``flag`` names the option in the message."""
    out = Path(out)
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        # O_CREAT without O_TRUNC: a refused run leaves the holder's file as it is.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutDirBusy(f"{out}: cannot create its lock file {path} ({e.strerror or e}); "
                         f"pass a writable {flag}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise OutDirBusy(f"{out}: another run is writing this directory (holder: {holder}; "
                             f"lock {path}); wait for it to end, or pass another {flag}"
                             ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
