"""Tests for experiments/data.py: small files in the real formats, no network."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import pickle
import struct
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import data as D  # noqa: E402

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


# -------------------------------------------------------------------- helpers
def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (0x803 if array.ndim == 3 else 0x801)
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_idx_set(directory: Path, gz: bool = True, label: int | None = None, n=(5, 3), skip=()) -> dict:
    """Write a small MNIST-format set; returns the arrays by stem. ``label`` fixes all labels."""
    rng, arrays = np.random.default_rng(len(str(directory))), {}
    for split, count in zip(("train", "t10k"), n):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count) if label is None else np.full(count, label)
        arrays[f"{split}-labels-idx1-ubyte"] = labels
    for stem, array in arrays.items():
        if stem not in skip:
            write(directory / (stem + ".gz" * gz), idx_bytes(array))
    return arrays


class Py2Pickler(pickle._Pickler):
    """Writes pickles like Python 2's cPickle did for the CIFAR batches: str as 8-bit strings."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        obj = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str


def cifar_pickle(n: int, seed: int, labels=None) -> tuple[bytes, np.ndarray, list]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = labels if labels is not None else [int(v) for v in rng.integers(0, 10, n)]
    buf = io.BytesIO()
    batch = {"batch_label": f"batch {seed}", "labels": y, "data": x, "filenames": ["a.png"] * n}
    Py2Pickler(buf, protocol=2).dump(batch)
    # The real files were written by numpy 1.x, which named the module numpy.core.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"), x, y


def write_cifar_dir(directory: Path, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for seed, name in enumerate(BATCHES):
        raw, x, y = cifar_pickle(n, seed)
        write(directory / name, raw)
        xs.append(x), ys.append(y)
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)


