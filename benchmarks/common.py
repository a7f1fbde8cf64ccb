"""What every benchmark records beside its numbers: machine, versions, git SHA, date, CPU load."""

from __future__ import annotations

import datetime
import os
import platform

import torch

from ssl_ops.tracking import git_commit


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}",
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
    }
