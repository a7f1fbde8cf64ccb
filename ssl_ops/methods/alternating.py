"""Alternating optimisation of the classifier and the pseudo-labels (Rebuffi et al. 2020, §3.2, Algorithm 1).

Preparation (Alg. 1 l.1-2): the backbone comes from a self-supervised pre-training (``init``, RotNet by default:
``ssl-ops pretrain rotation``), its first K blocks are frozen (``freeze_blocks``, 2 as in the paper) and a new linear
classifier sits on top. N_t, the trainable weights, are the unfrozen blocks (parameters and BatchNorm statistics)
**and that classification layer** (l.2: "Replace the last layer with one dimensioned for the classification task.
The trainable weights now form a network Nt"); their preparation-phase values are kept to re-initialise them.

Each of ``cycles`` cycles (the run's ``epochs x steps_per_epoch`` optimiser steps are shared equally):

(5) fine-tune **only the classification layer** on the labeled set with cross-entropy (``classifier_steps``
    full-batch steps on frozen, un-augmented features; the backbone is in eval mode, so not even its
    BatchNorm statistics move); it starts from the classifier as phase (9) of the previous cycle left it;
(6) pseudo-label every unlabeled image with that network: one-hot argmax (``labels: hard``) or its softmax
    (``soft``);
(7) draw a random ``subset_fraction`` (two thirds) of the unlabeled set; the last ``full_set_cycles``
    cycles use all of it;
(8) reset N_t, the classifier included, to the preparation-phase weights;
(9) train N_t on the pseudo-labelled subset only with L = 0.5 * L_temp + 0.5 * L_pseudo, where L_pseudo is the
    cross-entropy against the (soft) pseudo-label and L_temp = KL(p_prev || p_now), p_prev the prediction for the
    same image the last time it was drawn in this cycle (the paper's "previous epoch"; images not yet drawn in the
    cycle have none and add no term). At each cycle start the optimiser's momentum is cleared and the
    learning-rate schedule (warm-up, cosine) restarts, as a new training run would.

What the paper says about (8) and (9), the default here:
- §1: "At this point, the representation is reset to initial state (from the pre-text task) and fine-tuned using
  the pseudo-labels only." Alg. 1 l.9: "Train Nt on the unlabelled metaset Ti"; §3.2: "we fine-tune the whole
  architecture on the unlabelled set". So phase 2 sees no true labels: ``labeled_batch_size: 0``. A positive
  value adds that many labeled images (their true labels) to each step: an extension, not the paper.
- Alg. 1 l.8: "Reassign Nt to the weights extracted from the preparation phase", and §3.2 "Information flow":
  "the information that flows from phase one to phase two is only the pseudo-labels on the unlabelled data,
  whereas the information that flows from phase two back to phase one are the weights of the network". So the
  classifier fitted in phase 1 does not carry into phase 2: ``reset_classifier: true`` resets it with the
  blocks; ``false`` keeps the phase-1 classifier as phase 2's starting point (and resets the blocks only).

Refinement mode (§4.3, ``refine: true``): the network (all of it) starts from a trained Mean Teacher
(``teacher: models/mean_teacher.pt``, its EMA network) and step (8) resets N_t to those weights. §4.3 also drops
the random split and assigns soft labels; the params must say so (``labels: soft``, ``split: false``, or an
error), and ``init`` must be null, so that what a run logs is what ran. ``mean_teacher_refine`` is this mode
with these fixed.

Ablations (§4.2): ``reinit: false`` skips step (8) (blocks and classifier), ``split: false`` uses the whole
unlabeled set in every cycle, ``temporal: false`` drops L_temp (then L = L_pseudo).

Per cycle, ``self.cycle_log`` (and the step metrics, averaged per epoch by the engine) records the phase-1
labeled accuracy, the val accuracy after phase 1 and at the end of the previous cycle, and how many
pseudo-labels changed their argmax since the previous cycle (all of them in cycle 1). The state of a cycle
lives in buffers of ``self.model``, so a resumed run continues the cycle it stopped in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ssl_ops import augment, io
from ssl_ops.engine import lr_lambda, predict_logits, topk_accuracy
from ssl_ops.errors import CheckpointError, ParamsError, SslOpsError
from ssl_ops.losses import soft_cross_entropy, temporal_kl
from ssl_ops.methods._inner_loop import inner_step
from ssl_ops.methods.base import Method, MethodParams, load_backbone, register_method


class AlternatingParams(MethodParams):
    init: Path | None = Path("models/pretrain/rotation.pt")  # the self-supervised backbone (§3.1: RotNet)
    freeze_blocks: int | None = Field(2, ge=0)  # Rebuffi et al.: the first two blocks stay fixed
    cycles: int = Field(5, gt=0)  # N of Algorithm 1; the run's steps are shared equally among them
    classifier_steps: int = Field(100, gt=0)  # phase (5): full-batch steps on the labeled features
    classifier_lr: float = Field(0.1, gt=0)
    labels: Literal["hard", "soft"] = "hard"  # step (6)
    subset_fraction: float = Field(2 / 3, gt=0, le=1)  # step (7): the paper's random two thirds
    full_set_cycles: int = Field(1, ge=0)  # the last this many cycles train on the whole unlabeled set
    temporal_weight: float = Field(0.5, ge=0, le=1)  # L = w * L_temp + (1 - w) * L_pseudo; the paper: 0.5
    # step (9) trains on the pseudo-labelled set only (Alg. 1 l.9, §1 "using the pseudo-labels only"): 0. A positive
    # value adds this many labeled images with their true labels to each step (not the paper; choose it on val)
    labeled_batch_size: int = Field(0, ge=0)
    # step (8) resets the classification layer too (Alg. 1 l.2: it is part of N_t; §3.2: only the pseudo-labels
    # flow from phase 1 to phase 2). False: the classifier fitted in phase 1 carries into phase 2
    reset_classifier: bool = True
    # A compute cap, not part of the algorithm: use a fixed random subset of this many unlabeled images (seeded
    # by train.seed) in every cycle. Pseudo-labelling is a forward pass over the whole pool each cycle, which
    # on a CPU costs more than the training itself. None: all of them (the paper).
    max_unlabeled: int | None = Field(None, gt=0)
    reinit: bool = True  # ablation switch: false skips step (8)
    split: bool = True  # ablation switch: false trains on the whole unlabeled set every cycle
    temporal: bool = True  # ablation switch: false drops L_temp
    refine: bool = False  # §4.3: start from a Mean Teacher; with labels: soft and split: false
    teacher: Path = Path("models/mean_teacher.pt")  # refine mode only: `ssl-ops train mean_teacher` output

    @model_validator(mode="after")
    def _refine_says_what_runs(self) -> AlternatingParams:
        # §4.3's refinement uses soft labels and no split. Refine mode once forced both over these keys, so a run
        # logged `labels: hard, split: true` while neither ran: now the keys must state it themselves
        if self.refine and (self.labels != "soft" or self.split):
            raise ValueError("refine: true is the refinement of Rebuffi et al. §4.3, which assigns soft labels with "
                             "no random split: set labels: soft and split: false with it (now labels: "
                             f"{self.labels}, split: {str(self.split).lower()}), or train `mean_teacher_refine`, "
                             "which fixes both")
        # the whole network comes from the Mean Teacher, so a pretext backbone would be logged and never loaded
        # (mean_teacher_refine refuses init through network_from)
        if self.refine and self.network_from is None and self.init is not None:
            raise ValueError(f"init ({self.init}) is not read in refine mode: the network comes whole from the Mean "
                             "Teacher `teacher` names; set init: null")
        # step (7)'s keys are read only with the split; a saved params dump round-trips their defaults
        if not self.split:
            for key in ("subset_fraction", "full_set_cycles"):
                default = AlternatingParams.model_fields[key].default
                if getattr(self, key) != default:
                    raise ValueError(f"{key} is not read without the random split (split: false, as in the "
                                     f"refinement of §4.3): leave it at its default ({default:g})")
        return self

    @classmethod
    def starts_from(cls, logged):
        # refine mode starts from its Mean Teacher (`teacher`), not from `init` (null there)
        if cls.network_from is None and logged("refine") == "True":
            path = logged("teacher")
            return None if path is None else Path(path).name
        return super().starts_from(logged)


class CycleState(nn.Module):
    """Buffers of the current cycle: targets and last predictions of every image it trains on (unlabeled pool
    positions first, then labeled positions), which of those were drawn yet, the active unlabeled positions,
    the previous cycle's pseudo-label argmax, and the cycle number (-1: none started)."""

    def __init__(self, n_unlabeled: int, n_labeled: int, classes: int):
        super().__init__()
        n = n_unlabeled + n_labeled
        self.register_buffer("targets", torch.zeros(n, classes))
        self.register_buffer("prev", torch.zeros(n, classes))
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("active", torch.zeros(n_unlabeled, dtype=torch.bool))
        self.register_buffer("argmax", torch.full((n_unlabeled,), -1, dtype=torch.long))
        self.register_buffer("cycle", torch.full((), -1, dtype=torch.long))


