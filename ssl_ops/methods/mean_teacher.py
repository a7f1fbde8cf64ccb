"""Mean Teacher (Tarvainen & Valpola 2017): the teacher is an exponential moving average of the student's
weights (eq. (2)); the student is trained with cross-entropy on labels plus w(t) times the squared softmax
difference between its prediction and the teacher's on a differently augmented view of each unlabeled image,
averaged over classes as in the reference code (``losses.softmax_mse_class_mean``), so that the weight means
the same for any number of classes.

"With T.L." (Rebuffi et al. §4.1): started from a self-supervised backbone (``init``, e.g. the RotNet
checkpoint models/pretrain/rotation.pt), "only the last two blocks and the last classification layer" are
trained: the first two blocks are frozen (``freeze_blocks: null`` becomes 2 when ``init`` is set; Rebuffi
et al. §4.5 freeze the first two blocks of every architecture). ``freeze_blocks: 0`` trains them all.

The teacher is the evaluated and exported model by default (the paper reports the better of the two, and
the EMA model is usually it). As in the reference code, the decay is ``min(ema_decay, 1 - 1/(step + 1))``
so that the teacher is not dominated by the random initialisation early on, only the weights are averaged,
and the teacher computes its targets in train mode: its BatchNorm layers normalise with batch statistics and
keep running statistics of their own, which match the averaged weights. (Averaging the student's running
statistics instead, with the teacher in eval mode, gave a teacher far worse than the student on val:
46% against the supervised baseline's 64% after 300 steps on Fashion-MNIST, 10 labels per class.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ssl_ops.ema import EMA
from ssl_ops.losses import softmax_mse_class_mean
from ssl_ops.methods._joint import JointMethod, JointParams
from ssl_ops.methods.base import register_method


class MeanTeacherParams(JointParams):
    unlabeled_weight: float = Field(100.0, ge=0)  # as pi_model: the reference's 100 on class-averaged MSE
    rampup_epochs: float = Field(5.0, ge=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)  # Tarvainen & Valpola: 0.99 during ramp-up, 0.999 after
    evaluate_teacher: bool = True  # False: evaluate / export the student instead

    @model_validator(mode="after")
    def _freeze_with_init(self) -> MeanTeacherParams:
        if self.init is not None and self.freeze_blocks is None:  # Rebuffi et al. §4.1 "with T.L."
            self.freeze_blocks = 2
        return self


@register_method("mean_teacher")
class MeanTeacher(JointMethod):
    Params = MeanTeacherParams

    def __init__(self, ctx, params: MeanTeacherParams):
        super().__init__(ctx, params)
        student = self.build_classifier()
        self.model = nn.ModuleDict({"student": student, "teacher": EMA(student, params.ema_decay, buffers=False)})

    def classifier(self) -> nn.Module:
        return self.model["teacher"].module if self.params.evaluate_teacher else self.model["student"]

    def training_step(self, step: int) -> dict[str, Tensor]:
        x, y, u = self.draw()
        n = len(x)
        logits = self.model["student"](torch.cat([x, self.ctx.augment(u)]))
        teacher = self.model["teacher"].module
        with torch.no_grad():
            teacher.train()  # batch statistics, and its own running statistics move (see the module docstring)
            target = teacher(self.ctx.augment(u))
            teacher.eval()
        sup = F.cross_entropy(logits[:n], y, label_smoothing=self.params.label_smoothing)
        cons = softmax_mse_class_mean(logits[n:], target)
        w = self.unlabeled_weight(step)
        return {"loss": sup + w * cons, "loss_sup": sup, "loss_cons": cons, "w_cons": torch.tensor(w)}

    def after_step(self, step: int) -> None:
        decay = min(self.params.ema_decay, 1.0 - 1.0 / (step + 2))  # step + 2: this is update number step + 1
        self.model["teacher"].update(self.model["student"], decay)
