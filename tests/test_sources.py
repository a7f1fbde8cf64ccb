"""Dataset readers (ssl_ops.data.sources): offline reading, error messages, imagefolder decoding.

No test touches the network: downloads are disabled or ``_torchvision_download`` is monkeypatched.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
from PIL import Image

from ssl_ops.data import sources
from ssl_ops.data.sources import RawDataset, load_source, read_idx, tv_arrays
from ssl_ops.errors import DatasetNotFoundError, SslOpsError
from ssl_ops.params import DataParams


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the real ~/.cache/ssl-ops from a test."""
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` (uint8 or int32) as an IDX file by hand, independently of the reader."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_tiny_mnist(folder: Path, gz: bool = True, n_train: int = 20, n_test: int = 10) -> None:
    """Four tiny IDX files (4×5 images, labels 0..9) in ``folder``."""
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 4, 5), dtype=np.uint8), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8), gz)


# ------------------------------------------------------------------------------------------------ digits


def test_digits_shapes_split_and_determinism() -> None:
    a = load_source(DataParams(name="digits"))
    assert a.train_x.shape == (1347, 1, 8, 8) and a.test_x.shape == (450, 1, 8, 8)
    assert a.train_x.dtype == a.test_x.dtype == np.uint8 and a.train_x.max() == 255
    assert a.train_y.dtype == a.test_y.dtype == np.int64
    assert set(np.unique(a.train_y)) == set(range(10)) and a.classes == [str(i) for i in range(10)]
    per_class = np.bincount(np.concatenate([a.train_y, a.test_y]))
    assert np.all(np.abs(np.bincount(a.test_y) - 0.25 * per_class) <= 1)  # stratified: 25% of each class
    assert a.unlabeled_x is None
    b = load_source(DataParams(name="digits"))
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(a, key), getattr(b, key))


# ---------------------------------------------------------------------------------------------- IDX / MNISTs


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / "x.idx", images, gz))
    assert out.dtype == np.uint8 and np.array_equal(out, images) and out.flags.writeable
    wide = np.array([[1, -2], [70000, 3]], dtype=np.int32)  # multi-byte: checks big-endian decoding
    out = read_idx(write_idx(tmp_path / "w.idx", wide, gz))
    assert out.dtype == np.int32 and out.dtype.isnative and np.array_equal(out, wide)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(SslOpsError, match="magic"):
        read_idx(bad)
    truncated = write_idx(tmp_path / "t.idx", np.zeros((3, 4), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(SslOpsError, match="truncated"):
        read_idx(truncated)
    broken_gz = tmp_path / "b.gz"
    broken_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04abcd")[:-6])
    with pytest.raises(SslOpsError, match=re.escape(str(broken_gz))):
        read_idx(broken_gz)


@pytest.mark.skipif(
    not sources.DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_mnist_from_debian_package() -> None:
    raw = load_source(DataParams(name="fashion_mnist", download=False))
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert raw.train_x.dtype == np.uint8 and raw.train_y.dtype == np.int64
    assert len(raw.classes) == 10 and raw.classes[0] == "T-shirt/top" and raw.classes[9] == "Ankle boot"
    assert np.array_equal(np.bincount(raw.train_y), [6000] * 10)
    assert np.array_equal(np.bincount(raw.test_y), [1000] * 10)


def test_fashion_mnist_reader_on_a_tiny_debian_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default dataset's reader, run in every CI (the test above needs the real package): four tiny IDX .gz
    files where Debian's dataset-fashion-mnist puts them, read with no data.root, pixels and labels as written."""
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    rng = np.random.default_rng(1)
    images = {p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in (("train", 20), ("t10k", 10))}
    for prefix, x in images.items():
        write_idx(system / f"{prefix}-images-idx3-ubyte.gz", x, gz=True)
        write_idx(system / f"{prefix}-labels-idx1-ubyte.gz", (9 - np.arange(len(x)) % 10).astype(np.uint8), gz=True)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", system)
    raw = load_source(DataParams(name="fashion_mnist", download=False))
    assert np.array_equal(raw.train_x[:, 0], images["train"]) and np.array_equal(raw.test_x[:, 0], images["t10k"])
    assert raw.train_y.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0] * 2 and raw.test_y.dtype == np.int64
    assert raw.classes[0] == "T-shirt/top" and raw.classes[9] == "Ankle boot"


@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
def test_mnist_like_from_root(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "data" if layout == "flat_gz" else tmp_path / "data" / "MNIST" / "raw"
    write_tiny_mnist(folder, gz=layout == "flat_gz")
    raw = load_source(DataParams(name="mnist", root=tmp_path / "data", download=False))
    assert raw.train_x.shape == (20, 1, 4, 5) and raw.test_x.shape == (10, 1, 4, 5)
    assert np.array_equal(raw.train_y, np.arange(20) % 10) and raw.classes == [str(i) for i in range(10)]


def test_fashion_mnist_missing_explains_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        load_source(DataParams(name="fashion_mnist", root=root, download=False))
    msg = str(err.value)
    for needle in (str(root), str(root / "FashionMNIST" / "raw"), "dataset-fashion-mnist", "data.root",
                   "https://github.com/zalandoresearch/fashion-mnist", "data.download is false"):  # fmt: skip
        assert needle in msg
    assert "\n" not in msg  # one paragraph

    # Without data.root: the Debian directory and the cache are the places looked at.
    with pytest.raises(DatasetNotFoundError) as err:
        load_source(DataParams(name="fashion_mnist", download=False))
    assert str(tmp_path / "no-debian") in str(err.value) and str(sources.CACHE_DIR) in str(err.value)


def test_partial_idx_folder_names_missing_files(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        load_source(DataParams(name="fashion_mnist", root=tmp_path, download=False))


def test_failed_download_becomes_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, dest: Path) -> None:
        (dest / "partial.gz").write_bytes(b"half")  # what an interrupted download leaves behind
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "_torchvision_download", offline)
    root = tmp_path / "new-root"
    with pytest.raises(DatasetNotFoundError, match=r"failed: .*Name or service not known"):
        load_source(DataParams(name="fashion_mnist", root=root, download=True))
    assert not root.exists()  # created for the download, removed again with the partial file
    with pytest.raises(DatasetNotFoundError, match=r"cifar10.*failed"):
        load_source(DataParams(name="cifar10", download=True))


def test_successful_download_is_moved_into_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(name: str, dest: Path) -> None:
        write_tiny_mnist(dest / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(sources, "_torchvision_download", fake_download)
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("the user's own file")
    raw = load_source(DataParams(name="fashion_mnist", root=root, download=True))
    assert raw.train_x.shape == (20, 1, 4, 5) and len(raw.classes) == 10
    assert sorted(p.name for p in root.iterdir()) == ["FashionMNIST", "notes.txt"]  # no temp folder left


# -------------------------------------------------------------------------------------- torchvision datasets


def test_cifar10_missing_mentions_data_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_source(DataParams(name="cifar10", root=tmp_path, download=False))
    msg = str(err.value)
    assert "data.root" in msg and "data.download: true" in msg and str(tmp_path / "cifar-10-batches-py") in msg


def test_tv_arrays_converts_layouts() -> None:
    hwc = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    x, y = tv_arrays(SimpleNamespace(data=hwc, targets=[3, 1]), channels_last=True)  # CIFAR
    assert x.shape == (2, 3, 3, 4) and x.flags.c_contiguous and np.array_equal(x[1, 2], hwc[1, :, :, 2])
    assert y.dtype == np.int64 and y.tolist() == [3, 1]
    chw = hwc.transpose(0, 3, 1, 2)
    x, y = tv_arrays(SimpleNamespace(data=chw, labels=np.array([0, 9], np.uint8)), channels_last=False)  # SVHN/STL
    assert np.array_equal(x, chw) and y.dtype == np.int64


# -------------------------------------------------------------------------------------------------- contract


def test_load_source_rejects_invalid_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    def bad(cfg: DataParams) -> RawDataset:
        x = np.zeros((4, 1, 8, 8), np.float32)  # wrong dtype
        return RawDataset(x, np.array([0, 1, 2, 5]), x, np.zeros(3, np.int64), classes=["a", "b"])

    monkeypatch.setitem(sources.SOURCES, "digits", bad)
    with pytest.raises(SslOpsError) as err:
        load_source(DataParams(name="digits"))
    msg = str(err.value)
    assert "train_x must be a non-empty uint8" in msg and "test_x has 4 images but test_y has 3" in msg
    assert "outside 0..1" in msg


def test_register_source_twice_is_a_bug() -> None:
    with pytest.raises(ValueError, match="already registered"):
        sources.register_source("digits")(lambda cfg: None)  # type: ignore[arg-type,return-value]


# ----------------------------------------------------------------------------------------------- imagefolder


def make_image_folder(root: Path) -> None:
    """cat: 5 images (sizes vary, one RGBA, solid red) + a .txt; dog: 4 images (one grayscale, one .JPG)."""
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    for i, size in enumerate([(20, 10), (33, 17), (16, 16), (40, 40)]):
        Image.new("RGB", size, (255, 0, 0)).save(cat / f"c{i}.png")
    Image.new("RGBA", (25, 30), (255, 0, 0, 128)).save(cat / "c_alpha.png")
    (cat / "notes.txt").write_text("not an image")
    for i in range(3):
        Image.new("RGB", (12 + i, 50), (0, 0, 255)).save(dog / f"d{i}.png")
    Image.new("L", (18, 18), 100).save(dog / "d_gray.JPG")


def imagefolder_params(root: Path, **kw: object) -> DataParams:
    return DataParams(name="imagefolder", root=root, image_size=16, test_fraction=0.4, download=False, **kw)


def test_imagefolder_flat_layout(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs")
    raw = load_source(imagefolder_params(tmp_path / "imgs"))
    assert raw.classes == ["cat", "dog"]
    assert raw.train_x.shape == (5, 3, 16, 16) and raw.test_x.shape == (4, 3, 16, 16)  # .txt skipped
    assert np.bincount(raw.test_y).tolist() == [2, 2]  # stratified: round(0.4 * 5) and round(0.4 * 4)
    x = np.concatenate([raw.train_x, raw.test_x])
    y = np.concatenate([raw.train_y, raw.test_y])
    assert np.all(x[y == 0] == np.array([255, 0, 0], np.uint8)[:, None, None])  # RGBA -> RGB, colours kept
    gray = [img for img in x[y == 1] if img[0, 0, 0] == 100]
    assert len(gray) == 1 and np.all(gray[0] == 100)  # the grayscale image replicated to 3 channels
    again = load_source(imagefolder_params(tmp_path / "imgs"))
    assert np.array_equal(raw.test_y, again.test_y) and np.array_equal(raw.test_x, again.test_x)


def test_imagefolder_train_test_layout_grayscale_and_unlabeled(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("b", "a"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (10, 14), 10 * i).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "unl" / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (9, 9), 7).save(tmp_path / "unl" / ("sub" if i else "") / f"u{i}.bmp")
    raw = load_source(imagefolder_params(tmp_path, unlabeled_dir=tmp_path / "unl"))
    assert raw.classes == ["a", "b"]
    assert raw.train_x.shape == (6, 1, 16, 16) and raw.test_x.shape == (4, 1, 16, 16)  # all grayscale: C = 1
    assert raw.unlabeled_x is not None and raw.unlabeled_x.shape == (3, 1, 16, 16)  # found recursively
    assert np.all(raw.unlabeled_x == 7) and raw.train_y.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_unlabeled_dir_inside_root_is_not_a_class(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "unlabeled").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "unlabeled" / "u.png")
    raw = load_source(imagefolder_params(tmp_path, unlabeled_dir=tmp_path / "unlabeled"))
    assert raw.classes == ["cat", "dog"] and raw.unlabeled_x is not None and raw.unlabeled_x.shape == (1, 3, 16, 16)


def test_imagefolder_corrupt_image_names_the_file(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    corrupt = tmp_path / "dog" / "broken.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(SslOpsError, match=re.escape(str(corrupt))):
        load_source(imagefolder_params(tmp_path))


def test_imagefolder_config_and_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(SslOpsError, match=r"data\.root"):
        load_source(DataParams(name="imagefolder", image_size=16))
    with pytest.raises(SslOpsError, match=r"data\.image_size"):
        load_source(DataParams(name="imagefolder", root=tmp_path))
    with pytest.raises(DatasetNotFoundError, match="no class sub-folders"):
        load_source(imagefolder_params(tmp_path))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no images"):
        load_source(imagefolder_params(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="not a directory"):
        load_source(imagefolder_params(tmp_path / "missing"))
