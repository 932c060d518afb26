"""Data sets for the k-path experiments: MNIST, Fashion-MNIST and CIFAR-10.

The module has its own readers for the original distribution formats (no
torchvision), a loader that finds, verifies and optionally downloads the files,
and the batch transforms the k-path tasks are built from.

Preprocessing. MNIST and Fashion-MNIST are used as pixels / 255 (float32 in
[0, 1]). CIFAR-10 is read the same way; the k-path experiment uses these
pixels with --features pixels, and with --features resnet20 the authors'
inputs, a pretrained ResNet-20's features of each rotated image
(experiments.cifar_features).

Integrity. Every standard file is checked against the canonical MD5 in ``MD5``.
A ``.gz`` whose own MD5 differs but whose decompressed content matches is
accepted: Debian's ``dataset-fashion-mnist`` ships the original Fashion-MNIST
files re-gzipped without the stored file name, so their ``.gz`` MD5s differ while
the content is identical. Any other mismatch, a missing or truncated file, or a
malformed record raises ``DataError``, which names the file and says how to get
the data, before any training starts.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import logging
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR", "DEFAULT_CACHE_DIR", "ENV_VAR", "MD5", "DataError", "Dataset",
    "class_label_map", "class_label_maps", "class_permutation", "download_file", "load_dataset",
    "pixel_permutations", "read_cifar10", "read_idx_images", "read_idx_labels", "rotate_images",
    "rotation_angles", "to_float",
]

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]

ENV_VAR = "GATED_OPS_DATA"
#: Where Debian's ``dataset-fashion-mnist`` installs the four original ``.gz`` files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "gated_ops" / "data"

#: Canonical MD5s. The .gz, tar.gz and CIFAR batch values are torchvision's
#: (datasets/mnist.py, datasets/cifar.py); the decompressed IDX values are the
#: published md5sums of the gunzipped originals (Fashion-MNIST's match Debian's files).
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
}

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
_IDX_FILES = {  # (split, kind) -> file name without .gz
    (split, kind): f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for split in ("train", "t10k") for kind in ("images", "labels")
}
_IDX_COUNTS = {"train": 60000, "t10k": 10000}
_CIFAR_DIR, _CIFAR_TAR = "cifar-10-batches-py", "cifar-10-python.tar.gz"
_CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
_CIFAR_BATCH_COUNT = 10000


@dataclass(frozen=True)
class _Spec:
    title: str
    url: str                   # download base URL
    files: tuple[str, ...]     # the distributed files, as downloaded
    subdirs: tuple[str, ...]   # searched below each root, most specific first; the first one receives downloads


_IDX_GZ = tuple(f"{stem}.gz" for stem in _IDX_FILES.values())
_SPECS = {
    "mnist": _Spec("MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/", _IDX_GZ, ("MNIST/raw", "mnist", "")),
    "fashion_mnist": _Spec("Fashion-MNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                           _IDX_GZ, ("FashionMNIST/raw", "fashion_mnist", "fashion-mnist", "")),
    "cifar10": _Spec("CIFAR-10", "https://www.cs.toronto.edu/~kriz/", (_CIFAR_TAR,), ("",)),
}


class DataError(RuntimeError):
    """A data file is missing, corrupt, truncated, malformed or not the canonical one."""


@dataclass(frozen=True)
class Dataset:
    """A loaded data set: uint8 images, (N, 28, 28) or (N, 3, 32, 32), and int64 labels in 0..9.

    ``source`` says where the files were found; ``checksums`` maps each file name
    to ``"ok"``, ``"ok (content; gzip header differs)"`` or ``"unverified (md5 ...)"``.
    """

    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    name: str
    source: str
    checksums: dict[str, str]

    @property
    def checksums_ok(self) -> bool:
        return all(status.startswith("ok") for status in self.checksums.values())


# --------------------------------------------------------------------- readers
def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _read_raw(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read(path: Path) -> tuple[bytes, bytes]:
    """Return (file bytes, content): the content is the decompressed data for ``*.gz``."""
    raw = _read_raw(path)
    if path.suffix != ".gz":
        return raw, raw
    try:
        return raw, gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None


def _parse_idx(content: bytes, path: Path, kind: str, expect_count: int | None) -> torch.Tensor:
    magic = _IDX_MAGIC[kind]
    header = 4 + 4 * (magic & 0xFF)
    if len(content) < header:
        raise DataError(f"{path}: truncated IDX file ({len(content)} bytes, the header alone needs {header})")
    found, *dims = struct.unpack(f">{header // 4}I", content[:header])
    if found != magic:
        raise DataError(f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x} (IDX {kind} file)")
    if kind == "images" and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    if expect_count is not None and dims[0] != expect_count:
        raise DataError(f"{path}: {dims[0]} {kind}, expected {expect_count}")
    size = math.prod(dims)
    if len(content) != header + size:
        raise DataError(f"{path}: truncated or oversized: {len(content) - header} data bytes, header announces {size}")
    array = np.frombuffer(content, np.uint8, count=size, offset=header).reshape(dims)
    if kind == "images":
        return torch.from_numpy(array.copy())
    if array.size and array.max() > 9:
        raise DataError(f"{path}: label {int(array.max())} out of range 0..9")
    return torch.from_numpy(array.astype(np.int64))


def read_idx_images(path: PathLike, expect_count: int | None = None) -> torch.Tensor:
    """Read an IDX image file (plain or ``.gz``) as uint8 (N, 28, 28); no checksum check."""
    path = Path(path)
    return _parse_idx(_read(path)[1], path, "images", expect_count)


def read_idx_labels(path: PathLike, expect_count: int | None = None) -> torch.Tensor:
    """Read an IDX label file (plain or ``.gz``) as int64 (N,) with values in 0..9; no checksum check."""
    path = Path(path)
    return _parse_idx(_read(path)[1], path, "labels", expect_count)


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches that resolves no global but numpy's array constructors.

    Globals are how a pickle runs code. A CIFAR batch holds one numpy array, whose
    pickle needs exactly ``ndarray``, ``dtype`` and ``_reconstruct`` (the set that
    ``torch.load(weights_only=True)`` also allows); everything else is refused.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _NUMPY_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _parse_cifar_batch(raw: bytes, where: str, expect_count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a malformed pickle can raise almost any exception type
        raise DataError(f"{where}: not a CIFAR-10 batch pickle ({type(e).__name__}: {e})") from None
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()} if isinstance(obj, dict) else {}
    data, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"{where}: expected a dict whose b'data' is a uint8 (N, 3072) array")
    if not (isinstance(labels, list) and all(type(y) is int for y in labels) and len(labels) == len(data)):
        raise DataError(f"{where}: expected b'labels' to be a list of {len(data)} ints")
    y = torch.tensor(labels, dtype=torch.int64)
    if y.numel() and not 0 <= int(y.min()) <= int(y.max()) <= 9:
        raise DataError(f"{where}: label out of range 0..9")
    if expect_count is not None and len(y) != expect_count:
        raise DataError(f"{where}: {len(y)} images, expected {expect_count}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), y


def _untar_batches(path: Path, raw: bytes) -> dict[str, bytes]:
    wanted = {f"{_CIFAR_DIR}/{b}": b for b in _CIFAR_BATCHES}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            for member in tar:  # one sequential pass: seeking back in a gzip stream re-decompresses it
                if member.name in wanted and member.isfile():
                    out[wanted[member.name]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated archive ({e})") from None
    if missing := [m for m, b in wanted.items() if b not in out]:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}")
    return out


def _load_cifar(path: Path, expect_counts: bool, verify: bool | None, checks: dict[str, str]) -> list[torch.Tensor]:
    """(train_x, train_y, test_x, test_y) from a batches directory or the tar.gz; fills ``checks``."""
    if path.is_dir():
        raws = {b: _read_raw(path / b) for b in _CIFAR_BATCHES}
        where = {b: str(path / b) for b in _CIFAR_BATCHES}
        for b in _CIFAR_BATCHES:
            checks[b] = _verify("cifar10", path / b, raws[b], raws[b], verify)
    else:
        raw = _read_raw(path)
        checks[path.name] = _verify("cifar10", path, raw, raw, verify)
        raws = _untar_batches(path, raw)
        where = {b: f"{path}[{_CIFAR_DIR}/{b}]" for b in _CIFAR_BATCHES}
    count = _CIFAR_BATCH_COUNT if expect_counts else None
    xs, ys = zip(*(_parse_cifar_batch(raws[b], where[b], count) for b in _CIFAR_BATCHES))
    return [torch.cat(xs[:5]), torch.cat(ys[:5]), xs[5], ys[5]]


def read_cifar10(path: PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 (python version) from ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``.

    Returns (train_x, train_y, test_x, test_y): uint8 (N, 3, 32, 32) and int64 (N,); no checksum check.
    """
    train_x, train_y, test_x, test_y = _load_cifar(Path(path), False, None, {})
    return train_x, train_y, test_x, test_y


