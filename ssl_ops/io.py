"""Atomic file writes and hashing.

Every file ssl-ops produces is written to a temporary file in the same directory and then renamed over
the target (``os.replace`` is atomic on POSIX), so a crash, a full disk or a kill never leaves a
half-written file where a reader would take it for complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_ops import faults
from ssl_ops.errors import CheckpointError, WriteFailedError, producing_command


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        faults.point("write")  # a kill here leaves only the temp file: the target keeps its old content
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically. A failing write (full disk, no permission, read-only or missing
    mount) raises :class:`WriteFailedError` naming the file; ``path`` keeps its previous content and no
    temp file is left behind."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        raise WriteFailedError(path, exc) from None


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())


def torch_save(path: str | Path, obj: Any) -> None:
    """torch.save, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely: ``weights_only=True`` refuses pickled code, only tensors and plain data load."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; run {producing_command(path)} first, or fix the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file; say which one
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "It is corrupted, truncated, or carries objects other than tensors and plain data "
            "(refused for safety: weights_only=True). Delete it and re-run the stage that makes it."
        ) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
