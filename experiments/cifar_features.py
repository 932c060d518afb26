"""ResNet-20 features of CIFAR-10's K rotations, extracted once and cached on disk.

The authors' CIFAR-10 k-path network is trained on features, not pixels (Saxe, Sodhani and
Lewallen, "The Neural Race Reduction", ICML 2022): encoder k sees the image rotated by
``rotation_angles(K)[k]`` (270 * k / K degrees, experiments.data) and mapped by a pretrained
ResNet-20 to its 64-d pooled features (experiments.resnet20). The features of every rotation of
every image are computed once, in batches, and kept in a cache directory:

    features-<key>.pt     {"format", "key", "train": (K, n_train, 64), "test": (K, n_test, 64)}
                          float32 tensors (torch.save)
    features-<key>.json   the manifest: what the features are of (the checkpoint's SHA-256, its
                          normalisation, K and the angles, the data's identity: split sizes and
                          the SHA-256 of the images and labels) and the SHA-256 of the .pt file

``<key>`` is a digest of everything the features depend on, so a changed checkpoint, data set,
normalisation or K looks for another file and extracts again; the files of other keys stay
(switching back reuses them). A cache is valid only with its manifest, which is written last,
after the .pt file is complete; the .pt file is checked against the manifest's SHA-256 on every
load, and a mismatch stops with one line naming the file and what to do (FeatureCacheError).

Resume. Extraction goes one rotation at a time; each rotation's features are written atomically
to ``features-<key>.parts/rotation-<k>-<sha256 prefix>.pt`` (the name carries the content's
checksum). An interrupted extraction, killed at any moment, resumes from the rotations already
written (a part whose content does not match its name is recomputed); the parts are removed once
the manifest is written. One process extracts into a directory at a time (a lock on
``DIR/.lock``); another waits for it and then reuses its result.

    python -m experiments.cifar_features --data-dir DIR --checkpoint resnet20.th --K 40 --out FEATS
    python -m experiments.kpath --preset paper_cifar10 --data-dir DIR --resnet-checkpoint resnet20.th \\
        --features-cache FEATS        # reuses them (without --features-cache: OUT/_features)
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from . import resnet20 as R
from .configs import OneLineParser, _parse_bool, usage_error
from .data import DataError, Dataset, load_dataset, rotate_images, rotation_angles, to_float
from .kpath import Progress, atomic_write, resolve_device, write_text

__all__ = ["FORMAT", "FeatureCacheError", "Features", "cache_paths", "dataset_identity",
           "feature_spec", "load_or_extract", "main"]

log = logging.getLogger("experiments.cifar_features")
PROG = "python -m experiments.cifar_features"
FORMAT = 1  # of the files and of what is computed; part of the key
BATCH = 500  # images per forward: ~1.2 s per batch on one CPU core, ~40 MB of activations


class FeatureCacheError(DataError):
    """A cache file that is corrupt, inconsistent with its manifest or not written here."""


@dataclass(frozen=True)
class Features:
    """The features of the K rotations of each split: (K, n, 64) float32 on the CPU."""

    train: Tensor
    test: Tensor
    key: str
    path: Path           # the .pt file
    manifest: dict
    reused: bool         # read from the cache (no extraction)


def dataset_identity(ds: Dataset) -> dict:
    """The data's identity: split sizes and one SHA-256 over the images and labels of both
    splits (their contents, whichever files they came from)."""
    h = hashlib.sha256()
    for t in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        h.update(f"{t.dtype} {tuple(t.shape)}\n".encode())
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return {"n_train": len(ds.train_y), "n_test": len(ds.test_y), "sha256": h.hexdigest()}


def feature_spec(checkpoint_sha256: str, normalization: str, K: int, data: dict) -> dict:
    """Everything the features depend on; its digest is the cache key."""
    mean, std = R.NORMALIZATIONS[normalization]
    return {"format": FORMAT, "model": "resnet20", "checkpoint_sha256": checkpoint_sha256,
            "normalization": normalization, "mean": list(mean), "std": list(std), "K": K,
            "angles": rotation_angles(K), "rotation": "experiments.data.rotate_images, then "
            "normalisation", "data": data, "dim": R.FEATURE_DIM, "dtype": "float32"}


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_paths(cache_dir: str | os.PathLike[str], key: str) -> tuple[Path, Path, Path]:
    """(features .pt, manifest .json, parts directory) of ``key`` in ``cache_dir``."""
    d = Path(cache_dir)
    return d / f"features-{key}.pt", d / f"features-{key}.json", d / f"features-{key}.parts"


def _atomic_save(path: Path, obj: object) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


@contextlib.contextmanager
def _extraction_lock(cache_dir: Path) -> Iterator[None]:
    """One extracting process per cache directory: the others wait (the features they want are
    probably the ones being written). The kernel drops the lock when its holder dies."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            log.info("%s: another process is extracting features here (%s); waiting for it",
                     cache_dir, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ the cache