# ------------------------------------------------------ checksums and locating
def _howto(name: str) -> str:
    spec = _SPECS[name]
    files = ", ".join(spec.files) + (f" (or the extracted {_CIFAR_DIR}/)" if name == "cifar10" else "")
    text = (f"To obtain {spec.title}: pass --data-dir DIR containing {files} (or set {ENV_VAR}=DIR), "
            f"or run with --download on a machine with network access (source {spec.url})")
    return text + (", or `apt-get install dataset-fashion-mnist`." if name == "fashion_mnist" else ".")


def _verify(name: str, path: Path, raw: bytes, content: bytes, enforce: bool | None) -> str:
    """Check a standard file against ``MD5[name]`` and return its status; ``enforce=None`` skips hashing."""
    if enforce is None:
        return "unverified"
    table, digest = MD5[name], _md5(raw)
    expected = table.get(path.name)
    if digest == expected:
        return "ok"
    content_digest = _md5(content) if content is not raw else digest
    if content is not raw and content_digest == table.get(path.name.removesuffix(".gz")):
        return "ok (content; gzip header differs)"
    if not enforce:
        return f"unverified (md5 {digest})"
    other = [_SPECS[n].title for n, t in MD5.items() if n != name and {digest, content_digest} & set(t.values())]
    hint = f" It is the {other[0]} file: keep each data set in its own sub-folder." if other else ""
    raise DataError(f"{path}: MD5 {digest} does not match the canonical {expected} of {_SPECS[name].title} "
                    f"{path.name}; the file is corrupt, truncated or from another data set.{hint}\n{_howto(name)}")


