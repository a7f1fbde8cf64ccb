"""Materialise a dataset in the canonical on-disk form every later stage reads.

``data/prepared/<name>/`` holds ``train_x.npy`` (uint8 N×C×H×W), ``train_y.npy`` (int64), the same for
``test``, optionally ``unlabeled_x.npy`` (unlabeled-only images, e.g. STL-10's 100k), and
``manifest.json`` with class names, shapes and the sha256 of every array. Readers verify the hashes so a
file modified after preparation is caught before training, with an error naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_ops import io
from ssl_ops.data.sources import _user_path, load_source
from ssl_ops.errors import DataIntegrityError, ParamsError
from ssl_ops.sections import DataParams

PREPARED_ROOT = Path("data/prepared")
# Committed symlinks that dvc.yaml's prepare stage depends on (DVC follows a dep that is a symlink and hashes
# the folder behind it): `link_sources` points them at the user's folders, so a changed image re-runs prepare.
SOURCES = Path("sources")
ARRAYS = ("train_x", "train_y", "test_x", "test_y", "unlabeled_x")
# data params that change the prepared arrays: recorded in the manifest, and a later stage run with other
# values is refused (it would train on arrays prepared otherwise while MLflow logs the new values)
PREPARED_WITH = ("root", "image_size", "unlabeled_dir", "test_fraction")


@dataclass
class PreparedDataset:
    name: str
    train_x: np.ndarray  # uint8 N×C×H×W (memory-mapped: pages load on first touch)
    train_y: np.ndarray  # int64 N
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    sha256: str  # one hash for the whole prepared dataset (hash of the per-array hashes)
    mean: list[float]  # per-channel mean of train images, in [0, 1] units
    std: list[float]
    unlabeled_x: np.ndarray | None = None
    prepared_with: dict | None = None  # the data params prepare read (PREPARED_WITH); None in older manifests

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_unlabeled_only(self) -> int:
        """Images without labels (``unlabeled_x``): they join the split's unlabeled pool after the train set."""
        return 0 if self.unlabeled_x is None else len(self.unlabeled_x)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


def dataset_hash(array_hashes: dict[str, str]) -> str:
    return io.sha256_bytes("\n".join(f"{k}:{v}" for k, v in sorted(array_hashes.items())).encode())