def write_cifar_tar(path: Path, batches_dir: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    return path


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    """No environment variable, an empty cache and no Debian files unless a test says otherwise."""
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    monkeypatch.setattr(D, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")


def small(name, root, **kw):
    return D.load_dataset(name, root, expect_counts=False, verify_checksums=False, **kw)


# ------------------------------------------------------------------ IDX files
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    images = D.read_idx_images(tmp_path / ("train-images-idx3-ubyte" + ".gz" * gz))
    labels = D.read_idx_labels(tmp_path / ("train-labels-idx1-ubyte" + ".gz" * gz), expect_count=5)
    assert images.dtype == torch.uint8 and images.shape == (5, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    assert np.array_equal(images.numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(labels.numpy(), arrays["train-labels-idx1-ubyte"])


@pytest.mark.parametrize("layout", ["", "MNIST/raw", "mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_load_small_mnist_layouts(tmp_path, layout, gz):
    arrays = write_idx_set(tmp_path / layout, gz=gz)
    ds = small("mnist", tmp_path)
    assert ds.name == "mnist" and str(tmp_path / layout) in ds.source
    assert (ds.train_x.shape, ds.test_x.shape, ds.test_y.shape) == ((5, 28, 28), (3, 28, 28), (3,))
    assert np.array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert set(ds.checksums) == {s + ".gz" * gz for s in IDX_STEMS}
    assert all(v.startswith("unverified (md5 ") for v in ds.checksums.values()) and not ds.checksums_ok


@pytest.mark.parametrize("layout", ["FashionMNIST/raw", "fashion_mnist", "fashion-mnist"])
def test_fashion_layouts_preferred_over_root(tmp_path, layout):
    write_idx_set(tmp_path, label=1)  # e.g. MNIST lying at the top of a shared root
    write_idx_set(tmp_path / layout, label=2)
    ds = small("fashion_mnist", tmp_path)
    assert str(tmp_path / layout) in ds.source and set(ds.train_y.tolist()) == {2}


def test_missing_file(tmp_path):
    write_idx_set(tmp_path, skip=("t10k-labels-idx1-ubyte",))
    with pytest.raises(D.DataError) as e:
        small("fashion_mnist", tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message and "missing t10k-labels-idx1-ubyte" in message
    assert "--data-dir" in message and "--download" in message and "apt-get install dataset-fashion-mnist" in message


def test_bad_magic(tmp_path):
    path = write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((2, 28, 28)), magic=0x801))
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte: bad magic number 0x00000801, expected 0x00000803"):
        D.read_idx_images(path)


def test_truncated_plain_and_gz(tmp_path):
    payload = idx_bytes(np.zeros((4, 28, 28)))
    plain = write(tmp_path / "a-images", payload[:-10])
    with pytest.raises(D.DataError, match=rf"{plain}: truncated"):
        D.read_idx_images(plain)
    (tmp_path / "b.gz").write_bytes(gzip.compress(payload)[:-20])
    with pytest.raises(D.DataError, match=r"b\.gz: corrupt or truncated gzip"):
        D.read_idx_images(tmp_path / "b.gz")
    with pytest.raises(D.DataError, match="truncated IDX file"):
        D.read_idx_labels(write(tmp_path / "c", b"\x00\x00\x08"))


def test_wrong_dims_and_label_range(tmp_path):
    with pytest.raises(D.DataError, match=r"x: images are 27x28, expected 28x28"):
        D.read_idx_images(write(tmp_path / "x", idx_bytes(np.zeros((2, 27, 28)))))
    with pytest.raises(D.DataError, match=r"y\.gz: label 10 out of range 0\.\.9"):
        D.read_idx_labels(write(tmp_path / "y.gz", idx_bytes(np.array([1, 10, 3]))))


def test_counts(tmp_path):
    write_idx_set(tmp_path)
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte\.gz: 5 images, expected 60000"):
        D.load_dataset("mnist", tmp_path, verify_checksums=False)
    with pytest.raises(D.DataError, match="2 labels, expected 3"):
        D.read_idx_labels(write(tmp_path / "l", idx_bytes(np.array([1, 2]))), expect_count=3)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.array([1, 2])))
    with pytest.raises(D.DataError, match="test split has 3 images but 2 labels"):
        small("mnist", tmp_path)


def test_wrong_md5_for_canonical_name(tmp_path):
    write_idx_set(tmp_path)
    with pytest.raises(D.DataError) as e:
        D.load_dataset("mnist", tmp_path, expect_counts=False)
    message = str(e.value)
    assert f"{tmp_path / 'train-images-idx3-ubyte.gz'}: MD5" in message
    assert D.MD5["mnist"]["train-images-idx3-ubyte.gz"] in message and "--download" in message


def test_plain_canonical_file_verified_by_content_md5(tmp_path, monkeypatch):
    arrays = write_idx_set(tmp_path, gz=False)
    for stem, array in arrays.items():
        monkeypatch.setitem(D.MD5["mnist"], stem, hashlib.md5(idx_bytes(array)).hexdigest())
    ds = D.load_dataset("mnist", tmp_path, expect_counts=False)
    assert ds.checksums_ok and set(ds.checksums.values()) == {"ok"}


# -------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("form", ["dir", "batches-dir-as-root", "tar"])
def test_cifar_round_trip(tmp_path, form):
    x, y = write_cifar_dir(tmp_path / "src" / "cifar-10-batches-py")
    root = {"dir": tmp_path / "src", "batches-dir-as-root": tmp_path / "src" / "cifar-10-batches-py",
            "tar": tmp_path / "t"}[form]
    if form == "tar":
        write_cifar_tar(root / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py")
    ds = small("cifar10", root)
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.train_y.dtype == torch.int64
    assert np.array_equal(torch.cat([ds.train_x, ds.test_x]).numpy(), x)
    assert np.array_equal(torch.cat([ds.train_y, ds.test_y]).numpy(), y)
    assert set(ds.checksums) == ({"cifar-10-python.tar.gz"} if form == "tar" else set(BATCHES))
    path = root / "cifar-10-python.tar.gz" if form == "tar" else tmp_path / "src" / "cifar-10-batches-py"
    assert ds.source.startswith(f"{path} (root)")
    assert all(map(torch.equal, D.read_cifar10(path), (ds.train_x, ds.train_y, ds.test_x, ds.test_y)))


def test_cifar_counts_and_checksums(tmp_path):
    write_cifar_dir(tmp_path / "cifar-10-batches-py")
    with pytest.raises(D.DataError, match=r"data_batch_1: 4 images, expected 10000"):
        D.load_dataset("cifar10", tmp_path, verify_checksums=False)
    with pytest.raises(D.DataError, match=r"data_batch_1: MD5 [0-9a-f]{32} does not match the canonical c99cafc1"):
        D.load_dataset("cifar10", tmp_path, expect_counts=False)
    tar = write_cifar_tar(tmp_path / "x" / "cifar-10-python.tar.gz", tmp_path / "cifar-10-batches-py")
    with pytest.raises(D.DataError, match=r"cifar-10-python\.tar\.gz: MD5 .* c58f30108f718f92721af3b95e74349a"):
        D.load_dataset("cifar10", tar.parent, expect_counts=False)


def test_cifar_missing_and_truncated(tmp_path):
    write_cifar_dir(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(D.DataError, match=r"cifar-10-batches-py: incomplete CIFAR-10 files, missing test_batch"):
        small("cifar10", tmp_path)
    tar = write_cifar_tar(tmp_path / "t" / "cifar-10-python.tar.gz", tmp_path / "cifar-10-batches-py")
    with pytest.raises(D.DataError, match=r"archive lacks cifar-10-batches-py/test_batch"):
        D.read_cifar10(tar)
    tar.write_bytes(tar.read_bytes()[:-200])
    with pytest.raises(D.DataError, match=r"cifar-10-python\.tar\.gz: corrupt or truncated archive"):
        D.read_cifar10(tar)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload, match", [
    (pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=4), r"global (posix|nt)\.system is not allowed"),
    (pickle.dumps([1, 2], protocol=4), "expected a dict whose b'data'"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=4), "uint8 .N, 3072"),
    (cifar_pickle(2, 0, labels=[0, 10])[0], "label out of range"),
    (cifar_pickle(2, 0, labels=[0])[0], "list of 2 ints"),
    (b"garbage", "not a CIFAR-10 batch pickle"),
])
def test_cifar_unpickling_is_restricted_and_validated(tmp_path, payload, match):
    write_cifar_dir(tmp_path)
    write(tmp_path / "data_batch_3", payload)
    with pytest.raises(D.DataError, match=rf"data_batch_3: .*{match}"):
        D.read_cifar10(tmp_path)


# ------------------------------------------------------------ where data comes from
def test_root_beats_env_var(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "root", label=1)
    write_idx_set(tmp_path / "env", label=2)
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    assert set(small("mnist", tmp_path / "root").train_y.tolist()) == {1}
    from_env = small("mnist", None)
    assert set(from_env.train_y.tolist()) == {2} and "$GATED_OPS_DATA" in from_env.source
    assert set(small("mnist", tmp_path / "empty").train_y.tolist()) == {2}  # an empty root falls through


def test_not_found_message(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.load_dataset("cifar10", tmp_path / "nothing")
    message = str(e.value)
    assert "CIFAR-10 not found" in message and str(tmp_path / "nothing") in message
    assert "cifar-10-python.tar.gz" in message and "--download" in message
    with pytest.raises(ValueError, match="unknown data set"):
        D.load_dataset("svhn")


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", DEBIAN)
    ds = D.load_dataset("fashion_mnist")
    assert str(DEBIAN) in ds.source and ds.checksums_ok and len(ds.checksums) == 4
    assert (len(ds.train_y), len(ds.test_y)) == (60000, 10000) and ds.train_x.shape == (60000, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10 and ds.train_y[:3].tolist() == [9, 0, 0]
    with pytest.raises(D.DataError, match="It is the Fashion-MNIST file"):
        D.load_dataset("mnist", DEBIAN)


# ----------------------------------------------------------------- downloading
@pytest.fixture
def serve(monkeypatch):
    """Make urllib serve local files: serve(url_to_path) -> list of requested URLs."""
    def install(files: dict[str, Path]) -> list[str]:
        requested = []

        def fake_urlopen(url, timeout=None):
            requested.append(url)
            if url not in files:
                raise urllib.error.URLError("unreachable")
            return open(files[url], "rb")
        monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
        return requested
    return install


def test_download_file(tmp_path, serve):
    source = write(tmp_path / "src.bin", os.urandom(3000))
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    serve({"http://x/f": source})
    dest = D.download_file("http://x/f", tmp_path / "out" / "f", md5)
    assert dest.read_bytes() == source.read_bytes() and os.listdir(tmp_path / "out") == ["f"]
    with pytest.raises(D.DataError, match=r"http://x/f: downloaded data has MD5 .*, expected 0{32}"):
        D.download_file("http://x/f", tmp_path / "bad" / "f", "0" * 32)
    assert os.listdir(tmp_path / "bad") == []  # no partial or temp file left behind
    with pytest.raises(D.DataError, match="http://x/missing: download to .* failed"):
        D.download_file("http://x/missing", tmp_path / "bad" / "g", md5)
    assert os.listdir(tmp_path / "bad") == []


def test_load_with_download(tmp_path, serve, monkeypatch):
    arrays = write_idx_set(tmp_path / "mirror")
    spec = D._SPECS["mnist"]
    for stem in arrays:
        digest = hashlib.md5((tmp_path / "mirror" / f"{stem}.gz").read_bytes()).hexdigest()
        monkeypatch.setitem(D.MD5["mnist"], stem + ".gz", digest)
    requested = serve({spec.url + stem + ".gz": tmp_path / "mirror" / f"{stem}.gz" for stem in arrays})
    ds = D.load_dataset("mnist", tmp_path / "root", download=True, expect_counts=False)
    assert sorted(requested) == sorted(spec.url + s + ".gz" for s in IDX_STEMS)
    assert ds.checksums_ok and "downloaded" in ds.source and (tmp_path / "root" / "MNIST" / "raw").is_dir()
    assert np.array_equal(ds.train_x.numpy(), arrays["train-images-idx3-ubyte"])
    requested.clear()
    assert small("mnist", tmp_path / "root", download=True).train_y.equal(ds.train_y) and requested == []

    monkeypatch.setitem(D.MD5["mnist"], "t10k-labels-idx1-ubyte.gz", "f" * 32)  # a tampered mirror
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte.gz: downloaded data has MD5"):
        D.load_dataset("mnist", tmp_path / "root2", download=True, expect_counts=False)
    assert not (tmp_path / "root2" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").exists()


# ------------------------------------------------------------------ transforms
def test_pixel_permutations():
    perms = D.pixel_permutations(5, 784)
    assert perms.shape == (5, 784) and perms.dtype == torch.int64
    assert all(torch.equal(p.sort().values, torch.arange(784)) for p in perms)
    assert torch.equal(perms, D.pixel_permutations(5, 784)) and torch.equal(perms[:3], D.pixel_permutations(3, 784))
    for k in range(5):
        assert torch.equal(perms[k], torch.randperm(784, generator=torch.Generator().manual_seed(k)))
    assert torch.equal(D.pixel_permutations(2, 784, seed_offset=3), perms[3:5])
    assert D.pixel_permutations(0, 7).shape == (0, 7)


def test_rotation_angles():
    assert D.rotation_angles(4) == [0.0, 67.5, 135.0, 202.5]
    assert D.rotation_angles(1) == [0.0]


def test_rot90_is_exact_and_counter_clockwise():
    image = torch.zeros(1, 1, 3, 3)
    image[0, 0, 0, 2] = 1.0  # top-right corner
    assert D.rotate_images(image, 90)[0, 0, 0, 0] == 1.0  # counter-clockwise: top-right -> top-left
    x = torch.rand(2, 3, 8, 8)
    for quarters in range(-2, 6):
        assert torch.equal(D.rotate_images(x, 90.0 * quarters), torch.rot90(x, quarters, dims=(2, 3)))
    wide = torch.rand(2, 1, 4, 6)
    assert torch.equal(D.rotate_images(wide, 180), torch.rot90(wide, 2, dims=(2, 3)))


@pytest.mark.parametrize("angle", [90.0, -90.0, 270.0])
def test_grid_sample_matches_rot90(angle):
    x = torch.rand(3, 2, 28, 28)
    rotated = D.rotate_images(x, angle + 1e-7)  # off a multiple of 90: takes the grid_sample path
    exact = torch.rot90(x, round(angle / 90), dims=(2, 3))
    assert torch.allclose(rotated[..., 1:-1, 1:-1], exact[..., 1:-1, 1:-1], atol=1e-5)


def test_grid_sample_rotation_keeps_shape_and_zero_fills():
    x = torch.ones(2, 1, 5, 9)
    rotated = D.rotate_images(x, 45.0)
    assert rotated.shape == x.shape and rotated[..., 2, 4].allclose(torch.ones(2, 1))
    assert rotated[..., 0, 0].abs().max() == 0  # the corner comes from outside the source
    with pytest.raises(ValueError):
        D.rotate_images(torch.zeros(2, 28, 28, dtype=torch.uint8), 10.0)


def test_class_permutations_and_label_maps():
    assert torch.equal(D.class_permutation(0), torch.arange(10))
    assert D.class_permutation(1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 8]
    k300 = next(itertools.islice(itertools.permutations(range(10)), 300, None))
    assert D.class_permutation(300).tolist() == list(k300)
    maps = D.class_label_maps(40)
    assert maps.shape == (40, 10) and maps.dtype == torch.int64
    for k in (0, 1, 7, 39):
        perm = D.class_permutation(k)
        assert torch.equal(maps[k], D.class_label_map(k))
        assert torch.equal(maps[k][perm], torch.arange(10))  # label perm[i] goes to position i
    assert D.class_label_maps(6, C=3).tolist() == [list(np.argsort(p)) for p in itertools.permutations(range(3))]
    with pytest.raises(ValueError):
        D.class_label_maps(7, C=3)


def test_to_float():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = D.to_float(images)
    assert x.dtype == torch.float32 and x.allclose(torch.tensor([[[0.0, 1.0], [0.2, 0.4]]])) and x.max() == 1.0
    assert D.to_float(images, flatten=True).shape == (1, 4)
