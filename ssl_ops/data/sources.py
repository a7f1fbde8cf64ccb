"""Dataset readers: one function per ``data.name``, each returning the raw arrays as a :class:`RawDataset`.

Readers look for the data offline first (``data.root``, then the standard places) and download only when
``data.download`` is true. Whatever cannot be found raises :class:`DatasetNotFoundError` with one paragraph
naming every path looked at and how to get the data. Heavy libraries (torchvision, scikit-learn, PIL) are
imported inside the readers that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import math
import os
import shutil
import socket
import struct
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np

from ssl_ops.errors import DatasetNotFoundError, ParamsError, SslOpsError
from ssl_ops.plugins import registrar
from ssl_ops.sections import DataParams

# Module-level so tests (and unusual installs) can point them elsewhere; read at call time.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
DEBIAN_MNIST_DIR = Path("/usr/share/datasets/mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ssl-ops"
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an unreachable network fails in seconds, not minutes

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_GRAY_MODES = frozenset({"1", "L", "LA"})  # PIL modes kept as one channel when every image has one

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(i) for i in range(10)]


@dataclass
class RawDataset:
    """A dataset as read from its source, before any labeled/unlabeled split."""

    train_x: np.ndarray  # uint8 (N, C, H, W), C = 1 or 3
    train_y: np.ndarray  # int64 (N,)
    test_x: np.ndarray  # uint8 (M, C, H, W)
    test_y: np.ndarray  # int64 (M,)
    classes: list[str]  # human-readable class names, index = label
    unlabeled_x: np.ndarray | None = None  # uint8 (U, C, H, W): images that come without labels
    skipped: list[str] = field(default_factory=list)  # imagefolder: non-image files left out (manifest)
    skip_reasons: dict[str, str] = field(default_factory=dict)  # imagefolder: skipped path -> why
    converted: dict[str, int] = field(default_factory=dict)  # imagefolder: source mode -> images converted


Reader = Callable[["DataParams"], RawDataset]
SOURCES: dict[str, Reader] = {}


# @register_source(name) registers a reader for a value of DataParams.name
register_source = registrar(SOURCES, "dataset source")


def load_source(cfg: DataParams) -> RawDataset:
    """Read dataset ``cfg.name`` and check the arrays' dtypes and shapes before anything is written."""
    reader = SOURCES.get(cfg.name)
    if reader is None:
        raise SslOpsError(f"unknown dataset {cfg.name!r}; available: {', '.join(sorted(SOURCES))}")
    raw = reader(cfg)
    validate(raw, cfg.name)
    return raw