def _idx_path(directory: Path, stem: str) -> Path | None:
    return next((p for p in (directory / f"{stem}.gz", directory / stem) if p.is_file()), None)


@dataclass(frozen=True)
class _Found:
    path: Path                     # IDX directory, CIFAR batches directory or CIFAR tar.gz
    missing: tuple[str, ...] = ()


def _locate(name: str, base: Path) -> _Found | None:
    """The first place below ``base`` holding some of the files (a complete set preferred for CIFAR)."""
    if name == "cifar10":
        partial = None
        for d in (base / _CIFAR_DIR, base):
            missing = tuple(b for b in _CIFAR_BATCHES if not (d / b).is_file())
            if not missing:
                return _Found(d)
            partial = partial or (_Found(d, missing) if len(missing) < len(_CIFAR_BATCHES) else None)
        return _Found(base / _CIFAR_TAR) if (base / _CIFAR_TAR).is_file() else partial
    for sub in _SPECS[name].subdirs:
        missing = tuple(s for s in _IDX_FILES.values() if _idx_path(base / sub, s) is None)
        if len(missing) < len(_IDX_FILES):
            return _Found(base / sub, missing)
    return None


def _load_found(name: str, found: _Found, origin: str, expect_counts: bool, verify: bool) -> Dataset:
    checks: dict[str, str] = {}
    if name == "cifar10":
        parts = _load_cifar(found.path, expect_counts, verify, checks)
    else:
        parts = []
        for (split, kind), stem in _IDX_FILES.items():
            path = _idx_path(found.path, stem)
            raw, content = _read(path)
            checks[path.name] = _verify(name, path, raw, content, verify)
            parts.append(_parse_idx(content, path, kind, _IDX_COUNTS[split] if expect_counts else None))
    for split, x, y in (("train", parts[0], parts[1]), ("test", parts[2], parts[3])):
        if len(x) != len(y):
            raise DataError(f"{found.path}: {split} split has {len(x)} images but {len(y)} labels")
    log.info("%s: %d train / %d test from %s (%s)", name, len(parts[1]), len(parts[3]), found.path, origin)
    return Dataset(*parts, name=name, source=f"{found.path} ({origin})", checksums=checks)


