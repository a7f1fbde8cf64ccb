"""Weight schedules for unlabeled-loss terms (the learning-rate schedule lives in the engine)."""

from __future__ import annotations

import math


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = step / length clipped to [0, 1] (Laine & Aila 2017 §3.1; Tarvainen &
    Valpola 2017 appendix B.1): starts at exp(-5) ~ 0.0067 and reaches 1 at ``step = length``; a length of 0
    means no ramp-up (always 1)."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
