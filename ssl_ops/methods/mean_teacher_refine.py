"""Mean Teacher refined by alternating optimisation (Rebuffi et al. 2020, §4.3, Table 1 "MT + Self-Sup +
Refinement").

§4.3: the alternating method "is particularly efficient when using a good representation", so it is run "on top of
others in order to refine their results": Algorithm 1 (``ssl_ops/methods/alternating.py``) starts from a trained
Mean Teacher, and "as the starting features are already competitive, we do not use the dataset random splitting in
our training procedure and we choose soft labels assignment in l.6 of algorithm 1". Step (8) resets N_t to the
Mean Teacher's weights, not to the pretext's.

This is ``ssl-ops train alternating`` with ``refine: true, labels: soft, split: false, init: null`` as a method of
its own, the second step of a chain (``mean_teacher`` -> ``mean_teacher_refine``, as MOAM's steps are): a campaign
can then run both alternating from the RotNet and the refinement on the same split, each with its own checkpoint,
preset and report row, and the report counts the chain's CPU-minutes. Its Mean Teacher is ``previous`` (the EMA
network of ``ssl-ops train mean_teacher`` on the same split; Table 1's is "with T.L.", from the RotNet with 2 frozen
blocks, which ``freeze_blocks`` keeps frozen here). Every other key is alternating's, but ``labels`` and ``split``
are fixed to §4.3's (soft, none) and the split's keys refused away from their defaults: nothing reads them here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from ssl_ops.errors import ParamsError
from ssl_ops.methods.alternating import Alternating, AlternatingParams
from ssl_ops.methods.base import register_method


class MeanTeacherRefineParams(AlternatingParams):
    network_from = "previous"  # the network comes whole from it; no pretext backbone is loaded
    previous: Path = Path("models/mean_teacher.pt")  # the Mean Teacher to refine (`ssl-ops train mean_teacher`)
    init: Path | None = None
    refine: bool = True  # §4.3: always on here (no random split, soft labels)
    # §4.3 "we do not use the dataset random splitting ... and we choose soft labels assignment": fixed here, so
    # the logged params say what ran (alternating's defaults, hard labels and the split, were logged and not read)
    labels: Literal["soft"] = "soft"
    split: Literal[False] = False

    @field_validator("labels", "split", mode="before")
    @classmethod
    def _as_in_section_4_3(cls, v, info):
        if info.field_name == "labels" and v != "soft":
            raise ValueError("the refinement assigns soft labels (Rebuffi et al. §4.3); for hard labels train "
                             "`alternating`")
        if info.field_name == "split" and v is not False:
            raise ValueError("the refinement trains on the whole unlabeled set every cycle (Rebuffi et al. §4.3: "
                             "no random split); for the split train `alternating`")
        return v

    @model_validator(mode="after")
    def _refine_from_previous(self) -> MeanTeacherRefineParams:
        # alternating's refine keys are this method's definition: refusing them is clearer than ignoring them
        if not self.refine:
            raise ParamsError("mean_teacher_refine.refine: this method is the refinement (§4.3); for Algorithm 1 "
                              "from the RotNet, train `alternating`")
        # alternating's key, not read here; a saved params dump round-trips its default
        if self.teacher not in (AlternatingParams.model_fields["teacher"].default, self.previous):
            raise ParamsError("mean_teacher_refine.teacher: name the Mean Teacher to refine with "
                              "mean_teacher_refine.previous (alternating.teacher is alternating's key)")
        return self


@register_method("mean_teacher_refine")
class MeanTeacherRefine(Alternating):
    Params = MeanTeacherRefineParams
    pretext = None
    teacher_key = "previous"  # refine mode loads params.previous
    previous = "mean_teacher"  # the chain's step before this one (tests and benchmarks train it briefly first)
