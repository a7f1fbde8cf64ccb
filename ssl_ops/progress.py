"""A rich progress bar with live loss and throughput, plus a one-line summary per epoch.

The bar is drawn only on a terminal with progress on (``train.progress``, no ``--no-progress``); the epoch line
(loss, lr, val top-1, images/s) is printed and flushed on the main rank in every case, so logs and CI show a
run as it goes rather than nothing until the end.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ssl_ops import distributed

console = Console(stderr=True, soft_wrap=True)


class TrainProgress:
    """Updated every ``every`` steps only: reading the loss forces a device sync, so we do it rarely."""

    def __init__(self, name: str, total: int, enabled: bool = True, completed: int = 0, every: int = 20):
        self.lines = distributed.is_main()  # the epoch lines: rank 0 only, whatever the bar does
        enabled = enabled and console.is_terminal  # a bar in a log file is noise: lines only there
        self.enabled, self.every, self.name = enabled, every, name
        self._last_t, self._last_step = time.perf_counter(), completed
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task(name, total=total, completed=completed, loss=float("nan"), ips=0.0)

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def update(self, completed: int, loss: float, images_per_step: int) -> None:
        now = time.perf_counter()
        ips = (completed - self._last_step) * images_per_step / max(now - self._last_t, 1e-9)
        self._last_t, self._last_step = now, completed
        self._progress.update(self._task, completed=completed, loss=loss, ips=ips)

    def epoch_done(self, epoch: int, metrics: dict[str, float], completed: int) -> None:
        self._progress.update(self._task, completed=completed)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self.enabled:
            self._progress.console.print(f"[dim]{self.name} epoch {epoch}[/dim]  {shown}")
        elif self.lines:  # plain text, flushed: `tail -f` and CI logs see each epoch as it ends
            print(f"{self.name} epoch {epoch}  {shown}", file=sys.stderr, flush=True)
        # exclude evaluation and checkpointing from the next throughput
        self._last_t, self._last_step = time.perf_counter(), completed
