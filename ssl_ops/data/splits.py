"""Class-balanced labeled / val / unlabeled splits of the train set.

A split is a JSON file with ``labeled``, ``val`` and ``unlabeled`` (sorted train-set indices), ``seed``
and ``dataset_sha256``. The three sets are disjoint and cover the train set; the test set is never
touched. ``val`` is a tiny class-balanced held-out set for model selection (S4L §7: one to five labels per
class rank hyper-parameters as well as a large validation set). Draws use NumPy's PCG64 generator, whose
stream is fixed across platforms, and the JSON is written with sorted keys, so the same params give a
byte-identical file on any machine.

Images that come without labels (``data.unlabeled_dir``, STL-10's unlabeled split; ``unlabeled_x.npy``) join
the unlabeled pool: they are indexed after the N train images (N + j is unlabeled image j, the order of
``engine.ImageStore``), listed in ``unlabeled`` and counted in ``unlabeled_only`` (written only when > 0, so
splits of datasets without them keep their bytes and sha256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_ops import io
from ssl_ops.errors import DataIntegrityError, SslOpsError
from ssl_ops.sections import SplitParams

SPLITS_ROOT = Path("data/splits")


@dataclass(frozen=True)
class Split:
    labeled: np.ndarray  # int64 train-set indices
    val: np.ndarray
    unlabeled: np.ndarray
    seed: int
    dataset_sha256: str
    sha256: str = ""  # of the split file itself: every MLflow run records it
    unlabeled_only: int = 0  # how many of ``unlabeled`` are images without labels (indices N .. N+U-1)


def split_path(dataset: str, cfg: SplitParams, root: Path = SPLITS_ROOT) -> Path:
    budget = f"{cfg.labels_per_class}pc" if cfg.labels_per_class is not None else f"frac{cfg.label_fraction:g}"
    return root / f"{dataset}-{budget}-seed{cfg.seed}.json"


def make_split(labels: np.ndarray, cfg: SplitParams, dataset_sha256: str,
               classes: list[str] | None = None, unlabeled_only: int = 0) -> Split:
    """Draw the split; raise a clear error when a class has too few images for the requested budget, or
    (given the dataset's ``classes``) none at all. ``unlabeled_only`` images without labels (indexed after
    the train set) are appended to the unlabeled pool."""
    rng = np.random.default_rng(cfg.seed)
    labels = np.asarray(labels)
    if classes is not None:
        counts = np.bincount(labels, minlength=len(classes))
        empty = [f"{c} ({classes[c]!r})" for c in np.flatnonzero(counts[: len(classes)] == 0)]
        if empty:
            raise SslOpsError(
                f"class(es) {', '.join(empty)} have no training images, so no labeled example can be drawn for "
                "them; add images of those classes (or remove the classes from the dataset) and re-run "
                "`ssl-ops prepare`"
            )
    labeled, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = cfg.labels_per_class if cfg.labels_per_class is not None else max(1, round(cfg.label_fraction * len(idx)))
        if n + cfg.val_per_class > len(idx):
            name = f"{int(c)} ({classes[int(c)]!r})" if classes is not None and c < len(classes) else str(int(c))
            raise SslOpsError(
                f"class {name} has {len(idx)} training images, fewer than the {n} labeled + "
                f"{cfg.val_per_class} val images requested per class; lower split.labels_per_class "
                f"(or split.label_fraction) or split.val_per_class"
            )
        labeled.append(idx[:n])
        val.append(idx[n : n + cfg.val_per_class])
    labeled_idx = np.sort(np.concatenate(labeled))
    val_idx = np.sort(np.concatenate(val))
    taken = np.zeros(len(labels), dtype=bool)
    taken[labeled_idx] = taken[val_idx] = True
    unlabeled = np.concatenate([np.flatnonzero(~taken), len(labels) + np.arange(unlabeled_only)])
    return Split(labeled_idx, val_idx, unlabeled, cfg.seed, dataset_sha256, unlabeled_only=unlabeled_only)


def _to_json(split: Split) -> str:
    obj = {
        "labeled": split.labeled.tolist(),
        "val": split.val.tolist(),
        "unlabeled": split.unlabeled.tolist(),
        "seed": split.seed,
        "dataset_sha256": split.dataset_sha256,
    }
    if split.unlabeled_only:
        obj["unlabeled_only"] = split.unlabeled_only
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def sha256_path(path: Path) -> Path:
    """``<split>.json.sha256`` beside the split, in ``sha256sum`` format (``sha256sum -c`` checks it too)."""
    return path.with_name(path.name + ".sha256")


def write_split(split: Split, path: Path) -> str:
    """Write atomically, then its sha256 file; return the file's sha256."""
    text = _to_json(split)
    digest = io.sha256_bytes(text.encode())
    io.write_text(path, text)
    io.write_text(sha256_path(path), f"{digest}  {path.name}\n")
    return digest


def _verify(path: Path, raw: bytes) -> None:
    """A split edited after `ssl-ops split` would silently change what is labeled: refuse it."""
    record = sha256_path(path)
    if not record.exists():
        raise DataIntegrityError(f"split file {path} has no recorded sha256 ({record} is missing), so a change "
                                 "to it cannot be detected; re-run `ssl-ops split` (or `dvc repro`)")
    expected = record.read_text().split()[0] if record.read_text().strip() else ""
    if io.sha256_bytes(raw) != expected:
        raise DataIntegrityError(
            f"split file {path} was modified after it was written: its sha256 no longer matches {record}. "
            f"Re-run `ssl-ops split` (or `dvc checkout {path.parent}`) to restore it."
        )


def load_split(path: Path, dataset_sha256: str | None = None, n_train: int | None = None,
               verify: bool = True) -> Split:
    """Read a split; refuse one modified since it was written (``verify``: its ``.sha256`` file), drawn from
    another dataset, or with out-of-range indices (``n_train``: train plus unlabeled-only images)."""
    if not path.exists():
        raise DataIntegrityError(f"split file {path} not found; run `ssl-ops split` (or `dvc repro`) first")
    raw = path.read_bytes()
    if verify:
        _verify(path, raw)
    try:
        obj = json.loads(raw)
        split = Split(
            np.asarray(obj["labeled"], dtype=np.int64),
            np.asarray(obj["val"], dtype=np.int64),
            np.asarray(obj["unlabeled"], dtype=np.int64),
            int(obj["seed"]),
            str(obj["dataset_sha256"]),
            io.sha256_bytes(raw),
            int(obj.get("unlabeled_only", 0)),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataIntegrityError(f"split file {path} is corrupted ({exc}); re-run `ssl-ops split`") from None
    if dataset_sha256 is not None and split.dataset_sha256 != dataset_sha256:
        raise DataIntegrityError(
            f"split file {path} was drawn from another dataset (dataset_sha256 {split.dataset_sha256[:12]}… "
            f"!= prepared {dataset_sha256[:12]}…); re-run `ssl-ops split` after `ssl-ops prepare`"
        )
    if n_train is not None:
        every = np.concatenate([split.labeled, split.val, split.unlabeled])
        if len(every) and (every.min() < 0 or every.max() >= n_train or len(np.unique(every)) != len(every)):
            raise DataIntegrityError(
                f"split file {path} has indices outside the train set of {n_train} images "
                "(unlabeled-only ones included) "
                "or repeated; "
                "re-run `ssl-ops split`"
            )
    return split