def _advice(pt: Path, manifest: Path) -> str:
    return f"delete {pt} and {manifest} to extract the features again"


def _read_cache(pt: Path, manifest_path: Path, spec: dict, key: str) -> Features:
    """The cached features of ``key``, checked against the manifest; FeatureCacheError if they
    are not what the manifest says."""
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FeatureCacheError(f"{manifest_path}: unreadable feature manifest ({type(e).__name__}"
                                f": {e}); {_advice(pt, manifest_path)}") from None
    if manifest.get("spec") != spec:
        raise FeatureCacheError(f"{manifest_path}: describes other features than its key "
                                f"{key} (edited or copied by hand?); {_advice(pt, manifest_path)}")
    if not pt.is_file():
        raise FeatureCacheError(f"{pt}: missing, but its manifest {manifest_path} exists; "
                                f"delete {manifest_path} to extract the features again")
    found = R.file_sha256(pt)
    if found != expected:
        raise FeatureCacheError(f"{pt}: checksum mismatch (sha256 {found[:16]}..., the manifest "
                                f"records {expected[:16]}...): the cached features are corrupt; "
                                f"{_advice(pt, manifest_path)}")
    try:
        data = torch.load(pt, map_location="cpu", weights_only=True)
        train, test = data["train"], data["test"]
        shapes = [list(train.shape), list(test.shape)]
    except Exception as e:  # checksum right but not our file: written by something else
        raise FeatureCacheError(f"{pt}: not a feature file of this module ({type(e).__name__}); "
                                f"{_advice(pt, manifest_path)}") from None
    want = [[spec["K"], spec["data"][f"n_{s}"], R.FEATURE_DIM] for s in ("train", "test")]
    if shapes != want or data.get("key") != key or train.dtype != torch.float32:
        raise FeatureCacheError(f"{pt}: holds {shapes} {train.dtype} features of key "
                                f"{data.get('key')}, expected {want} float32 of {key}; "
                                f"{_advice(pt, manifest_path)}")
    return Features(train, test, key, pt, manifest, reused=True)


_PART = re.compile(r"rotation-(\d+)-([0-9a-f]{16})\.pt")


def _read_part(path: Path, key: str, k: int, n: dict[str, int]) -> dict | None:
    """A finished rotation, or None (with a warning) if its content does not match its name."""
    try:
        if R.file_sha256(path)[:16] != _PART.fullmatch(path.name).group(2):
            raise ValueError("content does not match the checksum in its name")
        part = torch.load(path, map_location="cpu", weights_only=True)
        if not (part["key"] == key and part["k"] == k and all(
                tuple(part[s].shape) == (n[s], R.FEATURE_DIM) for s in n)):
            raise ValueError("not a part of these features")
        return part
    except Exception as e:  # a damaged file can raise almost any type
        log.warning("%s: %s; recomputing rotation %d", path, e, k)
        path.unlink(missing_ok=True)
        return None


def _write_part(parts: Path, part: dict) -> None:
    """Atomically, under a name that carries the content's SHA-256 (so a part is accepted only
    whole and unchanged)."""
    buf = io.BytesIO()
    torch.save(part, buf)
    digest = hashlib.sha256(buf.getbuffer()).hexdigest()
    atomic_write(parts / f"rotation-{part['k']:04d}-{digest[:16]}.pt",
                 lambda p: p.write_bytes(buf.getbuffer()))


