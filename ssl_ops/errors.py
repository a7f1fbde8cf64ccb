"""User-facing errors.

Anything raised as an :class:`SslOpsError` is printed by the CLI as one paragraph (no traceback) and
turns into a non-zero exit status. Raise it for problems the *user* can fix (bad params, missing data,
corrupted files); let genuine bugs raise ordinary exceptions so their traceback is kept.
"""


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