def load_mean_teacher(net: nn.Module, path: Path, key: str = "alternating.teacher") -> None:
    """The EMA network of an ``ssl-ops train mean_teacher`` checkpoint into ``net`` (a Classifier); ``key`` is the
    param that named ``path`` (for the errors)."""
    if not Path(path).exists():
        raise CheckpointError(f"{key} {path} does not exist; refinement mode starts from a trained "
                              f"Mean Teacher: run `ssl-ops train mean_teacher` first or set {key}")
    state = io.torch_load(path).get("state_dict", {})
    prefix = "teacher.module."
    teacher = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not teacher:
        raise CheckpointError(f"{key} {path} holds no Mean Teacher network (no '{prefix}*' keys); "
                              "point it at models/mean_teacher.pt")
    try:
        net.load_state_dict(teacher)
    except RuntimeError as exc:
        raise CheckpointError(f"{key} {path} does not fit this model (same model.backbone and width?): "
                              f"{str(exc).splitlines()[0][:300]}") from None


@register_method("alternating")
class Alternating(Method):
    Params = AlternatingParams
    pretext = "rotation"  # the pre-training it starts from (tests pre-train it first)
    teacher_key = "teacher"  # the param naming refine mode's Mean Teacher (mean_teacher_refine: "previous")
    params: AlternatingParams

    def __init__(self, ctx, params: AlternatingParams):
        super().__init__(ctx, params)
        if not ctx.store.in_memory:
            raise SslOpsError("alternating needs the train images in memory; raise data.max_in_memory_gb")
        if not len(ctx.split.unlabeled):
            raise SslOpsError("alternating needs unlabeled images; this split has none (lower split.labels_per_class)")
        net = ctx.build_classifier()
        if params.refine:
            load_mean_teacher(net, self.teacher_path, f"{self.name}.{self.teacher_key}")
        elif params.init is not None:
            load_backbone(net.backbone, params.init)
        try:
            net.backbone.freeze(params.freeze_blocks or 0)
        except ValueError as exc:
            raise ParamsError(f"alternating.freeze_blocks: {exc}") from None
        self.k = params.freeze_blocks or 0
        self.unlabeled = np.asarray(ctx.split.unlabeled)  # train-set indices of the unlabeled images used
        if params.max_unlabeled is not None and params.max_unlabeled < len(self.unlabeled):
            rng = np.random.default_rng(ctx.train.seed)
            self.unlabeled = np.sort(rng.choice(self.unlabeled, params.max_unlabeled, replace=False))
        n_u, n_l = len(self.unlabeled), len(ctx.split.labeled)
        # train-set index of every CycleState position: unlabeled ones first, then the labeled ones
        self.positions = torch.as_tensor(np.concatenate([self.unlabeled, ctx.split.labeled]), device=ctx.device).long()
        self.model = nn.ModuleDict({"net": net, "state": CycleState(n_u, n_l, ctx.num_classes)}).to(ctx.device)
        # N_t's preparation-phase weights, restored by step (8): the trainable blocks and the new classifier
        self.pretext_state = {k: v.detach().clone() for k, v in self.trainable_blocks().state_dict().items()}
        self.classifier_state = {k: v.detach().clone() for k, v in net.fc.state_dict().items()}
        self.cycle_log: list[dict[str, float]] = []
        self.optimizer = self.scheduler = None
        self._stats: dict[str, Tensor] = {}

    # -- what the switches mean --------------------------------------------------------------------

    @property
    def teacher_path(self) -> Path:
        """The Mean Teacher that refine mode starts from: the param ``teacher_key`` names."""
        return getattr(self.params, self.teacher_key)

    @property
    def soft(self) -> bool:
        return self.params.labels == "soft"

    @property
    def total_steps(self) -> int:
        return self.ctx.train.epochs * self.ctx.train.steps_per_epoch

    def cycle_of(self, step: int) -> int:
        return min(step * self.params.cycles // self.total_steps, self.params.cycles - 1)

    def cycle_start(self, cycle: int) -> int:
        """The first step of ``cycle`` (the inverse of :meth:`cycle_of`)."""
        return -(-cycle * self.total_steps // self.params.cycles)

    def uses_split(self, cycle: int) -> bool:
        p = self.params
        return p.split and cycle < p.cycles - p.full_set_cycles

    def classifier(self) -> nn.Module:
        return self.model["net"]

    def trainable_blocks(self) -> nn.Module:
        """N_t without the classifier: the backbone blocks after the first K."""
        return self.model["net"].backbone.blocks[self.k:]

    @property
    def images_per_step(self) -> int:
        return self.ctx.train.batch_size + self.params.labeled_batch_size

    # -- the engine's optimiser: a fresh momentum and schedule per cycle -------------------------------------

    def bind_optimizer(self, optimizer, scheduler) -> None:
        """Called by ``engine.fit``: the schedule restarts every cycle (warm-up, then cosine over the cycle)."""
        self.optimizer, self.scheduler = optimizer, scheduler
        c = self.params.cycles
        length = max(1, self.total_steps // c)
        # the run's warm-up is shared among the cycles like its steps (a whole-run warm-up would fill a short cycle)
        train = self.ctx.train
        per_cycle = lr_lambda(train.model_copy(update={"warmup_epochs": train.warmup_epochs / c}), length)

        def f(step: int) -> float:
            return per_cycle(step - self.cycle_start(self.cycle_of(min(step, self.total_steps - 1))))

        scheduler.lr_lambdas = [f] * len(optimizer.param_groups)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * f(scheduler.last_epoch)

    # -- Algorithm 1, steps (5)-(8) -------------------------------------------------------------------------

    @torch.no_grad()
    def _features(self, indices: np.ndarray) -> Tensor:
        net = self.model["net"]
        was = net.training
        net.eval()
        out = [net.features(augment.to_float(xb))
               for xb, _ in self.ctx.store.iterate(indices, self.ctx.train.eval_batch_size)]
        net.train(was)
        return torch.cat(out)

    def fit_classifier(self) -> float:
        """Step (5): only the classification layer, full-batch cross-entropy on the labeled features."""
        ctx, p, fc = self.ctx, self.params, self.model["net"].fc
        feats = self._features(ctx.split.labeled)
        y = torch.as_tensor(ctx.data.train_y[ctx.split.labeled], device=ctx.device).long()
        opt = torch.optim.SGD(fc.parameters(), lr=p.classifier_lr, momentum=0.9)
        with torch.enable_grad():
            for _ in range(p.classifier_steps):
                # every rank fits the same layer on the same features: no gradient averaging (net=None)
                inner_step(opt, F.cross_entropy(fc(feats), y))
        fc.zero_grad(set_to_none=True)
        with torch.no_grad():
            return (fc(feats).argmax(1) == y).float().mean().item()

    def val_accuracy(self) -> float:
        if not len(self.ctx.split.val):
            return float("nan")
        logits, labels = predict_logits(self.model["net"], self.ctx.store, self.ctx.split.val,
                                        self.ctx.train.eval_batch_size)
        return topk_accuracy(logits, labels, 1)

    @torch.no_grad()
    def assign_pseudo_labels(self) -> dict[str, float]:
        """Step (6): targets of the unlabeled images (one-hot or soft), the labeled ones' true labels."""
        ctx, st = self.ctx, self.model["state"]
        logits, true = predict_logits(self.model["net"], ctx.store, self.unlabeled, ctx.train.eval_batch_size)
        probs = F.softmax(logits, 1)
        hard = probs.argmax(1)
        n_u = len(hard)
        st.targets[:n_u] = probs if self.soft else F.one_hot(hard, ctx.num_classes).float()
        y_l = torch.as_tensor(ctx.data.train_y[ctx.split.labeled], device=ctx.device).long()
        st.targets[n_u:] = F.one_hot(y_l, ctx.num_classes).float()
        changed = (hard != st.argmax).sum().item()  # every label in cycle 1 (argmax starts at -1)
        st.argmax.copy_(hard)
        return {"pseudo_changed": float(changed), "pseudo_label_accuracy": (hard == true).float().mean().item()}

    def draw_subset(self, cycle: int) -> None:
        """Step (7): a random ``subset_fraction`` of the unlabeled positions (all of them when not splitting)."""
        st = self.model["state"]
        n = len(st.active)
        if not self.uses_split(cycle):
            st.active.fill_(True)
            return
        gen = torch.Generator().manual_seed(self.ctx.train.seed * 1000 + cycle)  # own stream: reproducible per cycle
        keep = torch.randperm(n, generator=gen)[: round(self.params.subset_fraction * n)]
        st.active.zero_()
        st.active[keep.to(st.active.device)] = True

    @torch.no_grad()
    def reset_trainable(self) -> None:
        """Step (8): N_t back to the preparation-phase (or, refining, the Mean Teacher's) weights: the trainable
        blocks, and the classification layer unless ``reset_classifier`` is false."""
        self.trainable_blocks().load_state_dict(self.pretext_state)
        if self.params.reset_classifier:
            self.model["net"].fc.load_state_dict(self.classifier_state)

    def start_cycle(self, cycle: int) -> None:
        st, p = self.model["state"], self.params
        log = {"cycle": float(cycle + 1), "val_top1_before": self.val_accuracy()}
        log["phase1_labeled_top1"] = self.fit_classifier()
        log["phase1_val_top1"] = self.val_accuracy()
        log.update(self.assign_pseudo_labels())
        self.draw_subset(cycle)
        log["subset_size"] = float(st.active.sum().item())
        if p.reinit:
            self.reset_trainable()
        st.seen.zero_()
        if self.optimizer is not None:
            self.optimizer.state.clear()  # a fresh momentum: step (9) is a new training run
        st.cycle.fill_(cycle)
        self.cycle_log.append(log)
        self._stats = {k: torch.tensor(v) for k, v in log.items() if k != "val_top1_before"}

    # -- step (9) --------------------------------------------------------------------------------------------

    def training_step(self, step: int) -> dict[str, Tensor]:
        ctx, p, st = self.ctx, self.params, self.model["state"]
        cycle = self.cycle_of(step)
        if cycle > int(st.cycle):
            self.start_cycle(cycle)
        if not self._stats:  # resumed mid-cycle: the logged per-cycle numbers are not in the checkpoint
            self._stats = {"cycle": torch.tensor(float(cycle + 1))}
        active = torch.nonzero(st.active).squeeze(1)
        n_u = len(st.active)
        pos = active[torch.randint(0, len(active), (ctx.train.batch_size,), generator=ctx.generator, device=ctx.device)]
        if p.labeled_batch_size:
            lpos = torch.randint(0, len(ctx.split.labeled), (p.labeled_batch_size,), generator=ctx.generator,
                                 device=ctx.device)
            pos = torch.cat([pos, n_u + lpos])
        logits = self.model["net"](ctx.augment(ctx.store.x[self.positions[pos]]))
        pseudo = soft_cross_entropy(st.targets[pos], logits)
        seen = st.seen[pos]
        temp = temporal_kl(st.prev[pos][seen], logits[seen]) if seen.any() else logits.sum() * 0.0
        with torch.no_grad():
            st.prev[pos] = F.softmax(logits.float(), 1)
            st.seen[pos] = True
        w = p.temporal_weight if p.temporal else 0.0
        loss = w * temp + (1 - w) * pseudo
        return {"loss": loss, "loss_pseudo": pseudo, "loss_temporal": temp,
                "temporal_coverage": seen.float().mean(), **self._stats}
