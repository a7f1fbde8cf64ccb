"""Deterministic fault injection for the reliability tests (tests/test_reliability*.py, reports/reliability.md).

``SSL_OPS_FAULT=<point>:<n>`` makes the process kill itself with SIGKILL (no cleanup, no ``finally``, as
``kill -9`` or the kernel's OOM killer would) the ``n``-th time it passes ``<point>`` (counted from 1 in this
process):

- ``step``: before an optimiser step (mid-epoch: the epoch's work since the last checkpoint is lost);
- ``checkpoint``: just after an epoch's checkpoint is in place;
- ``write``: inside an atomic write, after the temp file is complete but before it is renamed over the target.

A fixed kill point keeps the tests deterministic where a timer would be flaky. Unset (normal use) it costs
one comparison per call.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("SSL_OPS_FAULT", "")
_POINT, _, _N = _SPEC.partition(":")
_counts: dict[str, int] = {}


def point(name: str) -> None:
    """Called at each fault point; SIGKILLs this process when ``SSL_OPS_FAULT`` names it and its count."""
    if name != _POINT:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(_N):
        os.kill(os.getpid(), signal.SIGKILL)
