"""User-facing errors.

Anything raised as an :class:`SslOpsError` is printed by the CLI as one paragraph (no traceback) and
turns into a non-zero exit status. Raise it for problems the *user* can fix (bad params, missing data,
corrupted files); let genuine bugs raise ordinary exceptions so their traceback is kept.
"""


def producing_command(path) -> str:
    """The command that writes ``path`` (for "missing checkpoint" advice): models/pretrain/<p>.pt comes from
    ``ssl-ops pretrain <p>``, models/<m>.pt from ``ssl-ops train <m>``."""
    from pathlib import Path

    p = Path(path)
    if p.suffix == ".pt" and p.parent.name == "pretrain":
        return f"`ssl-ops pretrain {p.stem}` (or `dvc repro` with {p.stem} in pipeline.pretexts)"
    if p.suffix == ".pt" and p.parent.name == "models":
        return f"`ssl-ops train {p.stem}` (or `dvc repro`)"
    return "the stage that writes it"


class SslOpsError(Exception):
    """Base class: a problem the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


class ParamsError(SslOpsError):
    """params.yaml or a --set override is invalid."""


class DatasetNotFoundError(SslOpsError):
    """A dataset could not be found offline (and could not be downloaded)."""


class DataIntegrityError(SslOpsError):
    """A prepared array or split file does not match its recorded sha256, shape or dataset."""


class CheckpointError(SslOpsError):
    """A checkpoint is missing, unreadable, or belongs to another configuration."""


class TrainingDivergedError(SslOpsError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""

    exit_code = 3


class RegistryError(SslOpsError):
    """The MLflow Model Registry cannot do what was asked (no such run, model, alias or logged model)."""


class PredictInputError(SslOpsError):
    """Images given to ``ssl-ops predict`` do not match the model's input signature (channels, size, dtype)."""


class WriteFailedError(SslOpsError):
    """A file could not be written (disk full, no permission, ...); the previous version is kept."""

    def __init__(self, path, exc: OSError):
        import errno
        import os

        hint = {
            errno.ENOSPC: "the disk is full: free space (or point the run at another disk) and re-run",
            errno.EDQUOT: "the disk quota is exhausted: free space and re-run",
            errno.EACCES: "permission denied: make the folder writable for this user and re-run",
            errno.EPERM: "operation not permitted: make the folder writable for this user and re-run",
            errno.EROFS: "the file system is read-only: run from a writable folder",
        }.get(exc.errno, "fix the cause and re-run")
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(
            f"could not write {path}: {reason} (errno {exc.errno}); {hint}. Its previous version, if any, is "
            "unchanged and nothing half-written was left in its place; the same command resumes from the last "
            "checkpoint."
        )
        self.errno = exc.errno


class TrackingUnavailableError(SslOpsError):
    """The MLflow tracking server cannot be reached; the run stops with its last checkpoint kept."""