def _extract(model: R.ResNet, ds: Dataset, spec: dict, key: str, cache_dir: Path,
             device: torch.device, batch_size: int, progress: bool) -> Features:
    """Extract the features rotation by rotation, resuming from the parts on disk; then write
    the .pt file and, last, its manifest."""
    pt, manifest_path, parts = cache_paths(cache_dir, key)
    parts.mkdir(parents=True, exist_ok=True)
    for stray in parts.glob(".*.tmp"):  # a write killed half-way (we hold the lock)
        stray.unlink()
    splits = {"train": ds.train_x, "test": ds.test_x}
    n = {s: len(x) for s, x in splits.items()}
    angles = spec["angles"]
    K = len(angles)
    data: dict = {"format": FORMAT, "key": key,
                  **{s: torch.empty(K, n[s], R.FEATURE_DIM) for s in splits}}
    done = set()
    for path in sorted(parts.iterdir()):
        m = _PART.fullmatch(path.name)
        k = int(m.group(1)) if m else -1
        if not 0 <= k < K or k in done:
            log.warning("%s: not a part of these features; removing it", path)
            path.unlink(missing_ok=True)
            continue
        if (part := _read_part(path, key, k, n)) is None:
            continue
        for s in splits:
            data[s][k] = part[s]
        done.add(k)
    if done:
        log.info("%s: resuming, %d of %d rotations already extracted", parts, len(done), K)
    per_rotation = sum(n.values())
    finished = len(done) * per_rotation
    bar = Progress(K * per_rotation, f"resnet20 features K={K}", finished, progress)
    model = model.to(device).eval()
    for k, angle in enumerate(angles):
        if k in done:
            continue
        part = {"format": FORMAT, "key": key, "k": k, "angle": angle}
        for split, x in splits.items():
            out = [torch.empty(0, R.FEATURE_DIM)]
            for i in range(0, len(x), batch_size):
                images = to_float(x[i:i + batch_size].to(device))  # (b, 3, 32, 32)
                out.append(R.features(model, rotate_images(images, angle)).cpu())  # (b, 64)
                finished += len(images)
                bar.update(finished, lambda: f"rotation {k + 1}/{K}")
            part[split] = data[split][k] = torch.cat(out)
        _write_part(parts, part)
        done.add(k)
    bar.close()
    _atomic_save(pt, data)
    manifest = {"key": key, "file": pt.name, "sha256": R.file_sha256(pt),
                "bytes": pt.stat().st_size, "spec": spec,
                "shape": {s: list(data[s].shape) for s in splits},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": str(device),
                "torch": torch.__version__}
    write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")  # the commit point
    shutil.rmtree(parts, ignore_errors=True)
    log.info("wrote %s (%.1f MB) and %s", pt, pt.stat().st_size / 1e6, manifest_path)
    return Features(data["train"], data["test"], key, pt, manifest, reused=False)


def load_or_extract(ds: Dataset, checkpoint: str | os.PathLike[str], K: int,
                    cache_dir: str | os.PathLike[str], *, device: torch.device | str = "cpu",
                    normalization: str = "auto", batch_size: int = BATCH,
                    progress: bool = True) -> Features:
    """The ResNet-20 features of the K rotations of ``ds`` under ``checkpoint``: read from
    ``cache_dir`` if they are there and intact, else extracted (resuming an interrupted
    extraction) and written there.

    ``normalization``: ``auto`` (what the checkpoint records, else cifar10), ``cifar10`` or
    ``imagenet`` (experiments.resnet20). Raises ResNetCheckpointError for a checkpoint that does
    not load, FeatureCacheError for a corrupt or inconsistent cache file (both DataError).
    """
    checkpoint, cache_dir = Path(checkpoint), Path(cache_dir)
    model = R.load_resnet20(checkpoint, None if normalization == "auto" else normalization)
    spec = feature_spec(R.file_sha256(checkpoint), model.normalization, K, dataset_identity(ds))
    key = _key(spec)
    pt, manifest_path, parts = cache_paths(cache_dir, key)
    if manifest_path.exists():
        features = _read_cache(pt, manifest_path, spec, key)
        if parts.exists():  # killed after the manifest was written, before the clean-up
            shutil.rmtree(parts, ignore_errors=True)
        log.info("features: reusing %s (checkpoint sha256 %s..., K=%d)", pt,
                 spec["checkpoint_sha256"][:12], K)
        return features
    others = sorted(p.name for p in cache_dir.glob("features-*.json"))
    log.info("features: none cached for checkpoint sha256 %s..., %s normalisation, K=%d and "
             "this data (key %s)%s; extracting into %s", spec["checkpoint_sha256"][:12],
             model.normalization, K, key,
             f"; not used: {', '.join(others)} (other checkpoint, data or K)" if others else "",
             cache_dir)
    with _extraction_lock(cache_dir):
        if manifest_path.exists():  # another process finished them while we waited
            return _read_cache(pt, manifest_path, spec, key)
        return _extract(model, ds, spec, key, cache_dir, torch.device(device), batch_size,
                        progress)