# ----------------------------------------------------------------- downloading
def download_file(url: str, dest: PathLike, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` if its MD5 is ``md5``: streamed to a temp file, then ``os.replace``d.

    On any failure nothing is left at ``dest`` (nor a temp file) and ``DataError`` is raised.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: downloaded data has MD5 {digest.hexdigest()}, expected {md5}; "
                            f"{dest} was not written. Retry, or fetch the file by hand and pass --data-dir.")
        os.replace(tmp, dest)
    except OSError as e:  # includes urllib.error.URLError and timeouts
        raise DataError(f"{url}: download to {dest} failed ({e})") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------- loader
def load_dataset(name: str, root: PathLike | None = None, download: bool = False, *,
                 expect_counts: bool = True, verify_checksums: bool = True) -> Dataset:
    """Find, verify and load ``name`` ("mnist", "fashion_mnist" or "cifar10").

    Roots are searched in this order and the first one holding the data set wins:
    ``root``, ``$GATED_OPS_DATA``, Debian's ``DEBIAN_FASHION_MNIST_DIR`` (Fashion-MNIST
    only), ``DEFAULT_CACHE_DIR``. Below a root, the data-set sub-folders come first
    (``MNIST/raw``, ``mnist``; ``FashionMNIST/raw``, ``fashion_mnist``, ``fashion-mnist``),
    then the root itself; IDX files may be plain or ``.gz``. CIFAR-10 is read from
    ``cifar-10-batches-py/`` (or a root that is that folder) or ``cifar-10-python.tar.gz``.
    If nothing is found and ``download`` is set, the distributed files are downloaded,
    checksum first, into ``root`` (or ``DEFAULT_CACHE_DIR``) in the first sub-folder above.

    ``expect_counts`` requires the canonical sizes (60000/10000, CIFAR 50000/10000);
    ``verify_checksums=False`` records rather than enforces the MD5s. Tests with small
    files turn both off; real runs should not.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(_SPECS)}")
    bases = [(Path(root).expanduser(), "root")] if root is not None else []
    if env := os.environ.get(ENV_VAR):
        bases.append((Path(env).expanduser(), f"${ENV_VAR}"))
    if name == "fashion_mnist":
        bases.append((DEBIAN_FASHION_MNIST_DIR, "Debian dataset-fashion-mnist"))
    bases.append((DEFAULT_CACHE_DIR, "download cache"))

    for base, origin in bases:
        found = _locate(name, base)
        if found is None:
            continue
        if not found.missing:
            return _load_found(name, found, origin, expect_counts, verify_checksums)
        message = (f"{found.path}: incomplete {_SPECS[name].title} files, missing {', '.join(found.missing)}"
                   + ("" if name == "cifar10" else " (plain or .gz)"))
        if not download:
            raise DataError(f"{message}.\n{_howto(name)}")
        log.warning("%s; downloading instead", message)
        break

    if not download:
        searched = "; ".join(f"{b} ({o})" for b, o in bases)
        raise DataError(f"{_SPECS[name].title} not found. Searched: {searched}.\n{_howto(name)}")
    spec = _SPECS[name]
    target = (Path(root).expanduser() if root is not None else DEFAULT_CACHE_DIR) / spec.subdirs[0]
    for file in spec.files:
        if not (target / file).is_file():
            download_file(spec.url + file, target / file, MD5[name][file])
    found = _locate(name, target)
    assert found is not None and not found.missing, found
    return _load_found(name, found, "downloaded", expect_counts, verify_checksums)


# ------------------------------------------------------------------ transforms
def to_float(images: torch.Tensor, *, flatten: bool = False) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (pixels / 255), optionally flattened to (N, D)."""
    x = images.to(torch.float32) / 255.0
    return x.flatten(1) if flatten else x


def pixel_permutations(K: int, D: int, seed_offset: int = 0) -> torch.Tensor:
    """(K, D) int64 pixel permutations; row k is ``torch.randperm(D, generator=g)`` with
    ``g = torch.Generator().manual_seed(k + seed_offset)``, as in the authors' code, so
    permutation k does not depend on K. Apply with ``x.flatten(1)[:, perm.to(x.device)]``.
    """
    perms = [torch.randperm(D, generator=torch.Generator().manual_seed(k + seed_offset)) for k in range(K)]
    return torch.stack(perms) if perms else torch.empty(0, D, dtype=torch.int64)


def rotation_angles(K: int) -> list[float]:
    """The K rotation angles of the rotation task: 270 * k / K degrees, k = 0..K-1."""
    return [270.0 * k / K for k in range(K)]


def rotate_images(x: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Rotate a float batch (N, C, H, W) by ``angle_deg`` about the image centre.

    Positive angles turn the image counter-clockwise, as torchvision's ``rotate``.
    Multiples of 90 degrees that keep the shape are exact (``torch.rot90``); other
    angles use bilinear ``grid_sample`` (pixel centres, ``align_corners=False``) with
    zeros outside the source image. Runs on x's device, no host synchronisation.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    h, w = x.shape[-2:]
    quarters, rest = divmod(float(angle_deg), 90.0)
    if rest == 0.0 and (h == w or quarters % 2 == 0):
        return torch.rot90(x, int(quarters) % 4, dims=(-2, -1))
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    # Output pixel (u, v), in pixels from the centre with v pointing down, samples the
    # input at (c*u - s*v, s*u + c*v); affine_grid works in [-1, 1] units, hence the h/w factors.
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _class_permutations(K: int, C: int) -> torch.Tensor:
    perms = list(itertools.islice(itertools.permutations(range(C)), K))
    if K < 0 or len(perms) < K:
        raise ValueError(f"need 0 <= K <= {C}! class permutations, got K={K}")
    return torch.tensor(perms, dtype=torch.int64).reshape(K, C)


def class_permutation(k: int, C: int = 10) -> torch.Tensor:
    """The k-th (0-based) element of ``itertools.permutations(range(C))``, in lexicographic
    order: k=0 is the identity, k=1 swaps the last two classes."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return _class_permutations(k + 1, C)[k]


def class_label_map(k: int, C: int = 10) -> torch.Tensor:
    """Label map of path k: ``label_map[y]`` is the position of class y in ``class_permutation(k)``."""
    return torch.argsort(class_permutation(k, C))


def class_label_maps(K: int, C: int = 10) -> torch.Tensor:
    """(K, C) label maps of paths 0..K-1; relabel a batch with ``maps[k].to(y.device)[y]``."""
    return torch.argsort(_class_permutations(K, C), dim=1)