def validate(raw: RawDataset, name: str) -> None:
    """Raise :class:`SslOpsError` listing every way ``raw`` breaks the :class:`RawDataset` contract."""
    problems: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for key in ("train_x", "test_x", "unlabeled_x"):
        x = getattr(raw, key)
        if x is None and key == "unlabeled_x":
            continue
        ok = isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] in (1, 3) and len(x)
        if not ok:
            problems.append(f"{key} must be a non-empty uint8 array (N, C, H, W) with C = 1 or 3, got {_describe(x)}")
        else:
            shapes[key] = x.shape[1:]
    if len(set(shapes.values())) > 1:
        problems.append("image shapes (C, H, W) differ: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    if not raw.classes or len(set(raw.classes)) != len(raw.classes) or not all(isinstance(c, str) for c in raw.classes):
        problems.append(f"classes must be distinct strings, got {raw.classes!r}")
    for split in ("train", "test"):
        x, y = getattr(raw, f"{split}_x"), getattr(raw, f"{split}_y")
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
            problems.append(f"{split}_y must be an int64 array (N,), got {_describe(y)}")
        elif isinstance(x, np.ndarray) and len(x) != len(y):
            problems.append(f"{split}_x has {len(x)} images but {split}_y has {len(y)} labels")
        elif len(y) and (y.min() < 0 or y.max() >= len(raw.classes)):
            problems.append(f"{split}_y has labels in {y.min()}..{y.max()}, outside 0..{len(raw.classes) - 1}")
    if problems:
        raise SslOpsError(f"dataset source {name!r} returned invalid arrays: " + "; ".join(problems))


def _describe(a: Any) -> str:
    return f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


# ---------------------------------------------------------------------------------------------- IDX (MNISTs)

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not, into a writable native-endian array.

    Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per dimension,
    then the data in C order, big-endian.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, since files get renamed
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise SslOpsError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES:
        raise SslOpsError(
            f"{path} is not an IDX file: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x0000, a dtype code 08/09/0B/0C/0D/0E, the number of dimensions)"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SslOpsError(f"{path} is truncated: it ends inside its {header}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise SslOpsError(
            f"{path} is truncated or corrupted: its header announces shape {dims} ({expected} bytes) "
            f"but it holds {len(raw)} bytes"
        )
    # astype copies: the result must not be a read-only view of the bytes, and must be native-endian
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx_files(folder: Path) -> dict[str, Path] | str:
    """The four IDX files in ``folder``, or why they are not all there."""
    if not folder.is_dir():
        return "no such directory"
    found, missing = {}, []
    for key, stem in _IDX_FILES.items():
        # torchvision keeps both the .gz and the extracted file; some mirrors spell "train-images.idx3-ubyte"
        names = [n + ext for n in (stem, stem.replace("-idx", ".idx")) for ext in ("", ".gz")]
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            missing.append(stem + "[.gz]")
        else:
            found[key] = path
    return "missing " + ", ".join(missing) if missing else found


def _read_idx_dataset(files: dict[str, Path], classes: list[str]) -> RawDataset:
    """Images (N, H, W) and labels (N,) from the four IDX files, as a RawDataset with C = 1."""
    a = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = a[f"{split}_x"], a[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise SslOpsError(
                f"IDX files {files[f'{split}_x']} and {files[f'{split}_y']} do not belong together: images "
                f"{x.dtype} {x.shape}, labels {y.dtype} {y.shape}; expected uint8 (N, H, W) and (N,)"
            )
    return RawDataset(
        train_x=a["train_x"][:, None],
        train_y=a["train_y"].astype(np.int64),
        test_x=a["test_x"][:, None],
        test_y=a["test_y"].astype(np.int64),
        classes=list(classes),
    )


def _load_idx_source(
    cfg: DataParams, name: str, tv_folder: str, system_dir: Path, classes: list[str], howto: str
) -> RawDataset:
    """Find the IDX files (data.root, else the system dir and the cache), downloading if allowed."""
    if cfg.root is not None:  # an explicit root is the only place looked at: no silent fallback
        target = _user_path(cfg.root)
        places = [target, target / tv_folder / "raw"]
    else:
        target = CACHE_DIR / name
        places = [system_dir, target / tv_folder / "raw"]

    def search() -> tuple[dict[str, Path] | None, list[str]]:
        reasons = []
        for place in places:
            found = _find_idx_files(place)
            if isinstance(found, dict):
                return found, []
            reasons.append(f"{place} ({found})")
        return None, reasons

    files, reasons = search()
    failure = None
    if files is None and cfg.download:
        failure = _download(name, target)
        files, reasons = search()
    if files is None:
        looked = "looked for its four IDX files in " + "; ".join(reasons)
        raise _not_found(name, looked, cfg.download, failure, target, howto)
    return _read_idx_dataset(files, classes)


@register_source("fashion_mnist")
def read_fashion_mnist(cfg: DataParams) -> RawDataset:
    """Fashion-MNIST: 60k/10k grayscale 28×28 images of 10 clothing classes (the default dataset)."""
    howto = (
        "To get it: install the Debian package (`apt-get install dataset-fashion-mnist`, which puts the files in "
        "/usr/share/datasets/fashion-mnist/); or download the four .gz files from "
        "https://github.com/zalandoresearch/fashion-mnist into a directory and set data.root to it "
        "(e.g. `ssl-ops prepare --set data.root=/path/to/dir`); or, when online, set data.download: true."
    )
    system_dir = DEBIAN_FASHION_MNIST_DIR
    return _load_idx_source(cfg, "fashion_mnist", "FashionMNIST", system_dir, FASHION_MNIST_CLASSES, howto)


@register_source("mnist")
def read_mnist(cfg: DataParams) -> RawDataset:
    """MNIST: 60k/10k grayscale 28×28 handwritten digits."""
    howto = (
        "To get it: download the four .gz files (e.g. from torchvision's mirror "
        "https://ossci-datasets.s3.amazonaws.com/mnist/ or the original http://yann.lecun.com/exdb/mnist/) into a "
        "directory and set data.root to it (e.g. `ssl-ops prepare --set data.root=/path/to/dir`); or, when online, "
        "set data.download: true."
    )
    return _load_idx_source(cfg, "mnist", "MNIST", DEBIAN_MNIST_DIR, DIGIT_CLASSES, howto)


# ------------------------------------------------------------------------------------ torchvision datasets

# name -> (torchvision class, constructor kwargs of each split whose download fetches every file needed)
_TORCHVISION: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "fashion_mnist": ("FashionMNIST", [{"train": True}]),
    "mnist": ("MNIST", [{"train": True}]),
    "cifar10": ("CIFAR10", [{"train": True}]),
    "cifar100": ("CIFAR100", [{"train": True}]),
    "svhn": ("SVHN", [{"split": "train"}, {"split": "test"}]),  # one .mat file per split
    "stl10": ("STL10", [{"split": "train"}]),  # one archive holds every split
}


def _tv() -> Any:
    """torchvision.datasets, imported on first use (it takes seconds)."""
    import torchvision.datasets

    return torchvision.datasets


def _torchvision_download(name: str, dest: Path) -> None:
    """Fetch ``name`` with torchvision's own downloader into ``dest``, in torchvision's layout."""
    cls_name, splits = _TORCHVISION[name]
    cls = getattr(_tv(), cls_name)
    for kwargs in splits:
        cls(str(dest), download=True, **kwargs)


def _download(name: str, target: Path) -> str | None:
    """Download ``name`` into ``target``; return None on success, else a short reason for the failure.

    Files land in a temporary folder inside ``target`` and are moved in only once every file has
    arrived, so a failed or interrupted download never leaves partial files among the user's own.
    """
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ssl-ops-download-", dir=target))
    except OSError as exc:
        return f"cannot create a download folder in {target}: {exc.strerror or exc}"
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            _torchvision_download(name, tmp)
        _merge_into(tmp, target)
    except (OSError, RuntimeError, EOFError, http.client.HTTPException, tarfile.TarError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:  # leave no empty folder behind where there was none
            with contextlib.suppress(OSError):
                target.rmdir()
        return _brief(exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give urllib a deadline (torchvision opens URLs without one) unless the caller already set one."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else previous)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _merge_into(src: Path, dest: Path) -> None:
    """Move everything in ``src`` into ``dest``, merging folders and replacing files of the same name."""
    for child in src.iterdir():
        out = dest / child.name
        if child.is_dir() and out.is_dir():
            _merge_into(child, out)
        else:
            if out.is_dir():
                shutil.rmtree(out)
            os.replace(child, out)


def _brief(exc: BaseException) -> str:
    """One line for an error message: torchvision's download errors span several lines."""
    detail = exc.reason if isinstance(exc, URLError) else exc
    text = " ".join(line.strip() for line in str(detail).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _user_path(p: str | Path) -> Path:
    """A user-given path, ``~`` expanded and made absolute so error messages are unambiguous."""
    return Path(p).expanduser().absolute()


def _not_found(
    name: str, looked: str, download: bool, failure: str | None, target: Path, howto: str
) -> DatasetNotFoundError:
    """The one-paragraph error: what was looked for where, what happened to the download, how to get it."""
    if not download:
        dl = "Nothing was downloaded because data.download is false."
    elif failure:
        dl = f"Downloading it into {target} failed: {failure}."
    else:
        dl = f"A download into {target} finished but did not produce the expected files."
    return DatasetNotFoundError(f"Dataset {name!r} not found: {looked}. {dl} {howto}")


def _load_torchvision(
    cfg: DataParams, name: str, required: tuple[str, ...], layout: str, read: Callable[[Path], RawDataset]
) -> RawDataset:
    """Read a torchvision dataset from data.root (or the cache), downloading it there if allowed.

    ``required`` are the paths torchvision's layout has under the root: checking them first names the
    exact missing paths in the error and avoids importing torchvision when nothing is there.
    """
    root = _user_path(cfg.root) if cfg.root is not None else CACHE_DIR / name

    def attempt() -> tuple[RawDataset | None, str]:
        missing = [str(root / p) for p in required if not (root / p).exists()]
        if missing:
            return None, f"looked in {root} for torchvision's layout ({layout}) and found no " + ", ".join(missing)
        try:
            return read(root), ""
        except RuntimeError as exc:  # torchvision's md5 check: a truncated or modified file
            return None, f"found {layout} in {root} but torchvision could not load it ({_brief(exc)})"

    raw, looked = attempt()
    failure = None
    if raw is None and cfg.download:
        failure = _download(name, root)
        raw, looked = attempt()
    if raw is None:
        howto = (
            f"To get it: when online, set data.download: true (torchvision downloads it into {root}); or set "
            f"data.root to a directory holding torchvision's layout ({layout}), e.g. "
            "`ssl-ops prepare --set data.root=/path/to/dir`."
        )
        raise _not_found(name, looked, cfg.download, failure, root, howto)
    return raw


def tv_arrays(ds: Any, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NCHW images, int64 labels) from a torchvision dataset's in-memory arrays, no per-image loop.

    CIFAR keeps HWC images in ``.data`` and a list in ``.targets``; SVHN and STL-10 keep CHW images and
    ``.labels`` (SVHN's label 10 is already mapped to 0 by torchvision).
    """
    x = np.asarray(ds.data, dtype=np.uint8)
    if channels_last:
        x = x.transpose(0, 3, 1, 2)
    labels = ds.targets if hasattr(ds, "targets") else ds.labels
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64)


def _read_cifar(root: Path, cls_name: str) -> RawDataset:
    cls = getattr(_tv(), cls_name)
    train, test = cls(str(root), train=True), cls(str(root), train=False)
    return RawDataset(*tv_arrays(train, True), *tv_arrays(test, True), classes=list(train.classes))


def _read_svhn(root: Path) -> RawDataset:
    svhn = _tv().SVHN
    train, test = svhn(str(root), split="train"), svhn(str(root), split="test")
    return RawDataset(*tv_arrays(train, False), *tv_arrays(test, False), classes=list(DIGIT_CLASSES))


def _read_stl10(root: Path) -> RawDataset:
    # Each split re-checks the md5 of the whole 2.6 GB archive content: slow (seconds) but a one-off.
    stl = _tv().STL10
    train, test = stl(str(root), split="train"), stl(str(root), split="test")
    classes = list(train.classes)
    unlabeled_x = tv_arrays(stl(str(root), split="unlabeled"), False)[0]
    return RawDataset(*tv_arrays(train, False), *tv_arrays(test, False), classes=classes, unlabeled_x=unlabeled_x)


@register_source("cifar10")
def read_cifar10(cfg: DataParams) -> RawDataset:
    """CIFAR-10: 50k/10k colour 32×32 images, 10 classes."""
    folder = "cifar-10-batches-py"
    return _load_torchvision(cfg, "cifar10", (folder,), folder + "/", lambda r: _read_cifar(r, "CIFAR10"))


@register_source("cifar100")
def read_cifar100(cfg: DataParams) -> RawDataset:
    """CIFAR-100: 50k/10k colour 32×32 images, 100 fine-grained classes."""
    folder = "cifar-100-python"
    return _load_torchvision(cfg, "cifar100", (folder,), folder + "/", lambda r: _read_cifar(r, "CIFAR100"))


@register_source("svhn")
def read_svhn(cfg: DataParams) -> RawDataset:
    """SVHN: 73k/26k colour 32×32 house-number digits (the 531k ``extra`` split is not used)."""
    required = ("train_32x32.mat", "test_32x32.mat")
    return _load_torchvision(cfg, "svhn", required, "train_32x32.mat and test_32x32.mat", _read_svhn)


@register_source("stl10")
def read_stl10(cfg: DataParams) -> RawDataset:
    """STL-10: 5k labeled train, 8k test and 100k unlabeled colour 96×96 images, 10 classes."""
    return _load_torchvision(cfg, "stl10", ("stl10_binary",), "stl10_binary/", _read_stl10)


# ------------------------------------------------------------------------------------------------ digits


@register_source("digits")
def read_digits(cfg: DataParams) -> RawDataset:
    """scikit-learn's bundled 8×8 digits (1,797 images, no download): a seconds-long smoke-test dataset.

    Pixel values 0..16 are scaled to 0..255; the stratified 75/25 train/test split is fixed (seed 0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    y = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    train, test = np.sort(train), np.sort(test)  # keep the original order within each split
    return RawDataset(x[train], y[train], x[test], y[test], classes=list(DIGIT_CLASSES))


# --------------------------------------------------------------------------------------------- synthetic


@register_source("synthetic")
def read_synthetic(cfg: DataParams) -> RawDataset:
    """Seeded uniform-random uint8 images of the shape in ``cfg.synthetic`` (e.g. 3x32x32, 10 classes for a
    CIFAR-10 stand-in), labels cycling through the classes: the paper pipelines' smoke runs use it in place
    of a dataset this machine does not hold. Nothing in it can be learned; it exercises code paths only."""
    s = cfg.synthetic
    rng = np.random.default_rng(s.seed)

    def images(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        n = per_class * s.classes
        x = rng.integers(0, 256, size=(n, s.channels, s.image_size, s.image_size), dtype=np.uint8)
        return x, np.arange(n, dtype=np.int64) % s.classes

    (tx, ty), (vx, vy) = images(s.train_per_class), images(s.test_per_class)
    return RawDataset(tx, ty, vx, vy, classes=[f"class_{i}" for i in range(s.classes)])


# ------------------------------------------------------------------------------------------- imagefolder

IMAGEFOLDER_SPLIT_SEED = 0


@register_source("imagefolder")
def read_imagefolder(cfg: DataParams) -> RawDataset:
    """The user's own images: ``root/<class>/*`` (a test split is drawn) or ``root/{train,test}/<class>/*``.

    Every image is resized to ``data.image_size`` squared; the images are kept grayscale (C = 1) only if
    all of them are, else converted to RGB. ``data.unlabeled_dir`` (searched recursively) gives unlabeled_x.
    """
    if cfg.root is None:
        raise ParamsError(
            "data.name imagefolder needs data.root: a folder with one sub-folder of images per class "
            "(or train/ and test/ folders laid out that way), e.g. `ssl-ops prepare --set data.root=/path/to/images`"
        )
    if cfg.image_size is None:
        raise ParamsError(
            "data.name imagefolder needs data.image_size: every image is resized to that square size, "
            "e.g. `ssl-ops prepare --set data.image_size=64`"
        )
    root = _user_path(cfg.root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"Dataset 'imagefolder' not found: data.root {root} is not a directory.")
    unlabeled_dir = _user_path(cfg.unlabeled_dir) if cfg.unlabeled_dir is not None else None
    if unlabeled_dir is not None and not unlabeled_dir.is_dir():
        raise DatasetNotFoundError(f"data.unlabeled_dir {unlabeled_dir} is not a directory.")

    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        have, lack = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise SslOpsError(
            f"imagefolder {root} has a {have}/ folder but no {lack}/: provide both, each with one sub-folder "
            f"per class, or put the class folders directly in data.root to have a test split drawn"
        )
    problems: list[str] = []  # every problem of the folder, reported together (one run, not one per problem)
    unlabeled_files = _image_files(unlabeled_dir) if unlabeled_dir is not None else []
    if unlabeled_dir is not None and not unlabeled_files:
        problems.append(f"data.unlabeled_dir {unlabeled_dir} holds no images ({_extensions()})")
    if train_dir.is_dir():
        class_dirs = _class_dirs(train_dir, unlabeled_dir)
        classes = list(class_dirs)
        test_dirs = _class_dirs(test_dir, unlabeled_dir)
        unknown = sorted(set(test_dirs) - set(classes))
        if unknown:
            raise SslOpsError(f"{test_dir} has class folders {unknown} that {train_dir} lacks")
        train_files, train_y = _labelled_files(class_dirs, classes, problems)
        test_files, test_y = _labelled_files(test_dirs, classes, problems)
    else:
        class_dirs = _class_dirs(root, unlabeled_dir)
        classes = list(class_dirs)
        files, y = _labelled_files(class_dirs, classes, problems)
        if problems:  # e.g. an empty class: no test split can be drawn, but check every file first
            _load_images(files + unlabeled_files, cfg.image_size, problems, root)  # raises them all
        train_idx, test_idx = _stratified_split(y, cfg.test_fraction, classes, IMAGEFOLDER_SPLIT_SEED)
        train_files, train_y = [files[i] for i in train_idx], y[train_idx]
        test_files, test_y = [files[i] for i in test_idx], y[test_idx]
    # Files that are not images (by extension) and sub-folders of class folders are skipped, not errors; the
    # counts are printed by `ssl-ops prepare` and the list kept in manifest.json. Hidden files are ignored.
    folders = [*class_dirs.values(), *(test_dirs.values() if train_dir.is_dir() else [])]
    reasons = {str(p): "not an image (extension)" for d in [*folders, *([unlabeled_dir] if unlabeled_dir else [])]
               for p in _non_image_files(d, recursive=d == unlabeled_dir)}
    reasons |= {str(p): "sub-folder of a class folder (only files directly in it are read)"
                for d in folders for p in sorted(d.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    # One decode pass over all images, so every array shares the same number of channels.
    x, converted = _load_images(train_files + test_files + unlabeled_files, cfg.image_size, problems, root)
    n_train, n_test = len(train_files), len(test_files)
    return RawDataset(
        train_x=x[:n_train],
        train_y=train_y,
        test_x=x[n_train : n_train + n_test],
        test_y=test_y,
        classes=classes,
        unlabeled_x=x[n_train + n_test :] if unlabeled_files else None,
        skipped=sorted(reasons),
        skip_reasons=dict(sorted(reasons.items())),
        converted=converted,
    )


def _folder_problems(root: Path, problems: list[str]) -> DatasetNotFoundError:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    return DatasetNotFoundError(f"imagefolder {root} has {len(problems)} problem(s); fix them all, then re-run "
                       "`ssl-ops prepare`:\n  - " + "\n  - ".join(shown))


def _extensions() -> str:
    return "accepted extensions: " + " ".join(sorted(IMAGE_EXTENSIONS))


def _class_dirs(folder: Path, exclude: Path | None) -> dict[str, Path]:
    """Sorted class name -> folder; hidden folders and the unlabeled folder (if inside) are not classes."""
    dirs = {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (exclude is None or p.resolve() != exclude.resolve())
    }
    if not dirs:
        raise DatasetNotFoundError(
            f"imagefolder {folder} has no class sub-folders: put each class's images in {folder}/<class name>/"
        )
    return dirs


def _image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (in sub-folders too when ``recursive``), sorted; hidden files (e.g. macOS
    ``._*``) are skipped."""
    return sorted(
        p
        for p in (folder.rglob("*") if recursive else folder.iterdir())
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _non_image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Visible files in ``folder`` (or under it) whose extension is not an image's (notes, CSVs, archives ...)."""
    return sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                  if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _labelled_files(class_dirs: dict[str, Path], classes: list[str],
                    problems: list[str]) -> tuple[list[Path], np.ndarray]:
    """The image paths directly in the given class folders and their int64 labels (index into ``classes``);
    a class folder without images is appended to ``problems``."""
    files: list[Path] = []
    labels: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for name, folder in class_dirs.items():
        found = _image_files(folder, recursive=False)
        if not found:
            problems.append(f"class folder {folder} holds no images ({_extensions()})")
        files += found
        labels.append(np.full(len(found), classes.index(name), dtype=np.int64))
    return files, np.concatenate(labels)


def _stratified_split(y: np.ndarray, fraction: float, classes: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted indices: per class, a seeded random ``fraction`` (at least 1, never all) is test.

    Each class draws from its own generator, so adding images to one class leaves the others' split as is.
    """
    test = []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            raise SslOpsError(
                f"class {name!r} has {len(idx)} image; at least 2 are needed to draw a test split "
                "(or provide train/ and test/ folders)"
            )
        k = min(max(int(len(idx) * fraction + 0.5), 1), len(idx) - 1)
        test.append(np.random.default_rng([seed, c]).choice(idx, k, replace=False))
    test_idx = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(y)), test_idx), test_idx


def _load_images(paths: list[Path], size: int, problems: list[str] | None = None,
                 root: Path = Path(".")) -> tuple[np.ndarray, dict[str, int]]:
    """Decode and resize ``paths`` into one uint8 (N, C, size, size) array; C = 1 only if all are grayscale.
    Also returns {source mode: images converted}. Every unreadable or empty file is listed in ``problems``
    (with any problems found earlier) and raised together."""
    problems = [] if problems is None else problems
    modes = []
    # Image.open reads only the header, so this first pass is cheap and decides the channel count up front.
    for p in paths:
        try:
            if p.stat().st_size == 0:
                raise SslOpsError(f"image {p} is an empty (zero-byte) file; delete or replace it")
            modes.append(_open(p, lambda im: im.mode))
        except SslOpsError as exc:
            problems.append(str(exc))
    if problems:
        raise _folder_problems(root, problems)
    gray = all(m in _GRAY_MODES for m in modes)
    target = "L" if gray else "RGB"
    converted: dict[str, int] = {}
    for m in modes:
        if m != target:
            converted[m] = converted.get(m, 0) + 1
    out = np.empty((len(paths), 1 if gray else 3, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        pixels = _open(p, lambda im: np.asarray(_to_square(im, target, size)))
        out[i] = pixels if gray else pixels.transpose(2, 0, 1)
    return out, converted


def _to_square(im: Any, mode: str, size: int) -> Any:
    """``im`` upright, in ``mode``, resized (not cropped) to size × size with a high-quality filter."""
    from PIL import Image, ImageOps

    im.draft(None, (size, size))  # JPEG: decode at a reduced scale still >= size, much faster for photos
    im = ImageOps.exif_transpose(im)  # phone photos store their orientation in EXIF, not in the pixels
    return im.convert(mode).resize((size, size), Image.Resampling.LANCZOS)


def _open(path: Path, use: Callable[[Any], Any]) -> Any:
    """Apply ``use`` to the opened image; any decoding failure becomes an SslOpsError naming the file."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse both (memory, decode time)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return use(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SslOpsError(f"image {path} is too large to decode safely ({exc}); shrink it (e.g. to a few "
                          "thousand pixels a side) or remove it") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise SslOpsError(f"cannot read image {path}: {exc}; delete or replace the file") from None