# ------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> Features:
    """Extract (or check) the features of a checkpoint into --out. A bad flag: one line, exit
    status 2; missing data, an unreadable checkpoint or a corrupt cache: one line, exit 1."""
    p = OneLineParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="ResNet-20 checkpoint "
                   "(pytorch_resnet_cifar10 format; python -m experiments.resnet20 train)")
    p.add_argument("--data-dir", default=None, help="where to look for CIFAR-10 first")
    p.add_argument("--K", type=int, default=40, help="rotations 270*k/K degrees, k < K "
                   "(default: 40)")
    p.add_argument("--out", required=True, help="the cache directory (kpath's --features-cache)")
    p.add_argument("--normalization", choices=("auto", *R.NORMALIZATIONS), default="auto",
                   help="auto: as the checkpoint records, else cifar10 (default: auto)")
    p.add_argument("--batch-size", type=int, default=BATCH, help=f"images per forward "
                   f"(default: {BATCH})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--verify-data", type=_parse_bool, default=True, metavar="BOOL",
                   help="require the canonical sizes and MD5s (default: true)")
    p.add_argument("--progress", type=_parse_bool, default=True, metavar="BOOL",
                   help="progress bar on stderr (default: true)")
    a = p.parse_args(argv)
    for flag, ok, what in (("--K", 1 <= a.K <= 3628800, "an integer in 1..3628800"),
                           ("--batch-size", a.batch_size >= 1, "an integer >= 1"),
                           ("--threads", a.threads >= 0, "an integer >= 0")):
        if not ok:
            usage_error(f"{flag}: expected {what}, got {getattr(a, flag[2:].replace('-', '_'))}",
                        PROG)
    if not Path(a.checkpoint).is_file():
        usage_error(f"--checkpoint: {a.checkpoint} is not an existing file", PROG)
    if a.data_dir is not None and not Path(a.data_dir).is_dir():
        usage_error(f"--data-dir: {a.data_dir} is not an existing directory", PROG)
    if Path(a.out).exists() and not Path(a.out).is_dir():
        usage_error(f"--out: {a.out} exists and is not a directory", PROG)
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", a.device) or (
            a.device.startswith("cuda") and not torch.cuda.is_available()):
        usage_error(f"--device: expected auto, cpu, cuda or cuda:N with CUDA available, got "
                    f"{a.device}", PROG)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        ds = load_dataset("cifar10", a.data_dir, expect_counts=a.verify_data,
                          verify_checksums=a.verify_data)
        features = load_or_extract(ds, a.checkpoint, a.K, a.out, device=resolve_device(a.device),
                                   normalization=a.normalization, batch_size=a.batch_size,
                                   progress=a.progress)
    except DataError as e:
        sys.stderr.write(f"{PROG}: error: {' '.join(str(e).splitlines())}\n")
        raise SystemExit(1) from None
    print(json.dumps({"features": str(features.path), "key": features.key,
                      "reused": features.reused, "train": list(features.train.shape),
                      "test": list(features.test.shape)}))
    return features


if __name__ == "__main__":
    main()
