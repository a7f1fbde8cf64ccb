"""Pseudo-Label (Lee 2013; S4L §4.2): train on the labels, predict every unlabeled image, keep all
predictions or only those more confident than ``threshold``, then train a new network from scratch on the
labeled images plus the pseudo-labeled ones.

How this fits the engine's one-loop contract: the first ``training_step`` of a run builds the pseudo-labels
(the teacher phase) and stores them in buffers of ``self.model``; the student is then trained by the engine
as usual. Because the buffers are checkpointed, a resumed run or ``ssl-ops evaluate`` never redoes the
teacher phase, and the teacher phase's time is included in ``train_seconds``.

The teacher is either trained here, ``teacher_epochs`` x ``steps_per_epoch`` supervised steps with the same
optimiser settings as the supervised baseline (its own RNG streams, so the student's draws do not depend on
it), starting from ``init`` when it is set (as the student does), or read from ``teacher:
models/supervised.pt`` (the baseline's checkpoint; it must come from the same split and dataset and fit the
same backbone). We do not pick up that file implicitly: a result must not depend on whether another stage
happened to run, and DVC must see the dependency (when you set it, add ``models/supervised.pt`` to the
stage's deps).

Each step draws a labeled batch and an equal-size batch of pseudo-labeled images; L = CE_l + w · CE_pseudo.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_ops import distributed, io
from ssl_ops.engine import predict_logits
from ssl_ops.errors import CheckpointError, DataIntegrityError, SslOpsError
from ssl_ops.losses import select_pseudo_labels
from ssl_ops.methods._inner_loop import fit_on_labels
from ssl_ops.methods._joint import JointMethod, JointParams
from ssl_ops.methods.base import PrePhase, register_method


class PseudoLabelParams(JointParams):
    pre_phases = (PrePhase("teacher_epochs", "teacher", skip_if_set="teacher"),)  # S4L §4.2: trained on the labels
    threshold: float = Field(0.0, ge=0, lt=1)  # keep predictions with max probability > threshold; 0: all
    teacher: Path | None = None  # e.g. models/supervised.pt; None: train the teacher here
    teacher_epochs: int = Field(20, gt=0)  # teacher phase length, in epochs of steps_per_epoch steps


class PseudoLabels(nn.Module):
    """Buffers: pseudo-label of each unlabeled pool position (-1 = dropped) and whether they were computed."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("labels", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("done", torch.zeros((), dtype=torch.bool))


@register_method("pseudo_label")
class PseudoLabel(JointMethod):
    Params = PseudoLabelParams

    def __init__(self, ctx, params: PseudoLabelParams):
        super().__init__(ctx, params)
        if not ctx.store.in_memory:
            raise SslOpsError("pseudo_label needs the train images in memory; raise data.max_in_memory_gb")
        self.model = nn.ModuleDict({"net": self.build_classifier(),
                                    "pseudo": PseudoLabels(len(ctx.split.unlabeled))}).to(ctx.device)
        # the whole unlabeled pool on every rank under torchrun: identical buffers (rank 0's are broadcast), and
        # each rank's student then samples its own share of the kept positions
        self._unlabeled = torch.as_tensor(ctx.split.unlabeled, device=ctx.device)
        self._kept: Tensor | None = None  # positions in the unlabeled pool of this rank's kept images

    def classifier(self) -> nn.Module:
        return self.model["net"]

    # -- teacher phase ------------------------------------------------------------------------------------

    def _teacher(self) -> nn.Module:
        ctx, p = self.ctx, self.params
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(ctx.train.seed + 1)
            # a teacher trained here starts from ``init`` too when it is set, frozen as the student is (Rebuffi et
            # al. §4.1's "with T.L." for both networks): from scratch it would label as the plain one does; one read
            # from a file gets every weight from it, so it needs only the network
            teacher = ctx.build_classifier() if p.teacher is not None else self.build_classifier()
        if p.teacher is not None:
            ck = io.torch_load(p.teacher, map_location=ctx.device)
            if ck.get("split_sha256") != ctx.split.sha256 or ck.get("dataset_sha256") != ctx.data.sha256:
                raise DataIntegrityError(f"pseudo_label.teacher {p.teacher} was trained on another split or dataset; "
                                         "re-train it on this split or set pseudo_label.teacher: null")
            try:
                teacher.load_state_dict(ck["state_dict"])
            except (KeyError, RuntimeError) as exc:
                raise CheckpointError(f"pseudo_label.teacher {p.teacher} does not fit model.backbone="
                                      f"{ctx.params.model.backbone}: {str(exc).splitlines()[0][:300]}") from None
            return teacher
        # its own init (above) and batch streams: the student's draws do not depend on the teacher phase
        fit_on_labels(teacher, ctx, ctx.train, p.teacher_epochs * ctx.train.steps_per_epoch, ctx.train.seed + 1)
        return teacher

    @torch.no_grad()
    def _make_pseudo_labels(self) -> None:
        with torch.enable_grad():
            teacher = self._teacher()
        logits, _ = predict_logits(teacher, self.ctx.store, self._unlabeled, self.ctx.train.eval_batch_size)
        labels, keep = select_pseudo_labels(F.softmax(logits, 1), self.params.threshold)
        buf = self.model["pseudo"]
        buf.labels.copy_(torch.where(keep, labels, torch.full_like(labels, -1)))
        buf.done.fill_(True)

    def pseudo_stats(self) -> dict[str, float]:
        """Fraction of unlabeled images kept and (for analysis only) the accuracy of their pseudo-labels."""
        buf = self.model["pseudo"]
        keep = buf.labels >= 0
        true = self.ctx.store.y[self._unlabeled]
        known = keep & (true >= 0)  # unlabeled-only images (data.unlabeled_dir) have no true label (-1)
        acc = (buf.labels[known] == true[known]).float().mean().item() if known.any() else float("nan")
        return {"kept_fraction": keep.float().mean().item(), "pseudo_label_accuracy": acc}

    # -- student ------------------------------------------------------------------------------------------

    def training_step(self, step: int) -> dict[str, Tensor]:
        buf = self.model["pseudo"]
        if not bool(buf.done):
            self._make_pseudo_labels()
        if self._kept is None:
            keep = buf.labels >= 0
            if not keep.any():
                raise SslOpsError(f"pseudo_label: no unlabeled prediction is more confident than threshold="
                                  f"{self.params.threshold}; lower pseudo_label.threshold")
            self._kept = distributed.shard(torch.nonzero(keep).squeeze(1))
            self._stats = {k: torch.tensor(v) for k, v in self.pseudo_stats().items()}
        ctx = self.ctx
        x, y = ctx.labeled_batch(ctx.train.batch_size)
        pos = self._kept[torch.randint(0, len(self._kept), (self.unlabeled_batch_size,), generator=ctx.generator,
                                       device=ctx.device)]
        u, yu = ctx.augment(ctx.store.x[self._unlabeled[pos]]), buf.labels[pos]
        logits = self.model["net"](torch.cat([x, u]))
        sup = F.cross_entropy(logits[: len(x)], y, label_smoothing=self.params.label_smoothing)
        pseudo = F.cross_entropy(logits[len(x):], yu)
        w = self.unlabeled_weight(step)
        return {"loss": sup + w * pseudo, "loss_sup": sup, "loss_pseudo": pseudo, **self._stats}