def prepare(cfg: DataParams, root: Path = PREPARED_ROOT) -> Path:
    """Read the source dataset and write ``root/<name>/`` atomically (temp dir, then rename)."""
    raw = load_source(cfg)
    out = root / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.", dir=root))
    os.chmod(tmp, 0o777 & ~io.current_umask())  # mkdtemp makes 0700
    try:
        hashes, shapes = {}, {}
        for key in ARRAYS:
            arr = getattr(raw, key)
            if arr is None:
                continue
            np.save(tmp / f"{key}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            hashes[key] = io.sha256_file(tmp / f"{key}.npy")
            shapes[key] = list(arr.shape)
        # per-channel statistics in [0, 1] units, computed in chunks to bound memory on big datasets
        x = raw.train_x
        s1, s2 = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        for i in range(0, len(x), 4096):
            chunk = x[i : i + 4096].astype(np.float64) / 255.0
            s1 += chunk.sum(axis=(0, 2, 3))
            s2 += (chunk**2).sum(axis=(0, 2, 3))
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = s1 / count
        manifest = {
            "mean": mean.tolist(),
            "std": np.sqrt(np.maximum(s2 / count - mean**2, 0.0)).tolist(),
            "name": cfg.name,
            "classes": list(raw.classes),
            "shapes": shapes,
            "sha256": hashes,
            "dataset_sha256": dataset_hash(hashes),
            "skipped_files": list(raw.skipped),  # imagefolder: non-image files and class sub-folders left out
            "skip_reasons": dict(raw.skip_reasons),
            "converted": dict(raw.converted),  # imagefolder: source PIL mode -> images converted
            "color_mode": "L" if raw.train_x.shape[1] == 1 else "RGB",
            "prepared_with": _prepared_with(cfg),
        }
        io.write_json(tmp / "manifest.json", manifest)
        # Swap in the new directory; the old one is removed only once the new one is in place.
        old = root / f".{cfg.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _prepared_with(cfg: DataParams) -> dict:
    # folders as written in the params (not made absolute): `dvc exp run` prepares in a temp copy of the repo
    return {k: (str(v) if isinstance(v, Path) else v) for k in PREPARED_WITH for v in [getattr(cfg, k)]}


def check_prepared_with(cfg: DataParams, data: PreparedDataset) -> None:
    """Refuse data params that disagree with the prepared arrays (e.g. ``--set data.image_size=64`` on arrays
    prepared at 32): the run would use the old arrays while MLflow records the new value."""
    now = _prepared_with(cfg)
    then = dict(data.prepared_with or {})
    then["image_size"] = data.image_shape[-1]  # the arrays' own size: also catches manifests that predate this
    if cfg.image_size is None:
        now["image_size"] = then["image_size"]  # null = the dataset's own size (only imagefolder needs it)
    bad = [f"data.{k} is {now[k]!r} but data/prepared/{data.name} was prepared with {then[k]!r}"
           for k in PREPARED_WITH if k in then and now[k] != then[k]]
    if bad:
        raise ParamsError("; ".join(bad) + ". Re-run `ssl-ops prepare` (and `ssl-ops split`) with these params, "
                          "or `dvc repro`, or set the data params back to the prepared values")


def link_sources(cfg: DataParams, base: Path = SOURCES) -> dict[str, str]:
    """Point ``base/root`` and ``base/unlabeled`` at ``data.root`` / ``data.unlabeled_dir`` when each is a local
    folder, else at ``base/none`` (empty). A no-op outside a project (no ``base`` folder). Returns link -> target.

    DVC cannot template a dep from a param that may be null (``${data.root}`` fails for the default
    Fashion-MNIST), so the dependency goes through these links; ``prepare`` re-points them on every run.
    """
    if not base.is_dir():
        return {}
    done = {}
    for name, folder in (("root", cfg.root), ("unlabeled", cfg.unlabeled_dir)):
        target = str(_user_path(folder).resolve()) if folder is not None and _user_path(folder).is_dir() else "none"
        link = base / name
        if link.exists() and not link.is_symlink():
            raise DataIntegrityError(f"{link} must be the symlink `ssl-ops prepare` manages (dvc.yaml depends on "
                                     f"it), not a folder; move it away and re-run `ssl-ops prepare`")
        if not (link.is_symlink() and os.readlink(link) == target):
            tmp = base / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link)  # atomic: the link never disappears for a concurrent `dvc status`
        done[str(link)] = target
    return done


def load_prepared(name: str, root: Path = PREPARED_ROOT, verify: bool = True) -> PreparedDataset:
    """Open a prepared dataset; with ``verify`` every array's sha256 is checked against the manifest."""
    folder = root / name
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise DataIntegrityError(
            f"prepared dataset {folder} not found (no manifest.json); run `ssl-ops prepare` (or `dvc repro`) first"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        hashes: dict[str, str] = manifest["sha256"]
        manifest["classes"], manifest["mean"], manifest["std"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataIntegrityError(f"{manifest_path} is corrupted ({exc}); re-run `ssl-ops prepare`") from None
    arrays = {}
    for key, expected in hashes.items():
        path = folder / f"{key}.npy"
        if not path.exists():
            raise DataIntegrityError(f"{path} is missing; re-run `ssl-ops prepare` to rebuild {folder}")
        if verify and io.sha256_file(path) != expected:
            raise DataIntegrityError(
                f"{path} was modified after preparation: its sha256 no longer matches {manifest_path}. "
                f"Re-run `ssl-ops prepare` (or `dvc checkout {folder}`) to restore it."
            )
        try:
            arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DataIntegrityError(f"{path} is not a valid .npy array ({exc}); re-run `ssl-ops prepare`") from None
    return PreparedDataset(
        name=manifest["name"],
        classes=manifest["classes"],
        sha256=manifest.get("dataset_sha256") or dataset_hash(hashes),
        mean=manifest["mean"],
        std=manifest["std"],
        prepared_with=manifest.get("prepared_with"),
        **{k: arrays.get(k) for k in ARRAYS},
    )
