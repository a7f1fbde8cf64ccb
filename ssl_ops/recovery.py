"""Crash recovery: when does a stage continue from its checkpoint instead of starting over?

``ssl-ops train`` and ``ssl-ops pretrain`` (and so ``dvc repro``, which runs them) resume *automatically* when
``checkpoints/.../last.pt`` exists, was written under the same config hash (data, split, model, train and the
method's own section) and stopped before the last epoch: re-running the command that was killed is all it
takes. A checkpoint of other params, or of a finished run, is ignored and overwritten (a finished run is
retrained rather than reused, so a code change re-trains). ``--resume`` insists: other params are then an error.
Because every checkpoint holds the model, optimiser, schedule and all RNG states, a resumed run equals an
uninterrupted one exactly on CPU with fixed seeds (tests/test_reliability.py).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ssl_ops import io
from ssl_ops.errors import CheckpointError

console = Console(stderr=True, soft_wrap=True)


def resume_from(checkpoint: Path, config_hash: str, epochs: int, explicit: bool = False) -> tuple[bool, str | None]:
    """(resume?, the MLflow run id the checkpoint belongs to) for a stage about to train ``epochs`` epochs."""
    for stale in checkpoint.parent.glob(f".{checkpoint.name}.*.tmp"):  # a write killed before its rename
        stale.unlink(missing_ok=True)
    if not checkpoint.exists():
        return False, None
    try:
        state = io.torch_load(checkpoint)
    except CheckpointError as exc:
        if explicit:
            raise
        reason = str(exc).split(". It is corrupted")[0]  # io.torch_load's advice ("delete it") is done here
        console.print(f"[yellow]{reason}. It cannot be resumed (truncated or corrupted): starting over from epoch "
                      "0; it will be overwritten by this run's first checkpoint.[/yellow]", highlight=False)
        return False, None
    run_id = state.get("run_state", {}).get("mlflow_run_id")
    if explicit:
        return True, run_id  # fit refuses a config-hash mismatch with a clear message
    done = state.get("epoch", 0)
    if state.get("config_hash") != config_hash:
        console.print(f"{checkpoint} belongs to other params; starting over (it will be overwritten)", highlight=False)
        return False, None
    if done >= epochs:
        return False, None
    console.print(f"resuming from {checkpoint}: epoch {done}/{epochs} done, same params", highlight=False)
    return True, run_id
